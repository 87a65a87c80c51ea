"""Tests of the checkpoint loader (ldm.loader, ldm.config) and of the scripts' bad-input
handling, on the tiny config. CPU, offline, seconds.
"""
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from helpers_model import REPO, TINY, build_perturbed
from ldm.loader import read_checkpoint, release_state_dict
from ldm.models.diffusion.ddpm import SCHEDULE_KEYS, make_schedule
from ldm.errors import UserError
from ldm.loader import load_model_from_config, resolve_device, resolve_dtype

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


# -----------------------------------------------------------------------------
# helpers

@pytest.fixture(scope="module")
def tiny():
    return build_perturbed(TINY, seed=0)


@pytest.fixture(scope="module")
def released(tiny):
    return {k: v.clone() for k, v in release_state_dict(tiny).items()}


def save_ckpt(path, state_dict, **extra):
    torch.save({"state_dict": state_dict, "global_step": 1, **extra}, path)
    return path


@torch.no_grad()
def outputs(model):
    """A fingerprint of every part: UNet eps, VAE decode and encode mean, text conditioning."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = model.get_learned_conditioning(["a photo of the cat", ""])
    eps = model.apply_model(x, torch.tensor([1, 981]), ctx)
    img = model.decode_first_stage(x)
    mean = model.encode_first_stage(img.clamp(-1, 1), sample=False)
    return [ctx, eps, img, mean]


def assert_same_outputs(a, b):
    for u, v in zip(outputs(a), outputs(b)):
        assert torch.equal(u, v)


def refused(path, match, **kw):
    with pytest.raises(UserError, match=match) as info:
        load_model_from_config(TINY, path, verbose=False, **kw)
    return str(info.value)


# -----------------------------------------------------------------------------
# round trip

@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_round_trip(tiny, released, tmp_path, fmt):
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "ckpt":
        save_ckpt(path, released)
    else:
        save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    loaded = load_model_from_config(TINY, path, verbose=False)
    assert not loaded.training
    assert set(release_state_dict(loaded)) == set(released)
    for k, v in release_state_dict(loaded).items():
        assert torch.equal(v, released[k]), k
    assert_same_outputs(tiny, loaded)
    assert torch.equal(loaded.alphas_cumprod, tiny.alphas_cumprod)  # schedule buffers rebuilt after meta build


# -----------------------------------------------------------------------------
# known extras, wrong schedule, unknown / missing / misshapen keys

def test_known_extras_load_and_are_reported(tiny, released, tmp_path, capsys):
    sd = dict(released)
    sd.update(make_schedule(0.00085, 0.012, 1000))
    sd[POSITION_IDS] = torch.arange(77).expand(1, -1).clone()
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    ema = [k for k in released if k.startswith("model.diffusion_model.")][:5]
    for k in ema:  # the release's flattened EMA names
        sd["model_ema." + k[len("model."):].replace(".", "")] = released[k].clone()
    path = save_ckpt(tmp_path / "extras.ckpt", sd, epoch=3)
    loaded = load_model_from_config(TINY, path)
    line = capsys.readouterr().out
    n_skipped = len(SCHEDULE_KEYS) + 1 + 2 + len(ema)
    assert f"{len(released)} tensors loaded" in line
    assert f"skipped {n_skipped} known non-weight entries ({2 + len(ema)} of them EMA)" in line
    assert "epoch" in line and "global_step" in line  # ignored top-level entries are named
    assert_same_outputs(tiny, loaded)


def test_wrong_schedule_refused(released, tmp_path):
    sd = dict(released)
    sd.update(make_schedule(0.00085, 0.02, 1000))  # another linear_end
    refused(save_ckpt(tmp_path / "sched.ckpt", sd), r"noise schedule \(betas\)")


def test_unknown_key_refused(released, tmp_path):
    sd = dict(released)
    sd["model.diffusion_model.extra_block.weight"] = torch.zeros(3)
    msg = refused(save_ckpt(tmp_path / "unknown.ckpt", sd), "unexpected keys")
    assert "model.diffusion_model.extra_block.weight" in msg and "unknown.ckpt" in msg


def test_missing_key_refused(released, tmp_path):
    key = "first_stage_model.decoder.conv_out.bias"
    sd = {k: v for k, v in released.items() if k != key}
    msg = refused(save_ckpt(tmp_path / "missing.ckpt", sd), "missing keys")
    assert key in msg


def test_missing_text_key_named_in_released_form(released, tmp_path):
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert key in released
    sd = {k: v for k, v in released.items() if k != key}
    assert key in refused(save_ckpt(tmp_path / "missing_text.ckpt", sd), "missing keys")


def test_wrong_shape_refused(released, tmp_path):
    key = "model.diffusion_model.out.2.weight"
    sd = dict(released)
    sd[key] = torch.zeros(5, 32, 3, 3)
    msg = refused(save_ckpt(tmp_path / "shape.ckpt", sd), "shape mismatches")
    assert key in msg and "(5, 32, 3, 3)" in msg


def test_not_a_state_dict_refused(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    refused(path, "does not hold a state dict")


# -----------------------------------------------------------------------------
# pickles: Lightning's ModelCheckpoint is tolerated, anything else needs unsafe_pickle_load

class ArbitraryObject:
    """Stands for any class a checkpoint may pickle (here one defined in this test module)."""

    def __init__(self):
        self.payload = "ran"


def lightning_checkpoint(path, state_dict):
    """A Lightning-style file: the callbacks dict is keyed by the ModelCheckpoint class, plus an instance of it."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    assert not any(n in sys.modules for n in names), "a real pytorch_lightning is imported: the fake would shadow it"
    mods = {n: types.ModuleType(n) for n in names}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = ModelCheckpoint
    callback = ModelCheckpoint()
    callback.__dict__.update(monitor="val/loss", save_top_k=3, best_model_path="logs/last.ckpt")
    sys.modules.update(mods)
    try:
        torch.save({"state_dict": state_dict, "global_step": 1, "epoch": 2,
                    "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}},
                    "hyper_parameters": {"checkpoint_callback": callback}}, path)
    finally:
        for n in names:
            del sys.modules[n]
    return path


def test_lightning_checkpoint_loads_weights_only(tiny, released, tmp_path):
    path = lightning_checkpoint(tmp_path / "lightning.ckpt", released)
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(Exception):  # the file really does pickle a foreign class
        torch.load(path, weights_only=True)
    state_dict, extras = read_checkpoint(path)
    assert extras == ["callbacks", "epoch", "global_step", "hyper_parameters"]
    assert_same_outputs(tiny, load_model_from_config(TINY, path, verbose=False))


def test_arbitrary_pickle_refused_unless_unsafe(tiny, released, tmp_path):
    path = save_ckpt(tmp_path / "arbitrary.ckpt", released, payload=ArbitraryObject())
    msg = refused(path, "arbitrary unpickling")
    assert "ArbitraryObject" in msg and "unsafe_pickle_load" in msg
    loaded = load_model_from_config(TINY, path, unsafe_pickle_load=True, verbose=False)
    assert_same_outputs(tiny, loaded)


# -----------------------------------------------------------------------------
# another architecture

def test_sd2_like_checkpoint_refused(tmp_path):
    from omegaconf import OmegaConf

    from ldm.config import instantiate_from_config, load_config

    config = load_config(TINY)
    config.model.params.unet_config.params.context_dim = 1024  # SD 2.x's OpenCLIP-H context width
    with torch.device("meta"):
        other = instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in release_state_dict(other).items()}
    msg = refused(save_ckpt(tmp_path / "sd2.ckpt", sd), "another architecture")
    assert "1024" in msg


# -----------------------------------------------------------------------------
# device and precision

def test_device_auto_is_cpu_here():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        resolve_dtype("fp16", torch.device("cpu"))


# -----------------------------------------------------------------------------
# bad input through the script: exit code 2, one line `error: ...` naming the file, no traceback

def run_txt2img(*args, timeout=300):
    cmd = [sys.executable, str(REPO / "txt2img.py"), "--prompt", "a cat", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc, *names):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def valid_ckpt(released, tmp_path_factory):
    return save_ckpt(tmp_path_factory.mktemp("valid") / "tiny.ckpt", released)


def test_script_nonexistent_config(tmp_path, valid_ckpt):
    cfg = tmp_path / "no_such_config.yaml"
    assert_one_line_error(run_txt2img("--config", cfg, "--ckpt", valid_ckpt), cfg)


def test_script_config_not_a_model_config(tmp_path, valid_ckpt):
    cfg = tmp_path / "other.yaml"
    cfg.write_text("data:\n  batch_size: 4\n  root: /tmp\n")
    assert_one_line_error(run_txt2img("--config", cfg, "--ckpt", valid_ckpt), cfg)


def test_script_config_not_yaml(tmp_path, valid_ckpt):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model: [unclosed\n  target: {\n")
    assert_one_line_error(run_txt2img("--config", cfg, "--ckpt", valid_ckpt), cfg)


def test_script_nonexistent_checkpoint(tmp_path):
    ckpt = tmp_path / "missing.ckpt"
    assert_one_line_error(run_txt2img("--config", TINY, "--ckpt", ckpt), ckpt)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_script_truncated_checkpoint(tmp_path, valid_ckpt, released, suffix):
    full = valid_ckpt
    if suffix == ".safetensors":
        full = tmp_path / "full.safetensors"
        save_file({k: v.contiguous() for k, v in released.items()}, str(full))
    data = full.read_bytes()
    ckpt = tmp_path / f"truncated{suffix}"
    ckpt.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_txt2img("--config", TINY, "--ckpt", ckpt), ckpt)


def test_script_corrupt_safetensors(tmp_path):
    ckpt = tmp_path / "corrupt.safetensors"
    ckpt.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    assert_one_line_error(run_txt2img("--config", TINY, "--ckpt", ckpt), ckpt)


def test_script_directory_instead_of_checkpoint(tmp_path):
    folder = tmp_path / "a_folder.ckpt"
    folder.mkdir()
    assert_one_line_error(run_txt2img("--config", TINY, "--ckpt", folder), folder)


def test_script_directory_instead_of_config(tmp_path, valid_ckpt):
    assert_one_line_error(run_txt2img("--config", tmp_path, "--ckpt", valid_ckpt), tmp_path)


def test_script_fp16_on_cpu(valid_ckpt):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    line = assert_one_line_error(run_txt2img("--config", TINY, "--ckpt", valid_ckpt, "--device", "cpu",
                                             "--precision", "fp16"))
    assert "fp16" in line


def test_script_runs_on_auto_device(valid_ckpt, tmp_path):
    """The happy path: --device auto (the CPU here), tiny model, 2 steps, one PNG written."""
    proc = run_txt2img("--config", TINY, "--ckpt", valid_ckpt, "--device", "auto", "--steps", 2,
                       "--image_size", 16, "--seed", 7, "--outdir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tensors loaded" in proc.stdout
    pngs = list((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].name == "a_cat_7.png"


# -----------------------------------------------------------------------------
# files that are not what their name says, bad tensors, configs that would run code

def _png(path):
    from PIL import Image
    Image.new("RGB", (4, 4)).save(path, format="PNG")


@pytest.mark.parametrize("content, says", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "is a PNG image"),
    (b"<html><body>404</body></html>", "HTML"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n", "Git LFS pointer"),
    (bytes(range(171, 251)) * 8, "unknown content"),
])
def test_file_that_is_not_a_checkpoint_is_named_as_what_it_is(tmp_path, content, says):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    msg = refused(path, says)
    assert "unsafe_pickle_load" not in msg  # no advice to unpickle something that is not a pickle


def test_safetensors_named_ckpt_is_read_as_safetensors(tiny, released, tmp_path):
    path = tmp_path / "actually_safetensors.ckpt"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))
    loaded = load_model_from_config(TINY, path, verbose=False)
    for k, v in release_state_dict(loaded).items():
        assert torch.equal(v, released[k]), k


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused(released, tmp_path, value):
    sd = dict(released)
    key = "model.diffusion_model.out.2.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0, 0, 0] = value
    assert key in refused(save_ckpt(tmp_path / "nan.ckpt", sd), "NaN or Inf")


def test_integer_weights_refused(released, tmp_path):
    sd = dict(released)
    key = "model.diffusion_model.out.2.weight"
    sd[key] = torch.zeros(sd[key].shape, dtype=torch.int32)
    assert key in refused(save_ckpt(tmp_path / "int.ckpt", sd), "not floating point")


@pytest.mark.parametrize("target, says", [
    ("os.system", "not one of this project's model classes"),
    ("subprocess.Popen", "not one of this project's model classes"),
    ("LatentDiffusion", "not a dotted class path"),
    ("ldm.models.diffusion.ddpm.NoSuchClass", "not one of this project's model classes"),
])
def test_config_naming_other_code_refused(tmp_path, valid_ckpt, target, says):
    cfg = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    text = (REPO / "configs/tiny/tiny-inference.yaml").read_text()
    text = text.replace("target: ldm.models.autoencoder.AutoencoderKL",
                        f"target: {target}\n      params_unused: {{command: touch {marker}}}", 1)
    cfg.write_text(text)
    with pytest.raises(UserError, match=says):
        load_model_from_config(cfg, valid_ckpt, verbose=False)
    assert not marker.exists()


def test_config_misspelt_param_is_one_line(tmp_path, valid_ckpt):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text((REPO / "configs/tiny/tiny-inference.yaml").read_text().replace("model_channels:", "model_chanels:"))
    with pytest.raises(UserError, match="UNetModel: bad params.*model_chan"):
        load_model_from_config(cfg, valid_ckpt, verbose=False)


def test_unsafe_config_flag_allows_other_classes(tmp_path):
    from ldm.config import check_targets
    check_targets({"model": {"target": "mypackage.MyModel"}}, "cfg", unsafe=True)  # no error
    with pytest.raises(UserError):
        check_targets({"model": {"target": "mypackage.MyModel"}}, "cfg")
