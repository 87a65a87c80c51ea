"""Low-rank adapters on the UNet's Linear layers, in the UnGuide release's parameterisation.

    y = x W^T + b + s_i * alpha * (x A B)        A [in, r] ~ N(0, 1/r),  B [r, out] = 0

`LoRALinear` *is* the nn.Linear it adapts (same weight and bias Parameters, same state-dict keys) with a
child `lora` holding A and B, so adapter keys read `<module path>.lora.A` / `.lora.B` exactly as in the
release's lora.pth, and the base keys are untouched. B starts at zero: a fresh adapter changes nothing.

s_i is a per-sample scale (default 1): with `adapter_scale(unet, torch.tensor([0, 0, 1, 1]))` one UNet call
evaluates the base model on samples 0-1 and the adapted model on samples 2-3, from one copy of the weights.
`merge` folds alpha * (A B)^T into W for adapter-free inference speed; `unmerge` takes it out again.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = rank, float(alpha)
        a = torch.randn(in_features, rank, generator=generator, dtype=torch.float32) / math.sqrt(rank)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(rank, out_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.to(x.dtype)) @ self.B.to(x.dtype) * self.alpha  # [..., in] -> [..., out]

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a weight update of nn.Linear's layout [out, in]."""
        return (self.A @ self.B).T * self.alpha


class LoRALinear(nn.Linear):
    """An nn.Linear that shares its base weight and bias with the layer it replaces, plus an adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: no copy of the base model
        self.lora = LoRA(base.in_features, base.out_features, rank, alpha, generator,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.enabled = True
        self.merged = False
        self.sample_scale: torch.Tensor | None = None  # [B] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.sample_scale is not None or not self.enabled:
                raise RuntimeError("LoRALinear: the adapter is merged into the weight; unmerge before disabling it "
                                   "or scaling it per sample")
            return y
        if not self.enabled:
            return y
        delta = self.lora(x)
        if self.sample_scale is not None:
            if self.sample_scale.shape[0] != x.shape[0]:
                raise RuntimeError(f"LoRALinear: {self.sample_scale.shape[0]} per-sample scales for a batch of "
                                   f"{x.shape[0]}")
            delta = delta * self.sample_scale.view(-1, *([1] * (x.dim() - 1))).to(delta.dtype)
        return y + delta

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        delta = self.lora.delta_weight().to(self.weight.dtype)
        if not torch.isfinite(delta).all():
            raise RuntimeError("LoRALinear.merge: the adapter has non-finite values; refusing to merge")
        self.weight += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self.weight -= self.lora.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.lora.rank}, alpha={self.lora.alpha}, "
                f"enabled={self.enabled}, merged={self.merged}")


def inject_lora(unet: nn.Module, targets: list[str], rank: int = 1, alpha: float = 8.0,
                generator: torch.Generator | None = None) -> dict[str, LoRALinear]:
    """Replace the named nn.Linear modules of `unet` by LoRALinear, in the order given; return them by name."""
    injected = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already carries an adapter")
        if type(base) is not nn.Linear:
            raise ValueError(f"{name} is a {type(base).__name__}, not an nn.Linear")
        layer = LoRALinear(base, rank, alpha, generator)
        setattr(parent, child, layer)
        injected[name] = layer
    return injected


def remove_lora(unet: nn.Module) -> None:
    """Put plain nn.Linear layers back (unmerging first), restoring the base model exactly."""
    for name, layer in list(lora_layers(unet).items()):
        if layer.merged:
            layer.unmerge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, plain)


def lora_layers(unet: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(unet).values() for p in m.lora.parameters()]


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module path>.lora.A": [in, r], "<module path>.lora.B": [r, out]} relative to the UNet (release keys)."""
    return {f"{n}.lora.{k}": v.detach() for n, m in lora_layers(unet).items() for k, v in m.lora.state_dict().items()}


def set_enabled(unet: nn.Module, enabled: bool) -> None:
    for m in lora_layers(unet).values():
        m.enabled = enabled


@contextmanager
def adapters_disabled(unet: nn.Module):
    """Within the block the UNet is the base model."""
    layers = lora_layers(unet).values()
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(layers, before):
            m.enabled = e


@contextmanager
def adapter_scale(unet: nn.Module, scale: torch.Tensor):
    """Within the block sample i of every UNet call gets its adapters' output times scale[i] ([B])."""
    layers = lora_layers(unet).values()
    for m in layers:
        m.sample_scale = scale
    try:
        yield
    finally:
        for m in layers:
            m.sample_scale = None
