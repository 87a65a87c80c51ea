"""Which Linear layers of the UNet get an adapter: named presets or explicit name suffixes.

    default   attn2.to_k, attn2.to_v             the UnGuide release's default (ESD-x keys and values)
    xattn     every Linear under attn2           ESD's "xattn"
    noxattn   every Linear except under attn2, time_embed and out    ESD's "noxattn"
    nsfw      the same set as noxattn            the release's nudity preset (inject_lora_nsfw)
    selfattn  every Linear under attn1           ESD's "selfattn"
    full      every Linear                       ESD's "full"

Anything else is read as name suffixes, e.g. ["attn2.to_k", "attn2.to_v"] (the release's --target_modules).
Only nn.Linear layers qualify; the 1x1 convolutions (proj_in, proj_out) are never adapted.

ESD (`--method esd --train_method ...`) selects PARAMETERS by name, as ESD's train-esd.py does over
`diffusion_model.named_parameters()`: every Linear, Conv2d and norm weight and bias whose name matches
(esd_parameter_names); esd_layers gives the layers that own them, which carry a full delta (ldm/erasure/full.py).

    xattn      names containing "attn2"
    noxattn    all but names starting "out." or containing "attn2" or "time_embed"
    selfattn   names containing "attn1"
    full       all
"""
import torch.nn as nn

from ldm.erasure.delta import Delta

DEFAULT_TARGETS = ["attn2.to_k", "attn2.to_v"]


def _parts(name: str) -> list[str]:
    return name.split(".")


def _noxattn(name: str) -> bool:
    return "attn2" not in _parts(name) and "time_embed" not in _parts(name) and _parts(name)[0] != "out"


PRESETS = {
    "xattn": lambda n: "attn2" in _parts(n),
    "noxattn": _noxattn,
    "nsfw": _noxattn,
    "selfattn": lambda n: "attn1" in _parts(n),
    "full": lambda n: True,
}


def select_targets(unet: nn.Module, spec: list[str] | str | None = None) -> list[str]:
    """Names of the Linear layers `spec` selects (a preset name, or a list of suffixes), in module order.

    Raises ValueError when nothing matches: an adapter on no layer would silently erase nothing.
    """
    spec = list(DEFAULT_TARGETS) if spec in (None, "default", ["default"]) else spec
    spec = [spec] if isinstance(spec, str) else list(spec)
    linears = [n for n, m in unet.named_modules() if type(m) is nn.Linear]
    if len(spec) == 1 and spec[0] in PRESETS:
        chosen = [n for n in linears if PRESETS[spec[0]](n)]
    else:
        chosen = [n for n in linears if any(n == s or n.endswith("." + s) for s in spec)]
        unmatched = [s for s in spec if not any(n == s or n.endswith("." + s) for n in linears)]
        if unmatched:
            raise ValueError(f"target modules {unmatched} match no Linear layer of the UNet "
                             f"(presets: {', '.join(['default', *PRESETS])})")
    if not chosen:
        raise ValueError(f"target modules {spec} match no Linear layer of the UNet")
    return chosen


def describe_targets(names: list[str]) -> str:
    """One line for logs: how many layers and which kinds, e.g. '32 layers: attn2.to_k x16, attn2.to_v x16'."""
    kinds: dict[str, int] = {}
    for n in names:
        parts = _parts(n)
        cut = next((i for i, p in enumerate(parts) if p in ("attn1", "attn2", "ff", "emb_layers", "time_embed")),
                   len(parts) - 1)
        kind = ".".join(parts[cut:])
        kinds[kind] = kinds.get(kind, 0) + 1
    return f"{len(names)} layers: " + ", ".join(f"{k} x{v}" for k, v in kinds.items())


ESD_TRAIN_METHODS = {
    "xattn": lambda n: "attn2" in n,
    "noxattn": lambda n: not (n.startswith("out.") or "attn2" in n or "time_embed" in n),
    "selfattn": lambda n: "attn1" in n,
    "full": lambda n: True,
}


def esd_parameter_names(unet: nn.Module, train_method: str) -> list[str]:
    """The UNet parameter names ESD trains for `train_method` (its rule on parameter names), in module order."""
    if train_method not in ESD_TRAIN_METHODS:
        raise ValueError(f"train method {train_method!r} is not one of {', '.join(ESD_TRAIN_METHODS)}")
    deltas = {id(p) for m in unet.modules() if isinstance(m, Delta) for p in m.parameters()}  # not base weights
    return [n for n, p in unet.named_parameters() if id(p) not in deltas and ESD_TRAIN_METHODS[train_method](n)]


def esd_layers(unet: nn.Module, train_method: str) -> list[str]:
    """The module paths that own ESD's parameters for `train_method`; ValueError when a selected parameter is
    not the weight or bias of a layer (then a full delta could not carry it) or a layer is half-selected."""
    names = esd_parameter_names(unet, train_method)
    layers: dict[str, set[str]] = {}
    for n in names:
        path, _, pname = n.rpartition(".")
        layers.setdefault(path, set()).add(pname)
    for path, pnames in layers.items():
        own = {k for k, v in unet.get_submodule(path).named_parameters(recurse=False)}
        if not pnames <= {"weight", "bias"} or pnames != own:
            raise ValueError(f"{path}: ESD's {train_method} selects {sorted(pnames)} of its {sorted(own)}; "
                             "a full delta carries a layer's weight and bias together")
    return list(layers)
