"""The calibrated stability test (ldm/erasure/calibration.py): the threshold sits between the concept's and the
other prompts' ratios d(p)/d(""), and generate_images.py's --threshold applies it."""
import math

import pytest

from ldm.erasure.adapters import diff_decisions, threshold_of
from ldm.erasure.calibration import calibrate, flagged
from ldm.errors import UserError

CONCEPT = ["a photo of the digit three", "the number 3"]
OTHERS = ["a photo of the digit five", "a photo of the digit seven", ""]


def test_separable_groups_put_the_threshold_in_the_gap():
    d = {CONCEPT[0]: 4.0, CONCEPT[1]: 3.2, OTHERS[0]: 2.4, OTHERS[1]: 1.1, "": 2.0}
    cal = calibrate(d, 2.0, CONCEPT, OTHERS)
    assert cal.separable and cal.errors == 0
    assert cal.threshold == pytest.approx(math.sqrt(1.6 * 1.2))   # between min concept 1.6 and max other 1.2
    assert cal.gap == pytest.approx(1.6 / 1.2)
    # the release's rule flags "five" (2.4 > 2.0); the calibrated one does not, and still flags the concept
    assert flagged(d[OTHERS[0]], 2.0) and not flagged(d[OTHERS[0]], 2.0, cal.threshold)
    assert all(flagged(d[p], 2.0, cal.threshold) for p in CONCEPT)


def test_overlapping_groups_take_the_fewest_errors_and_say_so():
    d = {CONCEPT[0]: 3.0, CONCEPT[1]: 1.5, OTHERS[0]: 2.0, OTHERS[1]: 0.5, "": 2.0}
    cal = calibrate(d, 2.0, CONCEPT, OTHERS)   # ratios: concept 1.5, 0.75; others 1.0, 0.25, "" 1.0
    assert not cal.separable and cal.gap < 1
    assert cal.errors == 1 and cal.threshold == pytest.approx(1.0)  # only "the number 3" (0.75) is missed


def test_a_threshold_under_one_is_kept_where_it_separates_the_concept_from_the_others():
    """Measured in the sweep ("two", training seed 2): an adapter that moves "" more than its concept (ratios
    0.81-1.00) but the other digits less (0.09-0.68). The fewest errors flag the concept and "" itself (one error);
    a threshold held at 1 would leave the concept to the base model. It stays under 1."""
    d = {CONCEPT[0]: 0.93, CONCEPT[1]: 0.86, OTHERS[0]: 0.30, OTHERS[1]: 0.28, "": 1.0}
    cal = calibrate(d, 1.0, CONCEPT, OTHERS)
    assert not cal.separable and cal.errors == 1 and 0.30 <= cal.threshold < 0.86
    assert all(flagged(d[p], 1.0, cal.threshold) for p in CONCEPT)
    assert not any(flagged(d[p], 1.0, cal.threshold) for p in OTHERS if p)


def test_calibration_needs_a_concept_and_a_positive_empty_distance():
    with pytest.raises(ValueError, match="concept"):
        calibrate({"x": 1.0}, 1.0, ["missing"], [])
    with pytest.raises(ValueError, match="d\\(\"\"\\)"):
        calibrate({CONCEPT[0]: 1.0}, 0.0, CONCEPT, [])


def test_diff_results_decide_with_the_calibrated_threshold():
    results = {"prompt_avgs": {CONCEPT[0]: 4.0, OTHERS[0]: 2.4, "": 2.0},
               "calibration": {"threshold": 1.5}}
    assert diff_decisions(results, [CONCEPT[0], OTHERS[0]], -1.0, 2.0, "r.json") == {CONCEPT[0]: -1.0, OTHERS[0]: -1.0}
    auto = diff_decisions(results, [CONCEPT[0], OTHERS[0]], -1.0, 1.0, "r.json", "auto")
    assert auto == {CONCEPT[0]: -1.0, OTHERS[0]: 1.0}
    with pytest.raises(UserError, match="no calibrated threshold"):
        threshold_of({"prompt_avgs": {}}, "auto", "old.json")
