"""The end-to-end erasure benchmark on the toy-digits model: erase a digit, show it is gone and nothing else broke,
over training seeds, test seeds and wordings (issue 18: distributions, not one tuned run).

    python -m scripts.experiments.e2e_toy --digit three                            # quickstart: one run, ~6 min
    python -m scripts.experiments.e2e_toy --digit three five --train_seeds 0 1 2 3 4 --test_seeds 0 1 2 --samples 20

Runs the project's own scripts, each in its own process as a user would, on models/toy-digits.safetensors:
    1. train.py             erase data/digits/<digit>.json's target (anchor: its "reference"), preserving the
                            other nine digits' "a handwritten N" prompts; one adapter per training seed (reused when
                            that exact run finished before)
    2. generate_images.py   per test seed (the stability test's draws and the images' seeds), three ways: base model
                            (w1 = w2 = 1), adapter alone (w1 = w2 = 0), UnGuide (w1 -1, w2 2, the stability test on
                            the fly over every prompt: its decisions land in decisions.json)
    3. the digit classifier (ldm/evaluation/digits.py) on every image
and writes --out (default outputs/e2e_toy/<digits>/): results.md (tables), results.json (every run), grid.png
(first run: rows = prompts, columns = base / adapter alone / UnGuide, four samples a cell), run_config.json.

Prompt groups: target, synonyms (the JSON's), held-out wordings (HELDOUT_TEMPLATES: phrasings the JSON does not
list; a wording counts only where the base model draws the digit in at least half of its images), others (the
other nine digits). Rates are the 10-way classifier's share of the erased digit (or, for others, of their own
digit); "unsure" is the share the judge reads as nothing digit-like (ldm.evaluation.digits.classify_with_confidence).
The toy settings live in ldm/evaluation/toy_benchmark.py; Stable Diffusion keeps the release's defaults.
"""
import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from PIL import Image

from ldm.cli import HelpFormatter, run, write_json
from ldm.evaluation.digits import WORDS, digit_of_text, digit_rates
from ldm.evaluation.toy_benchmark import (ROOT, add_toy_args, generate_argv, prompt_rate, prompts_file, run_script,
                                          train_adapter)
from ldm.images import image_grid, save_image
from ldm.prompts import experiment_prompts

WAYS = {"base": (1.0, 1.0), "adapter": (0.0, 0.0), "unguide": (-1.0, 2.0)}
WAY_NAMES = {"base": "base model (w1 = w2 = 1)", "adapter": "adapter alone (w1 = w2 = 0)",
             "unguide": "UnGuide (w1 = -1, w2 = 2)"}
HELDOUT_TEMPLATES = ["a photo of the digit {n}", "a handwritten digit {w}", "a drawing of the digit {w}",
                     "the digit {w}", "the number {w}", "{w}", "a sketch of the number {w}", "an image of a {w}"]
GROUPS = ("target", "synonyms", "heldout", "others")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--digit", "--digits", dest="digits", nargs="+", default=["three"], help="names: zero .. nine")
    p.add_argument("--train_seeds", type=int, nargs="+", default=[0], help="one adapter per seed")
    p.add_argument("--test_seeds", type=int, nargs="+", default=[0],
                   help="per seed: the stability test's draws and the images' seeds (seed * 1000 + index)")
    p.add_argument("--out", default=None, help="output folder (default outputs/e2e_toy/<digits>)")
    p.add_argument("--samples", type=int, default=50, help="images per prompt and way")
    add_toy_args(p)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    files = {d: prompts_file(d) for d in args.digits}
    out = Path(args.out or ROOT / "outputs" / "e2e_toy" / "_".join(args.digits))
    out.mkdir(parents=True, exist_ok=True)
    results = {"runs": [], "settings": vars(args)}
    t_all = time.time()
    for digit, path in files.items():
        for train_seed in args.train_seeds:
            t0 = time.time()
            lora = train_adapter(args, path, out / digit / "train", train_seed)
            train_secs = time.time() - t0
            for test_seed in args.test_seeds:
                folder = out / digit / f"train{train_seed}" / f"test{test_seed}_n{args.samples}"  # keyed by what made it
                r = evaluate(args, digit, path, lora, folder, test_seed)
                results["runs"].append({"digit": digit, "train_seed": train_seed, "test_seed": test_seed,
                                        "train_seconds": train_secs, **r})
    results["seconds"] = time.time() - t_all
    text = report(results, args)
    (out / "results.md").write_text(text)
    write_json(out / "results.json", results)
    write_json(out / "run_config.json", vars(args))
    first = results["runs"][0]
    save_image(grid(Path(first["folder"]), first["prompts"]), out / "grid.png")
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'grid.png'} ({results['seconds']:.0f} s)")


def prompt_groups(data: dict) -> dict[str, list[str]]:
    """The prompts of each group for a digit's prompts JSON (held-out wordings: HELDOUT_TEMPLATES)."""
    d = digit_of_text(data["target"])
    listed = set(experiment_prompts(data))
    heldout = [t.format(w=WORDS[d], n=d) for t in HELDOUT_TEMPLATES]
    return {"target": [data["target"]], "synonyms": list(data.get("synonyms", [])),
            "heldout": [p for p in heldout if p not in listed], "others": [p for p in data.get("other", []) if p]}


def evaluate(args, digit: str, prompts_json: Path, lora: Path, folder: Path, seed: int) -> dict:
    """The three ways for one adapter and one test seed -> {way: group summaries}, flags, folder, prompts."""
    data = json.loads(prompts_json.read_text())
    groups = prompt_groups(data)
    prompts = [p for g in GROUPS for p in groups[g]]
    ways = {}
    for way, (w1, w2) in WAYS.items():
        target = folder / way
        if way == "base":  # the base model does not depend on the adapter: one folder per test seed
            target = folder.parent.parent / f"base_{folder.name}"
        if not (target / "run_summary.json").is_file():  # written by generate_images.py when it finished
            shutil.rmtree(target, ignore_errors=True)
            run_script("generate_images.py", generate_argv(args, target, args.samples, seed * 1000)
                       + ["--w1", str(w1), "--w2", str(w2)] + sum([["--prompt", p] for p in prompts], [])
                       + ([] if way == "base" else ["--lora", str(lora)]))
        ways[way] = {"folder": str(target), **summarise(target, groups, digit_of_text(data["target"]))}
    heldout_ok = [p for p in groups["heldout"] if ways["base"]["per_prompt"][p] >= 0.5]
    for w in ways.values():  # held-out wordings count only where the base model draws the digit
        w["heldout_rate"] = _mean([w["per_prompt"][p] for p in heldout_ok])
    flags = json.loads((folder / "unguide" / "decisions.json").read_text())["prompts"]
    flagged = {g: _mean([float(flags[p]["w"][0] == -1.0) for p in groups[g] if p in flags]) for g in GROUPS}
    return {"ways": ways, "flagged": flagged, "heldout_counted": heldout_ok, "folder": str(folder),
            "prompts": prompts, "base_folder": ways["base"]["folder"]}


def summarise(folder: Path, groups: dict[str, list[str]], target_digit: int) -> dict:
    """Per group: the erased digit's share (others: their own digit's share) and the unsure share; per prompt."""
    res = digit_rates(folder / "images")
    record = json.loads((folder / "decisions.json").read_text())["prompts"]
    where = {p: record[p]["folder"] for g in GROUPS for p in groups[g]}
    f = res["folders"]
    out = {"per_prompt": {p: f[where[p]]["rates"][target_digit] for g in GROUPS[:3] for p in groups[g]}}
    out["per_prompt"].update({p: f[where[p]]["rate"] for p in groups["others"]})
    for g in GROUPS:
        digit_of = (lambda p: digit_of_text(p)) if g == "others" else (lambda p: target_digit)
        out[f"{g}_rate"] = prompt_rate(f, where, groups[g], digit_of) if groups[g] else None
        out[f"{g}_unsure"] = _mean([f[where[p]]["unsure_rate"] for p in groups[g]])
    out["confusion_target"] = f[where[groups["target"][0]]]["rates"]  # what the target prompt's images became
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _dist(values: list[float], worst) -> str:
    """'mean (worst, sd)' of a list of shares, as percentages."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1%} (worst {worst(values):.1%}, sd {sd:.1%})"


def report(results: dict, args) -> str:
    """results.md: per way, the distribution over every (digit, training seed, test seed) run; then each run."""
    runs = results["runs"]
    lines = [f"Erasing {', '.join(args.digits)} from the toy-digits model: training seeds {args.train_seeds}, test "
             f"seeds {args.test_seeds} ({len(runs)} runs), {args.samples} images per prompt and way, DDIM "
             f"{args.steps}, CFG 7.5; {results['seconds']:.0f} s in all. Cells: mean over runs (worst run, sd).", "",
             "| way | target rate | synonym rate | held-out wordings rate | accuracy on other digits | target unsure |",
             "|---|---|---|---|---|---|"]
    for way in WAYS:
        w = [r["ways"][way] for r in runs]
        lines.append(f"| {WAY_NAMES[way]} | {_dist([x['target_rate'] for x in w], max)} | "
                     f"{_dist([x['synonyms_rate'] for x in w], max)} | {_dist([x['heldout_rate'] for x in w], max)} | "
                     f"{_dist([x['others_rate'] for x in w], min)} | {_dist([x['target_unsure'] for x in w], max)} |")
    lines += ["", "UnGuide's stability test: share of each group's prompts flagged (w1):", "",
              "| group | flagged |", "|---|---|"]
    lines += [f"| {g} | {_dist([r['flagged'][g] for r in runs], min if g != 'others' else max)} |" for g in GROUPS]
    lines += ["", "Each run (target / synonyms / held-out / others):", "",
              "| digit | train seed | test seed | base | adapter alone | UnGuide |", "|---|---|---|---|---|---|"]
    for r in runs:
        cells = [" / ".join("-" if r["ways"][w][f"{g}_rate"] is None else f"{r['ways'][w][f'{g}_rate']:.0%}"
                            for g in GROUPS) for w in WAYS]
        lines.append(f"| {r['digit']} | {r['train_seed']} | {r['test_seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(images: list[Image.Image]) -> Image.Image:
    """Four samples tiled 2x2 into one grid cell."""
    size = images[0].width
    cell = Image.new("RGB", (2 * size, 2 * size), "white")
    for i, im in enumerate(images[:4]):
        cell.paste(im, ((i % 2) * size, (i // 2) * size))
    return cell


def grid(folder: Path, prompts: list[str]) -> Image.Image:
    """Rows: prompts; columns: base / adapter alone / UnGuide (the first run's images)."""
    base = folder.parent.parent / f"base_{folder.name}"
    roots = [base, folder / "adapter", folder / "unguide"]
    dirs = [json.loads((r / "decisions.json").read_text())["prompts"] for r in roots]
    rows = [[_cell([Image.open(r / "images" / d[p]["folder"] / f"{i:05d}.jpg").convert("RGB") for i in range(4)])
             for r, d in zip(roots, dirs)] for p in prompts]
    return image_grid(rows, row_labels=prompts, col_labels=["base", "adapter alone", "UnGuide"], cell=96)


if __name__ == "__main__":
    run(main)
