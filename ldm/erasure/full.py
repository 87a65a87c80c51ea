"""Full-rank deltas (the delta kind "full"): ESD's fine-tuning of whole parameters, on one copy of the base model.

    weight' = weight + D        D like the layer's weight: Linear [out, in], Conv2d [out, in/g, kh, kw],
                                GroupNorm / LayerNorm affine [C] (LayerNorm: normalized_shape)
    bias'   = bias + b          b like the layer's bias [out] / [C]; absent when the layer has no bias

Both start at zero (a fresh delta changes nothing). The layer's output moves by a term linear in (D, b), so the
per-sample scale s_i of the delta interface applies to it:

    Linear      s_i * (x D^T + b)
    Conv2d      s_i * conv(x, D, b)                       (the layer's stride, padding, dilation, groups)
    GroupNorm   s_i * (gn(x) * D + b)                     gn(x): the normalised input before the affine
    LayerNorm   s_i * (ln(x) * D + b)

Without per-sample scales the layer runs once with (W + D, b + db) (fold_in_forward), as fast as ESD's own
fine-tuned layer; with them (UnGuidance's batched base / adapted calls) it adds the scaled terms above.
The base Parameters stay frozen: adapters_disabled gives the base model (the frozen predictions of ESD's loss),
adapter_scale blends base and fine-tuned model per sample (UnGuidance), merge writes the fine-tuned weights.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.erasure.delta import Delta, inject_delta, register_delta, wrapper_for


def _normalised(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A norm layer's input normalised, before its affine (same shape as x)."""
    if isinstance(layer, nn.GroupNorm):  # GroupNorm32 computes in fp32; so does this
        return F.group_norm(x.float(), layer.num_groups, None, None, layer.eps).to(x.dtype)
    return F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)


@register_delta
class FullDelta(Delta):
    kind = "full"
    tensor_names = ("D", "b")
    optional_tensors = ("b",)
    fold_in_forward = True   # training and ESD alone: one evaluation of the layer with W + D, b + db

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, alpha: float = 1.0, device=None, dtype=None):
        shape = tuple(weight_shape)
        super().__init__(min(shape[0], int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else 1, alpha)
        self.D = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))                    # like weight
        self.b = nn.Parameter(torch.zeros(shape[0], device=device, dtype=dtype)) if bias else None  # [out]

    @classmethod
    def for_layer(cls, layer: nn.Module) -> "FullDelta":
        """A zero delta on every Parameter of `layer` (its weight, and its bias when it has one)."""
        if wrapper_for(layer) is None or getattr(layer, "weight", None) is None:
            raise ValueError(f"a full delta needs a Linear, Conv2d, GroupNorm or LayerNorm with a weight, "
                             f"not a {type(layer).__name__}")
        w = layer.weight
        return cls(tuple(w.shape), layer.bias is not None, 1.0, device=w.device, dtype=w.dtype)

    def _terms(self, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = self.D.to(dtype) * self.alpha
        return d, None if self.b is None else self.b.to(dtype) * self.alpha

    def layer_delta(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        d, b = self._terms(x.dtype)
        if isinstance(layer, nn.Linear):
            return F.linear(x, d, b)                                              # [..., in] -> [..., out]
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, d, b)                                   # [B, in, H, W] -> [B, out, ..]
        n = _normalised(x, layer)                                                 # [B, C, ...] or [..., C]
        if isinstance(layer, nn.GroupNorm):
            view = (1, -1) + (1,) * (x.dim() - 2)                                 # affine over dim 1
            return n * d.view(view) + (0 if b is None else b.view(view))
        return n * d + (0 if b is None else b)                                    # affine over the last dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a Linear's delta: [..., in] -> [..., out]
        return F.linear(x, *self._terms(x.dtype))

    def delta_weight(self) -> torch.Tensor:  # like the weight
        return self.D * self.alpha

    def merge_terms(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        terms = {"weight": self.D * self.alpha}
        if self.b is not None:
            terms["bias"] = self.b * self.alpha
        return terms

    @classmethod
    def fit_layer(cls, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> int:
        w, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        if wrapper_for(layer) is None or w is None:
            raise ValueError(f"a full delta does not fit a {type(layer).__name__}")
        d, b = tensors["D"], tensors.get("b")
        if tuple(d.shape) != tuple(w.shape):
            raise ValueError(f"D {tuple(d.shape)} does not fit a {type(layer).__name__} weight {tuple(w.shape)}")
        if b is not None and (bias is None or tuple(b.shape) != tuple(bias.shape)):
            have = "no bias" if bias is None else f"a bias {tuple(bias.shape)}"
            raise ValueError(f"b {tuple(b.shape)} does not fit a {type(layer).__name__} with {have}")
        return cls(tuple(w.shape), False, device="meta").rank

    @classmethod
    def fit(cls, in_features: int, out_features: int, tensors: dict[str, torch.Tensor]) -> int:
        return cls.fit_layer(nn.Linear(in_features, out_features, bias="b" in tensors, device="meta"), tensors)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], alpha: float, device=None, dtype=None) -> "FullDelta":
        d, b = tensors["D"], tensors.get("b")
        delta = cls(tuple(d.shape), b is not None, alpha, device, dtype)
        with torch.no_grad():
            delta.D.copy_(d)
            if b is not None:
                delta.b.copy_(b)
        return delta

    def describe(self) -> str:
        return f"full: D {tuple(self.D.shape)}" + (", b" if self.b is not None else "") + f", alpha {self.alpha}"


def inject_full(unet: nn.Module, targets: list[str], name: str = "lora") -> dict[str, nn.Module]:
    """Give every named layer a zero full delta as adapter `name` (no random draws)."""
    return inject_delta(unet, targets, lambda path, layer: FullDelta.for_layer(layer), name)
