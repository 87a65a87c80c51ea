"""Weight deltas on the UNet's layers: what every erasure method produces, behind one interface.

    y = layer(x) + sum_n s_n[i] * delta_n(x)           Linear: delta_n(x) = x dW_n^T,  dW_n [out, in]

Layer types: nn.Linear (DeltaLinear), nn.Conv2d (DeltaConv2d), nn.GroupNorm / GroupNorm32 (DeltaGroupNorm) and
nn.LayerNorm (DeltaLayerNorm); every delta is linear in its tensors, so a per-sample scale multiplies its output.
A kind says which layers it fits (`fit_layer`), its output on a layer (`layer_delta`) and its update of the
layer's Parameters (`merge_terms`); LoRA adapts Linear layers only, the "full" kind (ldm/erasure/full.py) all four.

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
Removing the last delta of a layer turns it back into its plain class: the base model is restored exactly.
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
    optional_tensors: tuple[str, ...] = ()   # tensor names a layer may lack (a bias delta on a bias-free layer)
    fold_in_forward: bool = False            # True: without per-sample scales, forward with W + dW (one evaluation)

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

    # -- layer types beyond nn.Linear (defaults: a Linear-only kind such as LoRA) -------------------------
    @classmethod
    def fit_layer(cls, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
        """fit() for any layer: the rank of a delta of `tensors` on `layer`, ValueError when they do not fit."""
        if type(layer) is not nn.Linear and not isinstance(layer, DeltaLinear):
            raise ValueError(f"a {cls.kind!r} delta adapts Linear layers only, not a {type(layer).__name__}")
        return cls.fit(layer.in_features, layer.out_features, tensors)

    def layer_delta(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """The delta's contribution to `layer`'s output for input x (the output's shape)."""
        return self(x)

    def merge_terms(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """{base Parameter name: its update}, what merging adds to the layer's Parameters."""
        return {"weight": self.delta_weight()}

    def describe(self) -> str:
        return f"{self.kind}: rank {self.rank}, alpha {self.alpha}"


def _layer_attributes(layer: nn.Module) -> dict:
    """A layer's plain attributes (in_features, stride, eps, training, ...), not nn.Module's bookkeeping."""
    return {k: v for k, v in layer.__dict__.items() if not k.startswith("_") or k == "_reversed_padding_repeated_twice"}


class DeltaLayer:
    """The adapter bookkeeping shared by every adapted layer type (mixed into DeltaLinear, DeltaConv2d, ...):
    named deltas as children, switched on/off, scaled per sample, merged into the base Parameters.
    A subclass sets `base_type` and `_base_forward` (the plain layer's output with the given weight and bias)."""

    base_type: type = nn.Module  # subclasses define _base_forward(x, weight, bias): the plain layer's output

    def _adopt(self, base: nn.Module) -> None:
        """Take over `base`'s attributes and its Parameters (the same objects: no copy of the base model)."""
        self.__dict__.update(_layer_attributes(base))
        for k, v in base._parameters.items():
            self.register_parameter(k, v)
        self.__dict__["_original_class"] = type(base)  # restored by remove_delta (GroupNorm32 stays GroupNorm32)
        self.adapter_names: list[str] = []
        self.enabled = True
        self.merged = False
        self.sample_scale: torch.Tensor | dict[str, torch.Tensor] | None = None  # [B], {name: [B]} or None

    def add_delta(self, name: str, delta: "Delta") -> "Delta":
        if name in self.adapter_names:
            raise ValueError(f"this layer already carries adapter {name!r}")
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}: unmerge before adding an adapter")
        self.add_module(name, delta)
        self.adapter_names.append(name)
        return delta

    def remove_adapter(self, name: str) -> None:
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}: unmerge before removing an adapter")
        self.adapter_names.remove(name)
        delattr(self, name)

    def adapters(self) -> dict[str, "Delta"]:
        return {n: getattr(self, n) for n in self.adapter_names}

    def delta_weight(self) -> torch.Tensor:
        """Sum of the deltas as a weight update (the weight's shape, e.g. [out, in])."""
        return sum(a.merge_terms(self)["weight"] for a in self.adapters().values())

    def _scale(self, name: str) -> torch.Tensor | None:
        if isinstance(self.sample_scale, dict):
            return self.sample_scale.get(name)
        return self.sample_scale

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W + sum dW, b + sum db) when every delta folds into the weights (full-rank kinds) and no per-sample
        scale is set: then one layer evaluation with these weights replaces base + delta evaluations."""
        adapters = self.adapters().values()
        if self.merged or not self.enabled or self.sample_scale is not None or not adapters \
                or not all(a.fold_in_forward for a in adapters):
            return None
        weight, bias = self.weight, self.bias
        for a in adapters:
            terms = a.merge_terms(self)
            weight = weight + terms["weight"].to(weight.dtype).view_as(weight)
            if "bias" in terms:
                bias = bias + terms["bias"].to(bias.dtype)
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B, ...]
        folded = self._folded()
        if folded is not None:
            return self._base_forward(x, *folded)
        y = self._base_forward(x, self.weight, self.bias)
        if self.merged:
            if self.sample_scale is not None or not self.enabled:
                raise RuntimeError(f"{type(self).__name__}: the adapters are merged into the weight; unmerge "
                                   "before disabling them or scaling them per sample")
            return y
        if not self.enabled:
            return y
        for name, adapter in self.adapters().items():
            delta = adapter.layer_delta(x, self)                               # y's shape [B, ...]
            scale = self._scale(name)                                          # [B] or None
            if scale is not None:
                if scale.shape[0] != x.shape[0]:
                    raise RuntimeError(f"{type(self).__name__}: {scale.shape[0]} per-sample scales for a batch "
                                       f"of {x.shape[0]}")
                delta = delta * scale.view(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
            y = y + delta.to(y.dtype)
        return y

    def _apply_terms(self, sign: float) -> None:
        for adapter in self.adapters().values():
            for pname, d in adapter.merge_terms(self).items():   # {"weight": like weight, "bias": like bias}
                param = getattr(self, pname)
                param += sign * d.to(param.dtype).view_as(param)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge: already merged")
        for adapter in self.adapters().values():
            if not all(torch.isfinite(d).all() for d in adapter.merge_terms(self).values()):
                raise RuntimeError(f"{type(self).__name__}.merge: the adapter has non-finite values; refusing "
                                   "to merge")
        self._apply_terms(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: not merged")
        self._apply_terms(-1.0)
        self.merged = False

    def restored(self) -> nn.Module:
        """The plain layer again (its original class), on the same Parameters."""
        plain = self._original_class.__new__(self._original_class)
        nn.Module.__init__(plain)
        mine = ("adapter_names", "enabled", "merged", "sample_scale")
        plain.__dict__.update({k: v for k, v in _layer_attributes(self).items() if k not in mine})
        for k, v in self._parameters.items():
            plain.register_parameter(k, v)
        return plain

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}: {a.describe()}" for n, a in self.adapters().items())
        return f"{self.base_type.extra_repr(self)}, [{kinds}], enabled={self.enabled}, merged={self.merged}"


class DeltaLinear(DeltaLayer, nn.Linear):
    """An nn.Linear that shares its base weight and bias with the layer it replaces, plus named deltas."""

    base_type = nn.Linear

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self._adopt(base)

    def _base_forward(self, x, weight, bias) -> torch.Tensor:  # [B, ..., in] -> [B, ..., out]
        return F.linear(x, weight, bias)


class DeltaConv2d(DeltaLayer, nn.Conv2d):
    """An nn.Conv2d (weight [out, in/groups, kh, kw]) sharing its Parameters, plus named deltas."""

    base_type = nn.Conv2d

    def __init__(self, base: nn.Conv2d):
        nn.Module.__init__(self)
        self._adopt(base)

    def _base_forward(self, x, weight, bias) -> torch.Tensor:  # [B, in, H, W] -> [B, out, H', W']
        return self._conv_forward(x, weight, bias)


class DeltaGroupNorm(DeltaLayer, nn.GroupNorm):
    """An nn.GroupNorm (or GroupNorm32: computed in fp32) sharing its affine Parameters [C], plus named deltas."""

    base_type = nn.GroupNorm

    def __init__(self, base: nn.GroupNorm):
        nn.Module.__init__(self)
        self._adopt(base)

    def _base_forward(self, x, weight, bias) -> torch.Tensor:  # [B, C, ...] -> [B, C, ...]
        if self._original_class is nn.GroupNorm:
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        weight, bias = (None if p is None else p.float() for p in (weight, bias))  # GroupNorm32: in fp32
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class DeltaLayerNorm(DeltaLayer, nn.LayerNorm):
    """An nn.LayerNorm sharing its affine Parameters [*normalized_shape], plus named deltas."""

    base_type = nn.LayerNorm

    def __init__(self, base: nn.LayerNorm):
        nn.Module.__init__(self)
        self._adopt(base)

    def _base_forward(self, x, weight, bias) -> torch.Tensor:  # [B, ..., C] -> [B, ..., C]
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


# {base layer class: its adapted class}; subclasses of these (GroupNorm32) use their base's wrapper
WRAPPERS: dict[type, type[DeltaLayer]] = {nn.Linear: DeltaLinear, nn.Conv2d: DeltaConv2d,
                                           nn.GroupNorm: DeltaGroupNorm, nn.LayerNorm: DeltaLayerNorm}


def wrapper_for(layer: nn.Module) -> type[DeltaLayer] | None:
    """The adapted class for `layer` (None when its type cannot carry deltas)."""
    if isinstance(layer, DeltaLayer):
        return type(layer)
    if type(layer) in WRAPPERS:  # exact types: a Linear subclass may compute something else
        return WRAPPERS[type(layer)]
    return DeltaGroupNorm if isinstance(layer, nn.GroupNorm) else None  # GroupNorm32: forward kept


def _parent(unet: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_name, _, child = path.rpartition(".")
    return (unet.get_submodule(parent_name) if parent_name else unet), child


def inject_delta(unet: nn.Module, targets: list[str], make: Callable[[str, nn.Module], Delta],
                 name: str = "lora") -> dict[str, DeltaLayer]:
    """Give each named layer of `unet` (nn.Linear, nn.Conv2d, nn.GroupNorm or nn.LayerNorm) the delta
    `make(path, layer)` as adapter `name` (wrapping the layer in its DeltaLayer class when needed). `make` is
    called once a target, in the order of `targets`, and may refuse a layer type with ValueError."""
    injected = {}
    for path in targets:
        parent, child = _parent(unet, path)
        layer = getattr(parent, child)
        if isinstance(layer, DeltaLayer) and name in layer.adapter_names:
            raise ValueError(f"{path} already carries adapter {name!r}")
        wrapper = wrapper_for(layer)
        if wrapper is None:
            raise ValueError(f"{path} is a {type(layer).__name__}, not a layer that carries deltas "
                             f"({', '.join(t.__name__ for t in WRAPPERS)})")
        delta = make(path, layer)
        if not isinstance(layer, DeltaLayer):
            layer = wrapper(layer)
            setattr(parent, child, layer)
        layer.add_delta(name, delta)
        injected[path] = layer
    return injected


def remove_delta(unet: nn.Module, name: str | None = None) -> None:
    """Take adapter `name` (all adapters if None) out of the UNet; layers left without adapters become their
    plain class again, so the base model (or the model without that adapter) is restored exactly."""
    for path, layer in list(delta_layers(unet).items()):
        if layer.merged:
            layer.unmerge()
        for n in list(layer.adapter_names):
            if name is None or n == name:
                layer.remove_adapter(n)
        if not layer.adapter_names:
            setattr(*_parent(unet, path), layer.restored())


@torch.no_grad()
def bake(unet: nn.Module) -> None:
    """Fold every delta into the base Parameters for good and return the layers to their plain class: the UNet
    becomes the fine-tuned model, without adapter keys (merged exports)."""
    for path, layer in list(delta_layers(unet).items()):
        if not layer.merged:
            layer.merge()
        setattr(*_parent(unet, path), layer.restored())


def delta_layers(unet: nn.Module, name: str | None = None) -> dict[str, DeltaLayer]:
    """The adapted layers by module path (only those carrying adapter `name`, if given)."""
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, DeltaLayer) and (name is None or name in m.adapter_names)}


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
