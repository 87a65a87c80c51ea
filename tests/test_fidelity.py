"""Proof of fidelity: our CompVis-layout model tree computes what diffusers/transformers compute.

Our model (random weights moved off their initial values) is saved in released key names, converted with
diffusers' own LDM conversion functions and loaded strictly into diffusers' UNet2DConditionModel and
AutoencoderKL, and into a transformers CLIPTextModel; same inputs must give the same outputs (fp32, CPU).
The DDIM sampler is checked against diffusers' DDIMScheduler configured as Stable Diffusion's.

    pytest tests/test_fidelity.py -s -m "not slow"   # tiny config, seconds
    pytest tests/test_fidelity.py -s -m slow         # full SD v1 architecture, minutes, ~5 GB RAM
"""
import copy
import gc

import pytest
import torch

from helpers_model import (FULL, TINY, build_perturbed, config_dict, diffusers_unet, diffusers_vae,
                           hf_text_encoder, rel_err)
from ldm.loader import release_state_dict
from ldm.models.diffusion.ddim import cfg_model_fn, ddim_timesteps, partial_steps, sample_ddim
from ldm.modules.encoders.modules import load_tokenizer

TINY_TOL, FULL_TOL, DDIM_TOL = 1e-5, 5e-5, 1e-4
PROMPTS = ["a photo of the cat", "an oil painting of a lighthouse at dusk, highly detailed"]
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                    prediction_type="epsilon")


def report(what: str, err: float, tol: float) -> None:
    print(f"\n[fidelity] {what}: relative max error {err:.3e} (tolerance {tol:.0e})")


def text_reference(model):
    """transformers' CLIPTextModel from the same config as ours (eager attention: an independent code path)."""
    config = copy.deepcopy(model.cond_stage_model.transformer.config)
    config._attn_implementation = "eager"
    return hf_text_encoder(release_state_dict(model), config)


# -----------------------------------------------------------------------------
# shared checks (tiny and full)

@torch.no_grad()
def check_unet(model, config_path, side: int, tol: float, label: str) -> None:
    ref = diffusers_unet(release_state_dict(model), config_dict(config_path))
    g = torch.Generator().manual_seed(1)
    width = model.unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features  # context width
    errs = []
    for t in ([1, 1], [261, 500], [981, 999]):
        x = torch.randn(2, 4, side, side, generator=g)
        ctx = torch.randn(2, 77, width, generator=g)
        tt = torch.tensor(t)
        ours = model.apply_model(x, tt, ctx)
        theirs = ref(x, tt, encoder_hidden_states=ctx).sample
        assert ours.shape == theirs.shape == x.shape
        assert theirs.abs().max() > 1e-3  # not a trivially zero output
        errs.append(rel_err(ours, theirs))
        if t == [261, 500]:  # negative control: the comparison does notice a change of timestep or of context
            assert rel_err(ours, ref(x, tt + 1, encoder_hidden_states=ctx).sample) > 100 * tol
            assert rel_err(ours, ref(x, tt, encoder_hidden_states=ctx.flip(0)).sample) > 100 * tol
        del ours, theirs
    del ref
    gc.collect()
    report(f"{label} UNet eps (t in {{1, 261, 500, 981, 999}}, batch 2, {side}x{side} latent)", max(errs), tol)
    assert max(errs) < tol, errs


@torch.no_grad()
def check_vae(model, config_path, side: int, batch: int, tol: float, label: str) -> None:
    ref = diffusers_vae(release_state_dict(model), config_dict(config_path))
    g = torch.Generator().manual_seed(2)
    z = torch.randn(batch, 4, side, side, generator=g)
    ours = model.decode_first_stage(z)
    theirs = ref.decode(z / ref.config.scaling_factor).sample
    assert ours.shape == theirs.shape
    dec = rel_err(ours, theirs)
    report(f"{label} VAE decode ({side}x{side} latent, batch {batch})", dec, tol)
    f = ours.shape[-1] // side
    x = torch.rand(batch, 3, side * f, side * f, generator=g) * 2 - 1
    ours = model.first_stage_model.encode(x).mean
    theirs = ref.encode(x).latent_dist.mean
    enc = rel_err(ours, theirs)
    report(f"{label} VAE encode mean ({side * f}x{side * f} image)", enc, tol)
    # the scaled latent our encode_first_stage returns (posterior mean) is diffusers' mean times scaling_factor
    mode = rel_err(model.encode_first_stage(x, sample=False), theirs * ref.config.scaling_factor)
    del ref
    gc.collect()
    assert dec < tol and enc < tol and mode < tol, (dec, enc, mode)


@torch.no_grad()
def check_text(model, tol: float, label: str) -> None:
    ref = text_reference(model)
    tokens = model.cond_stage_model.tokenize(PROMPTS + [""])
    ours = model.get_learned_conditioning(PROMPTS + [""])
    theirs = ref(input_ids=tokens).last_hidden_state
    assert ours.shape == theirs.shape == (3, 77, ref.config.hidden_size)
    err = rel_err(ours, theirs)
    report(f"{label} text conditioning (last hidden state, 3 prompts)", err, tol)
    del ref
    assert err < tol


# -----------------------------------------------------------------------------
# tiny config

@pytest.fixture(scope="module")
def tiny():
    return build_perturbed(TINY, seed=0)


def test_unet_tiny(tiny):
    check_unet(tiny, TINY, side=8, tol=TINY_TOL, label="tiny")


def test_vae_tiny(tiny):
    check_vae(tiny, TINY, side=8, batch=2, tol=TINY_TOL, label="tiny")


def test_text_tiny(tiny):
    check_text(tiny, TINY_TOL, "tiny")


def test_perturbation_moves_every_parameter(tiny):
    """Zero-initialised layers and unit norms must not hide behind their initial values."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for name, module in tiny.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            assert p.abs().max() > 0, f"{name}.{pname} is all zeros"
            if isinstance(module, norms) and pname == "weight":
                assert not torch.allclose(p, torch.ones_like(p)), f"{name}.{pname} is still ones"


# -----------------------------------------------------------------------------
# DDIM

def test_ddim_matches_diffusers_scheduler(tiny):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD_SCHEDULER)
    sched.set_timesteps(50)
    steps = ddim_timesteps(50)
    assert sched.timesteps.tolist() == steps
    assert steps[0] == 981 and steps[-1] == 1 and len(steps) == 50
    ac_err = rel_err(tiny.alphas_cumprod, sched.alphas_cumprod)
    assert ac_err < 1e-5, ac_err

    with torch.no_grad():
        cond = tiny.get_learned_conditioning(PROMPTS)
        uncond = tiny.get_learned_conditioning([""] * len(PROMPTS))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours_fn = cfg_model_fn(tiny.apply_model, cond, uncond, 7.5)
    ours = sample_ddim(ours_fn, x_T, tiny.alphas_cumprod, steps, eta=0.0)

    def diffusers_loop(model_fn):
        x = x_T.clone()
        for t in sched.timesteps:
            with torch.no_grad():
                eps = model_fn(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x

    # (a) the sampler arithmetic alone: diffusers' scheduler driven by our guided eps
    err_sched = rel_err(ours, diffusers_loop(ours_fn))
    report("DDIM 50 steps, CFG 7.5, eta 0: ours vs DDIMScheduler on our eps", err_sched, DDIM_TOL)
    # (b) the whole chain: diffusers' UNet (guidance done the standard way) + DDIMScheduler
    ref = diffusers_unet(release_state_dict(tiny), config_dict(TINY))

    def ref_fn(x, t):
        out = ref(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.chunk(2)
        return u + 7.5 * (c - u)

    err_chain = rel_err(ours, diffusers_loop(ref_fn))
    report("DDIM 50 steps, CFG 7.5, eta 0: ours vs diffusers UNet + DDIMScheduler", err_chain, DDIM_TOL)
    assert err_sched < DDIM_TOL and err_chain < DDIM_TOL, (err_sched, err_chain)


def test_ddim_release_schedule_and_partial_steps():
    rel = ddim_timesteps(50, release_schedule=True)
    assert len(rel) == 49 and 981 not in rel and rel[0] == 961 and rel[-1] == 1
    assert rel == ddim_timesteps(50)[1:]
    assert partial_steps(50, 40, release_schedule=True) == 10
    assert partial_steps(50, 40) == 9


# -----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_short_prompt(tiny):
    ids = tiny.cond_stage_model.tokenize(["a photo of the cat"])
    assert ids.shape == (1, 77)
    expected = [49406, 320, 1125, 539, 518, 2368, 49407]
    assert ids[0].tolist() == expected + [49407] * (77 - len(expected))
    assert load_tokenizer()(["a photo of the cat"])["input_ids"][0] == expected


def test_tokenizer_long_prompt_truncates(tiny):
    long = "a photo of the cat sitting on a red sofa next to a window, " * 12
    ids = tiny.cond_stage_model.tokenize([long, "a cat"])
    assert ids.shape == (2, 77)
    row = ids[0].tolist()
    assert row[0] == 49406 and row[-1] == 49407
    assert 49407 not in row[1:-1]  # the text fills the window: no padding, EOS only at the end
    assert row[1:6] == [320, 1125, 539, 518, 2368]


# -----------------------------------------------------------------------------
# full SD v1 architecture (slow)

@pytest.fixture(scope="module")
def full():
    model = build_perturbed(FULL, seed=0)
    yield model
    del model
    gc.collect()


@pytest.mark.slow
def test_full_unet_parameter_count(full):
    assert sum(p.numel() for p in full.unet.parameters()) == 859_520_964
    ref = diffusers_unet(release_state_dict(full), config_dict(FULL))  # shares our tensors: no second copy
    assert sum(p.numel() for p in ref.parameters()) == 859_520_964


@pytest.mark.slow
def test_unet_full(full):
    check_unet(full, FULL, side=16, tol=FULL_TOL, label="full v1")


@pytest.mark.slow
def test_vae_full(full):
    check_vae(full, FULL, side=8, batch=1, tol=FULL_TOL, label="full v1")


@pytest.mark.slow
def test_text_full(full):
    check_text(full, FULL_TOL, "full v1")
