"""SepCE / SRS-ME on the toy-digits model: erase two digits with one weight-decoupled delta each, sum them,
remove one; the same prompts, images per prompt, seeds and classifier as separability_toy.py.

    python -m scripts.experiments.sepce_toy --threads 1          # ~15 minutes on one CPU core

1. training (in-process: ldm.erasure.sepce.build_sepce_method + training.Trainer; train.py is not wired
   yet): per digit, a "basis" delta on attn2.to_k / to_v whose rows live in the null space of the empty
   prompt's and the other nine digits' ("a photo of the digit N") token embeddings; stops by momentum
   (EMA 0.9 of the correlation term below --threshold) or at --iterations; saved with io.save_adapter
2. generate_images.py (a subprocess): the ten prompts "a photo of the digit <name>", --samples images each,
   for: base; each delta alone (--lora d.safetensors --w1 0 --w2 0: base + dW exactly; also "both with the
   other's delta removed"); the method's model base + dW_a + dW_b (the summed weights, --unet_weights);
   both files as two adapters at w = 0 (generate_images.py composes them in output space,
   CFG_a + CFG_b - CFG_base, not in the weights); both under UnGuidance (w1 -1, w2 2, --skip_unrelated)
3. the digit classifier (ldm/evaluation/digits.py) on every image
Writes --out (default outputs/sepce_toy/): results.md, results.json, run_config.json, the deltas.

The toy text space is 64 wide and the 77 tokens of one prompt already fill it (smallest relative singular
value 9e-6), so the null space is taken over the content tokens (start .. end-of-text) exactly, then inside
it over the padding tokens at --pad_rtol (see ldm/erasure/sepce.py: preserve_basis).
"""
import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]

from ldm.cli import HelpFormatter, run, write_json
from ldm.erasure.delta import delta_layers, remove_delta
from ldm.erasure.io import load_adapter
from ldm.erasure.sepce import SepCESettings, build_sepce_method, weight_residual
from ldm.erasure.training import Trainer, seeded_generator
from ldm.errors import UserError
from ldm.evaluation.digits import digit_rates
from ldm.evaluation.toy_benchmark import two_digits
from ldm.loader import load_model_from_config
from scripts.experiments.separability_toy import NAMES, summarise

CONFIG = ROOT / "configs/toy/digits-inference.yaml"
CKPT = ROOT / "models/toy-digits.safetensors"
PROMPT = "a photo of the digit {}"
# generate_images.py finds the "basis" kind once ldm.erasure.sepce is imported; until ldm/erasure/io.py imports
# it, the subprocess imports it first and then runs generate_images.py unchanged.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--digits", nargs=2, default=["three", "seven"])
    p.add_argument("--out", default=str(ROOT / "outputs" / "sepce_toy"))
    p.add_argument("--samples", type=int, default=20, help="images per prompt and configuration")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lr", type=float, default=1.0, help="Adam on V (toy; the release's SD default is 1e-6)")
    p.add_argument("--iterations", type=int, default=400, help="the cap")
    p.add_argument("--threshold", type=float, default=5e-5, help="momentum stop (release default)")
    p.add_argument("--reg_beta", type=float, default=1e-5)
    p.add_argument("--scale_factor", type=float, default=1e-2)
    p.add_argument("--tokens", default="content", choices=["content", "all"])
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--pad_rtol", type=float, default=0.1, help="padding tokens' tolerance (inf: ignore them)")
    p.add_argument("--preserve_template", default=PROMPT, help="the other nine digits' preserved prompts")
    p.add_argument("--no_unguide", dest="unguide", action="store_false", help="leave out the UnGuidance row")
    return p


def settings_for(digit: str, args) -> SepCESettings:
    others = [args.preserve_template.format(n) for n in NAMES if n != digit]
    return SepCESettings(preserve=others, reg_beta=args.reg_beta, threshold=args.threshold,
                         scale_factor=args.scale_factor, iterations=args.iterations, lr=args.lr, seed=args.seed,
                         tokens=args.tokens, rtol=args.rtol, pad_rtol=args.pad_rtol, images=args.samples,
                         ddim_steps=args.steps, image_steps=args.steps)


def erase(digit: str, args, out: Path) -> tuple[Path, dict]:
    """Train digit's delta; (file, summary: seconds, iterations, stop, null space and weight residuals)."""
    tic = time.time()
    model = load_model_from_config(CONFIG, CKPT, device=args.device, verbose=False).requires_grad_(False)
    s = settings_for(digit, args)
    g = seeded_generator(s.seed)
    method, info = build_sepce_method(model, PROMPT.format(digit), s, g, latent_shape=model.latent_shape(16))
    trainer = Trainer(method, s.lr, g)
    while trainer.done < s.iterations and not method.objective.stop_requested:
        i = trainer.done
        value, plan = trainer.step()
        if trainer.done == i:
            raise UserError(f"{digit}: the loss became {value} at iteration {i}; try a lower --lr")
    path = out / "deltas" / f"{digit}.safetensors"
    method.save(path, {"status": "complete", "iterations_done": str(trainer.done)})
    obj = method.objective
    summary = {"seconds": time.time() - tic, "iterations": trainer.done, "stop": obj.rule.reason or "cap",
               "final_ema": obj.rule.ema, "null_space": info,
               "weight_residual_preserved": weight_residual(model, "lora", s.preserve),
               "weight_change_target": weight_residual(model, "lora", [PROMPT.format(digit)])}
    print(f"{digit}: {trainer.done} iterations in {summary['seconds']:.0f} s ({summary['stop']}), "
          f"null space {info['dims']}/{info['width']} dims, ‖dW e‖/‖W e‖ on the preserved tokens "
          f"{summary['weight_residual_preserved']}, on the target's {summary['weight_change_target']}")
    return path, summary


@torch.no_grad()
def check_removal(files: dict[str, Path], a: str, b: str, device: str) -> bool:
    """Both deltas loaded, then b's removed: the UNet gives exactly the outputs of a's delta alone."""
    both = load_model_from_config(CONFIG, CKPT, device=device, verbose=False)
    only = load_model_from_config(CONFIG, CKPT, device=device, verbose=False)
    load_adapter(files[a], both.unet, name="a")
    load_adapter(files[b], both.unet, name="b")
    load_adapter(files[a], only.unet, name="a")
    remove_delta(both.unet, "b")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
    c = both.get_learned_conditioning([PROMPT.format(n) for n in NAMES[:4]])
    return torch.equal(both.apply_model(x, t, c), only.apply_model(x, t, c))


@torch.no_grad()
def merged_unet(files: list[Path], path: Path, device: str) -> Path:
    """The method's own model, base + sum_k dW_k, as a UNet state dict (generate_images.py --unet_weights)."""
    model = load_model_from_config(CONFIG, CKPT, device=device, verbose=False)
    weights = {k: v.clone() for k, v in model.unet.state_dict().items()}     # base UNet, unet-relative keys
    for k, f in enumerate(files):
        load_adapter(f, model.unet, name=f"d{k}")
    for layer_path, layer in delta_layers(model.unet).items():
        weights[f"{layer_path}.weight"] += layer.delta_weight()              # [out, in]: sum of the deltas
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(path))
    return path


def generate(folder: Path, files: list[Path], extra: list[str], args) -> dict:
    """generate_images.py as a subprocess; its summary numbers from the folder's images."""
    if folder.exists():
        shutil.rmtree(folder)
    argv = ["--config", str(CONFIG), "--ckpt", str(CKPT), "--device", args.device, "--output_dir", str(folder),
            "--samples", str(args.samples), "--steps", str(args.steps), "--seed", str(args.seed),
            "--image_size", "16", "--batch_size", str(args.batch_size), "--threads", str(args.threads)]
    argv += sum([["--prompt", PROMPT.format(n)] for n in NAMES], []) + (["--lora", *map(str, files)] if files else [])
    tic = time.time()
    proc = subprocess.run([sys.executable, "generate_images.py", *argv, *extra], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        raise UserError(f"generate_images.py failed ({proc.returncode}): {proc.stderr.strip()[-600:]}")
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("summary:")), "")
    return {"seconds": time.time() - tic, "summary": line}


def pixel_change(folder: Path, base: Path, names: list[str]) -> float:
    """Mean |pixel difference| (0..255) between paired images (same prompt, same seed) of two runs, over the
    prompt folders `names`: what a delta does to the preserved prompts' images."""
    diffs = []
    for name in names:
        for img in sorted((base / name).glob("*.jpg")):
            other = folder / name / img.name
            if other.is_file():
                a = np.asarray(Image.open(img).convert("RGB"), dtype=np.float64)
                b = np.asarray(Image.open(other).convert("RGB"), dtype=np.float64)
                diffs.append(np.abs(a - b).mean())
    return float(np.mean(diffs)) if diffs else float("nan")


def evals_per_image(summary: str) -> str:
    """UNet sample-evaluations per image (sampling plus any stability test) from generate_images.py's summary."""
    m = re.search(r"([\d.]+) UNet sample-evaluations per image", summary)
    return m.group(1) if m else "?"


def configurations(files: dict[str, Path], merged: Path, a: str, b: str, unguide: bool) -> dict:
    adapter = ["--w1", "0", "--w2", "0"]  # every adapter at w = 0 (one adapter: base + dW exactly)
    rows = {
        "base": ("base model", [], ["--w1", "1", "--w2", "1"]),
        f"only_{a}": (f"{a} erased (= both, {b}'s delta removed)", [files[a]], adapter),
        f"only_{b}": (f"{b} erased (= both, {a}'s delta removed)", [files[b]], adapter),
        "both": (f"{a} + {b}, weights summed (base + dW_{a} + dW_{b}, --unet_weights)", [],
                 ["--w1", "1", "--w2", "1", "--unet_weights", str(merged)]),
        "both_adapters": (f"{a} + {b}, two adapters at w = 0 (CFG_{a} + CFG_{b} - CFG_base)", [files[a], files[b]],
                          adapter),
    }
    if unguide:
        rows["both_unguide"] = (f"{a} + {b}, UnGuide (w1 -1, w2 2, --skip_unrelated)", [files[a], files[b]],
                                ["--w1", "-1", "--w2", "2", "--skip_unrelated", "--t_enc", "25", "--repeats", "10",
                                 "--decision", "release", "--threshold", "1"])
    return rows


def table(results: dict, a: str, b: str) -> str:
    lines = [f"| configuration | {a} rate | {b} rate | accuracy on the other 8 digits | "
             "mean abs pixel change vs base, other 8 | UNet evals / image | seconds (generation) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["configs"].values():
        lines.append(f"| {r['label']} | {r[f'rate_{a}']:.1%} | {r[f'rate_{b}']:.1%} | {r['other_accuracy']:.1%} | "
                     f"{r['pixel_change_others']:.2f} | {r['evals_per_image']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def erasure_lines(results: dict) -> str:
    lines = ["| delta | seconds to erase | iterations (stop) | null space dims | max ‖B e‖/‖e‖, preserved content "
             "/ padding tokens | max ‖dW e‖/‖W e‖, preserved content / all tokens | same, target's tokens |",
             "|---|---|---|---|---|---|---|"]
    for d, s in results["erasure"].items():
        n, w, t = s["null_space"], s["weight_residual_preserved"], s["weight_change_target"]
        lines.append(f"| {d} | {s['seconds']:.0f} | {s['iterations']} ({s['stop']}) "
                     f"| {n['dims']} / {n['width']} | {n['residual_content']:.1e} / {n['residual_padding']:.1e} | "
                     f"{w['content']:.1e} / {w['all']:.1e} | {t['content']:.2f} / {t['all']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    a, b = two_digits(args.digits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    files, erasure = {}, {}
    for d in (a, b):
        files[d], erasure[d] = erase(d, args, out)
    results = {"digits": [a, b], "samples": args.samples, "erasure": erasure,
               "removal_exact": check_removal(files, a, b, args.device), "configs": {}}
    merged = merged_unet([files[a], files[b]], out / "deltas" / f"merged_{a}_{b}_unet.safetensors", args.device)
    for key, (label, paths, extra) in configurations(files, merged, a, b, args.unguide).items():
        g = generate(out / key, paths, extra, args)
        res = digit_rates(out / key / "images")
        others = [n for n in NAMES if n not in (a, b)]
        results["configs"][key] = {"label": label, **summarise(res, a, b), "seconds": g["seconds"],
                                   "pixel_change_others": pixel_change(out / key / "images", out / "base" / "images",
                                                                       others),
                                   "evals_per_image": evals_per_image(g["summary"]), "summary": g["summary"]}
    results["wall_seconds"] = time.time() - t0
    text = (f"SepCE on the toy-digits model, erasing `{a}` and `{b}`: {args.samples} images per prompt (ten prompts "
            f'"a photo of the digit <name>"), DDIM {args.steps}, CFG 7.5, seed {args.seed}. Preserved for each '
            f'delta: "" and the other nine digits ("{args.preserve_template}"); tokens {args.tokens}, rtol '
            f"{args.rtol}, padding rtol {args.pad_rtol}; lr {args.lr}, beta {args.reg_beta}, threshold "
            f"{args.threshold}, scale factor {args.scale_factor}, cap {args.iterations}.\n\n"
            + table(results, a, b) + "\n\n" + erasure_lines(results) + "\n\n"
            + f"Both deltas loaded, then {b}'s removed: UNet outputs bit-identical to {a}'s delta alone: "
            + f"{results['removal_exact']}. Wall time {results['wall_seconds']:.0f} s.\n")
    (out / "results.md").write_text(text)
    write_json(out / "results.json", results)
    write_json(out / "run_config.json", vars(args))
    print(text)


if __name__ == "__main__":
    run(main)
