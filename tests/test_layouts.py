"""Models in the layouts users have (ldm/layouts.py): a diffusers folder written by diffusers' and transformers'
own save_pretrained, and UNet state dicts in the diffusers and CompVis layouts (--unet_weights), load to the
same weights and the same eps as the models that wrote them. Tiny config here; the full SD v1 size under -m slow.
"""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from helpers_model import FULL, TINY, build_perturbed, config_dict, diffusers_unet, diffusers_vae, hf_text_encoder, rel_err
from ldm.errors import UserError
from ldm.loader import load_model_from_config, release_state_dict


def write_diffusers_folder(model, config_path, folder, drop: str | None = None):
    """model's weights as a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/), each
    component written by its library's own save_pretrained."""
    released = release_state_dict(model)
    original = config_dict(config_path)
    parts = {"unet": diffusers_unet(released, original), "vae": diffusers_vae(released, original),
             "text_encoder": hf_text_encoder(released, copy.deepcopy(model.cond_stage_model.transformer.config))}
    for name, part in parts.items():
        if name != drop:
            part.save_pretrained(folder / name)
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder, parts["unet"]


@torch.no_grad()
def check_folder_round_trip(model, config_path, folder, side: int):
    folder, ref_unet = write_diffusers_folder(model, config_path, folder)
    loaded = load_model_from_config(config_path, folder, verbose=False)
    want, got = release_state_dict(model), release_state_dict(loaded)
    assert set(want) == set(got)
    for k in want:  # every tensor back exactly (a 1x1 conv read from a Linear included)
        assert torch.equal(want[k], got[k]), k
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, side, side, generator=g), torch.tensor([10, 700])
    ctx = loaded.get_learned_conditioning(["a photo of a cat", ""])
    err = rel_err(loaded.apply_model(x, t, ctx), ref_unet(x, t, encoder_hidden_states=ctx).sample)
    assert err < 1e-5, err


@pytest.fixture(scope="module")
def tiny():
    return build_perturbed(TINY, seed=3)


def test_diffusers_folder_loads_to_the_same_model(tiny, tmp_path):
    check_folder_round_trip(tiny, TINY, tmp_path / "sd", side=8)


@pytest.mark.slow
def test_diffusers_folder_full_size(tmp_path):
    check_folder_round_trip(build_perturbed(FULL, seed=3), FULL, tmp_path / "sd", side=8)


def test_unet_weights_in_both_layouts_replace_the_unet(tiny, tmp_path):
    base = build_perturbed(TINY, seed=4)  # another model: its UNet is replaced by tiny's
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in release_state_dict(base).items()}, str(base_file))
    released = release_state_dict(tiny)
    unet = diffusers_unet(released, config_dict(TINY))
    diff_file = tmp_path / "diffusers-unet.pt"
    torch.save(unet.state_dict(), diff_file)  # ESD publishes diffusers UNets as .pt state dicts
    compvis_file = tmp_path / "compvis-unet.safetensors"
    save_file({k[len("model.diffusion_model."):]: v.contiguous() for k, v in released.items()
               if k.startswith("model.diffusion_model.")}, str(compvis_file))
    for file in (diff_file, compvis_file):
        loaded = load_model_from_config(TINY, base_file, verbose=False, unet_weights=file)
        got = release_state_dict(loaded)
        for k, v in released.items():
            want = v if k.startswith("model.diffusion_model.") else release_state_dict(base)[k]
            assert torch.equal(got[k], want), (file.name, k)


def test_layout_errors_name_the_file(tiny, tmp_path):
    folder, _ = write_diffusers_folder(tiny, TINY, tmp_path / "novae", drop="vae")
    with pytest.raises(UserError, match="without its vae/ component"):
        load_model_from_config(TINY, folder, verbose=False)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load_model_from_config(TINY, plain, verbose=False)
    unet_file = tmp_path / "unet.safetensors"
    unet = diffusers_unet(release_state_dict(tiny), config_dict(TINY))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(unet_file))
    with pytest.raises(UserError, match="a diffusers UNet state dict.*--unet_weights"):
        load_model_from_config(TINY, unet_file, verbose=False)
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in release_state_dict(tiny).items()}, str(base_file))
    sd = unet.state_dict()
    sd.pop("conv_in.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["down_blocks.0.x"] = torch.zeros(1)
    broken = tmp_path / "broken-unet.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(broken))
    with pytest.raises(UserError, match="broken-unet.safetensors: not a UNet state dict"):
        load_model_from_config(TINY, base_file, verbose=False, unet_weights=broken)
    sd["conv_in.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(broken))
    with pytest.raises(UserError, match="broken-unet.safetensors: not a diffusers UNet.*unexpected keys"):
        load_model_from_config(TINY, base_file, verbose=False, unet_weights=broken)
