"""The reduced sweep of scripts/experiments/e2e_toy.py (issue 18): two digits (three, five) x two training seeds, each script in
its own process on the shipped toy-digits model (train.py with the erasure check -> compute_lora_diff.py ->
generate_images.py per w -> the digit classifier). Thresholds sit below what the sweep measures (README), so the
test fails when erasure, the check or the calibrated decision stop working, not on sampling noise. Reduced for CI
time: 2 images per prompt and w (the sweep's first two seeds: the same pictures), 4 stability-test draws, one
held-out wording per other digit ("the number seven": drawn, the collateral where nothing was tuned)."""
import argparse
import json

import pytest

from ldm.errors import UserError
from ldm.evaluation.digits import WORDS
from scripts.experiments import e2e_toy


@pytest.fixture(scope="module")
def results(tmp_path_factory, toy_train_dir):
    out = tmp_path_factory.mktemp("e2e")
    e2e_toy.main(["--digits", "three", "five", "--train_seeds", "0", "1", "--samples", "2", "--repeats", "4",
                  "--other_wordings", "1", "--out", str(out), "--train_dir", str(toy_train_dir)])
    return json.loads((out / "results.json").read_text()), out


def test_every_adapter_passes_the_training_check(results):
    res, _ = results
    assert len(res["training"]) == 4
    for t in res["training"]:
        assert t["check_passed"] is True and t["check_ratio"] >= 1.5 and t["check_rate"] <= 0.1, t


def test_the_calibrated_safe_rule_erases_every_run_and_spares_the_others(results):
    res, _ = results
    assert len(res["runs"]) == 4
    for run in res["runs"]:
        base, safe = run["ways"]["base"], run["ways"]["safe"]
        assert base["target_rate"] >= 0.9 and base["others_rate"] >= 0.9, run["digit"]  # the model draws digits
        assert safe["target_rate"] <= 0.05 and safe["synonyms_rate"] <= 0.2, (run["digit"], run["train_seed"])
        assert safe["heldout_rate"] is None or safe["heldout_rate"] <= 0.25
        assert safe["others_rate"] >= base["others_rate"] - 0.06                # unflagged others: the base model
        assert run["heldout_counted"], "no held-out wording the base model draws: the group would say nothing"
        assert run["flagged"]["calibrated"]["target"] == 1.0 and run["flagged"]["calibrated"]["others"] <= 1 / 9
        assert run["ways"]["adapter"]["target_rate"] <= 0.34                     # the adapter erases on its own


def test_the_other_digits_held_out_wordings_are_drawn_and_counted_where_the_base_draws_them(results):
    """--other_wordings 1: "the number N" for the nine other digits, drawn under every way; counted where the base
    model draws digit N in at least half its images; guarded keeps them near the base model."""
    res, out = results
    for run in res["runs"]:
        data = json.loads((e2e_toy.ROOT / "data" / "digits" / f"{run['digit']}.json").read_text())
        extra = e2e_toy.other_heldout(data, 1)
        assert extra == [f"the number {w}" for w in WORDS if w != run["digit"]] and set(extra) <= set(run["prompts"])
        assert set(run["others_heldout_counted"]) <= set(extra)
        assert len(run["others_heldout_counted"]) >= 5, run["others_heldout_counted"]  # the base draws most of them
        base = run["ways"]["base"]["per_prompt"]
        assert all(base[p] >= 0.5 for p in run["others_heldout_counted"])
        assert all(base[p] < 0.5 for p in set(extra) - set(run["others_heldout_counted"]))
        counted = run["others_heldout_counted"]
        for way in ("base", "guarded"):
            per = run["ways"][way]["per_prompt"]
            assert run["ways"][way]["others_heldout_rate"] == pytest.approx(sum(per[p] for p in counted) / len(counted))
        assert run["base_others_heldout_rate"] == run["ways"]["base"]["others_heldout_rate"]
        assert run["ways"]["guarded"]["others_heldout_rate"] >= run["base_others_heldout_rate"] - 0.12
        assert not set(extra) & set(run["grid_prompts"])  # the grid shows the concept's prompts and the JSON's
    text = (out / "results.md").read_text()
    assert "others' held-out wordings: drop (mean / worst)" in text


def test_ways_are_read_off_shared_images(results):
    """A way is a w per prompt over the same seeds: where two ways give a prompt the same w, they report the
    same rate for it."""
    res, _ = results
    for run in res["runs"]:
        for p in run["prompts"]:
            by_w = {}
            for way, w_of in run["weights"].items():
                by_w.setdefault(w_of[p], set()).add(run["ways"][way]["per_prompt"][p])
            assert all(len(v) == 1 for v in by_w.values()), (p, by_w)
        assert all(run["weights"]["base"][p] == 1.0 and run["weights"]["adapter"][p] == 0.0 for p in run["prompts"])


def test_report_states_distributions_targets_and_the_check(results):
    _, out = results
    text = (out / "results.md").read_text()
    assert "worst" in text and "meets the targets" in text and "false positives" in text
    assert "| three | 1 |" in text and "passed" in text
    assert (out / "grid.png").stat().st_size > 1000


def test_collect_joins_parts_of_a_sweep_and_refuses_mixtures(results, tmp_path):
    """--collect: the sweep's runs split by digit into two results.json files give the same tables; a run in both
    parts, or parts measured with other settings, are refused with one line naming the file."""
    res, _ = results
    parts = []
    for digit in ("three", "five"):
        part = {**res, "runs": [r for r in res["runs"] if r["digit"] == digit],
                "training": [t for t in res["training"] if t["digit"] == digit],
                "settings": {**res["settings"], "digits": [digit]}, "seconds": res["seconds"] / 2}
        parts.append(tmp_path / f"{digit}.json")
        parts[-1].write_text(json.dumps(part))
    out = tmp_path / "all"
    text = e2e_toy.collect([str(p) for p in parts], out)
    whole = e2e_toy.report(res, argparse.Namespace(**res["settings"]))
    assert text.splitlines()[1:] == whole.splitlines()[1:]          # every table (the first line: the seconds)
    assert json.loads((out / "results.json").read_text())["settings"]["digits"] == ["three", "five"]
    with pytest.raises(UserError, match="three.json: digit three, training seed 0, test seed 0 is also in"):
        e2e_toy.collect([str(parts[0]), str(parts[0])], out)
    other = json.loads(parts[1].read_text())
    other["settings"]["samples"] = 7
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(UserError, match="bad.json: measured with samples = 7"):
        e2e_toy.collect([str(parts[0]), str(bad)], out)


def test_evaluation_folders_are_keyed_by_the_adapter_and_the_test_settings(tmp_path):
    """Images of another adapter run (train.py's folder name carries its settings' hash) or other stability-test
    settings go to another folder: a rerun with a changed flag never reuses images it did not make."""
    args = e2e_toy.parser().parse_args(["--digits", "three"])
    lora = tmp_path / "three_seed0_aaaaaaaa" / "models" / "lora.safetensors"
    key = e2e_toy.run_key(args, lora)
    assert key.startswith("three_seed0_aaaaaaaa_") and e2e_toy.run_key(args, lora) == key
    assert e2e_toy.run_key(args, tmp_path / "three_seed0_bbbbbbbb" / "models" / "lora.safetensors") != key
    for flag, value in (("t_enc", 30), ("repeats", 4), ("steps", 20), ("other_wordings", 0)):
        changed = e2e_toy.parser().parse_args(["--digits", "three", f"--{flag}", str(value)])
        assert e2e_toy.run_key(changed, lora) != key, flag
