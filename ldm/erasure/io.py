"""Adapter files: ours (.safetensors with metadata) and the UnGuide release's lora.pth, through one loader.

Keys in both: "<module path>.lora.A" [in, r] and "<module path>.lora.B" [r, out], paths relative to the UNet
(`model.model.diffusion_model`). Our metadata: format, rank, alpha, targets, the base checkpoint's file hash
and a fingerprint of the base weights the adapter sits on (checked at load time: an adapter trained on
another base model is refused). A release lora.pth carries no metadata: alpha comes from the caller
(the release always used 8), and there is nothing to check the base model against.
"""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.erasure.lora import LoRALinear, inject_lora, lora_layers, lora_state_dict
from ldm.errors import UserError

FORMAT = "unguide-lora/1"
RELEASE_ALPHA = 8.0


@dataclass
class AdapterInfo:
    path: str
    rank: int
    alpha: float
    targets: list[str]
    fmt: str                      # FORMAT or "release-pth"
    base_sha256: str | None = None
    metadata: dict = field(default_factory=dict)
    name: str = "lora"            # the adapter's name inside the model (several adapters can share one model)


def base_fingerprint(unet: nn.Module, targets: list[str]) -> list[float]:
    """Mean |w| of the first and last targeted base weights: tells base models apart, whatever dtype or file."""
    def base_weight(name: str) -> torch.Tensor:
        m = unet.get_submodule(name)
        w = m.weight.detach().float()
        return w - m.delta_weight().detach().float() if isinstance(m, LoRALinear) and m.merged else w
    picks = [targets[0], targets[-1]] if targets else []
    return [round(float(base_weight(n).abs().mean()), 6) for n in picks]


def save_adapter(path: str | Path, unet: nn.Module, alpha: float, base_sha256: str | None = None,
                 extra: dict | None = None, name: str = "lora") -> None:
    """Write the UNet's adapter `name` to `path` (.safetensors, or .pth for the release's format), atomically."""
    layers = lora_layers(unet, name)
    if not layers:
        raise ValueError(f"save_adapter: the UNet has no adapter {name!r}")
    targets = list(layers)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet, name).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".pth":
        torch.save(tensors, tmp)
    else:
        ranks = {getattr(m, name).rank for m in layers.values()}
        meta = {"format": FORMAT, "rank": str(max(ranks)), "alpha": repr(float(alpha)),
                "targets": json.dumps(targets), "base_fingerprint": json.dumps(base_fingerprint(unet, targets)),
                "base_sha256": base_sha256 or ""}
        meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
        save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file, without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: adapter file not found" if not path.exists() else f"{path}: is not a file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError ...
        raise UserError(f"{path}: not a readable adapter file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: expected a dict of tensors (release lora.pth format)")
    return sd, {}


def validate_adapter_tensors(path: Path, tensors: dict[str, torch.Tensor], unet: nn.Module) -> dict[str, int]:
    """Validate every key against the UNet; return {module path: rank}."""
    modules = dict(unet.named_modules())
    ranks = {}
    for key in tensors:
        name, sep, which = key.rpartition(".lora.")
        if not sep or which not in ("A", "B"):
            raise UserError(f"{path}: key {key!r} is not of the form <module>.lora.A / <module>.lora.B")
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise UserError(f"{path}: {name!r} is not a Linear layer of this UNet (an adapter for another model?)")
        ranks[name] = None
    for name in ranks:
        a, b = tensors.get(f"{name}.lora.A"), tensors.get(f"{name}.lora.B")
        if a is None or b is None:
            raise UserError(f"{path}: {name} has only one of lora.A / lora.B")
        layer = modules[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != layer.in_features or b.shape[1] != layer.out_features \
                or a.shape[1] != b.shape[0]:
            raise UserError(f"{path}: {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a Linear "
                            f"{layer.in_features} -> {layer.out_features} (an adapter for another base model?)")
        ranks[name] = a.shape[1]
    return ranks


def load_adapter(path: str | Path, unet: nn.Module, alpha: float | None = None, name: str = "lora") -> AdapterInfo:
    """Inject the adapter of `path` into `unet` as adapter `name` (LoRALinear on its layers) and load its weights.

    alpha: the scale for a release lora.pth (default 8, as the release); for our files the stored alpha is
    used unless given. Refuses files whose keys or shapes do not fit this UNet, and ours whose recorded base
    weights differ from the UNet's.
    """
    path = Path(path)
    tensors, meta = read_adapter(path)
    if not tensors:
        raise UserError(f"{path}: holds no adapter tensors")
    if lora_layers(unet, name):
        raise UserError(f"{path}: the model already carries an adapter named {name!r}")
    ranks = validate_adapter_tensors(path, tensors, unet)
    targets = list(ranks)
    fmt = meta.get("format", "release-pth" if path.suffix != ".safetensors" else "safetensors")
    if meta.get("base_fingerprint"):
        want = json.loads(meta["base_fingerprint"])
        have = base_fingerprint(unet, json.loads(meta.get("targets", "[]")) or targets)
        if len(want) != len(have) or any(abs(w - h) > 1e-3 * max(abs(w), 1e-8) for w, h in zip(want, have)):
            raise UserError(f"{path}: trained on another base model (base weights fingerprint {want}, "
                            f"this model {have})")
    alpha = float(alpha if alpha is not None else meta.get("alpha", RELEASE_ALPHA))
    by_rank: dict[int, list[str]] = {}
    for target, r in ranks.items():
        by_rank.setdefault(r, []).append(target)
    for r, names in by_rank.items():
        inject_lora(unet, names, rank=r, alpha=alpha, generator=torch.Generator(), name=name)  # A set below
    layers = lora_layers(unet, name)
    with torch.no_grad():
        for target in targets:
            adapter = getattr(layers[target], name)
            adapter.A.copy_(tensors[f"{target}.lora.A"])
            adapter.B.copy_(tensors[f"{target}.lora.B"])
    return AdapterInfo(str(path), max(ranks.values()), alpha, targets, fmt, meta.get("base_sha256") or None, meta,
                       name)
