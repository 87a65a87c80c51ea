"""UnGuidance's decision rules (ldm/erasure/decision.py) and their defaults (ldm/cli.py resolve_decision): the
guarded rule's three zones, the protocol's default rule, and the threshold that is calibrated where the run has a
calibration and the release's 1 (said in one line) where it has none (issue 18)."""
import argparse
import json
import random

import pytest

import generate_images
from helpers_model import TINY, random_adapter_file, tiny_checkpoint
from ldm.cli import resolve_decision
from ldm.erasure.adapters import adapter_thresholds, threshold_of
from ldm.erasure.decision import RULES, get_rule, guarded_rule, safe_rule
from ldm.errors import UserError


def test_guarded_rule_has_three_zones():
    tau = 2.0  # d("") = 1: the ratio r is d(p)
    assert guarded_rule(3.0, 1.0, -1.0, 2.0, tau) == -1.0   # flagged: r > tau
    assert guarded_rule(1.5, 1.0, -1.0, 2.0, tau) == 0.0    # uncertain: 1 < r <= tau -> the adapter alone
    assert guarded_rule(2.0, 1.0, -1.0, 2.0, tau) == 0.0    # tie with tau: not flagged
    assert guarded_rule(1.0, 1.0, -1.0, 2.0, tau) == 1.0    # tie with d(""): clear -> the base model, never w2 = 2
    assert guarded_rule(0.3, 1.0, -1.0, 2.0, tau) == 1.0
    assert guarded_rule(0.3, 1.0, -1.0, 0.5, tau) == 0.5    # a w2 under 1 is kept
    assert guarded_rule(1.5, 1.0, -1.0, -0.5, tau) == -0.5  # ... and under 0 in the uncertain zone
    assert get_rule("guarded") is guarded_rule and set(RULES) == {"release", "safe", "floor", "guarded"}


def test_guarded_is_safe_at_the_releases_threshold_and_never_above_the_base_model():
    rng = random.Random(0)
    for _ in range(500):
        d, e = rng.uniform(0, 3), rng.uniform(0.1, 2)
        w1, w2 = rng.choice([-1.0, 0.0, 1.0]), rng.choice([0.0, 1.0, 2.0, 3.0])
        tau = rng.uniform(0.2, 1.0)  # no uncertain zone: the safe rule
        assert guarded_rule(d, e, w1, w2, tau) == safe_rule(d, e, w1, w2, tau)
        assert guarded_rule(d, e, -1.0, w2, rng.uniform(1, 3)) <= 1.0  # no prompt is amplified


def ns(**kw):
    return argparse.Namespace(**{"decision": None, "threshold": None, "protocol": "fast", **kw})


def test_the_protocol_decides_the_default_rule():
    a = ns()
    resolve_decision(a)
    assert (a.decision, a.threshold) == ("guarded", None)     # None: calibrated where the run has a calibration
    a = ns(protocol="release")
    resolve_decision(a)
    assert (a.decision, a.threshold) == ("release", 1.0)      # the release, exactly
    a = ns(protocol="release", decision="floor", threshold=2.5)
    resolve_decision(a)
    assert (a.decision, a.threshold) == ("floor", 2.5)        # what the user names is kept
    a = argparse.Namespace(decision=None, threshold=None)     # a script without --protocol: ours
    resolve_decision(a)
    assert a.decision == "guarded"


def test_default_threshold_is_the_calibrated_one_else_one_said_in_a_line(tmp_path, capsys):
    assert threshold_of({"calibration": {"threshold": 2.2}}, None, "r.json") == 2.2
    assert threshold_of({}, None, "old.json") == 1.0
    assert "old.json" in capsys.readouterr().err
    exp = tmp_path / "exp"
    (exp / "models").mkdir(parents=True)
    lora = exp / "models" / "lora.pth"  # a release adapter: no metadata
    lora.write_bytes(b"")
    assert adapter_thresholds([lora], None) == [1.0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calc_diff_results.json" in err[0]
    (exp / "calc_diff_results.json").write_text(json.dumps({"calibration": {"threshold": 1.7}}))
    assert adapter_thresholds([lora], None) == [1.7] and adapter_thresholds([lora], 1.0) == [1.0]


def _with_metadata(src, dst, **extra):
    """A copy of adapter file `src` with metadata fields added (what train.py --calibrate writes)."""
    from ldm.erasure.io import read_adapter, safetensors_bytes
    tensors, meta = read_adapter(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(safetensors_bytes(tensors, {**meta, **extra}))
    return dst


def test_the_threshold_an_adapter_stores_is_used_where_no_calc_diff_results_is(world, tmp_path, capsys):
    cal = {"threshold": 2.4, "separable": True, "protocol": {"ddim_steps": 50, "t_enc": 40, "guidance": 7.5}}
    lora = _with_metadata(world["lora"], tmp_path / "exp" / "models" / "lora.safetensors",
                          calibration=json.dumps(cal))
    assert adapter_thresholds([lora], None, (50, 40, 7.5)) == [2.4]
    assert adapter_thresholds([lora], "auto", (50, 40, 7.5)) == [2.4]
    assert "note" not in capsys.readouterr().err                          # measured at this test's settings
    assert adapter_thresholds([lora], None, (50, 25, 7.5)) == [2.4]
    err = capsys.readouterr().err
    assert "t_enc 40 (now 25)" in err and "ddim_steps" not in err        # said, in one line
    assert adapter_thresholds([world["lora"]], None) == [1.0]             # none stored: the release's 1, said
    assert "no calibrated threshold" in capsys.readouterr().err
    with pytest.raises(UserError, match="stores no calibrated threshold"):
        adapter_thresholds([world["lora"]], "auto")
    (tmp_path / "exp" / "calc_diff_results.json").write_text(json.dumps({"calibration": {"threshold": 1.3}}))
    assert adapter_thresholds([lora], None) == [1.3]                      # an explicit stability test wins
    bad = _with_metadata(world["lora"], tmp_path / "bad.safetensors", calibration='{"threshold": -1}')
    with pytest.raises(UserError, match="bad.safetensors: metadata 'calibration' holds no positive threshold"):
        adapter_thresholds([bad], None)


def test_on_the_fly_without_a_prompts_json_takes_the_adapters_stored_threshold(world, tmp_path, capsys):
    """generate_images.py's on-the-fly test, no --prompts_json: the adapter's stored calibration decides; a tau
    far above every ratio leaves every prompt unflagged (guarded: the base model or the adapter alone)."""
    lora = _with_metadata(world["lora"], tmp_path / "a.safetensors",
                          calibration=json.dumps({"threshold": 1e6, "protocol": {"t_enc": 2, "ddim_steps": 3}}))
    out = tmp_path / "out"
    generate_images.main(["--config", str(TINY), "--ckpt", str(world["ckpt"]), "--device", "cpu", "--output_dir",
                          str(out), "--image_size", "16", "--steps", "3", "--t_enc", "2", "--repeats", "2",
                          "--samples", "1", "--lora", str(lora), "--prompt", "a photo of the cat"])
    assert "stored calibrated threshold 1000000.000" in capsys.readouterr().err
    [rec] = json.loads((out / "decisions.json").read_text())["prompts"].values()
    assert rec["w"][0] in (0.0, 1.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("decision")
    base, ckpt = tiny_checkpoint(d)
    return {"ckpt": ckpt, "lora": random_adapter_file(base, d / "a.safetensors", 1), "dir": d}


@pytest.mark.parametrize("protocol,decision", [("fast", "guarded"), ("release", "release")])
def test_generate_images_records_the_default_decision(world, tmp_path, protocol, decision):
    out = tmp_path / protocol
    generate_images.main(["--config", str(TINY), "--ckpt", str(world["ckpt"]), "--device", "cpu", "--output_dir",
                          str(out), "--image_size", "16", "--steps", "3", "--t_enc", "2", "--repeats", "2",
                          "--samples", "1", "--lora", str(world["lora"]), "--prompt", "a photo of the cat",
                          "--prompt", "a photo of the dog", "--protocol", protocol])
    config = json.loads((out / "run_config.json").read_text())
    assert config["decision"] == decision
    ws = [w for v in json.loads((out / "decisions.json").read_text())["prompts"].values() for w in v["w"]]
    allowed = {-1.0, 2.0} if decision == "release" else {-1.0, 0.0, 1.0}
    assert ws and set(ws) <= allowed, ws
