"""A threshold for the stability test learned from the adapter's own prompts, instead of the release's fixed
d(p) > d("").

The release flags a prompt when r(p) = d(p) / d("") > 1. Measured on the toy world (issue 18), 1 is often the
wrong place: for some adapters a quarter to a half of the other digits' wordings have r > 1 (flagged, then
damaged by w1), while the concept's and the other prompts' ratios were cleanly separable at 1.6-2.4. The prompts
JSON already names both groups, so the threshold can be placed between them:

    concept ratios   R_c = { r(p) : p in target + synonyms }
    other ratios     R_o = { r(p) : p in other (non-empty) + preserved prompts } U { 1 }   (d("") itself)
    separable        min R_c > max R_o
    tau              sqrt(min R_c * max R_o)        the geometric midpoint of the gap (when separable)
                     else the tau in the sorted ratios that misclassifies the fewest prompts (ties: the
                     smaller tau: erasure over preservation), reported with its errors

A prompt is flagged when r(p) > tau. The threshold and both groups' ratios are stored in
calc_diff_results.json ("calibration") by compute_lora_diff.py, next to the adapter, and by train.py at the end
of a run inside the adapter file itself (metadata "calibration": `measure` below, with the stability test's
settings it was measured at), so the adapter carries its threshold wherever it goes.
"""
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Calibration:
    threshold: float            # tau: flag when d(p) / d("") > tau
    separable: bool             # min concept ratio > max other ratio
    gap: float                  # min R_c / max R_o (> 1 when separable)
    concept_ratios: dict        # {prompt: r(p)}
    other_ratios: dict          # {prompt: r(p)} ("" included, r = 1)
    errors: int                 # prompts of the two groups on the wrong side of tau

    def record(self) -> dict:
        return asdict(self)


def calibrate(d: dict[str, float], d_empty: float, concept: list[str], others: list[str]) -> Calibration:
    """tau from the d(p) of the concept's prompts and of the others (d: {prompt: mean d(p)}, d_empty: mean d(""))."""
    if not d_empty > 0 or not math.isfinite(d_empty):
        raise ValueError(f"calibration needs a positive, finite d(\"\"), got {d_empty}")
    rc = {p: d[p] / d_empty for p in concept if p in d}
    ro = {p: d[p] / d_empty for p in others if p in d and p != ""}
    ro[""] = 1.0
    if not rc:
        raise ValueError("calibration needs d(p) of at least one concept prompt (target or synonym)")
    lo_c, hi_o = min(rc.values()), max(ro.values())
    if lo_c > hi_o:
        return Calibration(math.sqrt(lo_c * hi_o), True, lo_c / hi_o, rc, ro, 0)
    candidates = sorted(set(rc.values()) | set(ro.values()))
    best = min(candidates, key=lambda t: (_errors(t, rc, ro), t))
    return Calibration(best, False, lo_c / hi_o, rc, ro, _errors(best, rc, ro))


def _errors(tau: float, rc: dict, ro: dict) -> int:
    """Concept prompts not flagged (r <= tau) plus other prompts flagged (r > tau)."""
    return sum(r <= tau for r in rc.values()) + sum(r > tau for r in ro.values())


def flagged(d_prompt: float, d_empty: float, threshold: float = 1.0) -> bool:
    """The stability test's flag: d(p) > threshold * d("") (the release: threshold 1)."""
    return float(d_prompt) > threshold * float(d_empty)


def json_prompts(data: dict) -> tuple[list[str], list[str]]:
    """(concept, others) of a prompts JSON: target + synonyms, and the non-empty "other" prompts."""
    concept = list(dict.fromkeys([data["target"], *data.get("synonyms", [])]))
    return concept, [p for p in dict.fromkeys(data.get("other", [])) if p and p not in concept]


def measure(model, protocol, shape: tuple[int, ...], data: dict, seed: int, adapter: str = "lora") -> dict:
    """Calibrate the adapter `adapter` of `model` on a prompts JSON now: the stability test (the fast protocol's
    draws of `seed`) for the concept and other prompts, then `calibrate` -> its record plus the test's settings
    ("protocol": what a later test must match for the threshold to mean the same)."""
    from ldm.erasure.protocols import fast_diff_table  # torch-side; this module's math stays import-light
    concept, others = json_prompts(data)
    [(est, empty)] = fast_diff_table(model, protocol, shape, concept + others, seed, adapters=[adapter])
    cal = calibrate({p: e.mean for p, e in est.items()}, empty.mean, concept, others)
    s = protocol.settings
    return {**cal.record(), "d_empty": empty.mean,
            "protocol": {"ddim_steps": s.ddim_steps, "t_enc": s.t_enc, "guidance": s.guidance, "eta": s.eta,
                         "repeats": protocol.repeats, "empty_draws": protocol.empty_draws, "seed": int(seed)}}


def protocol_mismatch(stored: dict, ddim_steps: int, t_enc: int, guidance: float | None = None) -> str | None:
    """A line saying how a stored calibration's stability test differs from this run's (None: it matches;
    guidance None: per prompt, not compared)."""
    p = stored.get("protocol") if isinstance(stored, dict) else None
    if not isinstance(p, dict):
        return None
    now = {"ddim_steps": ddim_steps, "t_enc": t_enc, "guidance": guidance}
    diff = [f"{k} {p[k]} (now {v})" for k, v in now.items() if v is not None and k in p and p[k] != v]
    return ("calibrated at " + ", ".join(diff)) if diff else None
