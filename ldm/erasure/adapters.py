"""Adapter sets of a sampling run (one adapter per erased concept) and their decisions w_k.

Loading: adapter k of a run is named "lora" / f"lora{k}" in the model (adapter_name); the same adapter twice
(same file or same content) is refused (check_distinct). Decisions: w_k per prompt, from a stability test's
estimates (decide_pairs), from calc_diff_results.json files (diff_decisions, read_diff_decisions), and
--skip_unrelated (skip_unrelated: an adapter decided w2 gets w = 1, contributing nothing and costing nothing).
"""
import hashlib
import sys
from pathlib import Path
from typing import Sequence

import torch

from ldm.erasure.decision import Rule, release_rule
from ldm.erasure.calibration import protocol_mismatch
from ldm.erasure.io import load_adapter, stored_calibration
from ldm.erasure.lora import lora_layers, lora_state_dict
from ldm.erasure.stability import Estimate
from ldm.errors import UserError
from ldm.runs import read_json, tensors_fingerprint


def adapter_name(k: int) -> str:
    """The model's name of the k-th adapter of a run: "lora", "lora1", "lora2", ..."""
    return "lora" if k == 0 else f"lora{k}"


def check_distinct(paths: list) -> None:
    """The same adapter twice (same file, or the same content under two names) would double its weight: refused."""
    seen: dict = {}
    for p in map(Path, paths):
        if not p.is_file():
            continue  # load_adapter says so
        key = p.resolve()
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        for other, (okey, odigest) in seen.items():
            if key == okey or digest == odigest:
                why = "the same file" if key == okey else f"the same content (sha256 {digest[:12]})"
                raise UserError(f"adapters {other} and {p} are {why}: give each adapter once")
        seen[p] = (key, digest)


def load_adapters(model, paths: list, alpha: float | None) -> list[str]:
    """Load adapter k as "lora" / f"lora{k}"; note (one line) modules that two adapters adapt with other ranks."""
    check_distinct(paths)
    names, ranks, seen = [], [], {}
    for k, path in enumerate(paths):
        info = load_adapter(path, model.unet, alpha=alpha, name=adapter_name(k))
        layers = lora_layers(model.unet, info.name)
        ranks.append({t: getattr(layers[t], info.name).rank for t in info.targets})
        names.append(info.name)
        (fingerprint,) = adapter_fingerprints(model, [info.name])
        if fingerprint in seen:  # the same tensors under other bytes (a retrain with the same seed; .pth vs .safetensors)
            raise UserError(f"adapters {seen[fingerprint]} and {path} hold the same tensors: give each adapter once")
        seen[fingerprint] = path
    for i in range(len(paths)):
        for j in range(i + 1, len(paths)):
            differ = sorted(t for t in ranks[i].keys() & ranks[j].keys() if ranks[i][t] != ranks[j][t])
            if differ:
                t = differ[0]
                print(f"note: {paths[i]} and {paths[j]} both adapt {len(differ)} module(s) with different ranks "
                      f"(e.g. {t}: {ranks[i][t]} vs {ranks[j][t]}); they add up there, each with its own weight",
                      file=sys.stderr)
    return names


def adapter_fingerprints(model, names: Sequence[str]) -> list[str]:
    """A content fingerprint per loaded adapter: its tensors and its scale alpha (ldm.runs.tensors_fingerprint)."""
    out = []
    for name in names:
        tensors = lora_state_dict(model.unet, name)
        alpha = {getattr(m, name).alpha for m in lora_layers(model.unet, name).values()}
        out.append(tensors_fingerprint({**tensors, "alpha": torch.tensor(sorted(alpha))}))
    return out


def decide_pairs(pairs: Sequence[tuple[Estimate, Estimate]], w1: float, w2: float,
                 thresholds: Sequence[float] | None = None, rule: Rule = release_rule) -> list[float]:
    """One prompt's [w_k] from its (d_k(p), d_k("")) per adapter under the decision `rule`
    (ldm.erasure.decision; adapter k flags above thresholds[k] * d_k(""))."""
    thresholds = thresholds or [1.0] * len(pairs)
    return [rule(dp.mean, de.mean, w1, w2, tau) for (dp, de), tau in zip(pairs, thresholds)]


def threshold_of(results: dict, threshold: float | str | None, source: str) -> float:
    """--threshold: a number, "auto": the calibrated threshold of a calc_diff_results.json (compute_lora_diff.py),
    or None (the default): the calibrated one when the file has one, else 1 (the release's), said in one line."""
    if threshold not in ("auto", None):
        return float(threshold)
    cal = results.get("calibration")
    if not isinstance(cal, dict) or not isinstance(cal.get("threshold"), (int, float)):
        if threshold is None:
            print(f"note: {source}: no calibrated threshold; flagging at d(p) > d(\"\") (the release's)",
                  file=sys.stderr)
            return 1.0
        raise UserError(f"{source}: no calibrated threshold (rerun compute_lora_diff.py, which writes one, or give "
                        "--threshold a number)")
    return float(cal["threshold"])


def skip_unrelated(ws: list[float], w2: float) -> list[float]:
    """--skip_unrelated, one prompt's [w_k]: an adapter decided w2 gets w = 1 (contributes 0, not evaluated)."""
    return [1.0 if v == w2 else v for v in ws]


def adapter_thresholds(paths: Sequence, threshold: float | str | None, test: tuple | None = None) -> list[float]:
    """--threshold per adapter file: the number for each, or "auto": each adapter's calibrated threshold, from the
    calc_diff_results.json of its experiment folder (<exp>/models/lora.* -> <exp>/calc_diff_results.json) or else
    the one train.py stored in the adapter (metadata "calibration"); None (the default): that threshold where there
    is one, else 1 (the release's), said in one line. test: this run's stability test (ddim_steps, t_enc,
    guidance), to say when a stored threshold was calibrated at other settings."""
    if threshold not in ("auto", None):
        return [float(threshold)] * len(paths)
    out = []
    for path in map(Path, paths):
        results = path.resolve().parent.parent / "calc_diff_results.json"
        if results.is_file():
            out.append(threshold_of(read_json(results, "diff results"), threshold, str(results)))
            continue
        stored = stored_calibration(path)
        if stored is not None:
            out.append(float(stored["threshold"]))
            mismatch = protocol_mismatch(stored, *test) if test else None
            print(f"{path}: its stored calibrated threshold {stored['threshold']:.3f}"
                  + (f" (note: {mismatch}; the ratio d(p)/d(\"\") depends on them)" if mismatch else ""),
                  file=sys.stderr)
            continue
        if threshold is None:
            print(f"note: {path}: no calibrated threshold (none stored in it by train.py, no {results.name} beside "
                  "its folder); flagging at d(p) > d(\"\") (the release's)", file=sys.stderr)
            out.append(1.0)
            continue
        raise UserError(f"--threshold auto: {path} stores no calibrated threshold and there is no {results} (run "
                        f"compute_lora_diff.py --output_dir {results.parent} first, or give --threshold a number)")
    return out


def diff_decisions(results: dict, prompts: list[str], w1: float, w2: float, source: str,
                   threshold: float | str | None = 1.0, rule: Rule = release_rule) -> dict[str, float]:
    """{prompt: w} of one adapter from its calc_diff_results.json (compute_lora_diff.py); UserError naming
    `source` when it lacks d("") or a prompt."""
    avgs = results.get("prompt_avgs")
    if not isinstance(avgs, dict):
        raise UserError(f"{source}: no prompt_avgs (not a calc_diff_results.json?)")
    if "" not in avgs:
        raise UserError(f"{source}: has no d(\"\") (prompt_avgs[\"\"]); rerun compute_lora_diff.py, which always "
                        "measures it")
    missing = [p for p in prompts if p not in avgs]
    if missing:
        raise UserError(f"{source}: no d(p) for {len(missing)} prompt(s), e.g. {missing[0]!r}; rerun "
                        "compute_lora_diff.py with these prompts")
    tau = threshold_of(results, threshold, source)
    return {p: rule(avgs[p], avgs[""], w1, w2, tau) for p in prompts}


def read_diff_decisions(paths: Sequence, prompts: list[str], w1: float, w2: float, missing_hint: str = "",
                        threshold: float | str | None = 1.0, rule: Rule = release_rule) -> dict[str, list[float]]:
    """{prompt: [w_k]} from one calc_diff_results.json per adapter (same order); UserError for a missing file
    (with missing_hint appended)."""
    per = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"{path}: " + (f"not found; {missing_hint}" if missing_hint else "diff results not found"))
        per.append(diff_decisions(read_json(path, "diff results"), prompts, w1, w2, str(path), threshold, rule))
    return {p: [d[p] for d in per] for p in prompts}
