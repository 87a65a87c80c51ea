"""The end-to-end erasure benchmark on the toy-digits model: erase one digit, show it is gone and nothing else broke.

    python -m scripts.experiments.e2e_toy --digit three            # ~6 minutes on 2 CPU cores

Runs the project's own scripts, as a user would, on models/toy-digits.safetensors:
    1. train.py             erase data/digits/<digit>.json's target (anchor: its "reference"), preserving the
                            other nine digits' "a handwritten N" prompts (--preserve; --preserve_weight 0: off)
    2. compute_lora_diff.py the stability test for every prompt of the JSON
    3. generate_images.py   three ways: base (w1 = w2 = 1), adapter alone (w1 = w2 = 0), UnGuide (w1 = -1, w2 = 2)
    4. the digit classifier (ldm/evaluation/digits.py) on every image
and writes to --out (default outputs/e2e_toy/<digit>/): results.md (the table), results.json, grid.png
(rows: prompts; columns: base / adapter / UnGuide; four samples per cell) and run_config.json.

Table columns: target rate (share of the target prompt's images classified as the erased digit), synonym rate
(the same over the synonyms' images), accuracy on the other digits (share of the other prompts' images
classified as their own digit) and seconds. The toy settings below are this model's, not SD's: the release's
defaults (200 iterations at lr 3e-5, no preservation term) stay in train.py for Stable Diffusion.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

import compute_lora_diff
import generate_images
import train
from ldm.cli import run, write_json
from ldm.evaluation.digits import digit_of_text, digit_rates
from ldm.images import image_grid, save_image
from ldm.errors import UserError

CONFIG = ROOT / "configs/toy/digits-inference.yaml"
CKPT = ROOT / "models/toy-digits.safetensors"
WAYS = {"base": (1.0, 1.0), "adapter": (0.0, 0.0), "unguide": (-1.0, 2.0)}
# The toy model's erasure settings (found by a small search; SD keeps the release's defaults in train.py).
TOY_SETTINGS = {"iterations": 300, "lr": 3e-4, "negative_guidance": 2.0, "t_enc": 25, "repeats": 10, "steps": 50,
                "lora_rank": 1, "lora_alpha": 8.0, "target_modules": ["default"], "start_guidance": 9.0,
                "preserve_weight": 10.0}
# Preservation prompts (train.py --preserve) for erasing digit d: the OTHER nine digits in a template the
# benchmark never samples ("a handwritten 7"; the table's prompts spell digits as words: "... the digit seven").
PRESERVE_TEMPLATE = "a handwritten {}"


def preserve_prompts(prompts_json: Path) -> list[str]:
    """The preservation prompts for the digit that `prompts_json`'s target names."""
    target = digit_of_text(json.loads(prompts_json.read_text())["target"])
    return [PRESERVE_TEMPLATE.format(d) for d in range(10) if d != target]


def add_toy_args(p: argparse.ArgumentParser) -> None:
    """The flags shared by the toy benchmarks (this one and separability_toy.py)."""
    p.add_argument("--steps", type=int, default=TOY_SETTINGS["steps"], help="DDIM steps of sampling and of the test")
    p.add_argument("--iterations", type=int, default=TOY_SETTINGS["iterations"])
    p.add_argument("--lr", type=float, default=TOY_SETTINGS["lr"])
    p.add_argument("--negative_guidance", type=float, default=TOY_SETTINGS["negative_guidance"])
    p.add_argument("--lora_rank", type=int, default=TOY_SETTINGS["lora_rank"])
    p.add_argument("--lora_alpha", type=float, default=TOY_SETTINGS["lora_alpha"])
    p.add_argument("--target_modules", nargs="+", default=TOY_SETTINGS["target_modules"])
    p.add_argument("--start_guidance", type=float, default=TOY_SETTINGS["start_guidance"])
    p.add_argument("--preserve_weight", type=float, default=TOY_SETTINGS["preserve_weight"],
                   help="train.py --preserve_weight for the other nine digits' 'a handwritten N' prompts; "
                        "0: the release's objective alone")
    p.add_argument("--t_enc", type=int, default=TOY_SETTINGS["t_enc"],
                   help="stability test: partial trajectory down to t_enc")
    p.add_argument("--repeats", type=int, default=TOY_SETTINGS["repeats"], help="stability test draws per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is the fastest for this model)")


def train_argv(args, prompts_json: Path, output_dir: Path) -> tuple[list[str], Path]:
    """train.py's arguments for the toy model with the toy flags of add_toy_args, and the adapter file that
    run writes (train.py names its folder after the settings)."""
    argv = (["--config_path", str(CONFIG), "--ckpt_path", str(CKPT), "--device", args.device,
             "--prompts_json", str(prompts_json), "--output_dir", str(output_dir), "--image_size", "16",
             "--iterations", str(args.iterations), "--lr", str(args.lr), "--ddim_steps", str(args.steps),
             "--negative_guidance", str(args.negative_guidance), "--seed", str(args.seed),
             "--lora_rank", str(args.lora_rank), "--lora_alpha", str(args.lora_alpha),
             "--start_guidance", str(args.start_guidance), "--target_modules", *args.target_modules]
            + (["--preserve", *preserve_prompts(prompts_json), "--preserve_weight", str(args.preserve_weight)]
               if args.preserve_weight > 0 else []))
    run_dir = Path(output_dir) / train.run_name(train.build_parser().parse_args(argv), prompts_json.stem)
    return argv, run_dir / "models" / "lora.safetensors"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digit", default="three", help="a name of data/digits/<name>.json (zero .. nine)")
    p.add_argument("--prompts_json", default=None, help="override data/digits/<digit>.json (e.g. another anchor)")
    p.add_argument("--out", default=None, help="output folder (default outputs/e2e_toy/<digit>)")
    p.add_argument("--samples", type=int, default=50, help="images per prompt and way")
    add_toy_args(p)
    return p


def _cell(images: list[Image.Image]) -> Image.Image:
    """Four samples tiled 2x2 into one grid cell."""
    size = images[0].width
    cell = Image.new("RGB", (2 * size, 2 * size), "white")
    for i, im in enumerate(images[:4]):
        cell.paste(im, ((i % 2) * size, (i // 2) * size))
    return cell


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)  # the toy model's matrices are small: one thread is the fastest
    prompts_json = Path(args.prompts_json) if args.prompts_json else ROOT / "data" / "digits" / f"{args.digit}.json"
    if not prompts_json.is_file():
        raise UserError(f"{prompts_json}: no such digit prompts file (use zero .. nine)")
    data = json.loads(prompts_json.read_text())
    out = Path(args.out or ROOT / "outputs" / "e2e_toy" / args.digit)
    out.mkdir(parents=True, exist_ok=True)
    model_args = ["--config", str(CONFIG), "--ckpt", str(CKPT), "--device", args.device]
    seconds: dict[str, float] = {}

    # 1. erase the target
    t0 = time.time()
    argv, lora = train_argv(args, prompts_json, out / "train")
    train.main(argv)
    exp = lora.parent.parent
    seconds["train"] = time.time() - t0

    # 2. the stability test for every prompt of the JSON
    t0 = time.time()
    compute_lora_diff.main(model_args + ["--lora", str(lora), "--prompts_json", str(prompts_json),
                                         "--output_dir", str(exp), "--seed", str(args.seed), "--image_size", "16",
                                         "--ddim_steps", str(args.steps), "--t_enc", str(args.t_enc),
                                         "--repeats", str(args.repeats)])
    seconds["stability test"] = time.time() - t0

    # 3. three ways of sampling, 4. classification
    prompts = generate_images.experiment_prompts(data)
    folders = generate_images.class_dirs(prompts)
    rows, results = {}, {"digit": args.digit, "prompts_json": str(prompts_json), "ways": {}}
    for way, (w1, w2) in WAYS.items():
        t0 = time.time()
        generate_images.main(model_args + ["--output_dir", str(out / way), "--prompts_json", str(prompts_json),
                                           "--samples", str(args.samples), "--steps", str(args.steps),
                                           "--seed", str(args.seed), "--image_size", "16", "--batch_size", "100",
                                           "--w1", str(w1), "--w2", str(w2)]
                             + (["--lora", str(lora)] if way != "base" else [])
                             + (["--diff_results", str(exp / "calc_diff_results.json")] if way == "unguide" else []))
        secs = time.time() - t0 + (seconds["stability test"] if way == "unguide" else 0.0)
        res = digit_rates(out / way / "images")
        rows[way] = summarise(res, data, folders, secs)
        results["ways"][way] = {"summary": rows[way], "folders": res["folders"]}

    table = ["| way | target rate | synonym rate | accuracy on other digits | seconds |", "|---|---|---|---|---|"]
    names = {"base": "base model (w1 = w2 = 1)", "adapter": "adapter alone (w1 = w2 = 0)",
             "unguide": "UnGuide (w1 = -1, w2 = 2)"}
    for way, r in rows.items():
        table.append(f"| {names[way]} | {r['target_rate']:.1%} | {r['synonym_rate']:.1%} | "
                     f"{r['other_accuracy']:.1%} | {r['seconds']:.0f} |")
    text = (f"Erasing `{data['target']}` (anchor `{data['reference']!r}`) from the toy-digits model: "
            f"{args.samples} images per prompt, DDIM {args.steps}, CFG 7.5; training {seconds['train']:.0f} s.\n\n"
            + "\n".join(table) + "\n")
    (out / "results.md").write_text(text)
    results["seconds"] = seconds
    write_json(out / "results.json", results)
    write_json(out / "run_config.json", vars(args))
    save_image(grid(out, prompts, folders), out / "grid.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'grid.png'}")


def summarise(res: dict, data: dict, folders: dict, seconds: float) -> dict:
    """Target / synonym rates of the erased digit and the accuracy on the other digits' prompts."""
    target_digit = digit_of_text(data["target"])
    f = res["folders"]

    def rate(prompts, digit_of):
        n = sum(f[folders[p]]["n"] for p in prompts)
        hits = sum(f[folders[p]]["rates"][digit_of(p)] * f[folders[p]]["n"] for p in prompts)
        return hits / max(n, 1)
    others = [p for p in data.get("other", []) if p]
    return {"target_rate": rate([data["target"]], lambda p: target_digit),
            "synonym_rate": rate(data.get("synonyms", []), lambda p: target_digit),
            "other_accuracy": rate(others, digit_of_text), "seconds": seconds}


def grid(out: Path, prompts: list[str], folders: dict) -> Image.Image:
    rows = []
    for p in prompts:
        rows.append([_cell([Image.open(out / way / "images" / folders[p] / f"{i:05d}.jpg").convert("RGB")
                            for i in range(4)]) for way in WAYS])
    return image_grid(rows, row_labels=prompts, col_labels=["base", "adapter alone", "UnGuide"], cell=96)


if __name__ == "__main__":
    run(main)
