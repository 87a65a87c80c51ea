"""Adapter files: ours (.safetensors with metadata) and the UnGuide release's lora.pth, through one loader.

Keys: "<module path>.<kind>.<tensor>", paths relative to the UNet (`model.model.diffusion_model`); for a LoRA
(the kind "lora", the only one the release knows) "<path>.lora.A" [in, r] and "<path>.lora.B" [r, out].
Our metadata: format, delta_kind (absent: "lora"), rank, alpha, targets, the base checkpoint's file hash and a
fingerprint of the base weights the adapter sits on (checked at load time: an adapter trained on another base
model is refused); from train.py also its settings, status, the erasure check's verdict and "calibration" (the
stability test's threshold learned at the end of training, with the test's settings: stored_calibration). The
kind names a class of the registry `ldm.erasure.delta.DELTA_KINDS`, never code.
A release lora.pth carries no metadata: it is a LoRA, alpha comes from the caller (the release always used 8),
and there is nothing to check the base model against.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

import ldm.erasure.full  # noqa: F401  (registers the kind "full")
import ldm.erasure.lora  # noqa: F401  (registers the kind "lora")
import ldm.erasure.sepce  # noqa: F401  (registers the kind "basis")
from ldm.erasure.delta import (DELTA_KINDS, Delta, DeltaLayer, delta_kind, delta_layers, delta_state_dict,
                               inject_delta, wrapper_for)
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
    kind: str = "lora"            # the delta kind (a key of DELTA_KINDS)


def base_fingerprint(unet: nn.Module, targets: list[str]) -> list[float]:
    """Mean |w| of the first and last targeted base weights: tells base models apart, whatever dtype or file."""
    def base_weight(name: str) -> torch.Tensor:
        m = unet.get_submodule(name)
        w = m.weight.detach().float()
        return w - m.delta_weight().detach().float() if isinstance(m, DeltaLayer) and m.merged else w
    picks = [targets[0], targets[-1]] if targets else []
    return [round(float(base_weight(n).abs().mean()), 6) for n in picks]


def _metadata(unet: nn.Module, name: str, alpha: float, base_sha256: str | None, extra: dict | None) -> dict:
    layers = delta_layers(unet, name)
    targets = list(layers)
    meta = {"format": FORMAT, "delta_kind": delta_kind(unet, name),
            "rank": str(max(getattr(m, name).rank for m in layers.values())), "alpha": repr(float(alpha)),
            "targets": json.dumps(targets), "base_fingerprint": json.dumps(base_fingerprint(unet, targets)),
            "base_sha256": base_sha256 or ""}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return meta


def save_adapter(path: str | Path, unet: nn.Module, alpha: float, base_sha256: str | None = None,
                 extra: dict | None = None, name: str = "lora") -> None:
    """Write the UNet's adapter `name` to `path` (.safetensors, or .pth for the release's format), atomically."""
    if not delta_layers(unet, name):
        raise ValueError(f"save_adapter: the UNet has no adapter {name!r}")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in delta_state_dict(unet, name).items()}
    path = Path(path)
    if path.suffix == ".pth" and delta_kind(unet, name) != "lora":
        raise ValueError(f"save_adapter: the release's .pth format holds LoRA adapters only; {name!r} is a "
                         f"{delta_kind(unet, name)!r} delta (write .safetensors)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".pth":
        torch.save(tensors, tmp)
    else:
        tmp.write_bytes(safetensors_bytes(tensors, _metadata(unet, name, alpha, base_sha256, extra)))
    os.replace(tmp, path)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose header lists metadata and tensors in sorted order: the same tensors and metadata
    give the same bytes, whatever order the dicts were built in or the library serialises maps in."""
    raw = save({k: tensors[k] for k in sorted(tensors)}, metadata=dict(sorted(metadata.items())))
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes; data offsets are header-relative
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


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


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an adapter file without reading its tensors ({} for a release .pth or a missing file: the
    loader says what is wrong with those)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}")


def stored_calibration(path: str | Path, meta: dict[str, str] | None = None) -> dict | None:
    """The calibration train.py stored in the adapter (metadata "calibration": ldm.erasure.calibration.measure's
    record), or None; UserError naming the file when the field is there but not a calibration."""
    text = (read_metadata(path) if meta is None else meta).get("calibration")
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    t = value.get("threshold") if isinstance(value, dict) else None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise UserError(f"{path}: metadata 'calibration' holds no positive threshold: {text[:80]!r}")
    return value


def delta_class(path: Path, meta: dict[str, str]) -> type[Delta]:
    """The registered class of the file's delta kind (metadata "delta_kind"; "lora" when absent)."""
    kind = meta.get("delta_kind", "lora")
    if kind not in DELTA_KINDS:
        raise UserError(f"{path}: delta kind {kind!r} is not one of this toolkit's ({', '.join(DELTA_KINDS)})")
    return DELTA_KINDS[kind]


def _split_keys(path: Path, tensors: dict[str, torch.Tensor], cls: type[Delta],
                modules: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {tensor name: tensor}}, every key checked to read <layer path>.<kind>.<tensor name>."""
    form = " / ".join(f"<module>.{cls.kind}.{t}" for t in cls.tensor_names)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, sep, which = key.rpartition(f".{cls.kind}.")
        if not sep or which not in cls.tensor_names:
            raise UserError(f"{path}: key {key!r} is not of the form {form}")
        if name not in modules or wrapper_for(modules[name]) is None:
            raise UserError(f"{path}: {name!r} is not a Linear layer of this UNet, nor a Conv2d or norm layer "
                            "(an adapter for another model?)")
        if value.numel() == 0:
            raise UserError(f"{path}: {key} is empty (shape {tuple(value.shape)}: rank 0, an adapter that adapts "
                            "nothing)")
        if not torch.is_floating_point(value) or not torch.isfinite(value).all():
            raise UserError(f"{path}: {key} holds non-finite values (NaN or inf)" if torch.is_floating_point(value)
                            else f"{path}: {key} is not a floating-point tensor ({value.dtype})")
        by_module.setdefault(name, {})[which] = value
    required = set(cls.tensor_names) - set(cls.optional_tensors)
    for name, parts in by_module.items():
        if not required <= set(parts):
            have = "only one of" if len(parts) == 1 else "only some of"
            raise UserError(f"{path}: {name} has {have} {' / '.join(f'{cls.kind}.{t}' for t in cls.tensor_names)}")
    return by_module


def validate_adapter_tensors(path: Path, tensors: dict[str, torch.Tensor], unet: nn.Module,
                             cls: type[Delta] | None = None) -> dict[str, int]:
    """Validate every key and shape against the UNet (for the kind `cls`, default LoRA); return {module path: rank}."""
    cls = cls or DELTA_KINDS["lora"]
    modules = dict(unet.named_modules())
    ranks = {}
    for name, parts in _split_keys(path, tensors, cls, modules).items():
        try:
            ranks[name] = cls.fit_layer(modules[name], parts)
        except ValueError as exc:
            raise UserError(f"{path}: {name}: {exc} (an adapter for another base model?)")
    return ranks


def _meta_json(path: Path, meta: dict[str, str], key: str, item: tuple[type, ...], what: str) -> list:
    """Metadata field `key`: a JSON list of `item` values ([] when absent); UserError naming the file and field."""
    text = meta.get(key) or "[]"
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
        raise UserError(f"{path}: metadata {key!r} is not a JSON list of {what}: {text[:60]!r}")
    return value


def checked_alpha(path: Path, meta: dict[str, str], alpha: float | None, ranks: dict[str, int],
                      kind: str) -> float:
    """The adapter's alpha (given, else the metadata's, else the release's 8), checked finite and > 0, and the
    metadata's rank checked: a positive integer, for a LoRA the rank of its tensors."""
    source = "alpha given for it" if alpha is not None else "metadata 'alpha'"
    text = alpha if alpha is not None else meta.get("alpha", RELEASE_ALPHA)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {source} {text!r} is not a number")
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{path}: {source} is {text!r}; it must be a finite number > 0")
    if "rank" in meta:
        rank = meta["rank"].strip()
        if not rank.isdigit() or int(rank) < 1:
            raise UserError(f"{path}: metadata 'rank' {meta['rank']!r} is not a positive integer")
        if kind == "lora" and int(rank) != max(ranks.values()):
            raise UserError(f"{path}: metadata 'rank' {rank} but its tensors have rank {max(ranks.values())}")
    return value


def _check_layer_set(path: Path, meta: dict[str, str], targets: list[str]) -> None:
    """The file's tensors cover exactly the layers its metadata lists (a file edited or cut short is refused)."""
    listed = _meta_json(path, meta, "targets", (str,), "layer names")
    if listed and set(listed) != set(targets):
        missing, extra = sorted(set(listed) - set(targets)), sorted(set(targets) - set(listed))
        raise UserError(f"{path}: its tensors cover other layers than its metadata lists (missing {missing[:3]}, "
                        f"unlisted {extra[:3]}{', ...' if len(missing) + len(extra) > 6 else ''})")


def _check_base(path: Path, meta: dict[str, str], unet: nn.Module, targets: list[str]) -> None:
    if not meta.get("base_fingerprint"):
        return
    want = _meta_json(path, meta, "base_fingerprint", (int, float), "numbers")
    have = base_fingerprint(unet, _meta_json(path, meta, "targets", (str,), "layer names") or targets)
    if len(want) != len(have) or any(abs(w - h) > 1e-3 * max(abs(w), 1e-8) for w, h in zip(want, have)):
        raise UserError(f"{path}: trained on another base model (base weights fingerprint {want}, "
                        f"this model {have})")


def load_adapter(path: str | Path, unet: nn.Module, alpha: float | None = None, name: str = "lora") -> AdapterInfo:
    """Inject the adapter of `path` into `unet` as adapter `name` (DeltaLinear on its layers, the file's delta
    kind) with its weights.

    alpha: the scale for a release lora.pth (default 8, as the release); for our files the stored alpha is
    used unless given. Refuses files whose keys or shapes do not fit this UNet, and ours whose recorded base
    weights differ from the UNet's.
    """
    path = Path(path)
    tensors, meta = read_adapter(path)
    if not tensors:
        raise UserError(f"{path}: holds no adapter tensors")
    if delta_layers(unet, name):
        raise UserError(f"{path}: the model already carries an adapter named {name!r}")
    cls = delta_class(path, meta)
    ranks = validate_adapter_tensors(path, tensors, unet, cls)
    targets = list(ranks)
    _check_layer_set(path, meta, targets)
    fmt = meta.get("format", "release-pth" if path.suffix != ".safetensors" else "safetensors")
    _check_base(path, meta, unet, targets)
    alpha = checked_alpha(path, meta, alpha, ranks, cls.kind)

    def make(target: str, layer: nn.Linear) -> Delta:
        parts = {t: tensors[k] for t in cls.tensor_names if (k := f"{target}.{cls.kind}.{t}") in tensors}
        return cls.from_tensors(parts, alpha, device=layer.weight.device, dtype=layer.weight.dtype)
    inject_delta(unet, targets, make, name)
    return AdapterInfo(str(path), max(ranks.values()), alpha, targets, fmt, meta.get("base_sha256") or None, meta,
                       name, cls.kind)
