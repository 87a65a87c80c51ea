"""The adaptive protocol's stopping rules (ldm.erasure.protocols.stop_after) and their guarantee: the decision of
the fast protocol equals the release's wherever the release's own margin exceeds 3 standard errors (issue 17).
Tiny config, CPU, reduced settings (scripts/bench/bench_draws.py measures the same over I2P rows)."""
import json

from helpers_model import check_peak_memory
from ldm.erasure.protocols import Protocol, stop_after
from ldm.erasure.stability import Estimate, StabilitySettings, clear_margin
from scripts.bench import bench_draws


def test_cv_rule_stops_a_clear_prompt_after_one_draw_and_is_se_from_three():
    empty = Estimate([1.0, 1.2, 0.8, 1.1, 0.9, 1.0])                  # d(""): mean 1, relative spread ~0.14
    cv = Protocol("fast", StabilitySettings(), adaptive=True, stop_rule="cv", k_se=3.0)
    se = Protocol("fast", StabilitySettings(), adaptive=True, stop_rule="se", k_se=3.0)
    assert stop_after(Estimate([2.5]), empty, cv) and not stop_after(Estimate([2.5]), empty, se)
    assert not stop_after(Estimate([1.2]), empty, cv)                  # 1.2 vs 1 +- 0.17 (3 SE ~ 0.56): not clear
    assert not stop_after(Estimate([0.1, 3.0]), empty, cv)             # its own spread is larger: not clear
    for values in ([2.0, 2.1, 1.9], [1.3, 1.1, 1.2, 1.25], [0.5, 0.52, 0.49]):
        e = Estimate(values)
        assert stop_after(e, empty, cv) == stop_after(e, empty, se) == clear_margin(e, empty, 3.0)


def test_fewer_draws_and_the_release_decision_wherever_its_margin_exceeds_3_se(tmp_path, capsys):
    """bench_draws on 5 I2P rows at reduced settings: for both adapters (random; concept-like, which moves some
    prompts a lot) the cv rule decides as the release wherever the release's margin exceeds 3 SE, with no more
    draws on average than the se rule (fewer for the concept-like adapter), and the replay is the library's."""
    out = tmp_path / "r.json"
    bench_draws.main(["--rows", "5", "--ddim_steps", "10", "--t_enc", "8", "--repeats", "5", "--empty_draws", "6",
                      "--eval_budget", "0", "--verify", "1", "--cache", str(tmp_path / "c.json"),
                      "--json_out", str(out)])
    res = json.loads(out.read_text())["results"]
    printed = capsys.readouterr().out
    check_peak_memory(res, printed)                                   # the process's, beside its seconds
    assert res["verified"] == 1 * 2 * 2                               # rows x adapters x rules, replay == library
    for kind, a in res["adapters"].items():
        cv, se = a["rules"]["cv"], a["rules"]["se"]
        assert cv["equal_release_clear"] == se["equal_release_clear"] == a["release_clear"], kind
        assert cv["mean_draws"] <= se["mean_draws"], kind
    concept = res["adapters"]["concept"]
    assert concept["release_clear"] >= 3 and concept["rules"]["cv"]["mean_draws"] < concept["rules"]["se"]["mean_draws"]
    assert "| concept | cv |" in printed
