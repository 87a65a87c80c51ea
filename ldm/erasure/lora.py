"""Low-rank adapters (the delta kind "lora"), in the UnGuide release's parameterisation.

    y = x W^T + b + s_i * alpha * (x A B)        A [in, r] ~ N(0, 1/r),  B [r, out] = 0

A LoRA is one kind of `ldm.erasure.delta.Delta`: it sits on a `DeltaLinear` (the nn.Linear it adapts, same
weight and bias Parameters) as the child `lora`, so its keys read `<module path>.lora.A` / `.lora.B` exactly as
in the release's lora.pth. B starts at zero: a fresh adapter changes nothing. Several adapters (one per erased
concept) can sit on one layer: `lora`, `lora1`, ... (`inject_lora(..., name=...)`).

The switching, per-sample scaling, merging and removal are the delta interface's; the LoRA names below
(`LoRALinear`, `lora_layers`, `remove_lora`, ...) are the same functions under the names callers know.
"""
import math

import torch
import torch.nn as nn

from ldm.erasure.delta import (Delta, DeltaLinear, adapter_names, adapter_scale, adapters_disabled, delta_layers,
                               delta_parameters, delta_state_dict, inject_delta, register_delta, remove_delta,
                               set_enabled)

__all__ = ["LoRA", "LoRALinear", "inject_lora", "remove_lora", "lora_layers", "lora_parameters", "lora_state_dict",
           "adapter_names", "adapter_scale", "adapters_disabled", "set_enabled"]

LoRALinear = DeltaLinear          # the adapted Linear of every delta kind
remove_lora = remove_delta
lora_layers = delta_layers
lora_parameters = delta_parameters
lora_state_dict = delta_state_dict


@register_delta
class LoRA(Delta):
    kind = "lora"
    tensor_names = ("A", "B")

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None, device=None, dtype=None):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        super().__init__(rank, alpha)
        a = torch.randn(in_features, rank, generator=generator, dtype=torch.float32) / math.sqrt(rank)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))                                  # [in, r]
        self.B = nn.Parameter(torch.zeros(rank, out_features, device=device, dtype=dtype))       # [r, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.to(x.dtype)) @ self.B.to(x.dtype) * self.alpha  # [..., in] -> [..., out]

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a weight update of nn.Linear's layout [out, in]."""
        return (self.A @ self.B).T * self.alpha

    @classmethod
    def fit(cls, in_features: int, out_features: int, tensors: dict[str, torch.Tensor]) -> int:
        a, b = tensors["A"], tensors["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != in_features or b.shape[1] != out_features \
                or a.shape[1] != b.shape[0]:
            raise ValueError(f"A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a Linear "
                             f"{in_features} -> {out_features}")
        return a.shape[1]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], alpha: float, device=None, dtype=None) -> "LoRA":
        a, b = tensors["A"], tensors["B"]                                   # [in, r], [r, out]
        lora = cls(a.shape[0], b.shape[1], a.shape[1], alpha, torch.Generator(), device, dtype)  # A set below
        with torch.no_grad():
            lora.A.copy_(a)
            lora.B.copy_(b)
        return lora


def inject_lora(unet: nn.Module, targets: list[str], rank: int = 1, alpha: float = 8.0,
                generator: torch.Generator | None = None, name: str = "lora") -> dict[str, DeltaLinear]:
    """Give the named nn.Linear modules of `unet` a fresh LoRA as adapter `name` (A drawn from `generator`,
    target by target in the given order)."""
    def make(path: str, layer: nn.Module) -> LoRA:
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{path} is a {type(layer).__name__}, not an nn.Linear (a LoRA adapts Linear layers only)")
        return LoRA(layer.in_features, layer.out_features, rank, alpha, generator,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    return inject_delta(unet, targets, make, name)
