"""A reduced run of scripts/experiments/e2e_toy.py: train.py -> generate_images.py (three ways, the stability test on
the fly) -> the digit classifier, on the shipped toy-digits model, each script in its own process. Thresholds are
below what the full benchmark measures (README), so the test fails when erasure stops working, not on sampling
noise."""
import json

import pytest

from scripts.experiments import e2e_toy


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    e2e_toy.main(["--digit", "three", "--samples", "6", "--out", str(out)])
    return json.loads((out / "results.json").read_text()), out


def test_unguide_erases_the_digit_and_spares_the_others(results):
    res, out = results
    (run,) = res["runs"]
    s = run["ways"]
    assert s["base"]["target_rate"] >= 0.9 and s["base"]["others_rate"] >= 0.9  # the model draws digits
    assert s["unguide"]["target_rate"] <= 0.20    # the full run: 8% / 10% (50 images per prompt)
    assert s["unguide"]["synonyms_rate"] <= 0.20
    assert s["unguide"]["others_rate"] >= s["base"]["others_rate"] - 0.10  # the full run: within 2 points
    assert run["flagged"]["target"] == 1.0 and run["flagged"]["synonyms"] >= 2 / 3  # the test flags the concept
    assert run["heldout_counted"], "no held-out wording the base model draws: the group would say nothing"
    text = (out / "results.md").read_text()
    assert "UnGuide" in text and "worst" in text and (out / "grid.png").stat().st_size > 1000
