"""The Stable Diffusion v1 UNet (`UNetModel`), in the CompVis layout.

    x [B, 4, h, w], t [B], context [B, 77, 768]  ->  eps [B, 4, h, w]

input_blocks.0 is the input conv; every later input block is a ResBlock
(+ SpatialTransformer at the attention resolutions) or a Downsample;
output_blocks mirror them with skip connections, ending in an Upsample at
each level change. With configs/stable-diffusion/v1-inference.yaml this is
the 859,520,964-parameter UNet of SD v1.x.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import normalization, timestep_embedding


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands emb to TimestepBlocks and context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """A 3x3 conv with stride 2."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv(dropout(SiLU(GN(h)))); return skip(x) + h."""

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


def _check_options(unused, use_spatial_transformer, context_dim, dims, num_classes, use_scale_shift_norm,
                   resblock_updown, conv_resample, num_heads, num_head_channels) -> None:
    """Only SD v1's UNet is implemented: refuse the CompVis options that would build another one."""
    if unused:
        raise ValueError(f"UNetModel: unsupported options {sorted(unused)}")
    if not use_spatial_transformer or context_dim is None:
        raise ValueError("UNetModel: only the text-conditioned SpatialTransformer UNet (SD v1) is implemented")
    if dims != 2 or num_classes is not None or use_scale_shift_norm or resblock_updown or not conv_resample:
        raise ValueError("UNetModel: dims=2, no class conditioning, no scale-shift norm, conv resampling only")
    if (num_heads == -1) == (num_head_channels == -1):
        raise ValueError("UNetModel: set exactly one of num_heads and num_head_channels")


class UNetModel(nn.Module):
    """Text-conditioned UNet. Only the options Stable Diffusion v1 uses are accepted; others fail loudly.

    attention_resolutions are downsampling factors (1, 2, 4, ...) at which a SpatialTransformer follows
    each ResBlock. num_head_channels=-1 means num_heads heads of width ch // num_heads.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions, dropout: float = 0.0, channel_mult=(1, 2, 4, 8),
                 num_heads: int = -1, num_head_channels: int = -1, use_spatial_transformer: bool = True,
                 transformer_depth: int = 1, context_dim: int | None = None, legacy: bool = False,
                 use_checkpoint: bool = False, use_fp16: bool = False, conv_resample: bool = True,
                 dims: int = 2, num_classes=None, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False, **unused):
        super().__init__()
        _check_options(unused, use_spatial_transformer, context_dim, dims, num_classes, use_scale_shift_norm,
                       resblock_updown, conv_resample, num_heads, num_head_channels)
        # use_checkpoint (gradient checkpointing), use_fp16 and legacy are accepted for config compatibility;
        # legacy=False with num_heads set gives d_head = ch // num_heads, as in SD v1.
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels = model_channels
        emb_dim = model_channels * 4

        def heads_for(ch: int) -> tuple[int, int]:
            return (num_heads, ch // num_heads) if num_head_channels == -1 else (ch // num_head_channels, num_head_channels)

        def res_and_attn(ch_in: int, ch_out: int, ds: int) -> list[nn.Module]:
            layers = [ResBlock(ch_in, emb_dim, dropout, ch_out)]
            if ds in attention_resolutions:
                n, d = heads_for(ch_out)
                layers.append(SpatialTransformer(ch_out, n, d, depth=transformer_depth, dropout=dropout,
                                                 context_dim=context_dim))
            return layers

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        skip_chans, ch, ds = self._encoder(in_channels, model_channels, channel_mult, num_res_blocks, res_and_attn)
        n, d = heads_for(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout),
            SpatialTransformer(ch, n, d, depth=transformer_depth, dropout=dropout, context_dim=context_dim),
            ResBlock(ch, emb_dim, dropout),
        )
        ch = self._decoder(skip_chans, ch, ds, model_channels, channel_mult, num_res_blocks, res_and_attn)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def _encoder(self, in_channels, model_channels, channel_mult, num_res_blocks, res_and_attn):
        """Encoder half -> (the channels of every block output, which the decoder consumes in reverse; the last
        channel count; the downsampling factor reached)."""
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(*res_and_attn(ch, mult * model_channels, ds)))
                ch = mult * model_channels
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2
        return skip_chans, ch, ds

    def _decoder(self, skip_chans, ch, ds, model_channels, channel_mult, num_res_blocks, res_and_attn) -> int:
        """Decoder half: num_res_blocks + 1 blocks per level, each eating one skip; upsample at level ends."""
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = res_and_attn(ch + skip_chans.pop(), mult * model_channels, ds)
                ch = mult * model_channels
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))  # [B, 4*mc]
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
