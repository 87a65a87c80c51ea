"""The in-training erasure check (ldm/erasure/check.py) and the rule that uses it (train.py --check_every,
ldm.erasure.training.TrainingRun) on the tiny model. CPU, offline."""
import copy
import json

import pytest
import torch

from ldm.erasure import check as check_mod
from ldm.erasure.check import CheckSettings, ErasureCheck
from ldm.erasure.io import read_adapter
from ldm.erasure.lora import inject_lora, lora_layers
from ldm.erasure.objective import UnGuideObjective
from ldm.erasure.stability import StabilitySettings
from ldm.erasure.targets import select_targets
from test_train import _interrupt_at, args, base, ckpt, run_dir, train_main  # noqa: F401,F811  (fixtures)


def _fake_check(monkeypatch, passes_from: int | None):
    """ErasureCheck.__call__ replaced: passed from iteration `passes_from` on (None: never); returns the calls."""
    calls = []

    def fake(self, iteration):
        calls.append(iteration)
        ok = passes_from is not None and iteration >= passes_from
        return {"iteration": iteration, "ratio": 2.0 if ok else 1.1, "d_target": 1.0, "d_empty": 1.0,
                "rate": None, "passed": ok}
    monkeypatch.setattr(check_mod.ErasureCheck, "__call__", fake)
    return calls


REAL_LOSS = UnGuideObjective.loss


def _record(out):
    rd = run_dir(out)
    return json.loads((rd / "train_config.json").read_text()), read_adapter(rd / "models" / "lora.safetensors")


def test_not_passed_at_the_end_trains_on_until_it_passes(ckpt, tmp_path, monkeypatch):
    calls = _fake_check(monkeypatch, passes_from=6)
    out = tmp_path / "a"
    code, _ = train_main(args(ckpt, out, "--check_every", "2", "--check_max_iterations", "10", iterations=4))
    assert code == 0
    cfg, (tensors, meta) = _record(out)
    assert calls == [2, 4, 6]  # every 2, the planned end (4), then 2 more at a time until passed
    assert cfg["iterations_done"] == 6 and cfg["erasure_check"]["passed"] is True
    assert [h["iteration"] for h in cfg["erasure_check"]["history"]] == [2, 4, 6]
    assert meta["erasure_check"] == "passed" and meta["iterations_done"] == "6"


def test_never_passing_stops_at_the_cap_and_says_so(ckpt, tmp_path, monkeypatch, capsys):
    calls = _fake_check(monkeypatch, passes_from=None)
    out = tmp_path / "b"
    code, err = train_main(args(ckpt, out, "--check_every", "2", "--check_max_iterations", "8", iterations=4),
                           capsys)
    assert code == 0
    cfg, (_, meta) = _record(out)
    assert calls == [2, 4, 6, 8] and cfg["iterations_done"] == 8
    assert cfg["erasure_check"]["passed"] is False and meta["erasure_check"] == "failed"
    assert "erasure check did not pass by iteration 8" in err


def test_passing_at_the_planned_end_stops_there(ckpt, tmp_path, monkeypatch):
    calls = _fake_check(monkeypatch, passes_from=0)
    out = tmp_path / "c"
    assert train_main(args(ckpt, out, "--check_every", "3", iterations=4))[0] == 0
    cfg, _ = _record(out)
    assert calls == [3, 4] and cfg["iterations_done"] == 4


def test_the_check_history_survives_a_resume(ckpt, tmp_path, monkeypatch, capsys):
    """Checks before an interruption stay in train_config.json's history after --resume (those up to the iteration
    resumed from); the resumed session adds its own."""
    calls = _fake_check(monkeypatch, passes_from=8)
    out = tmp_path / "r"
    _interrupt_at(monkeypatch, 5)  # Ctrl-C during iteration 5 (0-based): state saved at 5
    code, _ = train_main(args(ckpt, out, "--check_every", "2", iterations=8), capsys)
    assert code == 130 and calls == [2, 4]
    monkeypatch.setattr(UnGuideObjective, "loss", REAL_LOSS)
    assert train_main(args(ckpt, out, "--check_every", "2", "--resume", iterations=8))[0] == 0
    cfg, _ = _record(out)
    assert calls == [2, 4, 6, 8]
    assert [h["iteration"] for h in cfg["erasure_check"]["history"]] == [2, 4, 6, 8]
    assert cfg["erasure_check"]["passed"] is True


def test_checking_does_not_change_what_is_trained(ckpt, tmp_path):
    """The check draws from its own generators: the same seed gives the same adapter with and without it."""
    plain, checked = tmp_path / "plain", tmp_path / "checked"
    assert train_main(args(ckpt, plain, iterations=4))[0] == 0
    assert train_main(args(ckpt, checked, "--check_every", "2", "--check_max_iterations", "4", "--check_t_enc",
                           "1", iterations=4))[0] == 0
    a = read_adapter(run_dir(plain) / "models" / "lora.safetensors")[0]
    b = read_adapter(run_dir(checked) / "models" / "lora.safetensors")[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg, _ = _record(checked)
    assert [h["iteration"] for h in cfg["erasure_check"]["history"]] == [2, 4]
    assert all(h["ratio"] > 0 for h in cfg["erasure_check"]["history"])


def _check(model, judge=None, min_ratio=1.5, max_rate=0.1, preserve=None, min_kept=0.0):
    s = CheckSettings(every=1, min_ratio=min_ratio, max_rate=max_rate, samples=3, repeats=3, empty_draws=4,
                      min_kept=min_kept)
    return ErasureCheck(model, "a photo of the cat", s, StabilitySettings(4, 1, 7.5), (4, 2, 2), judge=judge,
                        steps=4, preserve=preserve)


def _moving_adapter(base):
    """A copy of the tiny model with a LoRA whose B is non-zero (seeded): it moves every prompt's prediction."""
    model = copy.deepcopy(base)
    inject_lora(model.unet, select_targets(model.unet, "default"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in lora_layers(model.unet).values():
            layer.lora.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model


def test_the_preserved_prompts_collateral_can_fail_a_pass(base):
    """kept: the share of a preserved prompt's adapter-alone images that its own judge accepts (each prompt drawn
    on the check's fixed seeds), at the worst preserved prompt; below min_kept the check does not pass."""
    model = _moving_adapter(base)
    seen = []
    dog = lambda z: (seen.append(("dog", z.shape)), [True, True, True])[1]  # noqa: E731
    bird = lambda z: (seen.append(("bird", z.shape)), [True, False, False])[1]  # noqa: E731
    preserve = {"a photo of the dog": dog, "a photo of the bird": bird}
    r = _check(model, min_ratio=0.0, preserve=preserve, min_kept=0.3)(3)
    assert seen == [("dog", (3, 4, 2, 2)), ("bird", (3, 4, 2, 2))]
    assert r["kept"] == pytest.approx(1 / 3) and r["passed"] is True       # the bird's share, not the mean
    assert _check(model, min_ratio=0.0, preserve=preserve, min_kept=0.5)(3)["passed"] is False
    assert _check(model, min_ratio=0.0)(3)["kept"] is None  # no preservation judges: not measured


def test_a_zero_adapter_does_not_pass(base):
    model = copy.deepcopy(base)
    inject_lora(model.unet, select_targets(model.unet, "default"), generator=torch.Generator().manual_seed(0))
    r = _check(model)(0)  # B = 0: d(target) = d("") = 0, no separation (ratio 1, not inf)
    assert r["d_target"] == 0 and r["d_empty"] == 0 and r["ratio"] == 1.0 and r["passed"] is False


def test_ratio_and_judge_decide(base):
    """A LoRA that moves the prompt's tokens: the ratio is d(target)/d(""); the judge's rate can fail a pass."""
    model = _moving_adapter(base)
    seen = []
    judge = lambda z: (seen.append(z.shape), [True, False, False])[1]  # noqa: E731
    r = _check(model, judge=judge, min_ratio=0.0, max_rate=0.5)(7)
    assert seen == [(3, 4, 2, 2)] and r["rate"] == pytest.approx(1 / 3) and r["passed"] is True
    assert r["ratio"] == pytest.approx(r["d_target"] / r["d_empty"]) and r["d_target"] > 0
    assert _check(model, judge=judge, min_ratio=0.0, max_rate=0.2)(7)["passed"] is False  # the rate fails it
    assert _check(model, min_ratio=r["ratio"] * 1.01)(7)["passed"] is False  # the ratio fails it
    assert _check(model, min_ratio=r["ratio"] * 0.99)(7) == {**r, "rate": None}  # same draws: same numbers


@pytest.mark.parametrize("extra,want", [(["--check_every", "-1"], "--check_every"),
                                        (["--check_every", "2", "--check_t_enc", "9"], "--check_t_enc"),
                                        (["--check_every", "2", "--method", "sepce", "--preserve", "a dog"],
                                         "--method sepce"),
                                        (["--check_every", "2", "--check_min_kept", "0.9", "--preserve", "a dog"],
                                         "--check_min_kept 0.9"),
                                        (["--check_restarts", "2"], "--check_restarts 2"),
                                        (["--check_every", "2", "--check_judge", "digits", "--check_min_kept", "0.9",
                                          "--preserve", ""], "no --preserve prompt names a digit")])
def test_bad_check_flags_are_one_line(ckpt, tmp_path, capsys, extra, want):
    code, err = train_main(args(ckpt, tmp_path / "o", *extra, iterations=2), capsys)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("erasing ")]
    assert code == 2 and len(lines) == 1 and want in lines[0], err


def test_the_kept_share_judges_the_preserved_prompts_that_name_a_digit(ckpt, tmp_path, monkeypatch):
    """--check_min_kept with --preserve "a handwritten 7" "": the empty prompt is preserved (trained on) but has no
    class to keep, so the check judges only "a handwritten 7"."""
    judged = []

    def fake(self, iteration):
        judged.append(sorted(self.preserve))
        return {"iteration": iteration, "ratio": 2.0, "d_target": 1.0, "d_empty": 0.5, "rate": 0.0, "kept": 1.0,
                "passed": True}
    monkeypatch.setattr(check_mod.ErasureCheck, "__call__", fake)
    three = tmp_path / "three.json"
    three.write_text(json.dumps({"target": "a photo of the digit three", "reference": ""}))
    out = tmp_path / "o"
    code, _ = train_main(args(ckpt, out, "--check_every", "2", "--check_judge", "digits", "--check_min_kept", "0.9",
                              "--preserve", "a handwritten 7", "", prompts=three, iterations=2))
    assert code == 0 and judged == [["a handwritten 7"]]
    assert json.loads((run_dir(out) / "train_config.json").read_text())["preserve"] == ["a handwritten 7", ""]


def _fake_check_from_call(monkeypatch, passes_from_call: int | None):
    """ErasureCheck.__call__ replaced: passed from its call number `passes_from_call` (0-based) on; returns the
    calls' iterations."""
    calls = []

    def fake(self, iteration):
        calls.append(iteration)
        ok = passes_from_call is not None and len(calls) > passes_from_call
        return {"iteration": iteration, "ratio": 2.0 if ok else 1.1, "d_target": 1.0, "d_empty": 1.0,
                "rate": None, "passed": ok}
    monkeypatch.setattr(check_mod.ErasureCheck, "__call__", fake)
    return calls


RESTARTS = ["--check_every", "2", "--check_max_iterations", "4", "--check_restarts", "2"]


def test_a_restart_trains_a_fresh_adapter_from_the_next_seed(ckpt, tmp_path, monkeypatch, capsys):
    """Not passed at the cap (4): the adapter is dropped and attempt 1 starts over from seed 42 + 1000; it passes at
    its planned end, and the file is bit for bit the adapter a fresh run with --seed 1042 trains."""
    calls = _fake_check_from_call(monkeypatch, passes_from_call=2)
    out = tmp_path / "restarted"
    code, err = train_main(args(ckpt, out, *RESTARTS, iterations=4), capsys)
    assert code == 0 and calls == [2, 4, 2, 4]
    cfg, (tensors, meta) = _record(out)
    assert cfg["attempt"] == 1 and cfg["attempt_seed"] == 1042 and cfg["iterations_done"] == 4
    [dropped] = cfg["restarts"]
    assert dropped["seed"] == 42 and dropped["iterations_done"] == 4 and dropped["ratio"] == 1.1
    assert [h["iteration"] for h in dropped["history"]] == [2, 4]
    assert cfg["erasure_check"]["passed"] is True
    assert [h["iteration"] for h in cfg["erasure_check"]["history"]] == [2, 4]
    assert meta["restarts"] == "1" and meta["attempt_seed"] == "1042" and meta["erasure_check"] == "passed"
    _fake_check_from_call(monkeypatch, passes_from_call=0)
    fresh = tmp_path / "fresh"
    assert train_main(args(ckpt, fresh, "--seed", "1042", "--check_every", "2", iterations=4))[0] == 0
    again = read_adapter(run_dir(fresh) / "models" / "lora.safetensors")[0]
    assert set(tensors) == set(again) and all(torch.equal(tensors[k], again[k]) for k in tensors)


def test_restarts_stop_at_their_number_and_keep_the_last_attempt(ckpt, tmp_path, monkeypatch, capsys):
    calls = _fake_check_from_call(monkeypatch, passes_from_call=None)
    out = tmp_path / "never"
    code, err = train_main(args(ckpt, out, *RESTARTS[:-1], "1", iterations=4), capsys)
    assert code == 0 and calls == [2, 4, 2, 4]
    cfg, (_, meta) = _record(out)
    assert [a["seed"] for a in cfg["restarts"]] == [42] and cfg["attempt_seed"] == 1042
    assert cfg["erasure_check"]["passed"] is False and meta["erasure_check"] == "failed"
    assert "erasure check did not pass by iteration 4" in err


def test_a_run_interrupted_in_a_later_attempt_resumes_exactly(ckpt, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    _fake_check_from_call(monkeypatch, passes_from_call=2)
    assert train_main(args(ckpt, whole, *RESTARTS, iterations=4))[0] == 0
    cut = tmp_path / "cut"
    calls = _fake_check_from_call(monkeypatch, passes_from_call=2)
    _interrupt_at(monkeypatch, 6)  # attempt 0 made loss calls 0-3; call 6 is attempt 1's third iteration
    code, _ = train_main(args(ckpt, cut, *RESTARTS, iterations=4), capsys)
    assert code == 130 and calls == [2, 4, 2]
    monkeypatch.setattr(UnGuideObjective, "loss", REAL_LOSS)
    assert train_main(args(ckpt, cut, *RESTARTS, "--resume", iterations=4))[0] == 0
    assert calls == [2, 4, 2, 4]
    (a, _), (b, meta) = [read_adapter(run_dir(o) / "models" / "lora.safetensors") for o in (whole, cut)]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a) and meta["attempt_seed"] == "1042"
    cfg, _ = _record(cut)
    assert [r["seed"] for r in cfg["restarts"]] == [42]
    assert [h["iteration"] for h in cfg["erasure_check"]["history"]] == [2, 4]
