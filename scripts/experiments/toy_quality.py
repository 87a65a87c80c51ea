"""The toy-digits quality bar: does each digit prompt give its digit?

For every prompt file data/digits/<name>.json, its target prompt ("a photo of the digit three") is sampled
with seeds 0..n-1 (DDIM, CFG with the empty prompt), the images are classified by the digit classifier of
ldm.evaluation.digits, and the share classified as the intended digit is reported. Exit code 1 when any
digit is below --threshold (default 0.9), 0 otherwise.

    python -m scripts.experiments.toy_quality                                  # 50 images per digit, 50 steps, CFG 7.5
    python -m scripts.experiments.toy_quality --n 10 --digits three seven --synonyms --grid /tmp/toy_grid.png
    python -m scripts.experiments.toy_quality --json /tmp/toy_quality.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

from ldm.cli import positive, run, write_json
from ldm.evaluation.digits import WORDS, generation_rates
from ldm.images import image_grid, save_image
from ldm.errors import UserError
from ldm.loader import load_model_from_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/toy/digits-inference.yaml"))
    p.add_argument("--ckpt", default=str(ROOT / "models/toy-digits.safetensors"))
    p.add_argument("--prompts_dir", default=str(ROOT / "data/digits"))
    p.add_argument("--digits", nargs="+", default=WORDS, help="prompt file names (zero .. nine)")
    p.add_argument("--synonyms", action="store_true", help="also check each file's synonyms")
    p.add_argument("--n", type=positive(int), default=50, help="images per prompt (seeds 0..n-1)")
    p.add_argument("--steps", type=positive(int), default=50)
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--image_size", type=positive(int), default=16)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=positive(int), default=1, help="torch threads (1 is fastest on shared cores)")
    p.add_argument("--json", help="write the rates here")
    p.add_argument("--grid", help="write a PNG grid (one row per prompt, up to 16 images) here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model_from_config(args.config, args.ckpt, verbose=False)
    prompts = []
    for name in args.digits:
        path = Path(args.prompts_dir) / f"{name}.json"
        if not path.is_file():
            raise UserError(f"{path}: prompt file not found")
        data = json.loads(path.read_text())
        prompts += [data["target"]] + (data["synonyms"] if args.synonyms else [])
    t0 = time.time()
    res = generation_rates(model, prompts, list(range(args.n)), steps=args.steps, scale=args.scale,
                           image_size=args.image_size)
    seconds = time.time() - t0
    print(f"{'prompt':34s} digit  rate   (n={args.n}, {args.steps} DDIM steps, CFG {args.scale}; "
          f"{seconds:.1f}s, {seconds / len(prompts):.1f}s per prompt)")
    failed = []
    for prompt, r in res.items():
        flag = "" if r["rate"] is not None and r["rate"] >= args.threshold else "  < threshold"
        if flag:
            failed.append(prompt)
        print(f"{prompt:34s} {r['digit']!s:>5}  {r['rate']:.2f}{flag}")
    if args.json:
        write_json(args.json, {"n": args.n, "steps": args.steps, "scale": args.scale, "seconds": seconds,
                               "rates": {p: {k: v for k, v in r.items() if k != "images"} for p, r in res.items()}})
    if args.grid:
        rows = [r["images"][:16] for r in res.values()]
        save_image(image_grid(rows, row_labels=list(res), cell=48), args.grid)
    if failed:
        print(f"FAILED: {len(failed)} prompt(s) below {args.threshold}")
        sys.exit(1)
    print(f"passed: every prompt >= {args.threshold}")


if __name__ == "__main__":
    run(main)
