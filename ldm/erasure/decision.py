"""UnGuidance's decision rules: from the stability test's d(p) and d("") to the guidance weight w of a prompt.

    eps = w * CFG_base + (1 - w) * CFG_adapted          (ldm.erasure.guidance)

A prompt is *flagged* when the adapter moves its prediction more than the empty prompt's: d(p) > d("").

    release   w = w1 if flagged else w2                 the UnGuide release (w1 = -1, w2 = 2): --protocol release
    safe      w = w1 if flagged else min(w2, 1)         unflagged prompts get at most the base model
    floor     w = w1 if flagged else min(w2, 0)         unflagged prompts get at most the adapter alone
    guarded   three zones on r = d(p) / d(""):          flagged (r > threshold): w1; uncertain (1 < r <= threshold:
              above the release's own threshold, under the calibrated one): max(w1, min(w2, 0)), the adapter
              alone; clear (r <= 1): min(w2, 1), the base model. With threshold <= 1 it is `safe`. The default
              (ldm.cli.resolve_decision).

Why more than one rule: for an unflagged prompt the release's w2 = 2 gives eps = CFG_base + (CFG_base -
CFG_adapted). The adapter's difference points AWAY from the erased concept, so this pushes TOWARDS it: a
prompt that carries the concept but slips under the test (d(p) <= d("")) is drawn with the concept
*amplified*, worse than the base model and than the adapter alone. An attacker who can lower d(p) (a white-box
prompt search, ldm.attacks.unlearndiffatk) turns the defence into an amplifier. `safe` removes the
amplification and keeps the base model exactly on every unflagged prompt (so the other concepts keep the base
model's accuracy, bit for bit); `floor` also keeps the adapter's own erasure on them (no prompt is drawn with
less erasure than the adapter alone gives), at the cost of the adapter's collateral damage on unflagged
prompts (w = 0 is the adapter alone, which the preservation term keeps small). Ties go to "unflagged", as in
the release (ldm.erasure.guidance.decide). Every rule takes the stability test's threshold (1: the release's;
a calibrated one: ldm.erasure.calibration).

`guarded` sits between `safe` and `floor`: a calibrated threshold above 1 leaves a band of prompts the release
would flag and the calibration does not; `safe` hands them to the base model (an attacker only has to push d(p)
under the calibrated threshold), `floor` hands every unflagged prompt to the adapter (its collateral on all of
them); `guarded` gives the adapter the uncertain band only and the base model the prompts the adapter does not
move at all (r <= 1), so an attack must push d(p) under d("") itself to get the base model.
"""
from typing import Callable

from ldm.erasure.guidance import decide

Rule = Callable[..., float]  # (d_prompt, d_empty, w1, w2, threshold=1.0) -> w

# the most an unflagged prompt's w may be (guarded: its clear zone; its uncertain zone: at most 0)
UNFLAGGED_CAP = {"release": None, "safe": 1.0, "floor": 0.0, "guarded": 1.0}


def unflagged_weight(rule: str, w2: float) -> float:
    """The w a clearly unflagged prompt gets under `rule`: w2 (release), min(w2, 1) (safe, guarded), min(w2, 0)
    (floor)."""
    cap = UNFLAGGED_CAP[rule]
    return w2 if cap is None else min(w2, cap)


def _rule(name: str) -> Rule:
    def rule(d_prompt: float, d_empty: float, w1: float, w2: float, threshold: float = 1.0) -> float:
        return decide(d_prompt, d_empty, w1, unflagged_weight(name, w2), threshold)
    rule.__name__ = f"{name}_rule"
    rule.__doc__ = f"w1 when d(p) > threshold * d(\"\"), else unflagged_weight({name!r}, w2)."
    return rule


def guarded_rule(d_prompt: float, d_empty: float, w1: float, w2: float, threshold: float = 1.0) -> float:
    """w1 when d(p) > threshold * d(""); max(w1, min(w2, 0)) (the adapter alone) when d(""), the release's
    threshold, < d(p) <= threshold * d(""); min(w2, 1) (the base model) when d(p) <= d("")."""
    d_prompt, d_empty = float(d_prompt), float(d_empty)
    if d_prompt > threshold * d_empty:
        return w1
    if d_prompt > d_empty:
        return max(w1, min(w2, 0.0))
    return min(w2, 1.0)


release_rule, safe_rule, floor_rule = _rule("release"), _rule("safe"), _rule("floor")
RULES: dict[str, Rule] = {"release": release_rule, "safe": safe_rule, "floor": floor_rule, "guarded": guarded_rule}


def get_rule(name: str) -> Rule:
    """The rule of a name (release, safe, floor, guarded); ValueError naming the choices otherwise."""
    if name not in RULES:
        raise ValueError(f"decision rule must be one of {', '.join(RULES)}, got {name!r}")
    return RULES[name]
