"""Export our adapters to the layouts other tools load: diffusers/PEFT and kohya (AUTOMATIC1111, ComfyUI).

Ours:  "<CompVis module path>.lora.A" [in, r], ".lora.B" [r, out]; delta W = alpha * (A B)^T  (scale alpha, not
       alpha / r; alpha lives in the file's metadata, or is 8 for a release lora.pth).

diffusers / PEFT (`StableDiffusionPipeline.load_lora_weights`, `UNet2DConditionModel.load_lora_adapter`):
       "unet.<diffusers module path>.lora_A.weight" = A^T [r, in], ".lora_B.weight" = alpha * B^T [out, r].
       alpha is folded into lora_B: diffusers gives a PEFT-format file without alphas lora_alpha == r per layer
       (scale 1), so lora_B @ lora_A is the whole update, exactly ours; no loader has to honour extra metadata.

kohya (A1111, ComfyUI, sd-scripts):
       "lora_unet_<diffusers path, '.' -> '_'>.lora_down.weight" = A^T [r, in], ".lora_up.weight" = B^T [out, r],
       ".alpha" = alpha * r (a scalar): kohya's scale is alpha_kohya / r, which gives back our alpha.

Module paths are mapped block by block from the UNet's config (channel_mult, num_res_blocks,
attention_resolutions), as diffusers' own LDM converter lays out UNet2DConditionModel:
    input_blocks.{k}.0 / .1   -> down_blocks.{level}.resnets.{j} / attentions.{j}   (k = 1 + level*(n+1) + j)
    input_blocks.{k}.0        -> down_blocks.{level}.downsamplers.0                 (k = 1 + level*(n+1) + n)
    middle_block.0 / .1 / .2  -> mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{k}.0 / .1  -> up_blocks.{i}.resnets.{j} / attentions.{j}          (k = i*(n+1) + j, i=0 deepest)
    output_blocks.{k}.1 or .2 -> up_blocks.{i}.upsamplers.0                         (j = n, all but the last i)
    time_embed.0 / .2         -> time_embedding.linear_1 / linear_2
Inside a transformer the names are the same (transformer_blocks.0.attn2.to_k, ff.net.0.proj, ...); inside a
ResBlock emb_layers.1 -> time_emb_proj (and in_layers.2 -> conv1, out_layers.3 -> conv2, skip_connection ->
conv_shortcut, for completeness).

Exports keep the adapter but not UnGuidance: the adapter is always on, for every prompt. The per-prompt
gating needs this project's sampler.
"""
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ldm.config import instantiate_from_config, load_config
from ldm.erasure.delta import bake, delta_layers
from ldm.erasure.io import checked_alpha, load_adapter, read_adapter, validate_adapter_tensors  # load_adapter's own checks
from ldm.errors import UserError
from ldm.layouts import UNET_PREFIX, unet_key
from ldm.loader import load_model_from_config, release_state_dict

FORMATS = ("diffusers", "kohya")
RELEASE_ALPHA = 8.0
GATING_NOTE = ("UnGuidance's per-prompt gating is not included: this adapter is always applied, to every prompt; "
               "the gated sampler of the UnGuide toolkit is needed for it")

_RESNET = {"emb_layers.1": "time_emb_proj", "in_layers.0": "norm1", "in_layers.2": "conv1",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


# -----------------------------------------------------------------------------
# key map

def _params(unet_params) -> tuple[list[int], int, set[int]]:
    p = dict(unet_params)
    return list(p["channel_mult"]), int(p["num_res_blocks"]), {int(r) for r in p["attention_resolutions"]}


def block_map(unet_params) -> dict[str, tuple[str, dict[str, str] | None]]:
    """{CompVis layer prefix: (diffusers module prefix, suffix renames or None for 'same names')} of a UNet config.

    unet_params: the UNet's config params (channel_mult, num_res_blocks, attention_resolutions), e.g.
    `config.model.params.unet_config.params`.
    """
    mult, n, attn = _params(unet_params)
    levels = len(mult)
    out: dict[str, tuple[str, dict | None]] = {}
    k, ds = 1, 1
    for level in range(levels):
        for j in range(n):
            out[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.resnets.{j}", _RESNET)
            if ds in attn:
                out[f"input_blocks.{k}.1"] = (f"down_blocks.{level}.attentions.{j}", None)
            k += 1
        if level != levels - 1:
            out[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.downsamplers.0", {"op": "conv"})
            k += 1
            ds *= 2
    out["middle_block.0"] = ("mid_block.resnets.0", _RESNET)
    out["middle_block.1"] = ("mid_block.attentions.0", None)
    out["middle_block.2"] = ("mid_block.resnets.1", _RESNET)
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        has_attn = ds in attn
        for j in range(n + 1):
            out[f"output_blocks.{k}.0"] = (f"up_blocks.{i}.resnets.{j}", _RESNET)
            if has_attn:
                out[f"output_blocks.{k}.1"] = (f"up_blocks.{i}.attentions.{j}", None)
            if level and j == n:
                out[f"output_blocks.{k}.{2 if has_attn else 1}"] = (f"up_blocks.{i}.upsamplers.0", {"conv": "conv"})
            k += 1
        ds //= 2
    return out


def diffusers_path(path: str, blocks: dict) -> str:
    """Our (CompVis) UNet module path -> UNet2DConditionModel's. KeyError for a path the map does not cover."""
    if path in _TOP:
        return _TOP[path]
    parts = path.split(".")
    cut = 2 if parts[0] == "middle_block" else 3  # middle_block.<layer> / {input,output}_blocks.<block>.<layer>
    head, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
    if head not in blocks or not rest:
        raise KeyError(path)
    prefix, renames = blocks[head]
    if renames is None:
        return f"{prefix}.{rest}"
    if rest not in renames:
        raise KeyError(path)
    return f"{prefix}.{renames[rest]}"


def kohya_name(dpath: str) -> str:
    return "lora_unet_" + dpath.replace(".", "_")


# -----------------------------------------------------------------------------
# conversions (pure functions on state dicts)

def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = dict.fromkeys(k.rpartition(".lora.")[0] for k in tensors)
    return {n: (tensors[f"{n}.lora.A"], tensors[f"{n}.lora.B"]) for n in names}


def to_diffusers(tensors: dict[str, torch.Tensor], alpha: float, blocks: dict,
                 prefix: str = "unet") -> dict[str, torch.Tensor]:
    """PEFT layout with alpha folded into lora_B: lora_B @ lora_A == alpha * (A B)^T."""
    out = {}
    for name, (a, b) in _pairs(tensors).items():
        d = f"{prefix}.{diffusers_path(name, blocks)}" if prefix else diffusers_path(name, blocks)
        out[f"{d}.lora_A.weight"] = a.float().T.contiguous()
        out[f"{d}.lora_B.weight"] = (b.float() * alpha).T.contiguous()
    return out


def to_kohya(tensors: dict[str, torch.Tensor], alpha: float, blocks: dict) -> dict[str, torch.Tensor]:
    """kohya layout: up @ down * (alpha_kohya / r) == alpha * (A B)^T with alpha_kohya = alpha * r."""
    out = {}
    for name, (a, b) in _pairs(tensors).items():
        k = kohya_name(diffusers_path(name, blocks))
        out[f"{k}.lora_down.weight"] = a.float().T.contiguous()
        out[f"{k}.lora_up.weight"] = b.float().T.contiguous()
        out[f"{k}.alpha"] = torch.tensor(float(alpha) * a.shape[1], dtype=torch.float32)
    return out


def from_kohya(sd: dict[str, torch.Tensor], linear_paths: list[str], blocks: dict) -> tuple[dict, dict]:
    """Inverse of to_kohya: ({"<CompVis path>.lora.A/B": ...}, {CompVis path: scale alpha_kohya / r})."""
    inverse = {kohya_name(diffusers_path(p, blocks)): p for p in linear_paths}
    tensors, scales = {}, {}
    for key, down in sd.items():
        if not key.endswith(".lora_down.weight"):
            continue
        k = key[: -len(".lora_down.weight")]
        if k not in inverse:
            raise KeyError(k)
        p = inverse[k]
        up = sd[f"{k}.lora_up.weight"]
        tensors[f"{p}.lora.A"] = down.T.contiguous()
        tensors[f"{p}.lora.B"] = up.T.contiguous()
        r = down.shape[0]
        scales[p] = float(sd[f"{k}.alpha"]) / r if f"{k}.alpha" in sd else 1.0
    return tensors, scales


# -----------------------------------------------------------------------------
# the export, with validation (what scripts/tools/export_lora.py runs)

def load_unet_config(config_path: str | Path) -> dict:
    config = load_config(config_path)
    try:
        unet_config = config.model.params.unet_config
        params = dict(unet_config.params)
        _params(params)
    except Exception:
        raise UserError(f"{config_path}: no model.params.unet_config with channel_mult, num_res_blocks and "
                        "attention_resolutions (not an SD v1 config?)")
    return unet_config


def meta_unet(unet_config) -> nn.Module:
    """The config's UNet on the meta device: module names and Linear shapes, no memory, no weights."""
    with torch.device("meta"):
        return instantiate_from_config(unet_config)


def _validate(path: Path, tensors: dict[str, torch.Tensor], unet: nn.Module) -> dict[str, int]:
    """{module path: rank}; UserError naming the first problem (a stray key, a missing A or B, a shape)."""
    if not tensors:
        raise UserError(f"{path}: holds no adapter tensors")
    ranks = validate_adapter_tensors(path, tensors, unet)
    bad = [k for k, v in tensors.items() if not torch.isfinite(v.float()).all()]
    if bad:
        raise UserError(f"{path}: non-finite values in {bad[0]}")
    return ranks


@dataclass
class ExportResult:
    output: str
    fmt: str
    layers: int
    ranks: list[int]
    alpha: float
    tensors: int
    bytes: int


def _check_output(source: Path, output: Path, overwrite: bool) -> None:
    if output.suffix != ".safetensors":
        raise UserError(f"{output}: the output must be a .safetensors file (what diffusers, A1111 and ComfyUI load)")
    if output.exists() and not overwrite:
        raise UserError(f"{output}: exists; pass --overwrite to replace it")
    if output.exists() and not output.is_file():
        raise UserError(f"{output}: exists and is not a file")
    if output.resolve() == source.resolve():
        raise UserError(f"{output}: is the input file")


def _write(output: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file written under a temporary name, then renamed."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{output.parent}: cannot create the output folder ({exc.strerror or exc})")
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, output)
    except OSError as exc:
        raise UserError(f"{output}: cannot write ({exc.strerror or exc})")
    finally:
        if tmp.exists():
            tmp.unlink()


def export_adapter(lora: str | Path, fmt: str, output: str | Path,
                   config: str | Path = "configs/stable-diffusion/v1-inference.yaml",
                   alpha: float | None = None, overwrite: bool = False) -> ExportResult:
    """Convert our adapter file (.safetensors, or a release lora.pth) to `fmt` and write `output` atomically.

    alpha: the scale of a release lora.pth (default 8); for our files the alpha in the metadata is used unless
    given (as ldm.erasure.io.load_adapter does).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    lora, output = Path(lora), Path(output)
    _check_output(lora, output, overwrite)
    if alpha is not None and not (float(alpha) == float(alpha) and abs(float(alpha)) < float("inf")):
        raise UserError(f"--alpha {alpha}: not a finite number")
    unet_config = load_unet_config(config)
    tensors, meta = read_adapter(lora)
    if meta.get("delta_kind", "lora") != "lora":
        raise UserError(f"{lora}: a {meta['delta_kind']!r} delta, not a LoRA: export it with --format merged or "
                        "diffusers_unet (base + delta, with --ckpt)")
    unet = meta_unet(unet_config)
    ranks = _validate(lora, tensors, unet)
    alpha = checked_alpha(lora, meta, alpha, ranks, "lora")  # finite, > 0; the metadata's rank checked too
    blocks = block_map(unet_config.params)
    try:
        for name in ranks:
            diffusers_path(name, blocks)
    except KeyError as exc:
        raise UserError(f"{lora}: module {exc.args[0]!r} has no diffusers counterpart in the export map")

    rank_counts = Counter(ranks.values())
    common_rank = rank_counts.most_common(1)[0][0]
    note = {"unguide_source": lora.name, "unguide_alpha": repr(alpha), "unguide_layers": str(len(ranks)),
            "unguide_note": GATING_NOTE}
    if fmt == "diffusers":
        out = to_diffusers(tensors, alpha, blocks)
        metadata = {"format": "pt", **note,
                    "unguide_scale": "alpha folded into lora_B; load with lora_alpha == r (diffusers' default)"}
    else:
        out = to_kohya(tensors, alpha, blocks)
        dynamic = len(rank_counts) > 1
        metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_v2": "False",
                    "ss_network_dim": "Dynamic" if dynamic else str(common_rank),
                    "ss_network_alpha": "Dynamic" if dynamic else repr(alpha * common_rank), **note}

    _write(output, out, metadata)
    return ExportResult(str(output), fmt, len(ranks), sorted(rank_counts), alpha, len(out), output.stat().st_size)


def summary(res: ExportResult) -> str:
    if res.fmt in MERGED_FORMATS:
        return f"wrote {res.output}: {res.fmt} (base + delta), {res.tensors} tensors, {res.bytes} bytes"
    ranks = "/".join(map(str, res.ranks))
    scale = ("alpha folded into lora_B" if res.fmt == "diffusers"
             else f"kohya alpha = {res.alpha:g} x rank")
    return (f"wrote {res.output}: {res.fmt} layout, {res.layers} layers, rank {ranks}, alpha {res.alpha:g} "
            f"({scale}), {res.tensors} tensors, {res.bytes} bytes")



# -----------------------------------------------------------------------------
# merged exports: base + delta as whole weights (any delta kind; ESD's full deltas above all)
#
#   merged          a single-file checkpoint, CompVis keys (model.diffusion_model.*, first_stage_model.*,
#                   cond_stage_model.*): what A1111 / ComfyUI load as a model, and ldm.loader loads back
#   diffusers_unet  the UNet alone, diffusers' keys (down_blocks.0.resnets.0.conv1.weight, ...): the
#                   diffusion_pytorch_model.safetensors of a diffusers model folder's unet/ (or --unet_weights)

MERGED_FORMATS = ("merged", "diffusers_unet")


def merged_state_dict(model, delta: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights (CompVis keys) with the delta file folded in: W + dW, b + db on every layer it adapts.
    The file is checked as load_adapter checks it (keys, shapes, finite values, base fingerprint)."""
    if delta_layers(model.unet):
        raise ValueError("merged_state_dict: the model already carries adapters")
    load_adapter(delta, model.unet)
    bake(model.unet)                # the base Parameters now hold W + dW, b + db; no adapter keys left
    return {k: v.detach().contiguous() for k, v in release_state_dict(model).items()}


def diffusers_unet_state_dict(state_dict: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """CompVis model keys -> the UNet's tensors under diffusers' keys (ldm.layouts.unet_key)."""
    return {unet_key(k[len(UNET_PREFIX):], num_res_blocks): v for k, v in state_dict.items()
            if k.startswith(UNET_PREFIX)}


def export_merged(delta: str | Path, fmt: str, output: str | Path, config: str | Path, ckpt: str | Path,
                  overwrite: bool = False) -> ExportResult:
    """Write base (`ckpt`) + delta as `fmt` (MERGED_FORMATS) to `output` (.safetensors), atomically."""
    delta, output = Path(delta), Path(output)
    _check_output(delta, output, overwrite)
    if not Path(ckpt).exists():
        raise UserError(f"--ckpt {ckpt}: base checkpoint not found (a merged export needs the base weights)")
    model = load_model_from_config(config, ckpt, verbose=False).requires_grad_(False)
    sd = merged_state_dict(model, delta)
    if fmt == "diffusers_unet":
        sd = diffusers_unet_state_dict(sd, int(load_unet_config(config).params.num_res_blocks))
    meta = {"format": "pt", "unguide_source": delta.name, "unguide_base": Path(ckpt).name,
            "unguide_note": "base + delta merged: " + GATING_NOTE}
    _write(output, sd, meta)
    return ExportResult(str(output), fmt, 0, [], 1.0, len(sd), output.stat().st_size)
