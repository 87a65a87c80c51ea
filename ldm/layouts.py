"""Weights in the layouts users have: diffusers' model folders and UNet state dicts -> our (CompVis) key names.

    diffusers folder:  model_index.json, unet/, vae/, text_encoder/, tokenizer/   (save_pretrained's layout)
    UNet state dict:   a diffusers-layout (down_blocks.0.resnets.0.conv1.weight, ...) or CompVis-layout
                       (model.diffusion_model.input_blocks.1.0.in_layers.2.weight, ...) file, e.g. ESD's
                       published `diffusers-nudity-ESDu1-UNET.pt`

The conversion runs forwards: for every key of OUR model (CompVis names, ldm.loader.release_key) we compute
the diffusers key it comes from (`unet_key`, `vae_key`, `text_key`) and take that tensor, reshaped where the
layouts differ (the VAE's attention: 1x1 convolutions here, Linear layers in diffusers). Keys of the file that
no key of ours asks for are reported as unexpected, as for any checkpoint. The key rules restate the SD v1
architecture (res blocks, attentions, down/upsamplers per level); they are checked against diffusers' own
models in tests/test_layouts.py.
"""
import re
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.runs import read_json

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
COMPONENTS = ("unet", "vae", "text_encoder")
WEIGHT_FILES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                "text_encoder": ("model.safetensors", "pytorch_model.bin")}

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _resnet(rest: str) -> str:
    """CompVis ResBlock inner name -> diffusers ResnetBlock2D inner name (in_layers.2.weight -> conv1.weight)."""
    for ours, theirs in _RESNET.items():
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def unet_key(key: str, num_res_blocks: int) -> str:
    """A UNet key relative to the UNet (input_blocks.1.0.in_layers.2.weight) -> diffusers' key."""
    per = num_res_blocks + 1  # CompVis entries per level: the res blocks, then a down/upsampler
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for ours, theirs in fixed.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        kind, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if kind == "input_blocks":
            level, layer = divmod(i - 1, per)
            if layer == num_res_blocks:  # the level's downsampler: op.weight -> downsamplers.0.conv.weight
                return f"down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}"
            where = f"down_blocks.{level}"
        else:
            level, layer = divmod(i, per)
            where = f"up_blocks.{level}"
            if j > 0 and rest.startswith("conv."):  # the level's upsampler (last entry of the block)
                return f"{where}.upsamplers.0.{rest}"
        return f"{where}.resnets.{layer}.{_resnet(rest)}" if j == 0 else f"{where}.attentions.{layer}.{rest}"
    m = re.match(r"middle_block\.(\d)\.(.*)", key)
    if m:
        j, rest = int(m.group(1)), m.group(2)
        return f"mid_block.attentions.0.{rest}" if j == 1 else f"mid_block.resnets.{j // 2}.{_resnet(rest)}"
    return key


def vae_key(key: str, num_levels: int) -> str:
    """An AutoencoderKL key (encoder.down.0.block.1.conv1.weight) -> diffusers' key."""
    key = key.replace("nin_shortcut", "conv_shortcut").replace("norm_out.", "conv_norm_out.")
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", key)
    if m:
        part, which, rest = m.groups()
        if which == "attn_1":
            name, _, suffix = rest.partition(".")
            return f"{part}.mid_block.attentions.0.{_VAE_ATTN.get(name, name)}.{suffix}"
        return f"{part}.mid_block.resnets.{int(which[-1]) - 1}.{rest}"
    m = re.match(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.*)", key)
    if m:
        i, _, j, rest = m.groups()
        return (f"encoder.down_blocks.{i}.resnets.{j}.{rest}" if j is not None
                else f"encoder.down_blocks.{i}.downsamplers.0.{rest}")
    m = re.match(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.*)", key)
    if m:  # diffusers numbers the decoder's levels from the top, CompVis from the bottom
        i, _, j, rest = m.groups()
        level = num_levels - 1 - int(i)
        return (f"decoder.up_blocks.{level}.resnets.{j}.{rest}" if j is not None
                else f"decoder.up_blocks.{level}.upsamplers.0.{rest}")
    return key


def _num_res_blocks(ours: dict[str, torch.Tensor]) -> int:
    """Res blocks per UNet level, from our model's keys: input_blocks 1 .. are per level res blocks + sampler."""
    firsts = {int(k.split(".")[3]) for k in ours if k.startswith(UNET_PREFIX + "input_blocks.") and ".op." in k}
    return (min(firsts) - 1) if firsts else sum(1 for k in ours if k.startswith(UNET_PREFIX + "input_blocks.")
                                               and k.endswith("in_layers.2.weight"))


def _vae_levels(ours: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[3] for k in ours if k.startswith(VAE_PREFIX + "decoder.up.")})


def _take(theirs: dict[str, torch.Tensor], key: str, like: torch.Tensor, used: set[str]) -> torch.Tensor | None:
    value = theirs.get(key)
    if value is None:
        return None
    used.add(key)
    if value.dim() == 2 and like.dim() == 4 and like.shape[2:] == (1, 1):  # Linear [C, C] -> 1x1 conv
        value = value[:, :, None, None]
    return value


def _convert(theirs: dict, ours: dict, mine: dict[str, str], source: str, what: str) -> dict[str, torch.Tensor]:
    used: set[str] = set()
    out, missing = {}, []
    for key, their_key in mine.items():
        value = _take(theirs, their_key, ours[key], used)
        if value is None:
            missing.append(their_key)
        else:
            out[key] = value
    unexpected = sorted(set(theirs) - used - {k for k in theirs if k.endswith("position_ids")})
    if missing or unexpected:
        parts = ([f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"]
                 if missing else []) + ([f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}"
                                         f"{', ...' if len(unexpected) > 3 else ''})"] if unexpected else [])
        raise UserError(f"{source}: not a diffusers {what} of this config: " + "; ".join(parts))
    return out


def convert_unet(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], source: str
                 ) -> dict[str, torch.Tensor]:
    """A diffusers-layout UNet state dict -> {our key (model.diffusion_model.*): tensor}; UserError on a mismatch."""
    n = _num_res_blocks(ours)
    return _convert(theirs, ours, {k: unet_key(k[len(UNET_PREFIX):], n) for k in ours if k.startswith(UNET_PREFIX)},
                    source, "UNet")


def convert_vae(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], source: str
                ) -> dict[str, torch.Tensor]:
    """A diffusers-layout AutoencoderKL state dict -> {our key (first_stage_model.*): tensor}."""
    n = _vae_levels(ours)
    return _convert(theirs, ours, {k: vae_key(k[len(VAE_PREFIX):], n) for k in ours if k.startswith(VAE_PREFIX)},
                    source, "VAE")


def convert_text(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], source: str
                 ) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel state dict (text_model.* in transformers 4 and 5 files) -> our keys."""
    if not any(k.startswith("text_model.") for k in theirs):  # a file of a layout without the text_model level
        theirs = {"text_model." + k: v for k, v in theirs.items()}
    mine = {k: k[len(TEXT_PREFIX):] for k in ours if k.startswith(TEXT_PREFIX)}
    return _convert(theirs, ours, mine, source, "text encoder")


def is_diffusers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def looks_like_diffusers_unet(keys) -> bool:
    keys = set(keys)
    return "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys)


def looks_like_compvis_unet(keys) -> bool:
    return any(k.startswith(("input_blocks.", UNET_PREFIX + "input_blocks.")) for k in keys) and \
        not any(k.startswith(VAE_PREFIX) for k in keys)


def component_file(folder: Path, component: str) -> Path:
    """The weights file of one component of a diffusers folder (safetensors first); UserError when absent."""
    sub = folder / component
    if not sub.is_dir():
        raise UserError(f"{folder}: a diffusers folder without its {component}/ component")
    for name in WEIGHT_FILES[component]:
        if (sub / name).is_file():
            return sub / name
    sharded = sorted(sub.glob("*.index.json"))
    if sharded:
        raise UserError(f"{sharded[0]}: sharded weights are not supported; save the model unsharded")
    raise UserError(f"{sub}: none of {', '.join(WEIGHT_FILES[component])}")


def read_model_index(folder: Path) -> dict:
    index = read_json(folder / "model_index.json", "model index")
    if not isinstance(index, dict):
        raise UserError(f"{folder / 'model_index.json'}: expected a JSON object")
    return index
