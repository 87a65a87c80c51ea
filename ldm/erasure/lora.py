"""Low-rank adapters on the UNet's Linear layers, in the UnGuide release's parameterisation.

    y = x W^T + b + s_i * alpha * (x A B)        A [in, r] ~ N(0, 1/r),  B [r, out] = 0

`LoRALinear` *is* the nn.Linear it adapts (same weight and bias Parameters, same state-dict keys) with a
child `lora` holding A and B, so adapter keys read `<module path>.lora.A` / `.lora.B` exactly as in the
release's lora.pth, and the base keys are untouched. B starts at zero: a fresh adapter changes nothing.

s_i is a per-sample scale (default 1): with `adapter_scale(unet, torch.tensor([0, 0, 1, 1]))` one UNet call
evaluates the base model on samples 0-1 and the adapted model on samples 2-3, from one copy of the weights.
`merge` folds alpha * (A B)^T into W for adapter-free inference speed; `unmerge` takes it out again.

Several adapters (one per erased concept) can sit on one layer: the first is the child `lora`, further ones
`lora1`, `lora2`, ... (`inject_lora(..., name=...)`); the output adds them all, each with its own per-sample
scale when `adapter_scale` gets a {name: [B]} dict. Removing one restores exactly the model without it.
"""
import itertools
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


_SERIAL = itertools.count()


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha = rank, float(alpha)
        self.serial = next(_SERIAL)  # creation order: tells which of several adapters came first
        a = torch.randn(in_features, rank, generator=generator, dtype=torch.float32) / math.sqrt(rank)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(rank, out_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.to(x.dtype)) @ self.B.to(x.dtype) * self.alpha  # [..., in] -> [..., out]

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a weight update of nn.Linear's layout [out, in]."""
        return (self.A @ self.B).T * self.alpha


class LoRALinear(nn.Linear):
    """An nn.Linear that shares its base weight and bias with the layer it replaces, plus adapters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None,
                 name: str = "lora"):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: no copy of the base model
        self.adapter_names: list[str] = []
        self.enabled = True
        self.merged = False
        self.sample_scale: torch.Tensor | dict[str, torch.Tensor] | None = None  # [B], {name: [B]} or None
        self.add_adapter(name, rank, alpha, generator)

    def add_adapter(self, name: str, rank: int, alpha: float, generator: torch.Generator | None = None) -> LoRA:
        if name in self.adapter_names:
            raise ValueError(f"this layer already carries adapter {name!r}")
        if self.merged:
            raise RuntimeError("LoRALinear: unmerge before adding an adapter")
        adapter = LoRA(self.in_features, self.out_features, rank, alpha, generator,
                       device=self.weight.device, dtype=self.weight.dtype)
        self.add_module(name, adapter)
        self.adapter_names.append(name)
        return adapter

    def remove_adapter(self, name: str) -> None:
        if self.merged:
            raise RuntimeError("LoRALinear: unmerge before removing an adapter")
        self.adapter_names.remove(name)
        delattr(self, name)

    def adapters(self) -> dict[str, LoRA]:
        return {n: getattr(self, n) for n in self.adapter_names}

    def delta_weight(self) -> torch.Tensor:
        """Sum of the adapters as a weight update [out, in]."""
        return sum(a.delta_weight() for a in self.adapters().values())

    def _scale(self, name: str) -> torch.Tensor | None:
        if isinstance(self.sample_scale, dict):
            return self.sample_scale.get(name)
        return self.sample_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.sample_scale is not None or not self.enabled:
                raise RuntimeError("LoRALinear: the adapters are merged into the weight; unmerge before disabling "
                                   "them or scaling them per sample")
            return y
        if not self.enabled:
            return y
        for name, adapter in self.adapters().items():
            delta = adapter(x)
            scale = self._scale(name)
            if scale is not None:
                if scale.shape[0] != x.shape[0]:
                    raise RuntimeError(f"LoRALinear: {scale.shape[0]} per-sample scales for a batch of {x.shape[0]}")
                delta = delta * scale.view(-1, *([1] * (x.dim() - 1))).to(delta.dtype)
            y = y + delta
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        delta = self.delta_weight().to(self.weight.dtype)
        if not torch.isfinite(delta).all():
            raise RuntimeError("LoRALinear.merge: the adapter has non-finite values; refusing to merge")
        self.weight += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: rank {a.rank}, alpha {a.alpha}" for n, a in self.adapters().items())
        return (f"in={self.in_features}, out={self.out_features}, [{ranks}], enabled={self.enabled}, "
                f"merged={self.merged}")


def inject_lora(unet: nn.Module, targets: list[str], rank: int = 1, alpha: float = 8.0,
                generator: torch.Generator | None = None, name: str = "lora") -> dict[str, LoRALinear]:
    """Give the named nn.Linear modules of `unet` adapter `name` (wrapping them in LoRALinear when needed)."""
    injected = {}
    for path in targets:
        parent_name, _, child = path.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        layer = getattr(parent, child)
        if isinstance(layer, LoRALinear):
            if name in layer.adapter_names:
                raise ValueError(f"{path} already carries adapter {name!r}")
            layer.add_adapter(name, rank, alpha, generator)
        elif type(layer) is nn.Linear:
            layer = LoRALinear(layer, rank, alpha, generator, name=name)
            setattr(parent, child, layer)
        else:
            raise ValueError(f"{path} is a {type(layer).__name__}, not an nn.Linear")
        injected[path] = layer
    return injected


def remove_lora(unet: nn.Module, name: str | None = None) -> None:
    """Take adapter `name` (all adapters if None) out of the UNet; layers left without adapters become plain
    nn.Linear again, so the base model (or the model without that adapter) is restored exactly."""
    for path, layer in list(lora_layers(unet).items()):
        if layer.merged:
            layer.unmerge()
        for n in list(layer.adapter_names):
            if name is None or n == name:
                layer.remove_adapter(n)
        if layer.adapter_names:
            continue
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, child = path.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, child, plain)


def lora_layers(unet: nn.Module, name: str | None = None) -> dict[str, LoRALinear]:
    """The adapted layers by module path (only those carrying adapter `name`, if given)."""
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, LoRALinear) and (name is None or name in m.adapter_names)}


def adapter_names(unet: nn.Module) -> list[str]:
    """The adapters present in the UNet, in the order they were added."""
    first: dict[str, int] = {}
    for m in lora_layers(unet).values():
        for n, a in m.adapters().items():
            first[n] = min(first.get(n, a.serial), a.serial)
    return sorted(first, key=first.get)


def lora_parameters(unet: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    return [p for m in lora_layers(unet, name).values() for n, a in m.adapters().items()
            if name is None or n == name for p in a.parameters()]


def lora_state_dict(unet: nn.Module, name: str = "lora") -> dict[str, torch.Tensor]:
    """Adapter `name` in the file layout: {"<module path>.lora.A": [in, r], "<module path>.lora.B": [r, out]}."""
    return {f"{path}.lora.{k}": v.detach() for path, m in lora_layers(unet, name).items()
            for k, v in getattr(m, name).state_dict().items()}


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
def adapter_scale(unet: nn.Module, scale: torch.Tensor | dict[str, torch.Tensor]):
    """Within the block sample i of every UNet call gets its adapters' output times scale[i] ([B]), or, with a
    {name: [B]} dict, adapter `name`'s output times scale[name][i] (adapters not in the dict: scale 1)."""
    layers = lora_layers(unet).values()
    for m in layers:
        m.sample_scale = scale
    try:
        yield
    finally:
        for m in layers:
            m.sample_scale = None
