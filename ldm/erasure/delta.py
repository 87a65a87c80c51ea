"""Weight deltas on the UNet's Linear layers: what every erasure method produces, behind one interface.

    y = x W^T + b + sum_n s_n[i] * delta_n(x)          delta_n(x) = x dW_n^T,  dW_n [out, in]

`DeltaLinear` *is* the nn.Linear it adapts (the same weight and bias Parameters, the same state-dict keys) and
holds named delta modules as children ("lora", "lora1", ...), so the base keys are untouched and a delta's
keys read `<module path>.<name>.<tensor>`. A delta kind is an nn.Module subclass of `Delta`:

    kind               its name in the registry and in files ("lora"); a file's metadata names a kind, never code
    forward(x)         x [..., in] -> its output [..., out] (already times its own scale alpha)
    delta_weight()     the same as a weight update [out, in], for merging
    rank               the rank it is built with (metadata; an upper bound for full-rank kinds)
    from_tensors(...)  rebuilds it from its state-dict tensors (file I/O); fit(...) checks their shapes first

s_n[i] is a per-sample scale (default 1): `adapter_scale(unet, torch.tensor([0, 0, 1, 1]))` evaluates the base
model on samples 0-1 and the adapted model on samples 2-3 in one UNet call, from one copy of the weights; a
{name: [B]} dict scales each delta on its own. `merge` folds the deltas into W; `unmerge` takes them out again.
Removing the last delta of a layer turns it back into a plain nn.Linear: the base model is restored exactly.
"""
import itertools
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

_SERIAL = itertools.count()
DELTA_KINDS: dict[str, type["Delta"]] = {}  # {kind: class}: how a file's metadata finds the class to rebuild


def register_delta(cls: type["Delta"]) -> type["Delta"]:
    """Class decorator: make a delta kind loadable from files by its `kind`."""
    if DELTA_KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"delta kind {cls.kind!r} is already registered")
    DELTA_KINDS[cls.kind] = cls
    return cls


class Delta(nn.Module):
    """One method's update of one Linear layer (in_features -> out_features). Subclasses set `kind` and
    `tensor_names` (their state-dict keys, e.g. ("A", "B")) and implement the methods below."""

    kind: str = ""
    tensor_names: tuple[str, ...] = ()

    def __init__(self, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.serial = next(_SERIAL)  # creation order: tells which of several deltas came first

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # [out, in]
        raise NotImplementedError

    @classmethod
    def fit(cls, in_features: int, out_features: int, tensors: dict[str, torch.Tensor]) -> int:
        """The rank of a delta made of `tensors` ({tensor name: tensor}) on a Linear in -> out; ValueError (with
        the reason) when they do not fit."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], alpha: float, device=None, dtype=None) -> "Delta":
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind}: rank {self.rank}, alpha {self.alpha}"


class DeltaLinear(nn.Linear):
    """An nn.Linear that shares its base weight and bias with the layer it replaces, plus named deltas."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: no copy of the base model
        self.adapter_names: list[str] = []
        self.enabled = True
        self.merged = False
        self.sample_scale: torch.Tensor | dict[str, torch.Tensor] | None = None  # [B], {name: [B]} or None

    def add_delta(self, name: str, delta: Delta) -> Delta:
        if name in self.adapter_names:
            raise ValueError(f"this layer already carries adapter {name!r}")
        if self.merged:
            raise RuntimeError("DeltaLinear: unmerge before adding an adapter")
        self.add_module(name, delta)
        self.adapter_names.append(name)
        return delta

    def remove_adapter(self, name: str) -> None:
        if self.merged:
            raise RuntimeError("DeltaLinear: unmerge before removing an adapter")
        self.adapter_names.remove(name)
        delattr(self, name)

    def adapters(self) -> dict[str, Delta]:
        return {n: getattr(self, n) for n in self.adapter_names}

    def delta_weight(self) -> torch.Tensor:
        """Sum of the deltas as a weight update [out, in]."""
        return sum(a.delta_weight() for a in self.adapters().values())

    def _scale(self, name: str) -> torch.Tensor | None:
        if isinstance(self.sample_scale, dict):
            return self.sample_scale.get(name)
        return self.sample_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, ..., in] -> [B, ..., out]
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.sample_scale is not None or not self.enabled:
                raise RuntimeError("DeltaLinear: the adapters are merged into the weight; unmerge before disabling "
                                   "them or scaling them per sample")
            return y
        if not self.enabled:
            return y
        for name, adapter in self.adapters().items():
            delta = adapter(x)                                                 # [B, ..., out]
            scale = self._scale(name)                                          # [B] or None
            if scale is not None:
                if scale.shape[0] != x.shape[0]:
                    raise RuntimeError(f"DeltaLinear: {scale.shape[0]} per-sample scales for a batch of {x.shape[0]}")
                delta = delta * scale.view(-1, *([1] * (x.dim() - 1))).to(delta.dtype)
            y = y + delta
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("DeltaLinear.merge: already merged")
        delta = self.delta_weight().to(self.weight.dtype)                      # [out, in]
        if not torch.isfinite(delta).all():
            raise RuntimeError("DeltaLinear.merge: the adapter has non-finite values; refusing to merge")
        self.weight += delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("DeltaLinear.unmerge: not merged")
        self.weight -= self.delta_weight().to(self.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}: {a.describe()}" for n, a in self.adapters().items())
        return (f"in={self.in_features}, out={self.out_features}, [{kinds}], enabled={self.enabled}, "
                f"merged={self.merged}")


def _parent(unet: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_name, _, child = path.rpartition(".")
    return (unet.get_submodule(parent_name) if parent_name else unet), child


def inject_delta(unet: nn.Module, targets: list[str], make: Callable[[str, nn.Linear], Delta],
                 name: str = "lora") -> dict[str, DeltaLinear]:
    """Give each named nn.Linear of `unet` the delta `make(path, layer)` as adapter `name` (wrapping the layer
    in a DeltaLinear when needed). `make` is called once a target, in the order of `targets`."""
    injected = {}
    for path in targets:
        parent, child = _parent(unet, path)
        layer = getattr(parent, child)
        if isinstance(layer, DeltaLinear) and name in layer.adapter_names:
            raise ValueError(f"{path} already carries adapter {name!r}")
        if not isinstance(layer, DeltaLinear) and type(layer) is not nn.Linear:
            raise ValueError(f"{path} is a {type(layer).__name__}, not an nn.Linear")
        delta = make(path, layer)
        if not isinstance(layer, DeltaLinear):
            layer = DeltaLinear(layer)
            setattr(parent, child, layer)
        layer.add_delta(name, delta)
        injected[path] = layer
    return injected


def remove_delta(unet: nn.Module, name: str | None = None) -> None:
    """Take adapter `name` (all adapters if None) out of the UNet; layers left without adapters become plain
    nn.Linear again, so the base model (or the model without that adapter) is restored exactly."""
    for path, layer in list(delta_layers(unet).items()):
        if layer.merged:
            layer.unmerge()
        for n in list(layer.adapter_names):
            if name is None or n == name:
                layer.remove_adapter(n)
        if layer.adapter_names:
            continue
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        setattr(*_parent(unet, path), plain)


def delta_layers(unet: nn.Module, name: str | None = None) -> dict[str, DeltaLinear]:
    """The adapted layers by module path (only those carrying adapter `name`, if given)."""
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, DeltaLinear) and (name is None or name in m.adapter_names)}


def adapter_names(unet: nn.Module) -> list[str]:
    """The adapters present in the UNet, in the order they were added."""
    first: dict[str, int] = {}
    for m in delta_layers(unet).values():
        for n, a in m.adapters().items():
            first[n] = min(first.get(n, a.serial), a.serial)
    return sorted(first, key=first.get)


def delta_parameters(unet: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    return [p for m in delta_layers(unet, name).values() for n, a in m.adapters().items()
            if name is None or n == name for p in a.parameters()]


def delta_kind(unet: nn.Module, name: str = "lora") -> str:
    """The kind of adapter `name` (one kind on every layer; ValueError if absent or mixed)."""
    kinds = {getattr(m, name).kind for m in delta_layers(unet, name).values()}
    if len(kinds) != 1:
        raise ValueError(f"adapter {name!r}: " + (f"mixes kinds {sorted(kinds)}" if kinds else "not in the UNet"))
    return kinds.pop()


def delta_state_dict(unet: nn.Module, name: str = "lora", keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """Adapter `name` in the file layout {"<module path>.<kind>.<tensor>": tensor}, e.g. "<path>.lora.A" [in, r];
    detached views of the adapter's tensors (the Parameters themselves with keep_vars)."""
    out = {}
    for path, m in delta_layers(unet, name).items():
        delta = getattr(m, name)
        for k, v in delta.state_dict(keep_vars=keep_vars).items():
            out[f"{path}.{delta.kind}.{k}"] = v if keep_vars else v.detach()
    return out


def set_enabled(unet: nn.Module, enabled: bool) -> None:
    for m in delta_layers(unet).values():
        m.enabled = enabled


@contextmanager
def adapters_disabled(unet: nn.Module):
    """Within the block the UNet is the base model."""
    layers = delta_layers(unet).values()
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
    layers = delta_layers(unet).values()
    for m in layers:
        m.sample_scale = scale
    try:
        yield
    finally:
        for m in layers:
            m.sample_scale = None
