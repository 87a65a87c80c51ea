"""A reduced run of scripts/experiments/separability_toy.py: two adapters (three, five) on the toy-digits model, loaded
together and one at a time. Thresholds sit below what the full run measures (README: 5% / 0% erased, others
99.4% against the base model's 99.4%, each digit back at 100% when its adapter is removed), so the test fails
when composition or recovery stops working, not on sampling noise."""
import json

from scripts.experiments import separability_toy


def test_two_adapters_erase_both_spare_the_rest_and_removal_recovers(tmp_path, toy_train_dir):
    # three and five at seed 0: the adapters tests/test_e2e_toy.py trains (one folder: each trained once)
    separability_toy.main(["--digits", "three", "five", "--samples", "5", "--no_oracle", "--out", str(tmp_path),
                           "--train_dir", str(toy_train_dir)])
    c = json.loads((tmp_path / "results.json").read_text())["configs"]
    base, both = c["base"], c["both_skip"]
    assert base["rate_three"] >= 0.8 and base["rate_five"] >= 0.8
    assert both["rate_three"] <= 0.2 and both["rate_five"] <= 0.2                  # both stay erased
    assert both["other_accuracy"] >= base["other_accuracy"] - 0.1                    # the rest intact
    assert c["only_three"]["rate_five"] >= base["rate_five"] - 0.2                 # five's adapter removed
    assert c["only_five"]["rate_three"] >= base["rate_three"] - 0.2                 # three's adapter removed
    assert c["only_three"]["rate_three"] <= 0.2 and c["only_five"]["rate_five"] <= 0.2
