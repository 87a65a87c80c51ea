"""The stability test for every prompt of a prompts JSON -> output_dir/calc_diff_results.json.

    python compute_lora_diff.py --config configs/stable-diffusion/v1-inference.yaml --ckpt models/sd-v1-4.ckpt \
        --lora output/<exp>/models/lora.safetensors --prompts_json data/horse.json --output_dir output/<exp> \
        --seed 42 --ddim_steps 50 --t_enc 40 --repeats 30 --n_samples 1 [--protocol release|fast] [--adaptive]

d(p) = || eps_adapted(z, t, p) - eps_base(z, t, p) || on the base model's partial CFG trajectory z (see
ldm/erasure/protocols.py for both protocols). Prompts: target + other + synonyms (as the release); "" is always
measured (the release only did when "other" listed it). Output: the release's schema (prompt_avgs sorted
descending, config) plus prompt_stats (mean, std, sem, count and the w each prompt gets with w1=-1, w2=2),
calibration (a threshold on d(p)/d("") learned from this JSON's concept and other prompts, ldm/erasure/
calibration.py; generate_images.py --threshold auto uses it) and, with the fast protocol, empty_estimate (the
d("") every prompt is compared with); unet_sample_evaluations, seconds and peak memory (peak_memory_bytes,
_kind, _gib: ldm/memory.py). --prompt P (repeatable) also measures wordings the JSON does not list (e.g.
held-out wordings of the concept); they get d(p) and w like the others but never move the calibration.
"""
import argparse
import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from ldm.cli import Parser, add_model_args, ddim_steps_arg, finite, load_model, positive, resolve_image_size, run
from ldm.erasure.budget import UNetCounter, evals_per_draw
from ldm.erasure.guidance import decide
from ldm.erasure.calibration import calibrate
from ldm.erasure.io import load_adapter
from ldm.erasure.protocols import diff_table, diff_table_units, protocol_from_flags
from ldm.erasure.stability import estimate_dict
from ldm.memory import format_memory, memory_record
from ldm.prompts import diff_prompts, read_prompts_json


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    add_model_args(p)
    for a in ("--config", "--ckpt"):
        p._option_string_actions[a].required = True  # required, as in the release
    p.add_argument("--lora", required=True, help="adapter: our .safetensors or the release's lora.pth")
    p.add_argument("--lora_alpha", type=finite, default=None, help="alpha for a release lora.pth (default 8)")
    p.add_argument("--prompts_json", required=True,
                   help="the concept's prompts (README: Files)")
    p.add_argument("--prompt", action="append", default=[],
                   help="a further prompt to measure (repeatable); not used for the calibrated threshold")
    p.add_argument("--output_dir", required=True,
                   help="where calc_diff_results.json goes (the experiment folder)")
    p.add_argument("--seed", type=int, default=None, help="draw seed (default: a random one, recorded)")
    p.add_argument("--ddim_steps", type=ddim_steps_arg, default=50,
                   help="DDIM steps of the partial trajectory's schedule")
    p.add_argument("--image_size", type=positive(), default=None,
                   help="image side in px (default: the config's, 512 for SD, 16 for the toy model)")
    p.add_argument("--guidance", type=finite, default=7.5, help="CFG scale of the partial trajectory")
    p.add_argument("--repeats", type=positive(), default=1, help="draws per prompt (the maximum with --adaptive)")
    p.add_argument("--eta", type=finite, default=0.0,
                   help="DDIM eta of the partial trajectory")
    p.add_argument("--t_enc", type=int, default=25,
                   help="the partial trajectory stops at DDIM index t_enc")
    p.add_argument("--n_samples", type=positive(), default=25, help="release protocol: start codes per chunk")
    p.add_argument("--protocol", choices=["release", "fast"], default="fast",
                   help="release: the release's draws and schedule; fast: ours")
    p.add_argument("--schedule", choices=["standard", "release"], default=None,
                   help="DDIM schedule (default: release for --protocol release, standard for fast)")
    p.add_argument("--empty_draws", type=positive(), default=32, help="fast: draws of the one d(\"\") estimate")
    p.add_argument("--adaptive", action="store_true", help="fast: draw repeats in rounds until the decision is clear")
    p.add_argument("--k_se", type=finite, default=3.0,
                   help="adaptive: a decision is clear past k_se combined standard errors")
    p.add_argument("--min_repeats", type=positive(), default=4,
                   help="adaptive: draws before the first check")
    p.add_argument("--max_batch", type=positive(), default=64, help="UNet samples per call")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    resolve_image_size(args)
    data = read_prompts_json(args.prompts_json)
    prompts = list(dict.fromkeys(diff_prompts(data) + args.prompt))
    protocol = protocol_from_flags(args.protocol, args.ddim_steps, args.t_enc, args.guidance, args.eta, args.schedule,
                                   repeats=args.repeats, adaptive=args.adaptive, min_repeats=args.min_repeats,
                                   k_se=args.k_se, empty_draws=args.empty_draws, max_batch=args.max_batch)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    model, device = load_model(args)
    info = load_adapter(args.lora, model.unet, alpha=args.lora_alpha)
    t0 = time.time()
    units = diff_table_units(protocol, len(prompts), args.n_samples)
    with UNetCounter(model.unet) as counter, \
            tqdm(total=units, desc="chunks" if args.protocol == "release" else "draws") as bar:
        [(estimates, empty)] = diff_table(model, protocol, model.latent_shape(args.image_size), prompts, seed,
                                          args.n_samples, progress=bar.update)
    seconds = time.time() - t0
    stats = {p: {**estimate_dict(e), "w": decide(e.mean, empty.mean, -1.0, 2.0)} for p, e in estimates.items()}
    stats[""]["w"] = decide(empty.mean, empty.mean, -1.0, 2.0)
    config = {"config": args.config, "ckpt": args.ckpt, "lora": args.lora, "device": str(device), "seed": seed,
              **{k: getattr(args, k) for k in ("ddim_steps", "image_size", "guidance", "repeats", "eta", "t_enc",
                                               "n_samples")},
              "target_prompt": data["target"], "synonyms": list(data.get("synonyms", [])), "protocol": args.protocol,
              "schedule": "release" if protocol.settings.release_schedule else "standard",
              **{k: getattr(args, k) for k in ("adaptive", "k_se", "min_repeats", "empty_draws")},
              "lora_alpha": info.alpha, "lora_format": info.fmt, "extra_prompts": list(args.prompt)}
    result = {"prompt_avgs": dict(sorted(((p, e.mean) for p, e in estimates.items()), key=lambda kv: kv[1],
                                         reverse=True)),
              "config": config, "prompt_stats": stats, "unet_sample_evaluations": counter.samples,
              "seconds": round(seconds, 2), **memory_record(device)}  # the process's peak (ldm/memory.py)
    result["calibration"] = _calibration(data, estimates, empty)
    if args.protocol == "fast":
        result["empty_estimate"] = estimate_dict(empty)
        result["evals_per_draw"] = {"prompt": evals_per_draw(protocol.settings),
                                    "empty": evals_per_draw(protocol.settings, True)}
    out = _write_results(Path(args.output_dir) / "calc_diff_results.json", result)
    for p, e in estimates.items():
        print(f"  d={e.mean:10.4f} ± {e.sem:.4f} (n={e.n:3d}) w={stats[p]['w']:+.0f}  {p!r}")
    cal = result["calibration"]
    if cal:
        print(f"calibrated threshold: flag when d(p) > {cal['threshold']:.3f} d(\"\") (the release: 1); concept and "
              f"other prompts {'separable' if cal['separable'] else 'overlap'} (gap {cal['gap']:.2f}x, "
              f"{cal['errors']} on the wrong side)")
    print(f"{counter.samples} UNet sample-evaluations in {seconds:.1f}s, peak memory {format_memory(result)} "
          f"-> {out}")


def _calibration(data: dict, estimates: dict, empty) -> dict | None:
    """The threshold learned from this adapter's prompts (ldm.erasure.calibration), or None when it cannot be."""
    try:
        return calibrate({p: e.mean for p, e in estimates.items()}, empty.mean,
                         [data["target"], *data.get("synonyms", [])], list(data.get("other", []))).record()
    except ValueError as exc:
        print(f"note: no calibrated threshold: {exc}")
        return None


def _write_results(out: Path, result: dict) -> Path:
    """Atomic write, non-ASCII kept (the release's ensure_ascii=False)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    run(main)
