"""The attack suite (attack.py, ldm/attacks/): the white-box objective goes down, the attack raises the judged
rate on the toy model, resume gives the same rows, the unguide defence runs the generation code's stability
test and sampler, decision rules, and bad input (exit 2, one line). CPU, the toy-digits model; ~2 minutes."""
import csv
import json
from pathlib import Path

import pytest
import torch

import attack
from helpers_model import check_peak_memory, randomize_adapters
from ldm.attacks import unlearndiffatk as uda
from ldm.attacks.factory import concept_latents, draw_target_images
from ldm.attacks.pipeline import Defended
from ldm.attacks.tokens import TokenSpace
from ldm.cli import run
from ldm.erasure.decision import floor_rule, get_rule, release_rule, safe_rule
from ldm.erasure.guidance import unguidance_model_fn
from ldm.erasure.lora import inject_lora
from ldm.erasure.stability import StabilitySettings
from ldm.erasure.targets import select_targets
from ldm.erasure.guidance import decide, unguided_latents
from ldm.erasure.protocols import Protocol, fast_diff_table
from ldm.images import start_noise
from ldm.loader import load_model_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG, CKPT = ROOT / "configs/toy/digits-inference.yaml", ROOT / "models/toy-digits.safetensors"
THREE = ROOT / "data/digits/three.json"
TOY = ["--config", str(CONFIG), "--ckpt", str(CKPT), "--device", "cpu", "--image_size", "16", "--t_enc", "25",
       "--threads", "1", "--judge", "digits", "--prompts_json", str(THREE)]


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    return load_model_from_config(CONFIG, CKPT, verbose=False)


@pytest.fixture(scope="module")
def toy_unguide():
    """The toy model with a random (non-zero) adapter: a defence whose decisions vary by prompt."""
    model = load_model_from_config(CONFIG, CKPT, verbose=False)
    inject_lora(model.unet, select_targets(model.unet, ["default"]), rank=1, alpha=8.0,
                generator=torch.Generator().manual_seed(0))
    return randomize_adapters(model, seed=1, scale=0.05)


def test_decision_rules():
    assert release_rule(2.0, 1.0, -1, 2) == -1 and release_rule(1.0, 1.0, -1, 2) == 2  # ties: unflagged
    assert safe_rule(2.0, 1.0, -1, 2) == -1 and safe_rule(0.5, 1.0, -1, 2) == 1.0      # no amplification
    assert floor_rule(2.0, 1.0, -1, 2) == -1 and floor_rule(0.5, 1.0, -1, 2) == 0.0    # the adapter alone
    assert get_rule("release") is release_rule
    with pytest.raises(ValueError):
        get_rule("nope")


def test_objective_mix_is_unguidance_at_scale_one(toy_unguide):
    """The attack's defended prediction is UnGuidance's formula (the sampler's model function at CFG 1)."""
    model = toy_unguide
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([50, 400, 900])
    cond = model.get_learned_conditioning(["a photo of the digit three"]).expand(3, -1, -1)
    uncond = model.get_learned_conditioning([""]).expand(3, -1, -1)
    for w in (-1.0, 0.0, 2.0):
        with torch.no_grad():
            ours = uda.mixed(uda.predictions(model, x, t, cond, ["lora"]), [w])
            ref = unguidance_model_fn(model, cond, uncond, 1.0, [w], ["lora"])(x, t)
        assert torch.allclose(ours, ref, atol=1e-5), w


def test_whitebox_attack_lowers_its_objective(toy):
    """On a fixed draw (seed), the optimised tokens score lower than the random tokens it started from."""
    defended = Defended(toy, "base", [], image_size=16, steps=20, t_enc=10)
    z = concept_latents(toy, draw_target_images(toy, "a photo of the digit three", 8, 16, 20, 7.5, seed=100))
    space = TokenSpace(toy.cond_stage_model, 3)
    cfg = uda.UDAConfig(n_tokens=3, steps=30, batch=4, check_every=1000)
    res = uda.run_attack(defended, space, "a photo of the digit four", z, cfg, [], lambda text: (False, []),
                         torch.Generator().manual_seed(0))
    before = uda.fixed_objective(defended, space, res["idx_start"], "a photo of the digit four", z, [], seed=7)
    after = uda.fixed_objective(defended, space, res["idx"], "a photo of the digit four", z, [], seed=7)
    assert after < 0.95 * before, (before, after)  # measured 0.082 -> 0.076 (seed 0), 0.088 -> 0.081 (seed 1)


def test_attack_raises_the_judged_rate_on_the_toy_base_model(tmp_path):
    """From "four" to "three": a reduced UnlearnDiffAtk run on the base model (4 seeds)."""
    s = attack.main(TOY + ["--attack", "unlearndiffatk", "--defense", "base", "--prompt", "a photo of the digit four",
                           "--samples", "4", "--n_tokens", "3", "--attack_steps", "20", "--check_every", "5",
                           "--output_dir", str(tmp_path)])
    assert s["asr_before"] == 0.0 and s["counts"]["done"] == 4
    assert s["asr_after"] >= 0.5, s  # measured 2/4 (0/4 before)
    rows = list(csv.DictReader(open(tmp_path / "attack_results.csv")))
    assert all(r["adversarial_prompt"].endswith("a photo of the digit four") for r in rows)
    assert all(r["round_trip"] == "True" for r in rows) and all(int(r["unet_evals"]) > 0 for r in rows)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path))]


def test_resume_after_an_interruption_gives_the_same_rows(tmp_path, capsys):
    argv = TOY + ["--attack", "ringabell", "--defense", "base", "--prompt", "a photo of the digit four",
                  "--samples", "3", "--n_tokens", "2", "--generations", "3", "--population", "16", "--pool", "64",
                  "--output_dir", str(tmp_path / "a")]
    attack.main(argv)
    full = _rows(tmp_path / "a" / "attack_results.csv")
    assert len(full) == 3
    (tmp_path / "a" / "rows" / "000002.json").unlink()        # the last job never finished
    (tmp_path / "a" / "attack_results.csv").unlink()
    capsys.readouterr()
    s = attack.main(argv)
    assert _rows(tmp_path / "a" / "attack_results.csv") == full and s["counts"]["done"] == 3
    rows = [json.loads(p.read_text()) for p in sorted((tmp_path / "a" / "rows").glob("*.json"))]
    for r in rows:
        check_peak_memory(r)                                       # each row: its process's peak so far
    assert s["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in rows)  # both runs' rows: the largest
    check_peak_memory(json.loads((tmp_path / "a" / "attack_summary.json").read_text()), capsys.readouterr().out)
    other = list(argv)                                             # other settings: refused, nothing written
    other[other.index("--generations") + 1] = "4"
    with pytest.raises(SystemExit) as e:
        run(lambda: attack.main(other))
    assert e.value.code == 2 and len(list((tmp_path / "a" / "rows").glob("*.json"))) == 3


def test_unguide_defense_runs_the_generation_code(toy_unguide):
    """d(p), d(""), w and the image latents of the defended pipeline are generate_images.py's on-the-fly path
    (fast_diff_table, decide, unguided_latents), called directly."""
    model, prompt = toy_unguide, "zebra quantum a photo of the digit three"
    defended = Defended(model, "unguide", ["lora"], seed=3, steps=10, t_enc=5, repeats=4, empty_draws=8,
                        image_size=16)
    dec = defended.decide([prompt], [3], [7.5])[0]
    protocol = Protocol("fast", StabilitySettings(10, 5, 7.5, 0.0, False), repeats=4, empty_draws=8)
    [(table, empty)] = fast_diff_table(model, protocol, (4, 8, 8), [prompt], 3)
    assert dec.d_prompt == [table[prompt].mean] and dec.d_empty == [empty.mean]
    assert dec.w == [decide(table[prompt].mean, empty.mean, -1.0, 2.0)]
    z = defended.latents([prompt], [11], [7.5], [dec])
    ref = unguided_latents(model, [prompt], start_noise([11], (4, 8, 8), torch.device("cpu")), 7.5, [dec.w[0]], 10)
    assert torch.equal(z, ref)


def _bad(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run(lambda: attack.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    base = TOY + ["--attack", "unlearndiffatk", "--output_dir", str(tmp_path / "out")]
    assert "--lora" in _bad(base + ["--defense", "unguide"], capsys)
    assert "--clip_model" in _bad([a if a != "digits" else "clip" for a in base] + ["--defense", "base"], capsys)
    assert "--attack_steps" in _bad(base + ["--defense", "base", "--attack_steps", "0"], capsys)
    assert "--n_tokens" in _bad(base + ["--defense", "base", "--n_tokens", "-1"], capsys)
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,evaluation_seed\n")
    assert "no prompt" in _bad(base + ["--defense", "base", "--csv_path", str(empty)], capsys)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(b"not a png")
    assert "a.png" in _bad(base + ["--defense", "base", "--target_images", str(imgs)], capsys)
    from PIL import Image
    (imgs / "a.png").unlink()
    Image.new("RGB", (32, 32)).save(imgs / "b.png")
    assert "32x32" in _bad(base + ["--defense", "base", "--target_images", str(imgs)], capsys)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_tokens_round_trip(toy):
    space = TokenSpace(toy.cond_stage_model, 4)
    adv = space.random(20, torch.Generator().manual_seed(0))
    assert all(space.round_trips(a, "a photo of the digit four") for a in adv)
    assert space.with_prompt(adv[:1], "x " * 100).shape == (1, 77)


def test_judges_run_offline(tmp_path):
    from PIL import Image
    from ldm.attacks.judges import clip_judge, digits_judge, nudenet_judge
    from ldm.errors import UserError
    assert nudenet_judge(0.6)([Image.new("RGB", (64, 64))]) == [False]   # a blank image exposes nothing
    assert digits_judge("a photo of the digit three").protocol["concept"] == "classified as 3"
    with pytest.raises(UserError, match="--clip_model"):
        clip_judge(str(tmp_path / "no_clip"), "a cat", ["a dog"])


def test_attacks_toy_reuses_a_cached_figure_only_for_the_same_settings(tmp_path):
    """scripts/experiments/attacks_toy.py keeps its accuracy and oracle figures keyed by what made them: the same
    key reuses the file, another threshold (or adapter) recomputes it."""
    from scripts.experiments.attacks_toy import cached
    calls = []
    fn = lambda: calls.append(1) or len(calls)  # noqa: E731
    path = tmp_path / "accuracy.json"
    assert cached(path, fn, {"threshold": 1.0})["value"] == 1
    assert cached(path, fn, {"threshold": 1.0})["value"] == 1 and len(calls) == 1
    assert cached(path, fn, {"threshold": 3.5})["value"] == 2 and len(calls) == 2
