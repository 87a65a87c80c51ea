"""Benchmark: how many stability draws the fast protocol's adaptive decision spends per I2P prompt, and whether it
decides as the release does wherever the release's own margin is clear.

    python -m scripts.bench.bench_draws --rows 500 --threads 1            # tiny config, CPU, README settings

One process, the tiny config with seeded random weights (scripts/bench/bench_unguidance.random_model) and two
adapters tested together on the same draws (one base trajectory, stability.latent_diffs): "random" (A ~ N(0, 1):
small margins, mixed decisions) and "concept" (A along the text-embedding direction of --concept: the prompts that
carry it are moved a lot). Per I2P row (data/I2P_prompts_4703.csv, from --row_start) it computes, with the
library's own functions:
  * the release's test (protocols.release_row_estimates): --repeats paired start codes, one fixed t, d(p) and d("")
    per row; its decision w and its margin |d(p) - d("")| in combined standard errors;
  * the fast protocol's first --repeats draws of d(p) (protocols.fast_prompt_estimates, non-adaptive), against the
    run's one d("") estimate (--empty_draws draws).
Draw i of a row is the same number however draws are batched (ldm.erasure.draws, protocols), so every adaptive
stopping rule is replayed exactly on these prefixes (the rule of protocols.stop_after: it is what
fast_prompt_estimates runs; the first --verify rows are checked against fast_prompt_estimates itself). Reported
per adapter and rule: draws per prompt (mean, median, p90, max), UNet sample-evaluations per prompt (draws +
the image: 200 at the README's settings), and decisions equal to the release's, over all rows and over the rows
where the release's margin exceeds 3 standard errors (the guarantee), plus equal to the fast protocol with all
draws. The draws are cached in --cache (keyed by the settings) so a cut run continues where it stopped.
The last line gives the process's peak memory (ldm/memory.py: peak RSS, CPU), for the whole run.
"""
import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ldm.cli import HelpFormatter
from ldm.erasure.budget import budgeted_repeats, evals_per_draw, evals_per_image
from ldm.erasure.guidance import decide
from ldm.erasure.lora import inject_lora
from ldm.erasure.protocols import (STOP_RULES, Protocol, estimate_empty, fast_prompt_estimates,
                                   release_row_estimates, stop_after)
from ldm.erasure.stability import Estimate, StabilitySettings, margin_in_se
from ldm.erasure.targets import select_targets
from ldm.memory import format_memory, memory_record
from ldm.runs import write_json
from scripts.bench.bench_unguidance import i2p_rows, random_model

REPO = Path(__file__).resolve().parents[2]
ADAPTERS = ("random", "concept")


@torch.no_grad()
def add_adapters(model, concept: str, seed: int = 1, scale: float = 0.05) -> list[str]:
    """Adapter "lora" (random: A ~ N(0, 1)) and "lora1" (concept-like: A along mean(ctx(concept) - ctx(""))), B
    ~ N(0, scale^2), on the default targets (cross-attention keys and values)."""
    ctx = model.get_learned_conditioning([concept, ""]).float()
    direction = (ctx[0] - ctx[1]).mean(0)
    direction = direction / direction.norm()
    g = torch.Generator().manual_seed(seed)
    targets, names = select_targets(model.unet), []
    for k, kind in enumerate(ADAPTERS):
        name = "lora" if k == 0 else f"lora{k}"
        for layer in inject_lora(model.unet, targets, 1, 8.0, name=name).values():
            delta = getattr(layer, name)
            if kind == "random":
                delta.A.copy_(torch.randn(delta.A.shape, generator=g))
            else:
                delta.A.copy_(direction.view(-1, 1).to(delta.A) * 4.0)
            delta.B.copy_(torch.randn(delta.B.shape, generator=g) * scale)
        names.append(name)
    return names


def collect(args, model, names, shape, rows, protocol: Protocol, cache: dict, cache_path: Path) -> dict:
    """Per row and adapter: the fast draws and the release's (d(p), d("")) draws; cached every 10 rows."""
    release = Protocol("release", replace(protocol.settings, release_schedule=True), repeats=args.repeats)
    full = replace(protocol, adaptive=False, repeats=args.repeats)
    done, t0, n_new = cache.setdefault("rows", {}), time.time(), 0
    for r in rows:
        key = str(r["idx"])
        if key in done:
            continue
        fast = fast_prompt_estimates(model, full, shape, [r["prompt"]], [r["seed"]], [r["guidance"]],
                                     cache["d_empty_est"], names)
        rel = release_row_estimates(model, release, shape, [r["prompt"]], [r["seed"]], [r["guidance"]], names)
        done[key] = {"fast": [f[0].values for f in fast], "release_p": [p[0][0].values for p in rel],
                     "release_e": [p[0][1].values for p in rel]}
        n_new += 1
        if n_new % 10 == 0:
            write_json(cache_path, _serialisable(cache))
            rate = (time.time() - t0) / n_new
            print(f"  {len(done)}/{len(rows)} rows ({rate:.2f} s/row)", file=sys.stderr, flush=True)
    write_json(cache_path, _serialisable(cache))
    return done


def _serialisable(cache: dict) -> dict:
    return {k: v for k, v in cache.items() if k != "d_empty_est"}


def replay(values: list[float], d_empty: Estimate, protocol: Protocol) -> int:
    """Draws the adaptive rule of `protocol` uses for a prompt whose draws are `values` (in order)."""
    n = min(protocol.min_repeats, protocol.repeats)
    while n < protocol.repeats and not stop_after(Estimate(values[:n]), d_empty, protocol):
        n = min(protocol.repeats, n + protocol.round_size)
    return n


def rule_protocol(args, protocol: Protocol, rule: str, cap: int) -> Protocol:
    """The adaptive protocol of a stopping rule: "se" as generate_images_nsfw.py's flags give it (--min_repeats,
    rounds of 2), "cv" from one draw, one draw at a time."""
    first, step = (args.min_repeats, 2) if rule == "se" else (1, 1)
    return replace(protocol, repeats=cap, stop_rule=rule, adaptive=True, min_repeats=first, round_size=step)


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def analyse(args, protocol: Protocol, rows, done: dict, d_empty: list[Estimate], rules: list[str]) -> dict:
    s = protocol.settings
    per_draw, image = evals_per_draw(s), evals_per_image(s)
    cap = budgeted_repeats(s, args.repeats, args.min_repeats, args.eval_budget)
    out = {"cap": cap, "evals_per_draw": per_draw, "image_evals": image, "adapters": {}}
    for k, kind in enumerate(ADAPTERS):
        res = {}
        rel_w, rel_margin, full_w = [], [], []
        for r in rows:
            rec = done[str(r["idx"])]
            ep, ee = Estimate(rec["release_p"][k]), Estimate(rec["release_e"][k])
            rel_w.append(decide(ep.mean, ee.mean, args.w1, args.w2))
            rel_margin.append(margin_in_se(ep, ee))
            full_w.append(decide(Estimate(rec["fast"][k]).mean, d_empty[k].mean, args.w1, args.w2))
        clear = [m > 3 for m in rel_margin]
        for rule in rules:
            p = rule_protocol(args, protocol, rule, cap)
            draws, ws = [], []
            for r in rows:
                vals = done[str(r["idx"])]["fast"][k]
                n = replay(vals, d_empty[k], p)
                draws.append(n)
                ws.append(decide(Estimate(vals[:n]).mean, d_empty[k].mean, args.w1, args.w2))
            bad = [r["idx"] for r, w, rw, c in zip(rows, ws, rel_w, clear) if c and w != rw]
            res[rule] = {"mean_draws": statistics.mean(draws), "median_draws": statistics.median(draws),
                         "p90_draws": quantile(draws, 0.9), "max_draws": max(draws),
                         "draws_histogram": {str(n): draws.count(n) for n in sorted(set(draws))},
                         "evals_per_prompt": image + per_draw * statistics.mean(draws),
                         "equal_release_all": sum(w == rw for w, rw in zip(ws, rel_w)),
                         "equal_release_clear": sum(w == rw for w, rw, c in zip(ws, rel_w, clear) if c),
                         "clear_rows_differing": bad,
                         "equal_fast_all_draws": sum(w == fw for w, fw in zip(ws, full_w))}
        out["adapters"][kind] = {"rows": len(rows), "release_clear": sum(clear),
                                 "release_w1": sum(w == args.w1 for w in rel_w),
                                 "fast_all_draws_equal_release_clear": sum(
                                     w == rw for w, rw, c in zip(full_w, rel_w, clear) if c),
                                 "d_empty": d_empty[k].mean, "rules": res}
    return out


def verify(args, model, names, shape, rows, protocol: Protocol, done: dict, d_empty: list[Estimate],
           rules: list[str]) -> int:
    """The replay against fast_prompt_estimates itself (adaptive, each adapter alone) on the first rows: the same
    number of draws and values within 1e-4 (one adapter's UNet call at t has another batch than two's)."""
    cap = budgeted_repeats(protocol.settings, args.repeats, args.min_repeats, args.eval_budget)
    checked = 0
    for rule in rules:
        p = rule_protocol(args, protocol, rule, cap)
        for r in rows[:args.verify]:
            for k, name in enumerate(names):
                [[est]] = fast_prompt_estimates(model, p, shape, [r["prompt"]], [r["seed"]], [r["guidance"]],
                                                [d_empty[k]], [name])
                vals = done[str(r["idx"])]["fast"][k]
                n = replay(vals, d_empty[k], p)
                if est.n != n or max(abs(a - b) for a, b in zip(est.values, vals)) > 1e-4:
                    raise SystemExit(f"replay differs from fast_prompt_estimates: row {r['idx']}, adapter "
                                     f"{ADAPTERS[k]}, rule {rule}: {est.n} draws vs {n}")
                checked += 1
    return checked


def report(args, result: dict) -> None:
    print(f"\n{args.rows} I2P rows from {args.row_start}; ddim_steps {args.ddim_steps}, t_enc {args.t_enc}, repeats "
          f"{args.repeats}, --eval_budget {args.eval_budget} -> at most {result['cap']} draws; a draw "
          f"{result['evals_per_draw']} UNet sample-evaluations, the image {result['image_evals']}; d(\"\") from "
          f"{args.empty_draws} draws once per run (not counted per prompt)")
    print("| adapter | rule | mean draws | median | p90 | max | UNet evals/prompt | = release (all) "
          "| = release (margin > 3 SE) | = fast, all draws | draws histogram |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, a in result["adapters"].items():
        for rule, r in a["rules"].items():
            print(f"| {kind} | {rule} | {r['mean_draws']:.2f} | {r['median_draws']:g} | {r['p90_draws']} | "
                  f"{r['max_draws']} | {r['evals_per_prompt']:.1f} | {r['equal_release_all']}/{a['rows']} | "
                  f"{r['equal_release_clear']}/{a['release_clear']} | {r['equal_fast_all_draws']}/{a['rows']} | "
                  f"{r['draws_histogram']} |")
    for kind, a in result["adapters"].items():
        print(f"  {kind}: d(\"\") {a['d_empty']:.4g}; release flags {a['release_w1']}/{a['rows']} (w1); release "
              f"margin > 3 SE on {a['release_clear']} rows; the fast protocol with all {args.repeats} draws equals "
              f"the release on {a['fast_all_draws_equal_release_clear']} of them")
        for rule, r in a["rules"].items():
            if r["clear_rows_differing"]:
                print(f"    {rule}: clear rows decided otherwise than the release: {r['clear_rows_differing'][:20]}")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/tiny/tiny-inference.yaml"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--csv_path", default=str(REPO / "data/I2P_prompts_4703.csv"))
    p.add_argument("--rows", type=int, default=500, help="I2P rows (from --row_start)")
    p.add_argument("--row_start", type=int, default=0)
    p.add_argument("--concept", default="nude naked", help="the concept-like adapter's concept")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--t_enc", type=int, default=40)
    p.add_argument("--repeats", type=int, default=10, help="draws per prompt (release; the fast protocol's all)")
    p.add_argument("--empty_draws", type=int, default=32)
    p.add_argument("--min_repeats", type=int, default=3)
    p.add_argument("--eval_budget", type=int, default=300, help="as generate_images_nsfw.py: caps the draws")
    p.add_argument("--k_se", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the d(\"\") draws")
    p.add_argument("--w1", type=float, default=-1.0)
    p.add_argument("--w2", type=float, default=2.0)
    p.add_argument("--rules", nargs="+", default=list(STOP_RULES), choices=list(STOP_RULES),
                   help="adaptive stopping rules to replay (protocols.STOP_RULES)")
    p.add_argument("--verify", type=int, default=3, help="rows checked against fast_prompt_estimates itself")
    p.add_argument("--cache", default=str(REPO / "outputs/bench_draws/draws.json"))
    p.add_argument("--json_out", default=None, help="also write the results here")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    device = torch.device("cpu")
    model = random_model(args.config, device)
    names = add_adapters(model, args.concept)
    shape = model.latent_shape(args.image_size)
    rows = i2p_rows(args.csv_path, args.rows, args.row_start)
    settings = StabilitySettings(args.ddim_steps, args.t_enc)
    protocol = Protocol("fast", settings, repeats=args.repeats, adaptive=True, min_repeats=args.min_repeats,
                        k_se=args.k_se, empty_draws=args.empty_draws)
    key = {k: getattr(args, k) for k in ("config", "image_size", "csv_path", "concept", "ddim_steps", "t_enc",
                                         "repeats", "empty_draws", "seed")}
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key}
    if "d_empty" not in cache:
        cache["d_empty"] = [e.values for e in estimate_empty(model, protocol, shape, args.seed, names)]
    cache["d_empty_est"] = [Estimate(v) for v in cache["d_empty"]]
    t0 = time.time()
    done = collect(args, model, names, shape, rows, protocol, cache, cache_path)
    collect_s = time.time() - t0
    d_empty = cache["d_empty_est"]
    checked = verify(args, model, names, shape, rows, protocol, done, d_empty, args.rules)
    result = analyse(args, protocol, rows, done, d_empty, args.rules)
    result.update(verified=checked, collect_seconds=collect_s, seconds=time.time() - t_start,
                  **memory_record(device))  # the whole process's peak (ldm/memory.py)
    report(args, result)
    print(f"\nreplay checked against fast_prompt_estimates on {checked} (row, adapter, rule) cases; draws computed "
          f"in {collect_s:.0f} s this run ({time.time() - t_start:.0f} s in all; cache {cache_path}); peak memory "
          f"{format_memory(result)} (the process's, everything above included)")
    if args.json_out:
        write_json(args.json_out, {"settings": vars(args), "results": result})


if __name__ == "__main__":
    main()
