"""UnGuidance images for the prompts of erasure experiments: eps = w * CFG_base + (1 - w) * CFG_adapted.

Experiment-folder mode (the release's): every subfolder of --output_dir holding models/lora.* (.safetensors or
the release's .pth), calc_diff_results.json (compute_lora_diff.py) and train_config.json:
    python generate_images.py --config configs/stable-diffusion/v1-inference.yaml --ckpt models/sd-v1-4.ckpt \
        --output_dir output/ --samples 10 --steps 50 --w1 -1 --w2 2 --seed 2024
    -> output/<exp>/images/<class>/<idx:05d>.jpg  for the target, synonyms and others ("" dropped)
Explicit mode: --lora with --prompts_json or --prompt (repeatable); --diff_results, or the stability test runs on
the fly (fast protocol) -> output_dir/images/<class>/<idx:05d>.jpg.

w = w1 when d(p) > d("") else w2. --w1 0 --w2 0: the adapter alone; --w1 1 --w2 1: the base model alone (no
adapter loaded, no stability test). Image idx uses seed + idx (a CPU generator: the same picture on CPU and CUDA).
<class> is the prompt's last word, as in the release; where two prompts share a last word (the release then
mixed their images in one folder, fact sheet §9.9) each of them gets a slug of its whole prompt instead.
Complete experiments and existing images are skipped; RANK / WORLD_SIZE shard the images (idx % WORLD_SIZE).
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from ldm.cli import add_model_args, load_model, positive, run
from ldm.erasure.io import load_adapter
from ldm.erasure.stability import StabilitySettings
from ldm.erasure.unguide import (Protocol, UNetCounter, decide, fast_diff_table, release_diff_table,
                                 unguided_latents)
from ldm.images import save_image, start_noise, to_pil
from ldm.util import UserError

from compute_lora_diff import read_prompts_json


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "prompt"


def class_dirs(prompts: list[str]) -> dict[str, str]:
    """{prompt: folder}: the last word (the release's class_name), or a slug of the prompt on collisions."""
    last = {p: _slug(p.split(" ")[-1]) for p in prompts}
    counts: dict[str, int] = {}
    for v in last.values():
        counts[v] = counts.get(v, 0) + 1
    out = {p: (v if counts[v] == 1 else _slug(p)[:120]) for p, v in last.items()}
    if len(set(out.values())) != len(out):  # slugs collide too (e.g. prompts differing by punctuation)
        out = {p: f"{i:03d}_{v}" for i, (p, v) in enumerate(out.items())}
    return out


def experiment_prompts(data: dict) -> list[str]:
    prompts = [data["target"]] + list(data.get("synonyms", [])) + list(data.get("other", []))
    return [p for p in dict.fromkeys(prompts) if p != ""]  # the release's [:-1] dropped "" (or the target)


def _images_of(img_root: Path) -> int:
    return sum(1 for d in img_root.iterdir() if d.is_dir() for f in d.glob("[0-9]*.jpg")) if img_root.is_dir() else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, ckpt_default="models/sd-v1-4-full-ema.ckpt")
    p.add_argument("--output_dir", default="cat")
    p.add_argument("--samples", type=positive(), default=50)
    p.add_argument("--w1", type=float, default=-1.0)
    p.add_argument("--w2", type=float, default=2.0)
    p.add_argument("--steps", type=positive(), default=50)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale")
    p.add_argument("--image_size", type=positive(), default=512)
    p.add_argument("--batch_size", type=positive(), default=4, help="images per sampling batch")
    p.add_argument("--protocol", choices=["release", "fast"], default="fast",
                   help="release: the 49-step schedule (and the release's test when run on the fly)")
    p.add_argument("--lora", default=None, help="explicit mode: adapter file")
    p.add_argument("--lora_alpha", type=float, default=None, help="alpha for a release lora.pth (default 8)")
    p.add_argument("--prompts_json", default=None, help="explicit mode: prompts (target, synonyms, other)")
    p.add_argument("--prompt", action="append", default=None, help="explicit mode: a prompt (repeatable)")
    p.add_argument("--diff_results", default=None, help="explicit mode: calc_diff_results.json")
    p.add_argument("--repeats", type=positive(), default=10, help="on-the-fly test: draws of d(p)")
    p.add_argument("--t_enc", type=int, default=40, help="on-the-fly test")
    p.add_argument("--empty_draws", type=positive(), default=32, help="on-the-fly test: draws of d(\"\")")
    return p


def _decisions(results: dict, prompts: list[str], w1: float, w2: float, source: str) -> dict[str, float]:
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
    return {p: decide(avgs[p], avgs[""], w1, w2) for p in prompts}


def generate(model, device, prompts: list[str], ws: dict[str, float], img_root: Path, args) -> int:
    """Missing images of every prompt -> img_root/<class>/<idx:05d>.jpg; returns the number written."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    dirs = class_dirs(prompts)
    jobs = [(p, idx) for p in prompts for idx in range(args.samples)
            if idx % world == rank and not (img_root / dirs[p] / f"{idx:05d}.jpg").is_file()]
    shape = model.latent_shape(args.image_size)
    written = 0
    with tqdm(total=len(jobs), desc=img_root.parent.name or "images") as bar:
        for b0 in range(0, len(jobs), args.batch_size):
            batch = jobs[b0:b0 + args.batch_size]
            ps = [p for p, _ in batch]
            seeds = [args.seed + idx for _, idx in batch]
            z = unguided_latents(model, ps, start_noise(seeds, shape, device), args.guidance, [ws[p] for p in ps],
                                 args.steps, args.protocol == "release")
            for (p, idx), img in zip(batch, to_pil(model.decode_first_stage(z))):
                save_image(img, img_root / dirs[p] / f"{idx:05d}.jpg")
                written += 1
            bar.set_postfix_str(f"w={ws[ps[-1]]:+g} {ps[-1][:40]!r}")
            bar.update(len(batch))
    return written


def _model_with_adapter(args, lora, cache: dict):
    """One base model per run; the adapter is swapped per experiment."""
    from ldm.erasure.lora import remove_lora
    if "model" not in cache:
        cache["model"], cache["device"] = load_model(args)
    model = cache["model"]
    remove_lora(model.unet)
    if lora is not None:
        load_adapter(lora, model.unet, alpha=args.lora_alpha)
    return model, cache["device"]


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    explicit = bool(args.lora or args.prompts_json or args.prompt or args.diff_results)
    fixed_w = args.w1 if args.w1 == args.w2 else None
    cache: dict = {}
    t0 = time.time()
    total = 0
    evals = 0
    if explicit:
        if not (args.prompts_json or args.prompt):
            raise UserError("explicit mode needs --prompts_json or --prompt")
        if args.lora is None and fixed_w != 1.0:
            raise UserError("explicit mode needs --lora (or --w1 1 --w2 1 for the base model alone)")
        prompts = experiment_prompts(read_prompts_json(args.prompts_json)) if args.prompts_json else []
        prompts += [p for p in (args.prompt or []) if p not in prompts and p != ""]
        model, device = _model_with_adapter(args, args.lora if fixed_w != 1.0 else None, cache)
        with UNetCounter(model.unet) as c:
            if fixed_w is not None:
                ws = {p: fixed_w for p in prompts}
            elif args.diff_results:
                path = Path(args.diff_results)
                if not path.is_file():
                    raise UserError(f"{path}: diff results not found")
                ws = _decisions(json.loads(path.read_text(encoding="utf-8")), prompts, args.w1, args.w2, str(path))
            else:
                ws = _on_the_fly(model, prompts, args)
            total += generate(model, device, prompts, ws, Path(args.output_dir) / "images", args)
        evals += c.samples
    else:
        root = Path(args.output_dir)
        if not root.is_dir():
            raise UserError(f"{root}: not a directory of experiments")
        exps = sorted(d for d in root.iterdir() if d.is_dir())
        if not exps:
            raise UserError(f"{root}: no experiment folders")
        for exp in exps:
            loras = [exp / "models" / n for n in ("lora.safetensors", "lora.pth") if (exp / "models" / n).is_file()]
            if not loras and not (exp / "train_config.json").is_file():
                print(f"skip {exp.name}: not an experiment folder (no models/lora.*, no train_config.json)")
                continue
            if not (exp / "train_config.json").is_file():
                raise UserError(f"{exp}: train_config.json not found")
            if not loras and fixed_w != 1.0:
                raise UserError(f"{exp}/models: no lora.safetensors or lora.pth")
            settings = json.loads((exp / "train_config.json").read_text(encoding="utf-8"))
            pj = settings.get("prompts_json")
            if not pj:
                raise UserError(f"{exp}/train_config.json: no prompts_json")
            if not Path(pj).is_file() and (exp / Path(pj).name).is_file():
                pj = str(exp / Path(pj).name)
            prompts = experiment_prompts(read_prompts_json(pj))
            img_root = exp / "images"
            if _images_of(img_root) >= len(prompts) * args.samples:
                print(f"skip {exp.name}: complete ({len(prompts)} prompts x {args.samples} images)")
                continue
            if fixed_w is not None:
                ws = {p: fixed_w for p in prompts}
            else:
                diff = exp / "calc_diff_results.json"
                if not diff.is_file():
                    raise UserError(f"{diff}: not found; run compute_lora_diff.py --output_dir {exp} first")
                ws = _decisions(json.loads(diff.read_text(encoding="utf-8")), prompts, args.w1, args.w2, str(diff))
            model, device = _model_with_adapter(args, loras[0] if fixed_w != 1.0 else None, cache)
            print(f"{exp.name}: " + ", ".join(f"{p!r}: w={w:+g}" for p, w in ws.items()))
            with UNetCounter(model.unet) as c:
                total += generate(model, device, prompts, ws, img_root, args)
            evals += c.samples
    secs = time.time() - t0
    if total:
        print(f"summary: {total} images in {secs:.1f}s ({secs / total:.2f} s/image, "
              f"{evals / total:.0f} UNet sample-evaluations per image)")
    else:
        print("nothing to do: every image exists")


def _on_the_fly(model, prompts: list[str], args) -> dict[str, float]:
    """The stability test now (fast protocol, or the release's with --protocol release)."""
    if not 0 <= args.t_enc < args.steps:
        raise UserError(f"--t_enc {args.t_enc} must be in 0..{args.steps - 1}")
    settings = StabilitySettings(args.steps, args.t_enc, args.guidance, 0.0, args.protocol == "release")
    protocol = Protocol(args.protocol, settings, repeats=args.repeats, empty_draws=args.empty_draws)
    shape = model.latent_shape(args.image_size)
    print(f"stability test on the fly ({args.protocol} protocol, {args.repeats} repeats)", file=sys.stderr)
    if args.protocol == "release":
        from ldm.erasure.stability import Estimate
        table = release_diff_table(model, prompts + [""], protocol, args.seed, 1, shape)
        est = {p: Estimate(v) for p, v in table.items()}
        empty = est[""]
    else:
        est, empty = fast_diff_table(model, prompts, protocol, args.seed, shape)
    for p in prompts:
        print(f"  d={est[p].mean:.4f} vs d('')={empty.mean:.4f} -> w={decide(est[p].mean, empty.mean, args.w1, args.w2):+g}"
              f"  {p!r}", file=sys.stderr)
    return {p: decide(est[p].mean, empty.mean, args.w1, args.w2) for p in prompts}


if __name__ == "__main__":
    run(main)
