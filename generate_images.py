"""UnGuidance images for the prompts of erasure experiments: eps = w * CFG_base + (1 - w) * CFG_adapted.

Experiment-folder mode (the release's): every subfolder of --output_dir holding models/lora.* (.safetensors or
the release's .pth), calc_diff_results.json (compute_lora_diff.py) and train_config.json (each experiment folder
gets run_config.json and decisions.json, as in explicit mode):
    python generate_images.py --config configs/stable-diffusion/v1-inference.yaml --ckpt models/sd-v1-4.ckpt \
        --output_dir output/ --samples 10 --steps 50 --w1 -1 --w2 2 --seed 2024
    -> output/<exp>/images/<class>/<idx:05d>.jpg  for the target, synonyms and others ("" dropped)
Explicit mode: --lora with --prompts_json or --prompt (repeatable); --diff_results, or the stability test runs on
the fly (fast protocol) -> output_dir/images/<class>/<idx:05d>.jpg, output_dir/run_config.json (what made the
images: the base weights and adapters by content fingerprint, w1, w2, steps, CFG, seed, size, protocol; a rerun
with other settings is refused), output_dir/decisions.json ({prompt: {folder, w, d, d_empty}} per adapter;
d only where the test ran here) and output_dir/run_summary.json (this run's images, seconds, UNet
sample-evaluations of the test and of sampling, peak memory: ldm/memory.py). A rerun may add prompts: earlier prompts keep their folders.

w = w1 when d(p) > d("") else w2. --w1 0 --w2 0: the adapter alone; --w1 1 --w2 1: the base model alone (no
adapter loaded, no stability test). Image idx uses seed + idx (a CPU generator: the same picture on CPU and CUDA).
<class> is the prompt's last word, as in the release; where two prompts share a last word (the release then
mixed their images in one folder, fact sheet §9.9) each of them gets a slug of its whole prompt instead.
Complete experiments and existing images are skipped; RANK / WORLD_SIZE shard the images (idx % WORLD_SIZE).

Several adapters (explicit mode, one per erased concept): --lora a.safetensors b.safetensors ... with
--diff_results a.json b.json ... (one per adapter, same order) or the on-the-fly test (one batched test for all
adapters). Adapter k gets its own decision w_k (d_k(p) vs d_k("")) and
    eps = CFG_base + sum_k (1 - w_k) (CFG_k - CFG_base)        one UNet call per step
--skip_unrelated: adapters decided w2 ("unrelated" to the prompt) get w_k = 1: they add nothing and cost nothing.
Removing an adapter (leaving its file out) restores the model without it. The same file twice, or two files with
the same content, is refused.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from ldm.cli import (Parser, add_decision_args, add_model_args, ddim_steps_arg, finite, image_autocast, load_model,
                     positive, resolve_decision, resolve_image_size, run, write_json)
from ldm.erasure.adapters import (adapter_fingerprints, adapter_thresholds, check_distinct, decide_pairs, load_adapters,
                                  read_diff_decisions, skip_unrelated)
from ldm.erasure.decision import get_rule, unflagged_weight
from ldm.erasure.budget import UNetCounter
from ldm.erasure.calibration import calibrate
from ldm.erasure.guidance import unguided_latents
from ldm.erasure.lora import remove_lora
from ldm.erasure.protocols import diff_table, protocol_from_flags
from ldm.errors import UserError
from ldm.images import image_complete, image_format, save_images, start_noise
from ldm.loader import autocast
from ldm.memory import format_memory, memory_record
from ldm.prompts import class_dirs, experiment_prompts, extend_class_dirs, read_prompts_json
from ldm.runs import check_run_config, folder_lock, model_fingerprint, shard


def _images_of(img_root: Path) -> int:
    return sum(1 for d in img_root.iterdir() if d.is_dir() for f in d.glob("[0-9]*.jpg")) if img_root.is_dir() else 0


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    add_decision_args(p, "prompts")
    add_model_args(p, ckpt_default="models/sd-v1-4-full-ema.ckpt")
    p.add_argument("--output_dir", default="cat",
                   help="experiment mode: the folder of experiments; explicit mode: where images/ and the records go")
    p.add_argument("--samples", type=positive(), default=50,
                   help="images per prompt")
    p.add_argument("--steps", type=ddim_steps_arg, default=50,
                   help="DDIM steps")
    p.add_argument("--seed", type=int, default=2024,
                   help="image idx uses seed + idx; also the on-the-fly test's draws")
    p.add_argument("--guidance", type=finite, default=7.5, help="CFG scale")
    p.add_argument("--image_size", type=positive(), default=None,
                   help="image side in px (default: the config's, 512 for SD, 16 for the toy model)")
    p.add_argument("--batch_size", type=positive(), default=4, help="images per sampling batch")
    p.add_argument("--protocol", choices=["release", "fast"], default="fast",
                   help="release: the 49-step schedule (and the release's test when run on the fly)")
    p.add_argument("--lora", nargs="+", default=None,
                   help="explicit mode: adapter file(s); several: one per erased concept, each with its own w")
    p.add_argument("--lora_alpha", type=finite, default=None, help="alpha for a release lora.pth (default 8)")
    p.add_argument("--prompts_json", default=None, help="explicit mode: prompts (target, synonyms, other)")
    p.add_argument("--prompt", action="append", default=None, help="explicit mode: a prompt (repeatable)")
    p.add_argument("--diff_results", nargs="+", default=None,
                   help="explicit mode: calc_diff_results.json, one per --lora file (same order)")
    p.add_argument("--folder_names", choices=["last_word", "prompt"], default="last_word",
                   help="image folder of a prompt: its last word (the release's; a slug of the whole prompt where two "
                        "share one) or always a slug of the whole prompt")
    p.add_argument("--sum_in_weights", action="store_true",
                   help="several adapters as ONE model: the base plus the sum of their weight deltas (SepCE's "
                        "composition); needs --w1 == --w2 (no per-adapter decision)")
    p.add_argument("--skip_unrelated", action="store_true",
                   help="adapters decided w2 (unrelated to the prompt) get w = 1: not evaluated")
    p.add_argument("--repeats", type=positive(), default=10, help="on-the-fly test: draws of d(p)")
    p.add_argument("--t_enc", type=int, default=40, help="on-the-fly test")
    p.add_argument("--empty_draws", type=positive(), default=32, help="on-the-fly test: draws of d(\"\")")
    return p


def _fmt(w: list[float]) -> str:
    return ",".join(f"{v:+g}" for v in w) or "+1"


def generate(model, device, prompts: list[str], ws: dict[str, list[float]], img_root: Path, args,
             adapters: list, dirs: dict[str, str] | None = None) -> int:
    """Missing images of every prompt -> img_root/<class>/<idx:05d>.jpg; returns the number written.
    ws[p][k] is prompt p's weight for adapters[k] (no adapter: ws[p] == [] and the base model samples);
    dirs: {prompt: folder} (default: class_dirs)."""
    rank, world = shard()
    dirs = dirs or class_dirs(prompts, args.folder_names)
    jobs = [(p, idx) for p in prompts for idx in range(args.samples)
            if idx % world == rank and not image_complete(img_root / dirs[p] / f"{idx:05d}.jpg")]
    if getattr(args, "skip_unrelated", False):  # batch prompts with the same adapters in play: the others are skipped
        jobs.sort(key=lambda job: tuple(v == 1.0 for v in ws[job[0]]))
    shape = model.latent_shape(args.image_size)
    written = 0
    with tqdm(total=len(jobs), desc=img_root.parent.name or "images") as bar:
        for b0 in range(0, len(jobs), args.batch_size):
            batch = jobs[b0:b0 + args.batch_size]
            ps = [p for p, _ in batch]
            seeds = [args.seed + idx for _, idx in batch]
            with autocast(device, image_autocast(args)):  # the release's fp16 image, fp32 test: ldm.cli
                z = unguided_latents(model, ps, start_noise(seeds, shape, device), args.guidance,
                                     [[ws[p][k] for p in ps] for k in range(len(adapters))], args.steps,
                                     args.protocol == "release", adapters=adapters)
                decoded = model.decode_first_stage(z).float()
            # --protocol release writes the release's files (truncated to uint8, JPEG 75): ldm.images.IMAGE_FORMATS
            save_images(decoded, [img_root / dirs[p] / f"{idx:05d}.jpg" for p, idx in batch],
                        image_format(args.protocol))
            written += len(batch)
            bar.set_postfix_str(f"w={_fmt(ws[ps[-1]])} {ps[-1][:40]!r}")
            bar.update(len(batch))
    return written


def _model_with_adapters(args, loras: list, cache: dict):
    """One base model per run; the adapters are swapped per experiment -> (model, device, adapter names)."""
    if "model" not in cache:
        cache["model"], cache["device"] = load_model(args)
    model = cache["model"]
    remove_lora(model.unet)
    names = load_adapters(model, loras, args.lora_alpha)
    return model, cache["device"], names


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    resolve_image_size(args)
    resolve_decision(args)  # guarded unless --protocol release; the threshold: calibrated where there is one
    args.w2 = unflagged_weight(args.decision, args.w2)  # the one w2 every decision below uses
    explicit = bool(args.lora or args.prompts_json or args.prompt or args.diff_results)
    fixed_w = args.w1 if args.w1 == args.w2 else None  # no decision to make: no stability test
    t0 = time.time()
    stats, device = _explicit(args, fixed_w) if explicit else _experiments(args, fixed_w)
    secs, total, evals = time.time() - t0, stats["images"], stats["unet_evals"]
    memory = memory_record(device)  # the process's peak on the device load_model resolved (ldm.memory)
    if explicit:  # what this run did (the last run in the folder), for benchmarks and readers
        write_json(Path(args.output_dir) / "run_summary.json",
                   {"images": total, "seconds": round(secs, 2), **stats, **memory})
    if total:
        print(f"summary: {total} images in {secs:.1f}s ({secs / total:.2f} s/image, "
              f"{evals / total:.0f} UNet sample-evaluations per image); peak memory {format_memory(memory)}")
    else:
        print("nothing to do: every image exists")
    return {"images": total, "seconds": secs, **stats, **memory}


def _explicit(args, fixed_w: float | None) -> tuple[dict, object]:
    """Explicit mode: --lora, --prompts_json / --prompt, --diff_results or the test on the fly -> (the counts, the
    device).
    The folder records what made it (run_config.json) and each prompt's folder, d and w (decisions.json)."""
    if not (args.prompts_json or args.prompt):
        raise UserError("explicit mode needs --prompts_json or --prompt")
    if args.lora is None and fixed_w != 1.0:
        raise UserError("explicit mode needs --lora (or --w1 1 --w2 1 for the base model alone)")
    loras = list(args.lora or []) if fixed_w != 1.0 else []
    if args.diff_results and fixed_w is None and len(args.diff_results) != len(loras):
        raise UserError(f"--diff_results: {len(args.diff_results)} file(s) for {len(loras)} adapter(s); "
                        "give one per --lora file, in the same order")
    check_distinct(loras)
    if args.sum_in_weights and fixed_w is None:
        raise UserError("--sum_in_weights makes the adapters one model: give one weight for it (--w1 == --w2, "
                        "e.g. --w1 0 --w2 0 for the summed model alone)")
    prompts = experiment_prompts(read_prompts_json(args.prompts_json)) if args.prompts_json else []
    prompts += [p for p in (args.prompt or []) if p not in prompts and p != ""]
    out = Path(args.output_dir)
    with folder_lock(out, shard()[0]):
        model, device, names = _model_with_adapters(args, loras, {})
        config = _explicit_config(args, model, names, loras, fixed_w)
        check_run_config(out, config, ignore=("ckpt", "lora", "config"))
        with UNetCounter(model.unet) as c:
            ws, tests = _explicit_decisions(args, model, prompts, names, fixed_w)
        test_evals = c.samples
        folders = _record_decisions(out, prompts, ws, tests, config)
        if args.sum_in_weights and names:  # one chunk with every adapter on: base + sum_k dW_k
            names, ws = [tuple(names)], {p: [fixed_w] for p in prompts}
        with UNetCounter(model.unet) as c:
            total = generate(model, device, prompts, ws, out / "images", args, names, folders)
    return {"images": total, "unet_evals": test_evals + c.samples, "test_evals": test_evals,
            "sample_evals": c.samples}, device


def _explicit_config(args, model, names: list[str], loras: list, fixed_w: float | None) -> dict:
    """The settings explicit-mode images depend on, inputs by content (ldm.runs); paths recorded, not compared."""
    decisions = ("fixed" if fixed_w is not None else "diff_results" if args.diff_results else "on_the_fly")
    config = {"mode": "explicit", "base": model_fingerprint(model), "adapters": adapter_fingerprints(model, names),
              "w1": args.w1, "w2": args.w2, "steps": args.steps, "guidance": args.guidance,
              "image_size": args.image_size, "seed": args.seed, "protocol": args.protocol,
              "image_format": image_format(args.protocol), "precision": args.precision,
              "skip_unrelated": args.skip_unrelated, "decisions": decisions, "threshold": args.threshold,
              "decision": args.decision, "sum_in_weights": args.sum_in_weights, "folder_names": args.folder_names,
              "ckpt": args.ckpt, "config": args.config, "lora": [str(p) for p in loras]}
    if decisions == "on_the_fly":
        config.update(t_enc=args.t_enc, repeats=args.repeats, empty_draws=args.empty_draws)
    return config


def _explicit_decisions(args, model, prompts: list[str], names: list[str], fixed_w: float | None):
    """-> ({prompt: [w_k]}, {prompt: [(d_k(p), d_k(""))]} where a test ran here, else {})."""
    if fixed_w is not None:
        return {p: [fixed_w] * len(names) for p in prompts}, {}
    if args.diff_results:
        ws = read_diff_decisions(args.diff_results, prompts, args.w1, args.w2, threshold=args.threshold,
                                 rule=get_rule(args.decision))
        tests = {}
    else:
        ws, tests = _on_the_fly(model, prompts, args, names)
    if args.skip_unrelated:
        ws = {p: skip_unrelated(w, args.w2) for p, w in ws.items()}
    return ws, tests


def _record_decisions(out: Path, prompts: list[str], ws: dict, tests: dict, config: dict) -> dict[str, str]:
    """Write run_config.json and decisions.json ({prompt: folder, w, d, d_empty}); prompts of an earlier run in
    this folder keep their folders, new ones get unused folders -> {prompt: folder}."""
    old = out / "decisions.json"
    known = json.loads(old.read_text(encoding="utf-8")).get("prompts", {}) if old.is_file() else {}
    folders = extend_class_dirs({p: v["folder"] for p, v in known.items()}, prompts, config.get("folder_names"))
    record = dict(known)
    for p in prompts:
        record[p] = {"folder": folders[p], "w": ws[p],
                     "d": [e.mean for e, _ in tests[p]] if p in tests else None,
                     "d_empty": [e.mean for _, e in tests[p]] if p in tests else None}
    write_json(out / "run_config.json", config)
    write_json(old, {"prompts": record})
    return folders


def _experiments(args, fixed_w: float | None) -> tuple[dict, object]:
    """Experiment-folder mode: every experiment under --output_dir -> (the counts, the device; None when every
    experiment was complete and no model was loaded)."""
    root = Path(args.output_dir)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory of experiments")
    exps = sorted(d for d in root.iterdir() if d.is_dir())
    if not exps:
        raise UserError(f"{root}: no experiment folders")
    cache: dict = {}
    total = evals = 0
    for exp in exps:
        images, exp_evals = _experiment(args, exp, fixed_w, cache)
        total, evals = total + images, evals + exp_evals
    return {"images": total, "unet_evals": evals, "test_evals": 0, "sample_evals": evals}, cache.get("device")


def _experiment(args, exp: Path, fixed_w: float | None, cache: dict) -> tuple[int, int]:
    """The missing images of one experiment folder -> (images written, UNet sample-evaluations)."""
    loras = [exp / "models" / n for n in ("lora.safetensors", "lora.pth") if (exp / "models" / n).is_file()]
    if not loras and not (exp / "train_config.json").is_file():
        print(f"skip {exp.name}: not an experiment folder (no models/lora.*, no train_config.json)")
        return 0, 0
    if not (exp / "train_config.json").is_file():
        raise UserError(f"{exp}: train_config.json not found")
    if not loras and fixed_w != 1.0:
        raise UserError(f"{exp}/models: no lora.safetensors or lora.pth")
    pj = json.loads((exp / "train_config.json").read_text(encoding="utf-8")).get("prompts_json")
    if not pj:
        raise UserError(f"{exp}/train_config.json: no prompts_json")
    if not Path(pj).is_file() and (exp / Path(pj).name).is_file():
        pj = str(exp / Path(pj).name)
    prompts = experiment_prompts(read_prompts_json(pj))
    img_root = exp / "images"
    if _images_of(img_root) >= len(prompts) * args.samples:
        print(f"skip {exp.name}: complete ({len(prompts)} prompts x {args.samples} images)")
        return 0, 0
    if fixed_w is not None:
        ws = {p: [fixed_w] for p in prompts}
    else:
        ws = read_diff_decisions([exp / "calc_diff_results.json"], prompts, args.w1, args.w2,
                                 f"run compute_lora_diff.py --output_dir {exp} first", args.threshold,
                                 get_rule(args.decision))
        if args.skip_unrelated:
            ws = {p: skip_unrelated(w, args.w2) for p, w in ws.items()}
    model, device, names = _model_with_adapters(args, loras[:1] if fixed_w != 1.0 else [], cache)
    if not names:
        ws = {p: [] for p in prompts}
    print(f"{exp.name}: " + ", ".join(f"{p!r}: w={_fmt(w)}" for p, w in ws.items()))
    config = {**_explicit_config(args, model, names, loras[:len(names)], fixed_w), "mode": "experiment",
              "decisions": "fixed" if fixed_w is not None else "calc_diff_results"}
    check_run_config(exp, config, ignore=("ckpt", "lora", "config"))  # an unfinished folder: the same settings
    folders = _record_decisions(exp, prompts, ws, {}, config)
    with UNetCounter(model.unet) as c:
        images = generate(model, device, prompts, ws, img_root, args, names, folders)
    return images, c.samples


def _on_the_fly(model, prompts: list[str], args, adapters: list[str]) -> tuple[dict, dict]:
    """The stability test now (fast protocol, or the release's with --protocol release), every adapter on the
    same draws and base trajectories -> ({prompt: [w_k]}, {prompt: [(d_k(p), d_k(""))]})."""
    protocol = protocol_from_flags(args.protocol, args.steps, args.t_enc, args.guidance, repeats=args.repeats,
                                   empty_draws=args.empty_draws)
    print(f"stability test on the fly ({args.protocol} protocol, {args.repeats} repeats"
          + (f", {len(adapters)} adapters" if len(adapters) > 1 else "") + ")", file=sys.stderr)
    per = diff_table(model, protocol, model.latent_shape(args.image_size), prompts, args.seed, adapters=adapters)
    tests = {p: [(est[p], empty) for est, empty in per] for p in prompts}
    thresholds = _on_the_fly_thresholds(args, per)
    ws = {p: decide_pairs(tests[p], args.w1, args.w2, thresholds, get_rule(args.decision)) for p in prompts}
    for p in prompts:
        for k, (est, empty) in enumerate(tests[p]):
            tag = f"[{adapters[k]}] " if len(adapters) > 1 else ""
            print(f"  {tag}d={est.mean:.4f} vs d('')={empty.mean:.4f} -> w={ws[p][k]:+g}  {p!r}", file=sys.stderr)
    return ws, tests


def _on_the_fly_thresholds(args, per: list) -> list[float]:
    """--threshold for each adapter of the on-the-fly test: the number, or "auto" / None (the default): with one
    adapter and --prompts_json, calibrated on the JSON's concept (target, synonyms) and other prompts from this
    test's own d values; otherwise each adapter's stored calibration (train.py's, or a calc_diff_results.json
    beside it: ldm.erasure.adapters.adapter_thresholds), else 1 (the release's; "auto": an error)."""
    if args.threshold not in ("auto", None):
        return [args.threshold] * len(per)
    if not args.prompts_json or len(per) > 1:
        return adapter_thresholds(args.lora, args.threshold, (args.steps, args.t_enc, args.guidance))
    data = read_prompts_json(args.prompts_json)
    out = []
    for est, empty in per:
        try:
            cal = calibrate({p: e.mean for p, e in est.items()}, empty.mean,
                            [data["target"], *data.get("synonyms", [])], list(data.get("other", [])))
        except ValueError as exc:
            if args.threshold == "auto":
                raise UserError(f"--threshold auto: {exc}")
            print(f"note: no calibrated threshold ({exc}): flagging at d(p) > d(\"\")", file=sys.stderr)
            out.append(1.0)
            continue
        print(f"calibrated threshold {cal.threshold:.3f} ({'separable' if cal.separable else 'overlap'}, "
              f"gap {cal.gap:.2f}x)", file=sys.stderr)
        out.append(cal.threshold)
    return out


if __name__ == "__main__":
    run(main)
