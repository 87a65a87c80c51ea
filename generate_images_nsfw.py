"""UnGuidance over a prompt CSV (I2P): per row, the stability test decides w, then one image is generated.

    python generate_images_nsfw.py --csv_path data/I2P_prompts_4703.csv --output_dir output/<nsfw exp> \
        --config configs/stable-diffusion/v1-inference.yaml --ckpt models/sd-v1-4.ckpt --alpha 8 \
        --image_size 512 --ddim_steps 50 --t_enc 40 --batch_size 4 --repeats 10 [--protocol release|fast] [--adaptive]
    RANK=r WORLD_SIZE=n python generate_images_nsfw.py ...      # shard r of n (e.g. under torchrun)
    python generate_images_nsfw.py --csv_path ... --output_dir ... --merge   # merge the shards' decisions by hand

Per row: prompt, evaluation_seed (default: the row index), evaluation_guidance (default 7.5; the trajectory's
and the image's CFG scale) and the row index (the CSV's unnamed first column as the release's index_col=0;
else `case_number`; else the row position). Layout, under --output_dir (the experiment folder):
    images/<exp_name>/<idx:05d>.jpg                 exp_name = w1_{w1}_w2_{w2}_repeats_{R}_ddim_steps_{S}_t_enc_{T}
                                                      (the release's), + "_fast" [+ "_adaptive"] for our protocol
    logs/<exp_name>/decisions.rank{R}.csv          one line per finished row, appended after its image exists
    logs/<exp_name>/decisions.csv                  all shards merged, sorted by row index
    logs/<exp_name>/run_config.json, d_empty.json, notes.rank{R}.txt (rows skipped or adjusted, with reasons)
    logs/<exp_name>/run_summary.rank{R}.json        the shard's last run that generated images: images, seconds,
                                                      UNet sample-evaluations, peak memory (ldm/memory.py)
Resume: rerun the same command. A row counts as done when its image AND its decisions line exist; images are
written atomically (temp file + rename) so a killed run never leaves a half image. Merge: whichever shard
finishes last finds every shard complete and writes decisions.csv; `--merge` writes it by hand at any time
(warning when rows are missing). Seeds are reduced mod 2^64 (torch's range; I2P's seeds are all < 2^32).
--batch_size is the number of CSV rows sampled together (the release's per-row sample count crashed above 1,
fact sheet §9.7; here every row gets the README's batch_size 1 procedure).

Several adapters: --lora a.safetensors b.safetensors ... (one per erased concept): per row every adapter k gets its
own test (d_k(p) vs d_k(""), the same draws, one batched test) and its own w_k; the image uses
eps = CFG_base + sum_k (1 - w_k) (CFG_k - CFG_base). --skip_unrelated: adapters decided w2 get w_k = 1 (not
evaluated). decisions.csv then holds the K values of d_prompt, d_prompt_std, d_empty and w joined by ";";
exp_name gets "_adapters_{K}" (and "_skip_unrelated").
"""
import argparse
import csv
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.cli import (Parser, add_decision_args, add_model_args, ddim_steps_arg, finite, image_autocast, load_model,
                     positive, resolve_decision, resolve_image_size, run, write_json)
from ldm.erasure.adapters import (adapter_fingerprints, adapter_thresholds, check_distinct, decide_pairs, load_adapters,
                                  skip_unrelated)
from ldm.erasure.decision import get_rule, unflagged_weight
from ldm.erasure import budget
from ldm.erasure.budget import UNetCounter, budgeted_repeats, evals_per_image, repeats_within_budget
from ldm.erasure.draws import reduce_seed
from ldm.erasure.guidance import unguided_latents
from ldm.erasure.protocols import STOP_RULES, Protocol, estimate_empty, protocol_from_flags, row_estimates
from ldm.erasure.stability import Estimate, StabilitySettings, estimate_dict
from ldm.errors import UserError
from ldm.images import IMAGE_FORMATS, image_complete, image_format, save_image, start_noise, to_pil
from ldm.loader import autocast
from ldm.memory import format_memory, memory_record
from ldm.prompts import DEFAULT_GUIDANCE, read_rows
from ldm.runs import check_run_config, folder_lock, model_fingerprint, read_json, shard

# recorded in run_config.json for the reader, not compared on resume: paths (the inputs are compared by content:
# "base" and "adapters" fingerprints), and the CSV (rows are keyed by their index; --limit may grow)
IGNORED_SETTINGS = ("csv_path", "ckpt", "lora", "config")
FIELDS = ["idx", "case_number", "prompt", "seed", "guidance", "d_prompt", "d_prompt_std", "d_empty", "w",
          "repeats_used", "unet_evals", "seconds"]


# ----------------------------------------------------------------------------------------------- layout
def experiment_name(args) -> str:
    name = f"w1_{args.w1}_w2_{args.w2}_repeats_{args.repeats}_ddim_steps_{args.ddim_steps}_t_enc_{args.t_enc}"
    if args.protocol == "fast":
        name += "_fast" + ("_adaptive" if args.adaptive else "")
    if args.lora and len(args.lora) > 1:
        name += f"_adapters_{len(args.lora)}"
    if getattr(args, "skip_unrelated", False):
        name += "_skip_unrelated"
    if args.threshold != 1.0:
        name += f"_threshold_{args.threshold}"
    if args.decision == "guarded":  # release / safe / floor show in w2 (capped); guarded's middle zone does not
        name += "_guarded"
    return name


def image_path(img_dir: Path, idx: int) -> Path:
    return img_dir / f"{idx:05d}.jpg"


def read_decisions(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:  # a torn last line lacks fields: not a record
        return [r for r in csv.DictReader(f) if r.get("idx", "").strip().lstrip("-").isdigit()
                and all(r.get(k) is not None for k in FIELDS) and r["w"] != ""]


def write_csv_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def merge_decisions(log_dir: Path, img_dir: Path, expected: set[int], force: bool = False) -> tuple[bool, int]:
    """Union of every decisions.rank*.csv (rows whose image exists), sorted by idx -> decisions.csv.
    Written when every expected row is there, or always with force. -> (written, rows missing)."""
    done: dict[int, dict] = {}
    for f in sorted(log_dir.glob("decisions.rank*.csv")):
        for r in read_decisions(f):
            idx = int(r["idx"])
            if image_complete(image_path(img_dir, idx)):
                done[idx] = r
    missing = len(expected - set(done))
    if missing and not force:
        return False, missing
    write_csv_atomic(log_dir / "decisions.csv", [done[i] for i in sorted(done)])
    return True, missing


# ----------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    add_decision_args(p, "rows")
    add_model_args(p)
    p.add_argument("--csv_path", default="data/I2P_prompts_4703.csv",
                   help="prompts CSV: prompt, evaluation_seed, evaluation_guidance, case_number")
    p.add_argument("--output_dir", default="generated_i2p", help="the experiment folder (holds models/lora.*)")
    p.add_argument("--lora", nargs="+", default=None,
                   help="adapter file(s) (default: output_dir/models/lora.safetensors or .pth); several: one per "
                        "erased concept, each with its own test and w")
    p.add_argument("--skip_unrelated", action="store_true",
                   help="adapters decided w2 (unrelated to the row's prompt) get w = 1: not evaluated")
    p.add_argument("--alpha", type=finite, default=None,
                   help="LoRA scale for a release lora.pth (default 8); our .safetensors carry their own")
    p.add_argument("--image_size", type=positive(), default=None,
                   help="image side in px (default: the config's, 512 for SD, 16 for the toy model)")
    p.add_argument("--ddim_steps", type=ddim_steps_arg, default=50,
                   help="DDIM steps of the image and of the test")
    p.add_argument("--t_enc", type=int, default=40,
                   help="stability test: the partial trajectory stops at DDIM index t_enc")
    p.add_argument("--ddim_eta", type=finite, default=0.0,
                   help="DDIM eta (0: deterministic)")
    p.add_argument("--batch_size", type=positive(), default=5, help="CSV rows sampled together")
    p.add_argument("--repeats", type=positive(), default=30, help="draws of d(p) per row (the maximum with --adaptive)")
    p.add_argument("--protocol", choices=["release", "fast"], default="fast",
                   help="the stability test's protocol (README: the fast protocol, and the release's)")
    p.add_argument("--schedule", choices=["standard", "release"], default=None,
                   help="DDIM schedule (default: release for --protocol release, standard for fast)")
    p.add_argument("--adaptive", dest="adaptive", action="store_true", default=None,
                   help="fast (default there): draw repeats in rounds until the decision is clear (margin > k_se SE)")
    p.add_argument("--no_adaptive", dest="adaptive", action="store_false", help="fast: always draw --repeats")
    p.add_argument("--k_se", type=finite, default=3.0,
                   help="adaptive: a decision is clear past k_se combined standard errors")
    p.add_argument("--stop_rule", choices=list(STOP_RULES), default="cv",
                   help="adaptive: when a row's draws stop; cv: a clear row after 1 draw (its spread taken from "
                        "d(\"\")'s until it has 3 draws of its own), se: the row's own standard errors, from 3 draws "
                        "(the rule before; scripts/bench/bench_draws.py compares them)")
    p.add_argument("--min_repeats", type=positive(), default=None,
                   help="adaptive: draws before the first check (default 1 with --stop_rule cv, 3 with se)")
    p.add_argument("--eval_budget", type=int, default=300,
                   help="adaptive: UNet sample-evaluations per row for its draws and image together; caps the draws "
                        "(README settings: 200 for the image + 20 a draw -> at most 5 draws); 0: no cap")
    p.add_argument("--empty_draws", type=positive(), default=32, help="fast: draws of the one d(\"\") estimate")
    p.add_argument("--seed", type=int, default=0, help="fast: seed of the d(\"\") draws")
    p.add_argument("--max_batch", type=positive(), default=64, help="UNet samples per stability-test call")
    p.add_argument("--limit", type=positive(), default=None, help="only the first N CSV rows")
    p.add_argument("--merge", action="store_true", help="only merge the shards' decisions into decisions.csv")
    return p


def draw_cap(args, settings: StabilitySettings, n_adapters: int) -> int:
    """--repeats, lowered with adaptive draws to what --eval_budget affords per row (said on stderr)."""
    if args.protocol != "fast" or not args.adaptive or n_adapters == 0:
        return args.repeats
    cap = budgeted_repeats(settings, args.repeats, args.min_repeats, args.eval_budget, n_adapters)
    if args.eval_budget and repeats_within_budget(settings, args.eval_budget, n_adapters) < cap:
        print(f"note: --eval_budget {args.eval_budget} cannot be met: the image alone takes "
              f"{evals_per_image(settings, n_adapters)} UNet evaluations; drawing --min_repeats {cap}", file=sys.stderr)
    elif cap < args.repeats:
        print(f"note: --eval_budget {args.eval_budget}: at most {cap} draws of d(p) per row (--repeats {args.repeats})",
              file=sys.stderr)
    return cap


def find_lora(args) -> list[Path]:
    if args.lora:
        return [Path(p) for p in args.lora]
    for name in ("lora.safetensors", "lora.pth"):
        if (Path(args.output_dir) / "models" / name).is_file():
            return [Path(args.output_dir) / "models" / name]
    raise UserError(f"{args.output_dir}/models: no lora.safetensors or lora.pth (pass --lora)")


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    resolve_image_size(args)
    resolve_decision(args)  # guarded unless --protocol release; the threshold: calibrated where there is one
    args.w2 = unflagged_weight(args.decision, args.w2)  # the one w2 every decision below uses
    protocol = _protocol(args)
    rank, world = shard()
    out_dir = Path(args.output_dir).resolve()  # the release joined output_dir twice (fact sheet §9.5)
    name = experiment_name(args)
    img_dir, log_dir = out_dir / "images" / name, out_dir / "logs" / name
    rows, notes = read_rows(args.csv_path, args.limit)
    expected = {r["idx"] for r in rows}
    if args.merge:
        if not any(log_dir.glob("decisions.rank*.csv")):
            raise UserError(f"--merge: {log_dir} holds no decisions.rank*.csv to merge (nothing generated there with "
                            "these settings yet)")
        written, missing = merge_decisions(log_dir, img_dir, expected, force=True)
        print(f"{log_dir / 'decisions.csv'}: {len(expected) - missing} rows"
              + (f"; {missing} rows not done yet" if missing else " (complete)"))
        return

    fixed_w = args.w1 if args.w1 == args.w2 else None  # no decision to make: no stability test
    loras = find_lora(args) if fixed_w != 1.0 else []
    check_distinct(loras)
    protocol = replace(protocol, repeats=draw_cap(args, protocol.settings, len(loras)))
    run_config = _run_config(args, protocol, loras)
    check_run_config(log_dir, run_config, ignore=IGNORED_SETTINGS)  # early: before anything is loaded
    with folder_lock(log_dir, rank):
        _resume_and_sample(args, protocol, loras, fixed_w, run_config, rows, notes, img_dir, log_dir, rank, world)


def _resume_and_sample(args, protocol: Protocol, loras: list[Path], fixed_w: float | None, run_config: dict,
                       rows: list[dict], notes: list[str], img_dir: Path, log_dir: Path, rank: int, world: int) -> None:
    """Resume (keep the decisions whose image exists), load the model, check what made the folder, sample."""
    expected = {r["idx"] for r in rows}
    mine = [r for r in rows if r["idx"] % world == rank]
    shard_file = log_dir / f"decisions.rank{rank}.csv"
    kept = {int(r["idx"]): r for r in read_decisions(shard_file) if image_complete(image_path(img_dir, int(r["idx"])))}
    todo = [r for r in mine if r["idx"] not in kept]
    print(f"rank {rank}/{world}: {len(mine)} rows, {len(mine) - len(todo)} done, {len(todo)} to do -> {img_dir}")
    if not todo:
        _finish(log_dir, img_dir, expected, Counter(), 0, 0.0, 0, 0)
        return
    model, device = load_model(args)
    job = _Run(model, device, model.latent_shape(args.image_size), load_adapters(model, loras, args.alpha), protocol,
               args, fixed_w, thresholds=adapter_thresholds(loras, args.threshold,
                                                                  (protocol.settings.ddim_steps, protocol.settings.t_enc)))
    run_config.update(base=model_fingerprint(model), adapters=adapter_fingerprints(model, job.names),
                      thresholds=job.thresholds)
    check_run_config(log_dir, run_config, ignore=IGNORED_SETTINGS)  # the weights themselves, by content
    _prepare_logs(log_dir, img_dir, run_config, notes, rank)
    write_csv_atomic(shard_file, [kept[i] for i in sorted(kept)])
    empty_evals = 0
    if fixed_w is None and args.protocol == "fast":
        job.d_empty, empty_evals = _empty_estimate(job, log_dir, run_config)
    t_start = time.time()
    stats, n_images, evals_total = _sample_rows(job, todo, img_dir, shard_file, rank)
    _finish(log_dir, img_dir, expected, stats, n_images, time.time() - t_start, evals_total, empty_evals,
            device=job.device, rank=rank)


def _protocol(args) -> Protocol:
    """The stability test's protocol from the flags (checked); --adaptive defaults to on with the fast protocol.
    Its repeats are --repeats: draw_cap lowers them once the adapters are known."""
    if args.adaptive is None:
        args.adaptive = args.protocol == "fast"
    if args.min_repeats is None:
        args.min_repeats = 1 if args.stop_rule == "cv" else 3
    protocol = protocol_from_flags(args.protocol, args.ddim_steps, args.t_enc, DEFAULT_GUIDANCE, args.ddim_eta,
                                   args.schedule, repeats=args.repeats, adaptive=args.adaptive,
                                   min_repeats=args.min_repeats, k_se=args.k_se, empty_draws=args.empty_draws,
                                   max_batch=args.max_batch, stop_rule=args.stop_rule,
                                   round_size=1 if args.stop_rule == "cv" else 2)
    if args.eval_budget < 0:
        raise UserError(f"--eval_budget {args.eval_budget}: must be >= 0 (0: no budget)")
    return protocol


def _run_config(args, protocol: Protocol, loras: list[Path]) -> dict:
    """run_config.json: the settings a resumed run must share."""
    lora_paths = [str(p.resolve()) for p in loras]
    return {"csv_path": str(Path(args.csv_path).resolve()), "ckpt": args.ckpt, "config": args.config,
            "lora": (lora_paths[0] if len(lora_paths) == 1 else lora_paths) if lora_paths else None,
            "alpha": args.alpha, "image_size": args.image_size, "protocol": args.protocol,
            "schedule": "release" if protocol.settings.release_schedule else "standard",
            "adaptive": args.adaptive, "k_se": args.k_se, "min_repeats": args.min_repeats,
            "stop_rule": args.stop_rule if args.adaptive else None,
            "eval_budget": args.eval_budget if args.adaptive else None, "max_repeats": protocol.repeats,
            "empty_draws": args.empty_draws, "seed": args.seed, "eta": args.ddim_eta, "precision": args.precision,
            "image_format": image_format(args.protocol), "decision": args.decision}


def _prepare_logs(log_dir: Path, img_dir: Path, run_config: dict, notes: list[str], rank: int) -> None:
    """Write run_config.json (checked by the caller) and this shard's notes (the first 5 said)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    write_json(log_dir / "run_config.json", run_config)
    (log_dir / f"notes.rank{rank}.txt").write_text("".join(n + "\n" for n in notes), encoding="utf-8")
    for n in notes[:5]:
        print(f"note: {n}", file=sys.stderr)
    if len(notes) > 5:
        print(f"note: ... {len(notes) - 5} more in {log_dir / f'notes.rank{rank}.txt'}", file=sys.stderr)


@dataclass
class _Run:
    """What every batch of rows needs: the model (its device resolved once), its adapters, the protocol."""
    model: object
    device: torch.device
    shape: tuple[int, int, int]               # the latent's [C, h, w]
    names: list[str]                          # adapter k of the run is names[k] in the model
    protocol: Protocol
    args: argparse.Namespace
    fixed_w: float | None                     # --w1 == --w2: no stability test
    d_empty: list[Estimate] | None = None     # fast protocol: d("") per adapter, once per run
    thresholds: list[float] | None = None     # per adapter: flag when d(p) > threshold * d("")


def _decide_rows(job: _Run, batch: list[dict]) -> tuple[list[list], list[list[float]]]:
    """-> (pairs, ws): pairs[i][k] = row i's (d_k(p), d_k("")) (None, None without a test), ws[i][k] its w_k."""
    args = job.args
    if job.fixed_w is not None:
        pairs = [[(None, None)] * max(len(job.names), 1) for _ in batch]
        return pairs, [[job.fixed_w] * len(row) for row in pairs]
    est = row_estimates(job.model, job.protocol, job.shape, [r["prompt"] for r in batch], [r["seed"] for r in batch],
                        [r["guidance"] for r in batch], job.d_empty, job.names)
    pairs = [list(row) for row in zip(*est)]
    ws = [decide_pairs(row, args.w1, args.w2, job.thresholds, get_rule(args.decision)) for row in pairs]
    if args.skip_unrelated:
        ws = [skip_unrelated(row, args.w2) for row in ws]
    return pairs, ws


def _sample_rows(job: _Run, todo: list[dict], img_dir: Path, shard_file: Path, rank: int
                 ) -> tuple[Counter, int, int]:
    """Test, sample and record every row of `todo`, args.batch_size rows at a time; each image is written before
    its decisions line -> (images per w, images, UNet sample-evaluations)."""
    args, model = job.args, job.model
    stats, n_images = Counter(), 0
    with UNetCounter(model.unet) as counter, open(shard_file, "a", newline="", encoding="utf-8") as fh, \
            tqdm(total=len(todo), desc=f"rows (rank {rank})") as bar:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        for b0 in range(0, len(todo), args.batch_size):
            batch = todo[b0:b0 + args.batch_size]
            t0 = time.time()
            pairs, ws = _decide_rows(job, batch)
            prompts, seeds = [r["prompt"] for r in batch], [r["seed"] for r in batch]
            with autocast(job.device, image_autocast(args)):  # the release's fp16 image, fp32 test: ldm.cli
                z = unguided_latents(model, prompts, start_noise(seeds, job.shape, job.device),
                                     [r["guidance"] for r in batch],
                                     [[row[k] for row in ws] for k in range(len(job.names))],
                                     args.ddim_steps, job.protocol.settings.release_schedule, args.ddim_eta,
                                     generator=torch.Generator(job.device).manual_seed(reduce_seed(seeds[0])),
                                     adapters=job.names)
                decoded = model.decode_first_stage(z).float()
            fmt = IMAGE_FORMATS[image_format(args.protocol)]
            images = to_pil(decoded, fmt["rounding"])
            secs = (time.time() - t0) / len(batch)
            for r, img, w_row, row in zip(batch, images, ws, pairs):
                save_image(img, image_path(img_dir, r["idx"]), fmt["quality"])  # the image first, then its decisions
                w = _joined(w_row) if w_row else job.fixed_w
                _write_decision(writer, fh, r, row, w, _row_evals(job, r["prompt"], row, w_row), secs)
                stats[w] += 1
                n_images += 1
            last, last_e = pairs[-1][0]
            bar.set_postfix_str(f"w={_w_text(_joined(ws[-1]) if ws[-1] else job.fixed_w)}"
                                + (f" d(p)={last.mean:.4g} d('')={last_e.mean:.4g} n={last.n}" if last else "")
                                + f" {prompts[-1][:30]!r}")
            bar.update(len(batch))
        return stats, n_images, counter.samples


def _row_evals(job: _Run, prompt: str, row: list, w_row: list[float]) -> int:
    """The row's own UNet sample-evaluations (its draws and its image, as run alone): the same number whatever
    batch or shard the row lands in (a batch shares UNet calls, and an average over it would not be)."""
    dp = row[0][0]
    s, k = job.protocol.settings, len(job.names)
    ws = [] if job.fixed_w == 1.0 else list(w_row)
    evals = budget.image_evals(s, ws)
    if dp is not None:
        fast = job.protocol.name == "fast"
        evals += budget.stability_evals(s, prompt, dp.n, k, empty_shortcut=fast)
        if not fast:  # the release measures d("") on the row's own draws
            evals += budget.stability_evals(s, "", row[0][1].n, k, empty_shortcut=False)
    return evals


def _write_decision(writer: csv.DictWriter, fh, r: dict, row: list, w, evals: int, secs: float) -> None:
    """One decisions line (the K adapters' values joined by ";"), flushed to disk."""
    dp = row[0][0]
    writer.writerow({**r, "d_prompt": _joined([_num(p.mean if p else None) for p, _ in row]),
                     "d_prompt_std": _joined([_num(p.std if p else None) for p, _ in row]),
                     "d_empty": _joined([_num(e.mean if e else None) for _, e in row]), "w": w,
                     "repeats_used": dp.n if dp else 0, "unet_evals": evals, "seconds": round(secs, 3)})
    fh.flush()
    os.fsync(fh.fileno())


def _num(v) -> str:
    return "" if v is None else f"{v:.6g}"


def _joined(values: list):
    """One adapter: its value as is (the single-adapter decisions.csv); several: joined by ";"."""
    return values[0] if len(values) == 1 else ";".join(str(v) for v in values)


def _w_text(w) -> str:
    return f"{w:+g}" if isinstance(w, (int, float)) else str(w)


def _empty_estimate(job: _Run, log_dir: Path, run_config: dict) -> tuple[list[Estimate], int]:
    """d("") of the fast protocol, one per adapter: read back from d_empty.json when made with the same settings,
    else computed (deterministic in --seed: every shard gets the same value) and recorded (one adapter: the
    single-adapter file; several: {"adapters": [one record each], "key", "unet_evals"})."""
    key = {k: run_config[k] for k in ("base", "adapters", "alpha", "image_size", "schedule", "empty_draws", "seed",
                                      "eta", "precision")}
    key.update(ddim_steps=job.args.ddim_steps, t_enc=job.args.t_enc)
    path = log_dir / "d_empty.json"
    saved = _read_cache(path)
    if saved is not None:
        if saved.get("key") == key:
            records = saved["adapters"] if "adapters" in saved else [saved]
            for rec in records:
                print(f"d(\"\") = {rec['mean']:.6g} ± {rec['sem']:.3g} (from {path})")
            return [Estimate(rec["values"]) for rec in records], 0
    with UNetCounter(job.model.unet) as c, tqdm(total=job.protocol.empty_draws, desc='d("")') as bar:
        ests = estimate_empty(job.model, job.protocol, job.shape, job.args.seed, job.names, bar.update)
    records = [{**estimate_dict(e), "values": e.values} for e in ests]
    write_json(path, {**records[0], "key": key, "unet_evals": c.samples} if len(records) == 1 else
               {"adapters": records, "key": key, "unet_evals": c.samples})
    for est in ests:
        print(f"d(\"\") = {est.mean:.6g} ± {est.sem:.3g} from {est.n} draws ({c.samples} UNet sample-evaluations)")
    return ests, c.samples


def _read_cache(path: Path) -> dict | None:
    """A cache file's record, or None (absent, or not a valid record: said, and recomputed)."""
    if not path.is_file():
        return None
    try:
        saved = read_json(path, "cache")
        records = saved["adapters"] if "adapters" in saved else [saved]
        if all(isinstance(r.get("values"), list) and r["values"] for r in records):
            return saved
    except (UserError, AttributeError, TypeError, KeyError):
        pass
    print(f"note: {path} is not a valid d(\"\") record; computing it again", file=sys.stderr)
    return None


def _finish(log_dir: Path, img_dir: Path, expected: set[int], stats: Counter, n_images: int, seconds: float,
            evals: int, empty_evals: int, device: torch.device | None = None, rank: int = 0) -> None:
    """The summary line and run_summary.rank{R}.json of a shard that generated images (peak memory on the
    device load_model resolved: ldm/memory.py), then the merge when every shard is complete."""
    if n_images:
        memory = memory_record(device)
        write_json(log_dir / f"run_summary.rank{rank}.json",
                   {"images": n_images, "seconds": round(seconds, 2), "unet_evals": evals, "empty_evals": empty_evals,
                    "images_per_w": {_w_text(w): n for w, n in sorted(stats.items())}, **memory})
        took = ", ".join(f"w={_w_text(w)}: {n}" for w, n in sorted(stats.items()))
        print(f"summary: {n_images} images ({took}); {seconds / n_images:.2f} s/image; "
              f"{evals / n_images:.0f} UNet sample-evaluations per prompt"
              + (f" (+ {empty_evals} once for d(\"\"))" if empty_evals else "")
              + f"; peak memory {format_memory(memory)}")
    written, missing = merge_decisions(log_dir, img_dir, expected)
    if written:
        print(f"all shards complete: {log_dir / 'decisions.csv'}")
    else:
        print(f"{missing} rows still to do in other shards (decisions.csv is written by the last shard to finish, "
              "or by --merge)")


if __name__ == "__main__":
    run(main)
