"""Erasure training (ldm/erasure/objective.py, train.py) on the tiny model. CPU, offline."""
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import train
from helpers_model import check_peak_memory
from ldm.loader import release_state_dict
from ldm.erasure.io import load_adapter, read_adapter
from ldm.erasure.lora import inject_lora, lora_layers, lora_parameters
from ldm.erasure.objective import UnGuideObjective, encode_prompts
from ldm.erasure.targets import select_targets
from ldm.models.diffusion.ddim import cfg_model_fn, ddim_timesteps, ddpm_t_range, partial_steps, sample_ddim
from ldm.loader import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny/tiny-inference.yaml")
CAT = str(REPO / "data/cat.json")
FAST = ["--image_size", "16", "--ddim_steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in release_state_dict(model).items()}, str(path))
    return path


@pytest.fixture(scope="module")
def base(ckpt):
    from ldm.loader import load_model_from_config
    return load_model_from_config(TINY, ckpt, verbose=False).requires_grad_(False)


def train_main(argv, capsys=None):
    """train.main in-process -> (exit code, stderr)."""
    code = 0
    try:
        train.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys else ""
    return code, err


def args(ckpt, out, *extra, prompts=CAT, iterations=6):
    return ["--config_path", TINY, "--ckpt_path", ckpt, "--prompts_json", prompts, "--output_dir", out,
            "--iterations", iterations, *FAST, *extra]


def messages(err):
    """stderr lines other than the progress bar's."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("erasing ")]


def run_dir(out):
    dirs = [d for d in Path(out).iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def adapter(path):
    return read_adapter(path)[0]


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def adapted(base, rank=1, seed=0, spec="default", b_scale=0.0):
    model = copy.deepcopy(base)
    inject_lora(model.unet, select_targets(model.unet, spec), rank=rank, alpha=8.0,
                generator=torch.Generator().manual_seed(seed))
    if b_scale:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in lora_layers(model.unet).values():
                m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=g) * b_scale)
    return model


# ---------------------------------------------------------------------------------------------------------
# the objective

def restated_loss(model, frozen, emb, shape, S, generator, start_guidance=9.0, eta=2.0):
    """The release's computation, restated plainly: a second (deep-copied) base model gives e_0 and e_p,
    each in its own call. Draw order as documented in objective.py: t_enc, t, x_T, noise seed."""
    t_enc = int(torch.randint(S, (1,), generator=generator))
    lo, hi = ddpm_t_range(S, t_enc)
    t = torch.full((1,), int(torch.randint(lo, hi, (1,), generator=generator)), dtype=torch.long)
    x_T = torch.randn((1, *shape), generator=generator)
    torch.randint(2 ** 62, (1,), generator=generator)  # the eta-noise seed (eta = 0: unused)
    fn = cfg_model_fn(model.apply_model, emb.target, emb.uncond, start_guidance)
    z = sample_ddim(fn, x_T, model.alphas_cumprod, ddim_timesteps(S), stop_after=partial_steps(S, t_enc))
    with torch.no_grad():
        e_0 = frozen.apply_model(z, t, emb.reference)
        e_p = frozen.apply_model(z, t, emb.target)
    e_n = model.apply_model(z, t, emb.target)
    return F.mse_loss(e_n, e_0 - eta * (e_p - e_0)), t_enc


def test_one_copy_objective_equals_two_copy_restatement(base):
    shape = base.latent_shape(16)
    frozen = copy.deepcopy(base)                      # the release's model_orig
    ours = adapted(base, b_scale=0.05)                # non-zero B: the adapted model differs from the base
    theirs = copy.deepcopy(ours)
    emb = encode_prompts(ours, "a photo of the cat", "a photo of the forest")
    obj = UnGuideObjective(ours, emb, shape, ddim_steps=5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    seen = set()
    for _ in range(6):
        loss1, plan = obj.loss(g1)
        loss2, t_enc = restated_loss(theirs, frozen, emb, shape, 5, g2)
        assert plan.t_enc == t_enc
        seen.add(t_enc)
        assert abs(float(loss1.detach()) - float(loss2.detach())) <= 1e-6
        loss1.backward()
        loss2.backward()
        for p1, p2 in zip(lora_parameters(ours.unet), lora_parameters(theirs.unet)):
            torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-5)
            p1.grad = p2.grad = None
    assert len(seen) > 1
    # the objective's own two-copy mode (used by the benchmark) agrees too
    obj2 = UnGuideObjective(theirs, emb, shape, ddim_steps=5, frozen_model=frozen)
    a, _ = obj.loss(torch.Generator().manual_seed(3))
    b, _ = obj2.loss(torch.Generator().manual_seed(3))
    assert abs(float(a.detach()) - float(b.detach())) <= 1e-6


def test_preservation_term_is_lambda_times_the_preserved_prompts_drift(base):
    """loss with --preserve = the release's loss + lambda * mean_k MSE(adapted, base) on the preserved prompts,
    at the same z and t; and the gradient reaches the adapters through it."""
    shape = base.latent_shape(16)
    model = adapted(base, b_scale=0.05)
    keep = ("a photo of the dog", "a red car on a road")
    plain_emb = encode_prompts(model, "a photo of the cat", "a photo of the forest")
    emb = encode_prompts(model, "a photo of the cat", "a photo of the forest", keep)
    assert torch.equal(emb.target, plain_emb.target) and emb.preserve.shape == (2, *emb.target.shape[1:])
    plain = UnGuideObjective(model, plain_emb, shape, ddim_steps=5)
    pres = UnGuideObjective(model, emb, shape, ddim_steps=5, preserve_weight=0.5)
    l0, plan0 = plain.loss(torch.Generator().manual_seed(5))
    l1, plan1 = pres.loss(torch.Generator().manual_seed(5))
    assert (plan0.t_enc, plan0.t) == (plan1.t_enc, plan1.t)
    z, t = plain.partial_latent(plan0), torch.full((1,), plan0.t, dtype=torch.long)
    frozen = copy.deepcopy(base)
    with torch.no_grad():
        drift = sum(F.mse_loss(model.apply_model(z, t, c[None]), frozen.apply_model(z, t, c[None]))
                    for c in emb.preserve) / len(keep)
    assert float(drift) > 1e-8
    assert abs(float((l1 - l0).detach()) - 0.5 * float(drift)) <= 1e-5 * float(drift) + 1e-9
    l1.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_parameters(model.unet))


def test_other_wordings_are_erased_one_drawn_per_iteration_with_its_own_context(base):
    """--erase_synonyms: each iteration draws its wording (last, after t_enc, t, x_T and the noise seed: the other
    draws are those of a run without it) and the whole loss is the target-only loss with that wording's context in
    place of c_p (trajectory, e_p, e_n); over draws every wording comes up."""
    shape = base.latent_shape(16)
    model = adapted(base, b_scale=0.05)
    also = ("a photo of the kitten", "a photo of the feline")
    emb = encode_prompts(model, "a photo of the cat", "a photo of the forest", (), also)
    obj = UnGuideObjective(model, emb, shape, ddim_steps=5)
    plain = UnGuideObjective(model, encode_prompts(model, "a photo of the cat", "a photo of the forest"), shape,
                             ddim_steps=5)
    seen = set()
    for seed in range(12):
        loss, plan = obj.loss(torch.Generator().manual_seed(seed))
        p0 = plain.draw(torch.Generator().manual_seed(seed))
        assert (plan.t_enc, plan.t, plan.noise_seed) == (p0.t_enc, p0.t, p0.noise_seed)
        seen.add(plan.prompt)
        wording = ("a photo of the cat", *also)[plan.prompt]
        single = UnGuideObjective(model, encode_prompts(model, wording, "a photo of the forest"), shape, ddim_steps=5)
        z = single.partial_latent(dataclasses.replace(plan, prompt=0))  # the same draws, that wording as c_p
        t = torch.full((1,), plan.t, dtype=torch.long)
        f = single.frozen_eps(z, t)
        e_n = model.apply_model(z, t, single.emb.target)
        expected = F.mse_loss(e_n, f[0:1] - 2.0 * (f[1:2] - f[0:1]))
        assert abs(float(loss.detach()) - float(expected.detach())) <= 1e-5 * float(expected.detach()) + 1e-9
    assert seen == {0, 1, 2}


def test_partial_trajectory_uses_the_adapted_model(base):
    """As the release: z comes from the model being trained (with its current adapters), not from the base."""
    shape = base.latent_shape(16)
    emb = encode_prompts(base, "a photo of the cat", "a photo of the forest")
    plain = UnGuideObjective(adapted(base), emb, shape, ddim_steps=5)
    moved = UnGuideObjective(adapted(base, b_scale=0.05), emb, shape, ddim_steps=5)
    plan = plain.draw(torch.Generator().manual_seed(0))
    plan.t_enc = 0  # the longest trajectory
    assert not torch.allclose(plain.partial_latent(plan), moved.partial_latent(plan))
    plan.t_enc = 4  # S - 1: no step on the standard schedule, z = x_T
    assert torch.equal(moved.partial_latent(plan), plan.start_code)


def test_loss_decreases_on_a_fixed_draw(base):
    """Regression on one fixed draw (t_enc = S-1: z = x_T): Adam must bring the loss well down."""
    model = adapted(base)
    emb = encode_prompts(model, "a photo of the cat", "a photo of the forest")
    obj = UnGuideObjective(model, emb, model.latent_shape(16), ddim_steps=4, fixed_t_enc=3)
    opt = torch.optim.Adam(lora_parameters(model.unet), lr=1e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss, _ = obj.loss(torch.Generator().manual_seed(11))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0], losses


def test_training_lowers_the_objective(base, ckpt, tmp_path):
    """End to end: the trained adapter scores a lower loss than the untrained one on the same held-out draws."""
    code, _ = train_main(args(ckpt, tmp_path, "--lr", "1e-3", "--save_losses", iterations=30))
    assert code == 0
    rd = run_dir(tmp_path)
    assert (rd / "losses.csv").is_file() and (rd / "losses.png").is_file()
    assert len((rd / "losses.csv").read_text().splitlines()) == 31

    def held_out(model):
        emb = encode_prompts(model, "a photo of the cat", "a photo of the forest")
        obj = UnGuideObjective(model, emb, model.latent_shape(16), ddim_steps=4)
        g = torch.Generator().manual_seed(1234)
        return sum(float(obj.loss(g)[0].detach()) for _ in range(12)) / 12

    untrained = adapted(base)
    trained = copy.deepcopy(base)
    load_adapter(rd / "models" / "lora.safetensors", trained.unet)
    before, after = held_out(untrained), held_out(trained)
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------------------------------------------------
# train.py end to end

def test_train_outputs_and_determinism(base, ckpt, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert train_main(args(ckpt, a))[0] == 0
    printed = capsys.readouterr().out
    assert train_main(args(ckpt, b))[0] == 0
    assert train_main(args(ckpt, c, "--seed", "7"))[0] == 0
    rd = run_dir(a)
    assert rd.name == ("class_name_cat_lora_rank_1_lora_alpha_8_iterations_6_lr_3e-05_start_guidance_9.0_"
                       "negative_guidance_2.0_ddim_steps_4")
    final = rd / "models" / "lora.safetensors"
    assert same(adapter(final), adapter(run_dir(b) / "models" / "lora.safetensors"))  # bitwise
    assert not same(adapter(final), adapter(run_dir(c) / "models" / "lora.safetensors"))
    assert not (rd / "checkpoint" / "state.pt").exists() and not (rd / "models" / "lora_partial.safetensors").exists()
    cfg = json.loads((rd / "train_config.json").read_text())
    for key in ("config", "ckpt", "lora_rank", "lora_alpha", "target_modules", "iterations", "lr", "image_size",
                "ddim_steps", "ddim_eta", "start_guidance", "negative_guidance", "target_prompt",
                "reference_prompt", "prompts_json", "class_name", "final_loss", "average_loss"):
        assert key in cfg, key
    assert cfg["status"] == "complete" and cfg["seed"] == 42 and cfg["class_name"] == "cat"
    assert cfg["reference_prompt"] == "a photo of the forest" and len(cfg["target_layers"]) == 14
    assert cfg["peak_memory_bytes"] > 0 and cfg["seconds_per_iteration"] > 0 and cfg["device"] == "cpu"
    check_peak_memory(cfg, printed)                                   # ldm/memory.py, as every script
    assert cfg["arguments"]["schedule"] == "standard" and cfg["torch_version"] == torch.__version__
    meta = read_adapter(final)[1]
    assert meta["complete"] == "true" and meta["rank"] == "1" and float(meta["alpha"]) == 8.0
    assert len(json.loads(meta["targets"])) == 14 and len(meta["base_sha256"]) == 16
    model = copy.deepcopy(base)
    info = load_adapter(final, model.unet)
    assert info.alpha == 8.0 and len(lora_layers(model.unet)) == 14



def test_the_adapter_stores_its_calibrated_threshold_as_compute_lora_diff_measures_it(ckpt, tmp_path, capsys):
    """train.py --calibrate (auto: the JSON lists other prompts): the finished adapter carries the threshold that
    compute_lora_diff.py learns from the same prompts with the same draws (seed, t_enc, repeats); off: none."""
    import compute_lora_diff
    out = tmp_path / "on"
    assert train_main(args(ckpt, out, "--calibrate_repeats", "2"), capsys)[0] == 0
    final = run_dir(out) / "models" / "lora.safetensors"
    stored = json.loads(read_adapter(final)[1]["calibration"])
    assert stored["protocol"] == {"ddim_steps": 4, "t_enc": 3, "guidance": 7.5, "eta": 0.0, "repeats": 2,
                                  "empty_draws": 32, "seed": 42}
    assert json.loads((run_dir(out) / "train_config.json").read_text())["calibration"] == stored
    # its cost, counted: 2 draws of each of the 13 prompts and 32 of "" (ldm.erasure.budget.evals_per_draw)
    from ldm.erasure.budget import evals_per_draw
    from ldm.erasure.stability import StabilitySettings
    test = StabilitySettings(4, 3, 7.5)
    assert stored["unet_sample_evaluations"] == 13 * 2 * evals_per_draw(test) + 32 * evals_per_draw(test, True)
    assert stored["seconds"] > 0
    assert set(stored["concept_ratios"]) == {"a photo of the cat", "a photo of the feline", "a photo of the kitten",
                                             "a photo of the kitty"} and len(stored["other_ratios"]) == 10
    compute_lora_diff.main(["--config", TINY, "--ckpt", str(ckpt), "--lora", str(final), "--prompts_json", CAT,
                            "--output_dir", str(tmp_path / "diff"), "--seed", "42", "--ddim_steps", "4", "--t_enc",
                            "3", "--repeats", "2", "--image_size", "16", "--device", "cpu"])
    measured = json.loads((tmp_path / "diff" / "calc_diff_results.json").read_text())["calibration"]
    assert measured["threshold"] == pytest.approx(stored["threshold"], rel=1e-5)
    assert measured["concept_ratios"] == pytest.approx(stored["concept_ratios"], rel=1e-5)
    off = tmp_path / "off"
    assert train_main(args(ckpt, off, "--calibrate", "off"), capsys)[0] == 0
    meta = read_adapter(run_dir(off) / "models" / "lora.safetensors")[1]
    assert "calibration" not in meta and "calibration" not in json.loads((run_dir(off) / "train_config.json")
                                                                         .read_text())
    assert same(adapter(final), adapter(run_dir(off) / "models" / "lora.safetensors"))  # calibrating trains nothing

def test_nsfw_json_selects_the_nsfw_preset(ckpt, tmp_path, capsys):
    prompts = tmp_path / "my_nsfw.json"
    prompts.write_text((REPO / "data/nsfw.json").read_text())
    code, _ = train_main(args(ckpt, tmp_path / "o", prompts=prompts, iterations=1), capsys)
    assert code == 0
    cfg = json.loads((run_dir(tmp_path / "o") / "train_config.json").read_text())
    assert cfg["target_preset"] == ["nsfw"] and len(cfg["target_layers"]) == 50
    assert cfg["class_name"] == "my_nsfw"


def test_release_schedule_runs(ckpt, tmp_path):
    assert train_main(args(ckpt, tmp_path, "--schedule", "release", "--ddim_eta", "0.5", iterations=2))[0] == 0


def _interrupt_at(monkeypatch, call, exc=KeyboardInterrupt, nan=False):
    """Make the objective's loss raise KeyboardInterrupt (or return NaN) on its call number `call` (0-based)."""
    real = UnGuideObjective.loss
    count = {"n": 0}

    def loss(self, generator):
        n = count["n"]
        count["n"] += 1
        if n == call:
            if nan:
                value, plan = real(self, generator)
                return value * float("nan"), plan
            raise exc
        return real(self, generator)

    monkeypatch.setattr(UnGuideObjective, "loss", loss)


def test_resume_after_interrupt_is_exact(ckpt, tmp_path, monkeypatch, capsys):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train_main(args(ckpt, whole, "--save_every", "3", iterations=8))[0] == 0
    _interrupt_at(monkeypatch, 5)  # Ctrl-C during iteration 5 (0-based)
    code, err = train_main(args(ckpt, cut, "--save_every", "3", iterations=8), capsys)
    assert code == 130 and "interrupted at iteration 5/8" in err and "Traceback" not in err
    rd = run_dir(cut)
    assert not (rd / "models" / "lora.safetensors").exists()
    partial = rd / "models" / "lora_partial.safetensors"
    assert read_adapter(partial)[1]["complete"] == "false"
    cfg = json.loads((rd / "train_config.json").read_text())
    assert cfg["status"] == "interrupted" and cfg["iterations_done"] == 5
    state = torch.load(rd / "checkpoint" / "state.pt", weights_only=True)
    assert state["iteration"] == 5 and len(state["losses"]) == 5
    # a fresh run into the same directory is refused; --resume continues it
    monkeypatch.undo()
    code, err = train_main(args(ckpt, cut, "--save_every", "3", iterations=8), capsys)
    assert code == 2 and "--resume" in err
    assert train_main(args(ckpt, cut, "--save_every", "3", "--resume", iterations=8))[0] == 0
    final = rd / "models" / "lora.safetensors"
    assert same(adapter(final), adapter(run_dir(whole) / "models" / "lora.safetensors"))  # bitwise
    assert not partial.exists() and not (rd / "checkpoint" / "state.pt").exists()
    a = json.loads((rd / "train_config.json").read_text())
    b = json.loads((run_dir(whole) / "train_config.json").read_text())
    assert a["status"] == "complete" and a["final_loss"] == b["final_loss"] and a["average_loss"] == b["average_loss"]
    code, err = train_main(args(ckpt, cut, "--resume", iterations=8), capsys)
    assert code == 2 and "already finished" in err


def test_resume_refuses_changed_settings(ckpt, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "cat.json"
    prompts.write_text(Path(CAT).read_text())
    _interrupt_at(monkeypatch, 2)
    assert train_main(args(ckpt, tmp_path / "o", prompts=prompts), capsys)[0] == 130
    monkeypatch.undo()
    code, err = train_main(args(ckpt, tmp_path / "o", "--resume", "--target_modules", "xattn", prompts=prompts),
                           capsys)
    assert code == 2 and "targets" in err and len(messages(err)) == 1
    prompts.write_text(json.dumps({"target": "a photo of the cat", "reference": "a photo of the sea"}))
    code, err = train_main(args(ckpt, tmp_path / "o", "--resume", prompts=prompts), capsys)
    assert code == 2 and "reference_prompt" in err


def _signal_at(monkeypatch, call, where):
    """Send this process SIGTERM on call number `call` (0-based) of the objective's loss ("loss": outside the
    update, the iteration is dropped) or of Adam's step ("update": it waits for the iteration's end)."""
    cls, attr = (UnGuideObjective, "loss") if where == "loss" else (torch.optim.Adam, "step")
    real = getattr(cls, attr)
    count = {"n": 0}

    def wrapped(self, *a, **kw):
        count["n"] += 1
        if count["n"] - 1 == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)

    monkeypatch.setattr(cls, attr, wrapped)


@pytest.mark.parametrize("where,done", [("loss", 5), ("update", 4)])
def test_sigterm_saves_state_and_resume_is_exact(ckpt, tmp_path, monkeypatch, capsys, where, done):
    """SIGTERM (timeout, a cluster scheduler) is Ctrl-C's twin: resumable state, a partial adapter, status
    "interrupted", exit 143; a SIGTERM during the optimiser update lets that iteration finish first."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train_main(args(ckpt, whole, "--save_every", "3", iterations=8))[0] == 0
    _signal_at(monkeypatch, 5 if where == "loss" else 3, where)
    code, err = train_main(args(ckpt, cut, "--save_every", "3", iterations=8), capsys)
    monkeypatch.undo()
    assert code == 143 and f"terminated (SIGTERM) at iteration {done}/8" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the loop
    rd = run_dir(cut)
    assert read_adapter(rd / "models" / "lora_partial.safetensors")[1]["status"] == "interrupted"
    cfg = json.loads((rd / "train_config.json").read_text())
    assert cfg["status"] == "interrupted" and cfg["iterations_done"] == done
    state = torch.load(rd / "checkpoint" / "state.pt", weights_only=True)
    assert state["iteration"] == done and len(state["losses"]) == done
    assert train_main(args(ckpt, cut, "--save_every", "3", "--resume", iterations=8))[0] == 0
    assert same(adapter(rd / "models" / "lora.safetensors"), adapter(run_dir(whole) / "models" / "lora.safetensors"))
    a = json.loads((rd / "train_config.json").read_text())
    b = json.loads((run_dir(whole) / "train_config.json").read_text())
    assert a["status"] == "complete" and a["final_loss"] == b["final_loss"] and a["average_loss"] == b["average_loss"]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_in_a_subprocess_saves_and_exits(ckpt, tmp_path, signum, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                             *map(str, args(ckpt, out, "--save_every", "2", iterations=100000))],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not list(Path(out).glob("*/checkpoint/state.pt")):
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "--resume" in err
    rd = run_dir(out)
    state = torch.load(rd / "checkpoint" / "state.pt", weights_only=True)
    assert state["iteration"] >= 2 and len(state["losses"]) == state["iteration"]
    assert read_adapter(rd / "models" / "lora_partial.safetensors")[1]["complete"] == "false"
    assert not (rd / "models" / "lora.safetensors").exists()
    assert json.loads((rd / "train_config.json").read_text())["status"] == "interrupted"


class Killed(BaseException):
    """kill -9 stand-in: nothing of train.py catches it."""


@pytest.mark.parametrize("cut", ["before_record", "before_rename"])
def test_a_kill_during_completion_is_resumed_or_rolled_forward_never_taken_for_done(ckpt, tmp_path, monkeypatch,
                                                                                    capsys, cut):
    """train.py killed between writing the adapter and marking the run complete (issue 15): no final adapter beside
    a record that is not "complete"; the next call resumes from the last iteration (no retraining) or finishes the
    rename; the adapter is the uninterrupted run's, bit for bit. The rule (RunFiles.finished) is also the toy
    benchmark's."""
    import ldm.erasure.training as training
    from ldm.evaluation import toy_benchmark
    assert train_main(args(ckpt, tmp_path / "whole", iterations=4))[0] == 0  # save_every 50: no state.pt on the way
    whole = run_dir(tmp_path / "whole") / "models" / "lora.safetensors"
    real_write, real_replace = training.write_json, training.os.replace

    def write_json(path, record):
        if cut == "before_record" and record.get("status") == "complete":
            raise Killed
        real_write(path, record)

    def replace(src, dst):
        if cut == "before_rename" and Path(dst).name == "lora.safetensors":
            raise Killed
        real_replace(src, dst)
    monkeypatch.setattr(training, "write_json", write_json)
    monkeypatch.setattr(training.os, "replace", replace)
    with pytest.raises(Killed):
        train.main([str(a) for a in args(ckpt, tmp_path / "o", iterations=4)])
    monkeypatch.undo()
    rd = run_dir(tmp_path / "o")
    files = training.RunFiles(rd)
    status = json.loads(files.config.read_text())["status"]
    assert not files.final.exists() and files.pending.exists() and files.state.exists()
    assert status == ("running" if cut == "before_record" else "complete")
    calls = []
    monkeypatch.setattr(toy_benchmark, "train_argv", lambda *a: (["x"], files.final))
    monkeypatch.setattr(toy_benchmark, "run_script", lambda *a: calls.append(a))
    toy_benchmark.train_adapter(None, Path(CAT), tmp_path, 0)  # the toy benchmark asks the same rule
    if cut == "before_record":  # the pending file was not the run's: removed; --resume continues from iteration 4
        assert calls and not files.pending.exists() and not files.final.exists()
        code, err = train_main(args(ckpt, tmp_path / "o", iterations=4), capsys)
        assert code == 2 and "--resume" in err
        _interrupt_at(monkeypatch, 0)  # any training iteration now would be a retraining
        assert train_main(args(ckpt, tmp_path / "o", "--resume", iterations=4), capsys)[0] == 0
    else:  # the record said complete: the rename is all that was left
        assert not calls and files.final.exists() and not files.pending.exists()
    assert same(adapter(files.final), adapter(whole))
    assert not files.state.exists() and not files.pending.exists()
    cfg = json.loads(files.config.read_text())
    assert cfg["status"] == "complete" and cfg["adapter"] == str(files.final) and cfg["iterations_done"] == 4
    code, err = train_main(args(ckpt, tmp_path / "o", iterations=4), capsys)
    assert code == 2 and "already finished" in err and len(messages(err)) == 1


def test_nan_loss_stops_and_keeps_the_last_good_adapter(ckpt, tmp_path, monkeypatch, capsys):
    good = tmp_path / "good"
    assert train_main(args(ckpt, good, iterations=3))[0] == 0
    _interrupt_at(monkeypatch, 4, nan=True)  # iteration 4's loss is NaN: the last finite loss was iteration 3's
    code, err = train_main(args(ckpt, tmp_path / "bad", iterations=8), capsys)
    assert code == 1 and len(messages(err)) == 1 and "became nan at iteration 4" in messages(err)[0]
    rd = run_dir(tmp_path / "bad")
    assert not (rd / "models" / "lora.safetensors").exists()
    partial = rd / "models" / "lora_partial.safetensors"
    assert read_adapter(partial)[1]["complete"] == "false"
    # the adapter that scored iteration 3's (finite) loss = the adapter after 3 updates
    assert same(adapter(partial), adapter(run_dir(good) / "models" / "lora.safetensors"))
    assert json.loads((rd / "train_config.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("case", ["missing", "not_json", "not_object", "no_target", "no_reference", "empty_target",
                                  "iterations", "lr", "rank", "targets", "fp16_cpu", "ckpt", "preserve_target",
                                  "no_synonyms"])
def test_bad_input_is_one_line_and_exit_2(case, ckpt, tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"target": "a photo of the cat", "reference": "a photo of the forest"}))
    extra, want = [], None
    if case == "missing":
        prompts, want = tmp_path / "nope.json", "nope.json"
    elif case == "not_json":
        prompts.write_text("{target: cat"); want = "not valid JSON"
    elif case == "not_object":
        prompts.write_text("[1, 2]"); want = "JSON object"
    elif case == "no_target":
        prompts.write_text(json.dumps({"reference": "x"})); want = '"target"'
    elif case == "no_reference":
        prompts.write_text(json.dumps({"target": "x"})); want = '"reference"'
    elif case == "empty_target":
        prompts.write_text(json.dumps({"target": "  ", "reference": "x"})); want = "empty"
    elif case == "iterations":
        extra, want = ["--iterations", "0"], "--iterations"
    elif case == "lr":
        extra, want = ["--lr", "-1e-4"], "--lr"
    elif case == "rank":
        extra, want = ["--lora_rank", "0"], "--lora_rank"
    elif case == "targets":
        extra, want = ["--target_modules", "attn9.to_k"], "attn9.to_k"
    elif case == "fp16_cpu":
        extra, want = ["--precision", "fp16"], "fp16"
    elif case == "ckpt":
        ckpt, want = tmp_path / "missing.ckpt", "missing.ckpt"
    elif case == "preserve_target":
        extra, want = ["--preserve", "a dog", "a photo of the cat"], "--preserve"
    elif case == "no_synonyms":
        extra, want = ["--erase_synonyms"], "--erase_synonyms"
    argv = args(ckpt, tmp_path / "out", prompts=prompts, iterations=2)
    if extra:  # later flags win in argparse
        argv += extra
    code, err = train_main(argv, capsys)
    assert code == 2, err
    lines = messages(err)
    assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0], err
    assert not list(tmp_path.glob("out/**/lora*.safetensors")) and not list(tmp_path.glob("out/**/state.pt"))


def test_nsfw_preset_flag_overrides_the_file_name_rule():
    """--nsfw_preset: auto is the release's rule (a name ending in nsfw.json), on / off force it either way."""
    import train
    base = ["--prompts_json", "data/nsfw.json"]
    for flag, want_nsfw in (([], True), (["--nsfw_preset", "off"], False)):
        args = train.build_parser().parse_args(base + flag)
        args.image_size = 16
        s = train.settings_from_args(args, {"target": "x", "reference": ""})
        assert (s.target_preset == ["nsfw"]) == want_nsfw
    args = train.build_parser().parse_args(["--prompts_json", "data/cat.json", "--nsfw_preset", "on"])
    args.image_size = 16
    assert train.settings_from_args(args, {"target": "x", "reference": ""}).target_preset == ["nsfw"]
