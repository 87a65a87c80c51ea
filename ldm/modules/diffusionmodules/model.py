"""The autoencoder's convolutional Encoder and Decoder (CompVis layout: down.{i}.block.{j}, mid.attn_1, up.{i}...).

Encoder: image [B, 3, H, W] -> moments [B, 2*z, H/f, W/f]  (f = 2 ** (len(ch_mult) - 1))
Decoder: latent [B, z, H/f, W/f] -> image [B, 3, H, W]
All GroupNorms here use 32 groups and eps 1e-6.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convs as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (m(hn).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom), then a 3x3 conv with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_plain(attn_resolutions, attn_type: str = "vanilla") -> None:
    if list(attn_resolutions) or attn_type != "vanilla":
        raise ValueError("autoencoder: only attn_resolutions=[] with vanilla attention (SD v1) is implemented")


class Encoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int, attn_resolutions=(),
                 dropout: float = 0.0, in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 attn_type: str = "vanilla", resamp_with_conv: bool = True):
        super().__init__()
        _check_plain(attn_resolutions, attn_type)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        chans = [ch] + [ch * m for m in ch_mult]
        for level in range(len(ch_mult)):
            stage = nn.Module()
            stage.block = nn.ModuleList([ResnetBlock(chans[level] if j == 0 else chans[level + 1], chans[level + 1], dropout)
                                         for j in range(num_res_blocks)])
            stage.attn = nn.ModuleList()
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(chans[level + 1])
            self.down.append(stage)
        top = chans[-1]
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(top, top, dropout)
        self.mid.attn_1 = AttnBlock(top)
        self.mid.block_2 = ResnetBlock(top, top, dropout)
        self.norm_out = Normalize(top)
        self.conv_out = nn.Conv2d(top, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, out_ch: int, ch_mult=(1, 2, 4, 8), num_res_blocks: int, attn_resolutions=(),
                 dropout: float = 0.0, in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 attn_type: str = "vanilla", resamp_with_conv: bool = True, give_pre_end: bool = False,
                 tanh_out: bool = False):
        super().__init__()
        _check_plain(attn_resolutions, attn_type)
        if give_pre_end or tanh_out:
            raise ValueError("Decoder: give_pre_end and tanh_out are not supported")
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(top, top, dropout)
        self.mid.attn_1 = AttnBlock(top)
        self.mid.block_2 = ResnetBlock(top, top, dropout)
        # up[i] works at the resolution of down[i]; it is built (and run) from the coarsest level down.
        self.up = nn.ModuleList([nn.Module() for _ in ch_mult])
        block_in = top
        for level in reversed(range(len(ch_mult))):
            stage, block_out = self.up[level], ch * ch_mult[level]
            stage.block = nn.ModuleList([ResnetBlock(block_in if j == 0 else block_out, block_out, dropout)
                                         for j in range(num_res_blocks + 1)])
            stage.attn = nn.ModuleList()
            if level != 0:
                stage.upsample = Upsample(block_out)
            block_in = block_out
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
