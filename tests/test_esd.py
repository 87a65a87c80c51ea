"""ESD as a method of its own (train.py --method esd, the delta kind "full", merged exports). Tiny model, CPU."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

import generate_images
from ldm.cli import run
from ldm.config import instantiate_from_config, load_config
from ldm.erasure.delta import adapter_scale, adapters_disabled, bake, delta_layers, delta_state_dict
from ldm.erasure.export import export_merged
from ldm.erasure.full import inject_full
from ldm.erasure.io import load_adapter, read_adapter, save_adapter
from ldm.erasure.methods import METHODS
from ldm.erasure.objective import UnGuideObjective, encode_prompts
from ldm.erasure.settings import TrainSettings
from ldm.erasure.targets import esd_layers
from ldm.erasure.training import Trainer, read_state
from ldm.errors import UserError
from ldm.loader import load_model_from_config
from test_train import CAT, TINY, args, base, ckpt, messages, restated_loss, run_dir, train_main  # noqa: F401

FULL_SD = Path(__file__).resolve().parents[1] / "configs/stable-diffusion/v1-inference.yaml"
KEY = {"D": "weight", "b": "bias"}


def esd_restated(named_parameters, train_method: str) -> set[str]:
    """ESD's train-esd.py selection, restated on parameter names."""
    keep = []
    for name, _ in named_parameters:
        if train_method == "noxattn" and not (name.startswith("out.") or "attn2" in name or "time_embed" in name):
            keep.append(name)
        elif train_method == "selfattn" and "attn1" in name:
            keep.append(name)
        elif train_method == "xattn" and "attn2" in name:
            keep.append(name)
        elif train_method == "full":
            keep.append(name)
    return set(keep)


def trained_names(unet) -> set[str]:
    """The base parameter names the full deltas stand for: <path>.lora.D -> <path>.weight, .b -> .bias."""
    return {f"{k.rsplit('.', 2)[0]}.{KEY[k.rsplit('.', 1)[1]]}" for k in delta_state_dict(unet)}


def with_delta(base, train_method="noxattn", seed=0, scale=0.02):
    """A copy of `base` with full deltas of random values (seeded) on ESD's `train_method` layers."""
    model = copy.deepcopy(base)
    inject_full(model.unet, esd_layers(model.unet, train_method))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_state_dict(model.unet, keep_vars=True).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def eps(model, seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *model.latent_shape(16), generator=g)
    t = torch.tensor([700, 150][:n])
    c = model.get_learned_conditioning(["a photo of the cat", "a dog"][:n])
    with torch.no_grad():
        return model.apply_model(z, t, c)


# ---------------------------------------------------------------------------------------------------------------
# parameter sets

@pytest.mark.parametrize("train_method", ["xattn", "noxattn", "selfattn", "full"])
def test_each_train_method_trains_exactly_esds_parameters(base, train_method):
    model = copy.deepcopy(base)
    inject_full(model.unet, esd_layers(model.unet, train_method))
    assert trained_names(model.unet) == esd_restated(base.unet.named_parameters(), train_method)
    kinds = {type(base.unet.get_submodule(p)).__name__ for p in delta_layers(model.unet)}
    if train_method in ("noxattn", "full"):  # convolutions, norms and biases are part of ESD's set
        assert {"Conv2d", "GroupNorm32", "LayerNorm", "Linear"} <= kinds


def test_parameter_counts_on_the_sd_v1_config():
    """ESD's sets on the full SD v1 UNet (meta device: no memory): the same names, the same counts."""
    want = {"xattn": 43_962_560, "noxattn": 813_495_680, "selfattn": 49_574_080, "full": 859_520_964}
    for train_method, count in want.items():
        with torch.device("meta"):
            unet = instantiate_from_config(load_config(FULL_SD).model.params.unet_config)
            params = dict(unet.named_parameters())
            assert sum(params[n].numel() for n in esd_restated(params.items(), train_method)) == count
            inject_full(unet, esd_layers(unet, train_method))
        assert sum(p.numel() for p in delta_state_dict(unet).values()) == count


# ---------------------------------------------------------------------------------------------------------------
# the objective: one copy equals ESD's two copies

def test_one_copy_esd_loss_equals_the_two_model_restatement(base):
    """Ours: the base weights + a full delta, e_0/e_p with the deltas off. ESD's: a fine-tuned model whose own
    parameters are trained (W' = W + D) and a deep-copied frozen model. Same losses; the gradient of D is the
    gradient of W'."""
    shape, S = base.latent_shape(16), 5
    ours = with_delta(base, "noxattn")
    theirs = copy.deepcopy(ours)
    bake(theirs.unet)                                           # ESD's fine-tuned model: plain layers holding W + D
    names = esd_restated(theirs.unet.named_parameters(), "noxattn")
    for n, p in theirs.unet.named_parameters():
        p.requires_grad_(n in names)
    frozen = copy.deepcopy(base)                                # ESD's model_orig
    emb = encode_prompts(ours, "a photo of the cat", "")
    obj = UnGuideObjective(ours, emb, shape, ddim_steps=S, start_guidance=3.0, negative_guidance=1.0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    their_params = dict(theirs.unet.named_parameters())
    for _ in range(3):
        loss1, plan = obj.loss(g1)
        loss2, t_enc = restated_loss(theirs, frozen, emb, shape, S, g2, start_guidance=3.0, eta=1.0)
        assert plan.t_enc == t_enc
        assert abs(float(loss1.detach()) - float(loss2.detach())) <= 1e-6 * max(1.0, float(loss2.detach()))
        loss1.backward()
        loss2.backward()
        for key, d in delta_state_dict(ours.unet, keep_vars=True).items():
            name = f"{key.rsplit('.', 2)[0]}.{KEY[key.rsplit('.', 1)[1]]}"
            torch.testing.assert_close(d.grad, their_params[name].grad, atol=1e-6, rtol=1e-4)
            d.grad = their_params[name].grad = None


# ---------------------------------------------------------------------------------------------------------------
# per-sample scaling, saving and reloading

def test_per_sample_scale_and_reload(base, tmp_path):
    ours = with_delta(base, "full")
    e_base, e_ours = eps(base), eps(ours)
    assert (e_base - e_ours).abs().max() > 1e-3                 # the delta does something
    with adapters_disabled(ours.unet):
        torch.testing.assert_close(eps(ours), e_base, atol=1e-6, rtol=0)
    with adapter_scale(ours.unet, torch.tensor([0.0, 1.0])):    # sample 0: base, sample 1: ESD model
        mixed = eps(ours)                                       # (W x + s D x, against (W + D) x unscaled)
    torch.testing.assert_close(mixed[0], e_base[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], e_ours[1], atol=1e-5, rtol=0)
    save_adapter(tmp_path / "d.safetensors", ours.unet, 1.0, extra={"method": "esd", "train_method": "full"})
    tensors, meta = read_adapter(tmp_path / "d.safetensors")
    assert meta["delta_kind"] == "full" and meta["method"] == "esd" and json.loads(meta["base_fingerprint"])
    fresh = copy.deepcopy(base)
    info = load_adapter(tmp_path / "d.safetensors", fresh.unet)
    assert info.kind == "full"
    torch.testing.assert_close(eps(fresh), e_ours, atol=1e-6, rtol=0)


def test_build_esd_trains_only_its_deltas(base):
    """The registry's esd builder: zero deltas (the model starts as the base), Adam moves them, base untouched."""
    model = copy.deepcopy(base)
    targets = esd_layers(model.unet, "xattn")
    s = TrainSettings(lora_rank=None, lora_alpha=None, targets=targets, lr=1e-3, target_prompt="a photo of the cat",
                      reference_prompt="", ddim_steps=4, schedule="standard", image_size=16, start_guidance=3.0,
                      negative_guidance=1.0, ddim_eta=0.0, base_sha256=None, seed=0, preserve=None,
                      preserve_weight=None, method="esd", train_method="xattn")
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    method = METHODS["esd"](model, s, torch.Generator().manual_seed(0), None)
    assert method.objective.emb.reference.equal(encode_prompts(model, "x", "").reference)  # reference ""
    torch.testing.assert_close(eps(model), eps(base), atol=0, rtol=0)
    trainer = Trainer(method, 1e-3, torch.Generator().manual_seed(0))
    for _ in range(2):
        trainer.step()
    assert all(v.abs().max() > 0 for k, v in method.tensors.items() if k.endswith(".D"))
    with adapters_disabled(model.unet):
        torch.testing.assert_close(eps(model), eps(base), atol=0, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# train.py --method esd

def test_train_py_esd_run(base, ckpt, tmp_path, capsys):
    code, err = train_main(args(ckpt, tmp_path / "out", "--method", "esd", "--train_method", "selfattn",
                                iterations=3), capsys)
    assert code == 0, err
    rd = run_dir(tmp_path / "out")
    assert rd.name == ("method_esd_class_name_cat_train_method_selfattn_iterations_3_lr_1e-05_start_guidance_3_"
                       "negative_guidance_1_ddim_steps_4")
    cfg = json.loads((rd / "train_config.json").read_text())
    assert (cfg["lr"], cfg["start_guidance"], cfg["negative_guidance"]) == (1e-5, 3.0, 1.0)  # ESD's defaults
    assert cfg["reference_prompt"] == "" and cfg["method"] == "esd" and cfg["status"] == "complete"
    tensors, meta = read_adapter(rd / "models" / "lora.safetensors")
    assert (meta["delta_kind"], meta["method"], meta["train_method"]) == ("full", "esd", "selfattn")
    names = {f"{k.rsplit('.', 2)[0]}.{KEY[k.rsplit('.', 1)[1]]}" for k in tensors}
    assert names == esd_restated(base.unet.named_parameters(), "selfattn")
    assert all(v.abs().max() > 0 for k, v in tensors.items() if k.endswith(".D"))  # every chosen weight moved


def test_old_state_without_method_resumes_as_unguide(tmp_path):
    s = TrainSettings(lora_rank=1, lora_alpha=8, targets=["a"], lr=1e-4, target_prompt="t", reference_prompt="r",
                      ddim_steps=4, schedule="standard", image_size=16, start_guidance=9.0, negative_guidance=2.0,
                      ddim_eta=0.0, base_sha256=None, seed=0, preserve=None, preserve_weight=None)
    old = {k: v for k, v in s.fingerprint().items() if k not in ("method", "train_method")}  # a release-era file
    state = {"iteration": 1, "args": old, "generator": torch.Generator().get_state(), "lora": {"a.lora.A": 0},
             "optimizer": {}}
    torch.save(state, tmp_path / "state.pt")
    assert read_state(tmp_path / "state.pt", s.fingerprint(), ["a.lora.A"], s.legacy_values())["iteration"] == 1
    esd = TrainSettings(**{**s.__dict__, "method": "esd", "train_method": "xattn"})
    with pytest.raises(UserError, match="method"):
        read_state(tmp_path / "state.pt", esd.fingerprint(), ["a.lora.A"], esd.legacy_values())


@pytest.mark.parametrize("case", ["train_method", "lora_rank", "lora_alpha", "target_modules", "preserve",
                                  "train_method_unguide"])
def test_train_py_bad_flags_one_line_exit_2(case, ckpt, tmp_path, capsys):
    extra = {"train_method": ["--method", "esd", "--train_method", "attn3"],
             "lora_rank": ["--method", "esd", "--lora_rank", "4"],
             "lora_alpha": ["--method", "esd", "--lora_alpha", "4"],
             "target_modules": ["--method", "esd", "--target_modules", "xattn"],
             "preserve": ["--method", "esd", "--preserve", "a dog"],
             "train_method_unguide": ["--train_method", "xattn"]}[case]
    code, err = train_main(args(ckpt, tmp_path / "out", *extra, iterations=2), capsys)
    lines = messages(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert ("--train_method" if case.startswith("train_method") else f"--{case}") in lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# delta files: bad input

def test_bad_delta_files_are_refused(base, tmp_path):
    ours = with_delta(base, "xattn")
    save_adapter(tmp_path / "d.safetensors", ours.unet, 1.0)
    tensors, meta = read_adapter(tmp_path / "d.safetensors")
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.mul_(1.5)
    with pytest.raises(UserError, match="another base model"):
        load_adapter(tmp_path / "d.safetensors", other.unet)
    k0 = next(iter(tensors))
    cases = {"nan": ({**tensors, k0: tensors[k0] * float("nan")}, meta, "non-finite"),
             "layers": ({k: v for k, v in tensors.items() if not k.startswith(k0.rsplit(".", 2)[0] + ".")}, meta,
                        "other layers than its metadata"),
             "shape": ({**tensors, k0: tensors[k0][:1]}, meta, "does not fit")}
    for name, (t, m, want) in cases.items():
        save_file(t, str(tmp_path / f"{name}.safetensors"), metadata=m)
        with pytest.raises(UserError, match=want) as exc:
            load_adapter(tmp_path / f"{name}.safetensors", copy.deepcopy(base).unet)
        assert f"{name}.safetensors" in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------------------------
# exports and generation

@pytest.fixture(scope="module")
def delta_file(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("delta") / "esd.safetensors"
    save_adapter(path, with_delta(base, "noxattn", seed=3, scale=0.05).unet, 1.0, extra={"method": "esd"})
    return path


def test_merged_exports_equal_base_plus_delta(base, ckpt, delta_file, tmp_path):
    want = copy.deepcopy(base)
    load_adapter(delta_file, want.unet)
    e_want = eps(want)
    export_merged(delta_file, "merged", tmp_path / "merged.safetensors", TINY, ckpt)
    merged = load_model_from_config(TINY, tmp_path / "merged.safetensors", verbose=False)
    torch.testing.assert_close(eps(merged), e_want, atol=1e-5, rtol=1e-5)
    export_merged(delta_file, "diffusers_unet", tmp_path / "unet.safetensors", TINY, ckpt)
    assert any(k.startswith("down_blocks.") for k in load_file(str(tmp_path / "unet.safetensors")))
    unet = load_model_from_config(TINY, ckpt, verbose=False, unet_weights=tmp_path / "unet.safetensors")
    torch.testing.assert_close(eps(unet), e_want, atol=1e-5, rtol=1e-5)
    assert (eps(base) - e_want).abs().max() > 1e-2


def _images(out: Path) -> np.ndarray:
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 2
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files])


def test_generate_images_with_a_full_delta_is_the_merged_model(ckpt, delta_file, tmp_path):
    export_merged(delta_file, "merged", tmp_path / "merged.safetensors", TINY, ckpt)
    common = ["--device", "cpu", "--prompt", "a photo of the cat", "--samples", "2", "--steps", "4",
              "--image_size", "16", "--seed", "1", "--config", TINY]
    run(lambda: generate_images.main([*common, "--ckpt", str(ckpt), "--output_dir", str(tmp_path / "esd"),
                                      "--lora", str(delta_file), "--w1", "0", "--w2", "0"]))
    run(lambda: generate_images.main([*common, "--ckpt", str(tmp_path / "merged.safetensors"),
                                      "--output_dir", str(tmp_path / "merged"), "--w1", "1", "--w2", "1"]))
    run(lambda: generate_images.main([*common, "--ckpt", str(ckpt), "--output_dir", str(tmp_path / "base"),
                                      "--w1", "1", "--w2", "1"]))
    esd, merged, plain = _images(tmp_path / "esd"), _images(tmp_path / "merged"), _images(tmp_path / "base")
    assert np.abs(esd - merged).max() <= 2                      # JPEG of the same pixels, up to float rounding
    assert np.abs(esd - plain).mean() > 5 * max(np.abs(esd - merged).mean(), 0.1)
