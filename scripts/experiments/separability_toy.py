"""Composable erasure on the toy-digits model: two adapters at once, each with its own UnGuidance weight.

    python -m scripts.experiments.separability_toy                 # digits three and seven, 30 images per prompt
    python -m scripts.experiments.separability_toy --samples 20    # the README table (~12 minutes on 2 CPU cores)

Runs the project's own scripts, each in its own process, on models/toy-digits.safetensors:
    1. train.py             one adapter per erased digit (data/digits/<digit>.json, the toy settings of
                            ldm/evaluation/toy_benchmark.py); an adapter of that exact run in --out/train/ is reused
    2. generate_images.py   for the ten prompts "a photo of the digit <name>", five configurations:
                            base model; both adapters with UnGuide (w1 -1, w2 2; the stability test on the fly,
                            one batched test for both), with and without --skip_unrelated; each adapter alone
                            (= the other one removed: recovery is removal); and the same four with
                            "oracle" decisions (--diff_results files: w1 only on the adapter's own digit's
                            prompt), which separate the composition from the stability test's false positives
    3. the digit classifier (ldm/evaluation/digits.py) on every image
and writes --out (default outputs/separability_toy/): results.md (the table), results.json, run_config.json.

Columns: the share of each erased digit's prompt's images classified as that digit, the accuracy on the other
eight prompts, UNet sample-evaluations per image (sampling + the on-the-fly stability test) and seconds
(generation incl. the test; training not counted). Every configuration uses the same seeds (paired images).
"""
import argparse
import json
import shutil
import time
from pathlib import Path

from ldm.cli import HelpFormatter, run, write_json
from ldm.evaluation.digits import WORDS as NAMES
from ldm.evaluation.digits import digit_of_text, digit_rates
from ldm.evaluation.toy_benchmark import (ROOT, add_toy_args, generate_argv, prompts_file, run_script, train_adapter,
                                          two_digits)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--digits", nargs=2, default=["three", "seven"], help="the two digits to erase (names)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "separability_toy"))
    p.add_argument("--train_dir", default=None,
                   help="where the adapters are trained and reused (default <out>/train; e2e_toy.py takes the same)")
    p.add_argument("--samples", type=int, default=30, help="images per prompt and configuration")
    add_toy_args(p)
    p.add_argument("--seed", type=int, default=0, help="training seed of both adapters, and the images' seed")
    p.add_argument("--batch_size", type=int, default=100, help="images per sampling batch")
    p.add_argument("--no_oracle", dest="oracle", action="store_false",
                   help="leave out the rows with oracle decisions")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    a, b = two_digits(args.digits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_dir = Path(args.train_dir) if args.train_dir else out / "train"
    lora = {d: train_adapter(args, prompts_file(d), train_dir, args.seed) for d in (a, b)}
    train_secs = time.time() - t0
    prompts = [f"a photo of the digit {n}" for n in NAMES]
    results = {"digits": [a, b], "samples": args.samples, "adapters": {d: str(p) for d, p in lora.items()},
               "train_seconds": train_secs, "configs": {}}
    for key, (label, files, extra) in configurations(args, a, b, lora, prompts, out).items():
        folder = out / key
        if folder.exists():
            shutil.rmtree(folder)  # a fresh run: the timings and counts are this run's
        t1 = time.time()
        run_script("generate_images.py", generate_argv(args, folder, args.samples, args.seed, args.batch_size)
                   + sum([["--prompt", p] for p in prompts], []) + (["--lora", *map(str, files)] if files else [])
                   + ["--decision", "release", "--threshold", "1"] + extra)  # the README's table: the release's rule
        stats = json.loads((folder / "run_summary.json").read_text())
        res = digit_rates(folder / "images")
        results["configs"][key] = {"label": label, "adapters": [str(f) for f in files], **summarise(res, a, b),
                                   "seconds": time.time() - t1, "generate": stats, "folders": res["folders"]}
    results["checks"] = checks(results["configs"], a, b, args.oracle)
    text = report(results, args, a, b)
    (out / "results.md").write_text(text)
    write_json(out / "results.json", results)
    write_json(out / "run_config.json", vars(args))
    print(text)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")


def configurations(args, a: str, b: str, lora: dict, prompts: list[str], out: Path) -> dict:
    """{key: (label, adapter files, extra generate_images.py flags)}: the base model, both adapters (with and without
    --skip_unrelated), each alone; with args.oracle, the same with oracle decisions (--diff_results files giving w1
    on the adapter's own digit's prompt only: d(p) = 2 there, 0.5 elsewhere, d("") = 1)."""
    configs = {
        "base": ("base model", [], ["--w1", "1", "--w2", "1"]),
        "both": (f"{a} + {b}, UnGuide", [lora[a], lora[b]], []),
        "both_skip": (f"{a} + {b}, UnGuide, --skip_unrelated", [lora[a], lora[b]], ["--skip_unrelated"]),
        f"only_{a}": (f"{a} alone ({b} removed), UnGuide", [lora[a]], []),
        f"only_{b}": (f"{b} alone ({a} removed), UnGuide", [lora[b]], []),
    }
    if not args.oracle:
        return configs
    oracle = {}
    for d in (a, b):
        oracle[d] = out / f"oracle_diff_{d}.json"
        write_json(oracle[d], {"prompt_avgs": {**{p: (2.0 if p.endswith(" " + d) else 0.5) for p in prompts}, "": 1.0}})
    both = ["--diff_results", str(oracle[a]), str(oracle[b])]
    configs.update({
        "both_oracle": (f"{a} + {b}, oracle decisions", [lora[a], lora[b]], both),
        "both_oracle_skip": (f"{a} + {b}, oracle decisions, --skip_unrelated", [lora[a], lora[b]],
                             both + ["--skip_unrelated"]),
        f"only_{a}_oracle": (f"{a} alone ({b} removed), oracle decisions", [lora[a]], ["--diff_results", str(oracle[a])]),
        f"only_{b}_oracle": (f"{b} alone ({a} removed), oracle decisions", [lora[b]], ["--diff_results", str(oracle[b])]),
    })
    return configs


def checks(c: dict, a: str, b: str, oracle: bool) -> dict[str, bool]:
    """Both digits erased together (50 points under the base model) and each back within 2 points when its adapter
    is removed; the same with oracle decisions."""
    base, out = c["base"], {}
    for tag, suffix in [("", "")] + ([("oracle: ", "_oracle")] if oracle else []):
        out.update({
            f"{tag}{a} erased with both": c[f"both{suffix}"][f"rate_{a}"] < base[f"rate_{a}"] - 0.5,
            f"{tag}{b} erased with both": c[f"both{suffix}"][f"rate_{b}"] < base[f"rate_{b}"] - 0.5,
            f"{tag}{a} back when its adapter is removed (within 2 points of base)":
                abs(c[f"only_{b}{suffix}"][f"rate_{a}"] - base[f"rate_{a}"]) <= 0.02,
            f"{tag}{b} back when its adapter is removed (within 2 points of base)":
                abs(c[f"only_{a}{suffix}"][f"rate_{b}"] - base[f"rate_{b}"]) <= 0.02,
        })
    return out


def report(results: dict, args, a: str, b: str) -> str:
    table = [f"| configuration | {a} rate on its prompt | {b} rate on its prompt | accuracy on the other 8 digits "
             "| UNet evals / image (sampling + test) | seconds |", "|---|---|---|---|---|---|"]
    for r in results["configs"].values():
        g = r["generate"]
        n = max(g["images"], 1)
        table.append(f"| {r['label']} | {r[f'rate_{a}']:.1%} | {r[f'rate_{b}']:.1%} | {r['other_accuracy']:.1%} | "
                     f"{g['sample_evals'] / n:.0f} + {g['test_evals'] / n:.1f} | {r['seconds']:.0f} |")
    return (f"Erasing `{a}` and `{b}` from the toy-digits model with two rank-1 adapters loaded together: "
            f"{args.samples} images per prompt (ten prompts \"a photo of the digit <name>\"), DDIM {args.steps}, "
            f"CFG 7.5, w1 -1, w2 2, stability test on the fly ({args.repeats} repeats, t_enc {args.t_enc}); "
            f"training {results['train_seconds']:.0f} s (0: adapters reused).\n\n" + "\n".join(table) + "\n\n"
            + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in results["checks"].items()) + "\n")


def summarise(res: dict, a: str, b: str) -> dict:
    """Rates of the erased digits on their own prompts and the accuracy on the other eight prompts."""
    f = res["folders"]
    da, db = digit_of_text(a), digit_of_text(b)
    others = [n for n in NAMES if n not in (a, b)]
    n_other = sum(f[n]["n"] for n in others)
    hits = sum(f[n]["rates"][digit_of_text(n)] * f[n]["n"] for n in others)
    return {f"rate_{a}": f[a]["rates"][da], f"rate_{b}": f[b]["rates"][db], "other_accuracy": hits / max(n_other, 1),
            "per_prompt": {n: f[n]["rate"] for n in NAMES}}


if __name__ == "__main__":
    run(main)
