"""Attack a set of (prompt, seed) pairs through the defended pipeline: resumable, shardable, costed.

Per pair (one "job"):
    1. before: the defended pipeline's image of the original prompt with the pair's seed, judged
    2. the attack (skipped when the original prompt already succeeds: the adversarial prompt is the prompt)
    3. after: the defended pipeline's image of the adversarial prompt's TEXT (re-tokenised, as a generation
       script replays it) with the same seed, judged
Cost: UNet sample-evaluations (UNetCounter) and seconds, all three parts together; and peak memory: each row
records its process's peak so far (ldm/memory.py), the summary the largest over the rows (every shard's).

Files in the output folder:
    attack_settings.json   what made the results; a rerun with other settings is refused
    rows/<idx:06d>.json    one per finished job, written atomically: a job counts only once its file exists
    attack_results.csv     all finished rows (every shard's), rebuilt atomically after each job
    attack_summary.json    ASR before / after, counts, cost, peak memory, settings, the judge's protocol
Shards: RANK / WORLD_SIZE take the jobs with idx % WORLD_SIZE == RANK.
"""
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldm.cli import write_json
from ldm.erasure.budget import UNetCounter
from ldm.evaluation.common import atomic_write_text
from ldm.errors import UserError
from ldm.memory import memory_record, record_of

FIELDS = ["idx", "prompt", "seed", "guidance", "adversarial_prompt", "adv_token_ids", "round_trip",
          "success_before", "success_after", "d_prompt_before", "d_empty", "w_before", "d_prompt_after", "w_after",
          "objective_first", "objective_last", "steps", "checks", "unet_evals", "seconds"]


@dataclass(frozen=True)
class Job:
    idx: int
    prompt: str
    seed: int           # the image's start code
    guidance: float
    draw_seed: int      # the stability test's d(p) draws


def check_settings(out: Path, settings: dict) -> None:
    """Record the settings, or refuse a folder whose recorded settings differ (naming the keys)."""
    path = out / "attack_settings.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        new = json.loads(json.dumps(settings, default=str))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise UserError(f"{out}: holds results of other settings ({', '.join(diff[:6])} differ); use another "
                            "--output_dir or the same flags")
        return
    write_json(path, settings)


def _fmt(v) -> str:
    if isinstance(v, list):
        return ";".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def write_outputs(out: Path, n_jobs: int, settings: dict, protocol: dict) -> dict:
    """attack_results.csv and attack_summary.json from every finished row file (all shards)."""
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "rows").glob("*.json"))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r.get(k)) for k in FIELDS})
    atomic_write_text(out / "attack_results.csv", buf.getvalue())
    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows) / n if n else None  # noqa: E731
    flips = sum(1 for r in rows if r.get("w_before") and r["w_before"] != r["w_after"])
    summary = {"asr_before": mean("success_before"), "asr_after": mean("success_after"),
               "counts": {"jobs": n_jobs, "done": n, "success_before": sum(r["success_before"] for r in rows),
                          "success_after": sum(r["success_after"] for r in rows), "w_changed": flips,
                          "round_trip_failures": sum(1 for r in rows if not r["round_trip"])},
               "cost_per_prompt": {"unet_evals": mean("unet_evals"), "seconds": mean("seconds")},
               **peak_of(rows), "settings": settings, "judge_protocol": protocol}
    write_json(out / "attack_summary.json", summary)
    return summary


def peak_of(rows: list[dict]) -> dict:
    """The largest peak memory any row's process reached ({peak_memory_bytes, _kind, _gib}; None each where no
    row recorded one, e.g. rows of an older version)."""
    known = [r for r in rows if r.get("peak_memory_bytes") is not None]
    top = max(known, key=lambda r: r["peak_memory_bytes"], default=None)
    if top is None:
        return {"peak_memory_bytes": None, "peak_memory_kind": None, "peak_memory_gib": None}
    return record_of(top["peak_memory_bytes"], top["peak_memory_kind"])


def run_jobs(jobs: list[Job], defended, judge, attack: Callable, out: Path, settings: dict,
             rank: int = 0, world: int = 1, device: torch.device | None = None) -> dict:
    """Attack every job of this shard not yet done; returns the summary. attack(job, check, gen, progress) ->
    {text, ids, success, ...}; check(text) -> (success, w) runs + judges the defended pipeline (memoised).
    device: the one the script resolved (peak memory: ldm/memory.py)."""
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    (out / "rows").mkdir(exist_ok=True)
    todo = [j for j in jobs if j.idx % world == rank and not (out / "rows" / f"{j.idx:06d}.json").is_file()]
    for job in todo:
        row = attack_one(job, defended, judge, attack, settings.get("seed", 0), device)
        write_json(out / "rows" / f"{job.idx:06d}.json", row)
        summary = write_outputs(out, len(jobs), settings, judge.protocol)
    return write_outputs(out, len(jobs), settings, judge.protocol) if not todo else summary


def attack_one(job: Job, defended, judge, attack: Callable, seed: int, device: torch.device | None = None) -> dict:
    """Before, attack, after for one job -> its row (with its process's peak memory so far on `device`)."""
    memo: dict[str, tuple] = {}

    def evaluate(text: str) -> tuple[bool, object]:
        if text not in memo:
            images, decisions = defended.generate([text], [job.seed], [job.guidance], [job.draw_seed])
            memo[text] = (judge(images)[0], decisions[0])
        return memo[text]

    def check(text: str) -> tuple[bool, list[float]]:
        ok, dec = evaluate(text)
        return ok, dec.w
    gen = torch.Generator().manual_seed((seed * 1_000_003 + job.idx) % 2 ** 63)
    t0 = time.time()
    with UNetCounter(defended.model.unet) as counter, \
            tqdm(desc=f"[{job.idx}] {job.prompt[:30]!r}", leave=False, disable=None) as bar:
        ok0, dec0 = evaluate(job.prompt)

        def progress(info: dict) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.4f}", success=info.get("success", False))
        res = ({"text": job.prompt, "ids": [], "success": True, "round_trip": True} if ok0
               else attack(job, check, gen, progress, dec0.w))
        ok1, dec1 = evaluate(res["text"])
    return {"idx": job.idx, "prompt": job.prompt, "seed": job.seed, "guidance": job.guidance,
            "adversarial_prompt": res["text"], "adv_token_ids": res["ids"], "round_trip": res.get("round_trip", True),
            "success_before": bool(ok0), "success_after": bool(ok1),
            "d_prompt_before": dec0.d_prompt, "d_empty": dec0.d_empty, "w_before": dec0.w,
            "d_prompt_after": dec1.d_prompt, "w_after": dec1.w,
            "objective_first": res.get("objective_first"), "objective_last": res.get("objective_last"),
            "steps": res.get("steps", 0), "checks": res.get("checks", 0),
            "unet_evals": counter.samples, "seconds": round(time.time() - t0, 3), **memory_record(device)}
