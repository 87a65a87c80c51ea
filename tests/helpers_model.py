"""Shared helpers of the fidelity and loader tests: configs, weight perturbation, reference models, errors.

The reference models (diffusers' UNet2DConditionModel / AutoencoderKL, transformers' CLIPTextModel) are
built from config dicts only: nothing is downloaded.
"""
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.config import load_config
from ldm.loader import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny" / "tiny-inference.yaml"
FULL = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
TEXT_PREFIX = "cond_stage_model.transformer."


def config_dict(path) -> dict:
    """The original (CompVis-style) YAML config as a plain dict, as diffusers' converters take it."""
    return OmegaConf.to_container(load_config(path), resolve=True)


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Move every parameter off its initial value, in place.

    Zero-initialised layers (biases, and any zero-init output conv) get small noise so they count; the affine
    parameters of GroupNorm/LayerNorm become weight ~ 1 + N(0, 0.1), bias ~ N(0, 0.1) instead of 1 and 0.
    """
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if isinstance(module, norms):
                p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
            else:
                p.add_(scale * noise)
    return model


def build_perturbed(path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb_(build_model(path), seed=seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (b: the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _load_assigned(cls, config: dict, state_dict: dict):
    """Build `cls(**config)` on the meta device and load `state_dict` strictly by assignment (no second copy)."""
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not meta, f"{cls.__name__}: tensors left on meta: {meta[:5]}"
    return model.eval()


def diffusers_unet(released: dict, original_config: dict):
    """diffusers' UNet2DConditionModel with our (released-format) weights, via diffusers' own LDM converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(original_config, released)
    converted = convert_ldm_unet_checkpoint(released, config)
    return _load_assigned(UNet2DConditionModel, config, converted)


def diffusers_vae(released: dict, original_config: dict):
    """diffusers' AutoencoderKL with our weights, via diffusers' own LDM converter."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(original_config, released)
    converted = convert_ldm_vae_checkpoint(released, config)
    return _load_assigned(AutoencoderKL, config, converted)


def hf_text_encoder(released: dict, text_config):
    """transformers' CLIPTextModel built from `text_config` with the released `cond_stage_model.transformer.*` weights.

    Released keys read `cond_stage_model.transformer.text_model.*`. transformers 4 nests its modules under
    `text_model.`, transformers 5 does not: the keys are mapped to whichever layout the installed class has.
    """
    from transformers import CLIPTextModel

    sd = {k[len(TEXT_PREFIX):]: v for k, v in released.items() if k.startswith(TEXT_PREFIX)}
    with torch.device("meta"):
        model = CLIPTextModel(text_config)
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    if not nested:
        sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    expected = set(model.state_dict())
    for k in [k for k in sd if k.endswith("position_ids") and k not in expected]:
        del sd[k]  # a non-persistent buffer in some versions
    model.load_state_dict(sd, strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers are not in the state dict: rebuild them
        if "position_ids" in module._buffers and module.position_ids.is_meta:
            module.position_ids = torch.arange(module.position_ids.shape[-1]).expand(1, -1)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not meta, f"CLIPTextModel: tensors left on meta: {meta[:5]}"
    return model.eval()


def tiny_model(seed: int = 0):
    return build_perturbed(TINY, seed)


def save_checkpoint(model, path) -> Path:
    """Write a model as a released-format .safetensors checkpoint (what load_model_from_config reads)."""
    from safetensors.torch import save_file
    from ldm.loader import release_state_dict
    save_file({k: v.contiguous() for k, v in release_state_dict(model).items()}, str(path))
    return Path(path)


def randomize_adapters(model, seed: int, scale: float):
    """Give every adapter `lora` a random, non-zero B (seeded), so that it changes the model's output."""
    from ldm.erasure.lora import lora_layers
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model.unet).values():
        layer.lora.B.data = torch.randn(layer.lora.B.shape, generator=g) * scale
    return model


def random_adapter_file(base, path, seed: int, rank: int = 1, targets=None, scale: float = 0.05):
    """Write a random (seeded, non-zero) adapter on a copy of `base` to `path`; -> path."""
    import copy
    from ldm.erasure.io import save_adapter
    from ldm.erasure.lora import inject_lora
    from ldm.erasure.targets import select_targets
    m = copy.deepcopy(base)
    inject_lora(m.unet, targets or select_targets(m.unet), rank, 8.0, generator=torch.Generator().manual_seed(seed))
    randomize_adapters(m, seed + 100, scale)
    save_adapter(path, m.unet, alpha=8.0)
    return path


def ref_cfg(m, prompt: str, scale: float = 7.5):
    """The plain CFG model function of model m for one prompt: u + scale (c - u), two separate UNet calls."""
    c, u = m.get_learned_conditioning([prompt]), m.get_learned_conditioning([""])

    def fn(x, t):
        e_u, e_c = m.apply_model(x, t, u.expand(len(x), -1, -1)), m.apply_model(x, t, c.expand(len(x), -1, -1))
        return e_u + scale * (e_c - e_u)
    return fn


def tiny_checkpoint(folder: Path, seed: int = 0):
    """(tiny model, the path of its checkpoint written to folder/tiny.safetensors)."""
    model = tiny_model(seed)
    return model, save_checkpoint(model, Path(folder) / "tiny.safetensors")


def check_peak_memory(record: dict, printed: str | None = None) -> None:
    """A script's peak-memory fields on the CPU (ldm/memory.py: a positive integer of bytes, kind cpu_peak_rss, the
    GiB rounded), and its printed summary naming them ("peak memory 0.43 GiB (cpu_peak_rss)")."""
    from ldm.memory import format_memory
    mem = record["peak_memory_bytes"]
    assert type(mem) is int and mem > 0, record
    assert record["peak_memory_kind"] == "cpu_peak_rss" and record["peak_memory_gib"] == round(mem / 2 ** 30, 3)
    if printed is not None:
        assert f"peak memory {format_memory(record)}" in printed, printed


def save_tiny_clip(folder: Path, tok, vocab_size: int, bos: int, eos: int, width: int, layers: int,
                   projection: int) -> Path:
    """A randomly initialised tiny CLIPModel (32 px images, patch 8; weights from torch's current RNG) with a
    CLIPProcessor around `tok`, saved to `folder` as a local CLIP folder (save_pretrained)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
                     vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=projection)
    CLIPModel(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
