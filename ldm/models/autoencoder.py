"""AutoencoderKL: the VAE that maps images to SD's latent space and back (keys `first_stage_model.*`)."""
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder


class DiagonalGaussianDistribution:
    """The encoder's posterior N(mean, exp(logvar)); moments [B, 2z, h, w] split along channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """encode: image [B, 3, H, W] in [-1, 1] -> posterior over z [B, embed_dim, H/f, W/f]; decode: z -> image.

    lossconfig, ckpt_path, image_key and monitor are training-time options of the CompVis config and are ignored.
    """

    def __init__(self, ddconfig: dict, embed_dim: int, lossconfig=None, ckpt_path=None, ignore_keys=(),
                 image_key: str = "image", monitor=None, colorize_nlabels=None):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs double_z: true (mean and log-variance)")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
