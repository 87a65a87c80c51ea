"""Benchmark: the UnGuide release's protocol (two model copies) against ours (one copy; fast; fast + adaptive).

    python -m scripts.bench.bench_unguidance                                   # tiny config, CPU
    python -m scripts.bench.bench_unguidance --config configs/stable-diffusion/v1-inference.yaml --random_weights \
        --image_size 64 --rows 1 --json_prompts 3 --ddim_steps 50 --t_enc 40 --repeats 10    # full SD v1 architecture
    python -m scripts.bench.bench_unguidance ... --device cuda                 # on a GPU

Each protocol runs in its own child process (so peak memory is its own): the model has seeded random weights
(every child builds the same), and the adapter is seeded too: "concept" (default) reacts to the tokens of
--concept (A along the text-embedding direction of the concept), so decisions have clear margins as with a
trained adapter; "random" is a plain random adapter (small margins everywhere).
Part 1, I2P rows (generate_images_nsfw.py per row): the release's procedure with TWO models (base + a deepcopy with
the adapter merged) = repeats x {p, ""} x (trajectory CFG steps x 2 + 2) + 49 x 4 sampling evaluations per prompt
(636 at the README's settings), against ours: the fast protocol (d("") once per run, reported apart) with and
without --adaptive (adaptive with generate_images_nsfw.py's --eval_budget rule, default 300 per prompt).
Part 2, a prompts JSON (compute_lora_diff.py): the release's chunks with two models against our fast table. Decisions are compared with the release's; "clear" = the release's margin exceeds 3 standard
errors. A last child checks the final latents of one model (per-sample adapter scales) against the two-model
formula for the same w.
"""
import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

import torch

from ldm.cli import HelpFormatter
from ldm.erasure.lora import inject_lora, lora_layers
from ldm.erasure.stability import Estimate, StabilitySettings
from ldm.erasure.targets import select_targets
from ldm.erasure.budget import UNetCounter, budgeted_repeats
from ldm.erasure.guidance import decide, unguided_latents
from ldm.erasure.protocols import Protocol, estimate_empty, fast_diff_table, fast_prompt_estimates
from ldm.erasure.stability import margin_in_se
from ldm.images import start_noise
from ldm.prompts import diff_prompts, read_prompts_json
from ldm.models.diffusion.ddim import (cfg_model_fn, ddim_timesteps, ddpm_t_range, partial_steps,
                                       sample_ddim)
from ldm.loader import build_model, resolve_device
from ldm.memory import format_memory, memory_record, peak_rss_bytes

VARIANTS = ["release", "fast", "fast_adaptive"]


# ----------------------------------------------------------------------------------------------- setup
@torch.no_grad()
def random_model(config: str, device, seed: int = 0):
    """Seeded random weights, every parameter moved off its init (zero-init convs would make eps == 0)."""
    torch.manual_seed(seed)
    model = build_model(config)
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
            else:
                p.add_(0.02 * noise)
    return model.to(device).eval()


@torch.no_grad()
def add_adapter(model, kind: str, concept: str, seed: int = 1, scale: float = 0.05):
    layers = inject_lora(model.unet, select_targets(model.unet), 1, 8.0)
    g = torch.Generator().manual_seed(seed)
    if kind in ("concept", "specific"):
        ctx = model.get_learned_conditioning([concept, ""]).float()
        direction = (ctx[0] - ctx[1]).mean(0)                      # [D]
        if kind == "specific":  # the concept's token directions without the 2 main directions of ""'s tokens
            _, _, vh = torch.linalg.svd(ctx[1], full_matrices=False)
            tok = ctx[0, 1:1 + len(concept.split())].mean(0)
            direction = tok - vh[:2].T @ (vh[:2] @ tok)
        direction = direction / direction.norm()
    for layer in layers.values():
        if kind in ("concept", "specific"):
            layer.lora.A.copy_(direction.view(-1, 1).to(layer.lora.A) * 4.0)
        elif kind == "random":
            layer.lora.A.copy_(torch.randn(layer.lora.A.shape, generator=g).to(layer.lora.A))
        b = torch.randn(layer.lora.B.shape, generator=g) * scale
        layer.lora.B.copy_(b.to(layer.lora.B))
    return model


def two_models(model):
    """(base, merged): the release's pair: the base model and a deepcopy with the adapter merged in."""
    merged = copy.deepcopy(model)
    for layer in lora_layers(merged.unet).values():
        layer.merge()
    for layer in lora_layers(model.unet).values():
        layer.enabled = False
    return model, merged


def i2p_rows(csv_path: str, n: int, start: int, nude: int = 0) -> list[dict]:
    """n rows from `start`, the last `nude` of them taken from rows with nudity_percentage >= 50."""
    import csv
    plain, nudes = [], []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            idx = int(rec[""])
            if idx < start or not rec["prompt"].strip():
                continue
            row = {"idx": idx, "prompt": rec["prompt"], "seed": int(float(rec["evaluation_seed"])),
                   "guidance": float(rec["evaluation_guidance"] or 7.5)}
            if nude and float(rec.get("nudity_percentage") or 0) >= 50:
                if len(nudes) < nude:
                    nudes.append(row)
            elif len(plain) < n - nude:
                plain.append(row)
            if len(plain) >= n - nude and len(nudes) >= nude:
                break
    return plain + nudes


# ----------------------------------------------------------------------------------------------- release, two models
@torch.no_grad()
def release_d(base, merged, prompt: str, codes, t, guidance, s: StabilitySettings):
    """The release's compute_latent_diff: base CFG trajectory (49-step schedule, till_T), then eps of both models."""
    n = codes.shape[0]
    cond = base.get_learned_conditioning([prompt] * n)
    unc = base.get_learned_conditioning([""] * n)
    z = sample_ddim(cfg_model_fn(base.apply_model, cond, unc, guidance), codes, base.alphas_cumprod,
                    ddim_timesteps(s.ddim_steps, base.num_timesteps, True), eta=0.0,
                    stop_after=partial_steps(s.ddim_steps, s.t_enc, True))
    return (merged.apply_model(z, t, cond) - base.apply_model(z, t, cond)).float().flatten(1).norm(dim=1).cpu()


@torch.no_grad()
def release_image_latent(base, merged, prompt: str, x_T, guidance: float, w: float, steps: int):
    """The release's AutoGuidedModel: w * CFG_full + (1 - w) * CFG_unlearned, two models, 49-step schedule."""
    cond = base.get_learned_conditioning([prompt])
    unc = base.get_learned_conditioning([""])
    fb, fa = cfg_model_fn(base.apply_model, cond, unc, guidance), cfg_model_fn(merged.apply_model, cond, unc, guidance)
    return sample_ddim(lambda x, t: w * fb(x, t) + (1 - w) * fa(x, t), x_T, base.alphas_cumprod,
                       ddim_timesteps(steps, base.num_timesteps, True))


def release_worker(args, model, device, shape, rows):
    base, merged = two_models(model)
    s = StabilitySettings(args.ddim_steps, args.t_enc, 7.5, 0.0, True)
    lo, hi = ddpm_t_range(args.ddim_steps, args.t_enc)
    res = {"rows": [], "json": {}}
    with UNetCounter(base.unet) as cb, UNetCounter(merged.unet) as cm:
        t0 = time.time()
        for r in rows:
            gen = torch.Generator().manual_seed(r["seed"])
            t = torch.randint(lo, hi, (1,), generator=torch.Generator().manual_seed(r["seed"])).to(device)
            dp, de, first = [], [], None
            for _ in range(args.repeats):
                codes = torch.randn((1, *shape), generator=gen).to(device)
                first = codes if first is None else first
                dp += release_d(base, merged, r["prompt"], codes, t, r["guidance"], s).tolist()
                de += release_d(base, merged, "", codes, t, r["guidance"], s).tolist()
            ep, ee = Estimate(dp), Estimate(de)
            w = decide(ep.mean, ee.mean, args.w1, args.w2)
            release_image_latent(base, merged, r["prompt"], first, r["guidance"], w, args.ddim_steps)
            res["rows"].append({"idx": r["idx"], "d_p": ep.mean, "d_e": ee.mean, "w": w,
                                "margin_se": margin_in_se(ep, ee), "repeats": ep.n})
        res["i2p_seconds"] = time.time() - t0
        res["i2p_evals"] = cb.samples + cm.samples
        if args.json_prompts:
            t0, e0 = time.time(), cb.samples + cm.samples
            prompts = json_prompts(args)
            gen = torch.Generator().manual_seed(42)
            table = {p: [] for p in prompts}
            for _ in range(args.json_repeats):       # --n_samples 1, as the README
                codes = torch.randn((1, *shape), generator=gen).to(device)
                t = torch.randint(lo, hi, (1,), generator=gen).to(device)
                for p in prompts:
                    table[p] += release_d(base, merged, p, codes, t, 7.5, s).tolist()
            est = {p: Estimate(v) for p, v in table.items()}
            res["json"] = {"seconds": time.time() - t0, "evals": cb.samples + cm.samples - e0,
                           "decisions": {p: {"w": decide(e.mean, est[""].mean, args.w1, args.w2),
                                             "margin_se": margin_in_se(e, est[""])} for p, e in est.items() if p}}
    return res


def json_prompts(args) -> list[str]:
    prompts = [p for p in diff_prompts(read_prompts_json(args.prompts_json)) if p][:args.json_prompts]
    return prompts + [""]


# ----------------------------------------------------------------------------------------------- ours
def fast_worker(args, model, device, shape, rows, adaptive: bool):
    release_schedule = args.schedule == "release"
    s = StabilitySettings(args.ddim_steps, args.t_enc, 7.5, 0.0, release_schedule)
    repeats = budgeted_repeats(s, args.repeats, args.min_repeats, args.eval_budget) if adaptive else args.repeats
    proto = Protocol("fast", s, repeats=repeats, adaptive=adaptive, min_repeats=args.min_repeats,
                     k_se=args.k_se, empty_draws=args.empty_draws, max_batch=args.max_batch)
    res = {"rows": [], "json": {}}
    with UNetCounter(model.unet) as c:
        t0 = time.time()
        d_empty = estimate_empty(model, proto, shape, 0)
        res["empty_seconds"], res["empty_evals"] = time.time() - t0, c.samples
        t0, e0 = time.time(), c.samples
        for b0 in range(0, len(rows), args.batch_size):
            batch = rows[b0:b0 + args.batch_size]
            [est] = fast_prompt_estimates(model, proto, shape, [r["prompt"] for r in batch], [r["seed"] for r in batch],
                                          [r["guidance"] for r in batch], d_empty)
            ws = [decide(e.mean, d_empty[0].mean, args.w1, args.w2) for e in est]
            unguided_latents(model, [r["prompt"] for r in batch], start_noise([r["seed"] for r in batch], shape, device),
                             [r["guidance"] for r in batch], [ws], args.ddim_steps, release_schedule)
            for r, e, w in zip(batch, est, ws):
                res["rows"].append({"idx": r["idx"], "d_p": e.mean, "d_e": d_empty[0].mean, "w": w, "repeats": e.n})
        res["i2p_seconds"], res["i2p_evals"] = time.time() - t0, c.samples - e0
        if args.json_prompts:
            t0, e0 = time.time(), c.samples
            jp = replace_repeats(proto, args.json_repeats)
            [(table, empty)] = fast_diff_table(model, jp, shape, json_prompts(args), 42)
            res["json"] = {"seconds": time.time() - t0, "evals": c.samples - e0,
                           "decisions": {p: {"w": decide(e.mean, empty.mean, args.w1, args.w2)}
                                         for p, e in table.items() if p}}
    return res


def replace_repeats(proto: Protocol, repeats: int) -> Protocol:
    from dataclasses import replace
    return replace(proto, repeats=repeats)


def check_worker(args, model, device, shape, rows):
    """Final latents of our one-model sampler vs the two-model formula, same w, both schedules."""
    out = {}
    r = rows[0]
    x = start_noise([r["seed"]], shape, device)
    for w in (args.w1, args.w2):
        ours = unguided_latents(model, [r["prompt"]], x, r["guidance"], [w], args.ddim_steps, True)
        base, merged = two_models(copy.deepcopy(model))
        ref = release_image_latent(base, merged, r["prompt"], x, r["guidance"], w, args.ddim_steps)
        out[f"w={w:+g}"] = ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
        del base, merged
    return out


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t0 = time.time()
    model = add_adapter(random_model(args.config, device), args.adapter, args.concept)
    shape = model.latent_shape(args.image_size)
    rows = i2p_rows(args.csv_path, args.rows, args.row_start, args.nude_rows)
    build_s = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args._worker == "release":
        res = release_worker(args, model, device, shape, rows)
    elif args._worker == "check":
        res = {"check": check_worker(args, model, device, shape, rows)}
    else:
        res = fast_worker(args, model, device, shape, rows, args._worker == "fast_adaptive")
    res["build_seconds"] = build_s
    res["peak_rss_mb"] = peak_rss_bytes() / 2 ** 20
    if device.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    res.update(memory_record(device))  # the scripts' measure (ldm/memory.py): this child's own peak
    res["model_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    return res


# ----------------------------------------------------------------------------------------------- driver
def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/tiny/tiny-inference.yaml"))
    p.add_argument("--random_weights", action="store_true", help="(always: seeded random weights and adapter)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per child (0: torch's default)")
    p.add_argument("--image_size", type=int, default=16)
    p.add_argument("--csv_path", default=str(REPO / "data/I2P_prompts_4703.csv"))
    p.add_argument("--rows", type=int, default=8, help="I2P rows (from --row_start)")
    p.add_argument("--row_start", type=int, default=0)
    p.add_argument("--nude_rows", type=int, default=0, help="of --rows, how many from rows with nudity_percentage >= 50")
    p.add_argument("--prompts_json", default=str(REPO / "data/horse.json"))
    p.add_argument("--json_prompts", type=int, default=13, help="prompts of the JSON (+ \"\"); 0 skips part 2")
    p.add_argument("--json_repeats", type=int, default=10)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--t_enc", type=int, default=40)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--empty_draws", type=int, default=32)
    p.add_argument("--min_repeats", type=int, default=3)
    p.add_argument("--eval_budget", type=int, default=300,
                   help="fast_adaptive: UNet evaluations per prompt for its draws and image (as generate_images_nsfw.py)")
    p.add_argument("--k_se", type=float, default=3.0)
    p.add_argument("--batch_size", type=int, default=4, help="ours: I2P rows per batch")
    p.add_argument("--max_batch", type=int, default=64)
    p.add_argument("--schedule", choices=["standard", "release"], default="standard", help="ours")
    p.add_argument("--w1", type=float, default=-1.0)
    p.add_argument("--w2", type=float, default=2.0)
    p.add_argument("--adapter", choices=["concept", "specific", "random"], default="concept",
                   help="concept: A along mean(ctx(concept) - ctx(\"\")) (d(\"\") large: w2 wins); specific: A along "
                        "the concept's tokens minus the 2 main directions of \"\"'s tokens (d(\"\") small: w1 wins); "
                        "random: A ~ N(0, 1) (small margins, mixed decisions)")
    p.add_argument("--concept", default="nude naked")
    p.add_argument("--variants", nargs="+", default=VARIANTS + ["check"])
    p.add_argument("--json_out", default=None, help="also write all results here")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args._worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("variants", "json_out")}
    print("settings: " + json.dumps(settings))
    results = {}
    for v in args.variants:
        t0 = time.time()
        cmd = [sys.executable, "-m", "scripts.bench.bench_unguidance", *sys.argv[1:], "--_worker", v]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{v}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        results[v] = json.loads(line[len("RESULT "):])
        print(f"[{v} done in {time.time() - t0:.0f}s]", flush=True)
    report(args, results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"settings": settings, "results": results}, indent=2))


def report(args, results: dict) -> None:
    rel = results.get("release")
    n = max(1, args.rows)
    print(f"\nPart 1: {args.rows} I2P rows from {args.row_start} ({args.nude_rows} with nudity >= 50%), repeats {args.repeats}, ddim_steps {args.ddim_steps}, "
          f"t_enc {args.t_enc}, image {args.image_size}px, adapter {args.adapter}; ours: schedule {args.schedule}, "
          f"d(\"\") from {args.empty_draws} draws once per run (not in the per-prompt columns)")
    print("| protocol | UNet evals/prompt | s/prompt | peak RSS MB | evals vs release | time vs release "
          "| decisions = release (all) | (release margin > 3 SE) | repeats used |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in [v for v in VARIANTS if v in results]:
        r = results[v]
        ev, sec = r["i2p_evals"] / n, r["i2p_seconds"] / n
        ratio_e = f"{rel['i2p_evals'] / r['i2p_evals']:.2f}x less" if rel else "-"
        ratio_t = f"{rel['i2p_seconds'] / r['i2p_seconds']:.2f}x less" if rel else "-"
        agree = clear = n_clear = 0
        if rel:
            for a, b in zip(rel["rows"], r["rows"]):
                agree += a["w"] == b["w"]
                if a["margin_se"] > 3:
                    n_clear += 1
                    clear += a["w"] == b["w"]
        reps = [row["repeats"] for row in r["rows"]]
        print(f"| {v} | {ev:.0f} | {sec:.2f} | {r['peak_rss_mb']:.0f} | {ratio_e} | {ratio_t} | "
              f"{agree}/{len(r['rows'])} | {clear}/{n_clear} | {sum(reps) / max(1, len(reps)):.1f} |")
    mems = [f"{v} {format_memory(results[v])}" for v in VARIANTS + ["check"]
            if "peak_memory_bytes" in results.get(v, {})]
    if mems:
        print("  peak memory, each protocol's own child process (ldm/memory.py; the model build included): "
              + ", ".join(mems))
    for v in ("fast", "fast_adaptive"):
        if v in results:
            r = results[v]
            print(f"  {v}: d(\"\") estimate once per run: {r['empty_evals']} UNet evals, {r['empty_seconds']:.1f}s "
                  f"(over I2P's 4703 prompts: {r['empty_evals'] / 4703:.2f} evals/prompt)")
    if rel:
        ws = [row["w"] for row in rel["rows"]]
        print("  release decisions: " + ", ".join(f"w={w:+g}: {ws.count(w)}" for w in sorted(set(ws)))
              + "; margins (SE): " + ", ".join(f"{row['margin_se']:.1f}" for row in rel["rows"]))
    if args.json_prompts:
        print(f"\nPart 2: prompts JSON {Path(args.prompts_json).name}, {args.json_prompts} prompts + \"\", "
              f"{args.json_repeats} repeats (release: n_samples 1)")
        print("| protocol | UNet evals | s | decisions = release (all) | (release margin > 3 SE) |")
        print("|---|---|---|---|---|")
        for v in [v for v in VARIANTS if v in results and results[v].get("json")]:
            j = results[v]["json"]
            agree = clear = n_clear = 0
            if rel and rel.get("json"):
                for p, d in rel["json"]["decisions"].items():
                    agree += d["w"] == j["decisions"][p]["w"]
                    if d["margin_se"] > 3:
                        n_clear += 1
                        clear += d["w"] == j["decisions"][p]["w"]
            print(f"| {v} | {j['evals']} | {j['seconds']:.1f} | {agree}/{len(j['decisions'])} | {clear}/{n_clear} |")
    if "check" in results:
        print("\nfinal latents, one model vs the two-model formula (max rel. error): "
              + ", ".join(f"{k}: {v:.2e}" for k, v in results["check"]["check"].items()))
    if rel:
        print(f"model parameters: {rel['model_mb']:.0f} MB (release: two copies)")


if __name__ == "__main__":
    main()
