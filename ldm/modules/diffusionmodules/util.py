"""Small building blocks shared by the UNet and the transformer blocks."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as Stable Diffusion does under fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # weights cast too: CPU kernels refuse mixed dtypes
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """The UNet's GroupNorm: 32 groups. ResBlocks use eps 1e-5 (PyTorch's default), SpatialTransformer 1e-6."""
    return GroupNorm32(32, channels, eps=eps)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer (or fractional) timesteps.

    timesteps: [B] -> [B, dim] laid out as [cos(t * f_0..f_{h-1}), sin(t * f_0..f_{h-1})],
    with h = dim // 2 and f_i = max_period ** (-i / h).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # [B, h]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
