"""The end-to-end erasure benchmark on the toy-digits model: erase a digit, show it is gone and nothing else broke,
over training seeds, test seeds, wordings and decision rules (issue 18: distributions, not one tuned run).

    python -m scripts.experiments.e2e_toy --digit three                            # quickstart: one run
    python -m scripts.experiments.e2e_toy --digits zero one two three four five six seven eight nine \\
        --train_seeds 0 1 2 3 4 --test_seeds 0 1 2 --samples 10                  # the sweep (a benchmark run)

Runs the project's own scripts, each in its own process as a user would, on models/toy-digits.safetensors:
    1. train.py             erase data/digits/<digit>.json's target (anchor: its "reference"), preserving the
                            other nine digits' "a handwritten N" prompts, with the erasure check on (d(target)/d("")
                            and the adapter-alone rate judged by the digit classifier; an adapter that has not
                            passed at the planned end trains on); one adapter per training seed, reused when that
                            exact run finished before
    2. compute_lora_diff.py per test seed: the stability test's d(p) for every prompt (the draws generate_images.py's
                            on-the-fly test takes with the same seed) and the calibrated threshold; also held-out
                            wordings of the other digits (its false positives; drawn too, step 3)
    3. generate_images.py   the images of every (prompt, w) some way needs, once: w = 1 (the base model), 0 (the
                            adapter alone), -1 and 2 (UnGuide's w1 and w2). Every way uses the same seeds
                            (seed * 1000 + index), so a way is a choice of w per prompt, read off the same images
    4. the digit classifier (ldm/evaluation/digits.py) on every image
and writes --out (default outputs/e2e_toy/<digits>/): results.md (tables), results.json (every run), grid.png
(first run: rows = prompts, columns = ways, four samples a cell), run_config.json.

A long sweep runs in parts (a digit per process, a session at a time); --collect joins their results.json files
into one report (the same settings required; a (digit, training seed, test seed) run measured twice is refused)
and writes its results.json compact (no image folders or per-prompt rates: small enough for the repository, and
itself collectable; docs/results/e2e_sweep/ holds the sweep's, one folder per digit):

    python -m scripts.experiments.e2e_toy --collect outputs/e2e_sweep/three/results.json --out docs/results/e2e_sweep/three
    python -m scripts.experiments.e2e_toy --collect docs/results/e2e_sweep/*/results.json --out docs/results/e2e_sweep

Ways (WAYS): base, adapter alone, and UnGuide under four decisions: the release's (flag d(p) > d(""); w1 = -1,
w2 = 2), the calibrated threshold (compute_lora_diff.py's, learned from the prompts JSON) with w2 = 2, and the
calibrated threshold with unflagged prompts capped at the base model (safe) or at the adapter alone (floor), and
guarded: the adapter alone for prompts the release flags and the calibration does not, the base model below
d("") (ldm/erasure/decision.py). A run whose adapter could not be calibrated (tau None) takes threshold 1 there
and is marked "uncalibrated" in results.md. Prompt groups: target, synonyms, held-out wordings (HELDOUT_TEMPLATES; a wording counts
only where the base model draws the digit in at least half of its images), others (the other nine digits: the
prompts JSON's "other" prompts), others' held-out wordings (OTHER_HELDOUT_TEMPLATES, --other_wordings of them: no
threshold is learned from them and no training preserves them, so their drop is the adapter's collateral where
nothing was tuned on it; counted like the concept's held-out wordings). Rates:
the 10-way classifier's share of the erased digit (others: of their own digit); "unsure": the share the judge reads
as nothing digit-like (ldm.evaluation.digits.classify_with_confidence). Toy settings: ldm/evaluation/toy_benchmark.py.
"""
import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

from PIL import Image

from ldm.cli import HelpFormatter, run, write_json
from ldm.errors import UserError
from ldm.erasure.decision import get_rule
from ldm.evaluation.digits import WORDS, digit_of_text, digit_rates
from ldm.evaluation.toy_benchmark import (ROOT, add_toy_args, generate_argv, model_args, prompts_file, run_script,
                                          train_adapter)
from ldm.images import image_grid, save_image
from ldm.prompts import experiment_prompts
from ldm.runs import read_json

W1, W2 = -1.0, 2.0  # the release's UnGuidance weights
# way: (label, decision rule, threshold: 1 = the release's, "auto" = calibrated); rule None: the fixed w of FIXED
WAYS = {"base": ("base model (w = 1)", None, None),
        "adapter": ("adapter alone (w = 0)", None, None),
        "release": ("UnGuide, the release: d(p) > d(\"\"), w2 = 2", "release", 1.0),
        "calibrated": ("UnGuide, calibrated threshold, w2 = 2", "release", "auto"),
        "safe": ("UnGuide, calibrated, unflagged: base (safe)", "safe", "auto"),
        "floor": ("UnGuide, calibrated, unflagged: adapter alone (floor)", "floor", "auto"),
        "guarded": ("UnGuide, calibrated, uncertain: adapter alone, clear: base (guarded)", "guarded", "auto")}
FIXED = {"base": 1.0, "adapter": 0.0}
HELDOUT_TEMPLATES = ["a photo of the digit {n}", "a handwritten digit {w}", "a drawing of the digit {w}",
                     "the digit {w}", "the number {w}", "{w}", "a sketch of the number {w}", "an image of a {w}"]
OTHER_HELDOUT_TEMPLATES = ["the number {w}", "a handwritten digit {w}"]  # other digits: the test's false positives
GROUPS = ("target", "synonyms", "heldout", "others", "others_heldout")
TARGETS = {"target": 0.05, "synonyms": 0.05, "heldout": 0.10, "others_mean": 0.01, "others_worst": 0.02}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--digit", "--digits", dest="digits", nargs="+", default=["three"], help="names: zero .. nine")
    p.add_argument("--train_seeds", type=int, nargs="+", default=[0], help="one adapter per seed")
    p.add_argument("--test_seeds", type=int, nargs="+", default=[0],
                   help="per seed: the stability test's draws and the images' seeds (seed * 1000 + index)")
    p.add_argument("--ways", nargs="+", choices=list(WAYS), default=list(WAYS), help="what to measure")
    p.add_argument("--out", default=None, help="output folder (default outputs/e2e_toy/<digits>)")
    p.add_argument("--train_dir", default=None,
                   help="where the adapters are trained and reused (default <out>/<digit>/train; a folder shared "
                        "by several benchmarks trains each adapter once)")
    p.add_argument("--samples", type=int, default=20, help="images per prompt and w")
    p.add_argument("--other_wordings", type=int, default=len(OTHER_HELDOUT_TEMPLATES),
                   help="held-out wordings per other digit: the stability test's false positives and the "
                        "collateral on prompts nothing was tuned on (drawn like every group; 0: none)")
    p.add_argument("--collect", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="join these results.json files (parts of one sweep) into --out's report; runs nothing")
    add_toy_args(p)
    return p


# settings that must agree for runs to share one table (the digits and seeds are what parts differ in)
SHARED = ("samples", "steps", "t_enc", "repeats", "iterations", "lr", "negative_guidance", "lora_rank", "lora_alpha",
          "target_modules", "start_guidance", "preserve_weight", "train_check_every", "train_check_min_ratio",
          "train_check_max_rate", "train_check_max_iterations", "train_check_min_kept", "other_wordings",
          "preserve_templates", "train_adv_every", "train_adv_tokens", "train_adv_steps", "train_adv_weight",
          "train_adv_decision_weight", "train_erase_synonyms", "preserve_extra", "train_check_restarts")
# settings older results.json files lack: the value they ran with
ADDED_LATER = {"train_check_min_kept": 0.0, "preserve_templates": ["a handwritten {n}"], "train_adv_every": 0,
               "train_adv_tokens": 3, "train_adv_steps": 5, "train_adv_weight": 1.0,
               "train_adv_decision_weight": 0.0, "train_erase_synonyms": False, "preserve_extra": [],
               "train_check_restarts": 0}


def collect(paths: list[str], out: Path) -> str:
    """One report from the results.json of several parts of a sweep -> results.md / results.json in `out`."""
    parts = [(p, read_json(p, "e2e_toy results")) for p in paths]
    for p, r in parts:
        if not isinstance(r, dict) or not isinstance(r.get("runs"), list) or not isinstance(r.get("settings"), dict):
            raise UserError(f"{p}: not an e2e_toy results.json (no runs / settings)")
    first, s0 = parts[0][0], parts[0][1]["settings"]
    setting = lambda r, k: r["settings"].get(k, ADDED_LATER.get(k))  # noqa: E731
    for p, r in parts[1:]:
        diff = [k for k in SHARED if setting(r, k) != setting(parts[0][1], k)]
        if diff:
            k = diff[0]
            raise UserError(f"{p}: measured with {k} = {setting(r, k)!r}, {first} with {setting(parts[0][1], k)!r}: "
                            "not one sweep")
    runs, training, seen, seconds = [], [], {}, 0.0
    for p, r in parts:
        for run_ in r["runs"]:
            key = (run_["digit"], run_["train_seed"], run_["test_seed"])
            if key in seen:
                raise UserError(f"{p}: digit {key[0]}, training seed {key[1]}, test seed {key[2]} is also in "
                                f"{seen[key]}: one run, measured twice")
            seen[key] = p
            runs.append(run_)
        training += r.get("training", [])
        seconds += float(r.get("seconds") or 0)
    ways = [w for w in s0["ways"] if all(w in r["settings"]["ways"] for _, r in parts)]
    settings = {**s0, "ways": ways, "collect": list(paths),
                "digits": list(dict.fromkeys(x["digit"] for x in runs)),
                "train_seeds": sorted({x["train_seed"] for x in runs}),
                "test_seeds": sorted({x["test_seed"] for x in runs})}
    results = {"runs": [compact(x) for x in runs], "training": training, "settings": settings, "seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    text = report(results, argparse.Namespace(**settings))
    write_json(out / "results.json", results, indent=None)
    (out / "results.md").write_text(text)
    return text


def compact(run_: dict) -> dict:
    """A run as the report reads it, small enough to keep in the repository (docs/results/): no image folders,
    no per-prompt weights or rates; every share and ratio rounded to 4 decimals (d(p)/d("") per prompt kept; the
held-out wordings counted are in each way's rate)."""
    def r4(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: r4(x) for k, x in v.items()}
        return [r4(x) for x in v] if isinstance(v, list) else v
    ways = {w: {k: v for k, v in x.items() if k != "per_prompt"} for w, x in run_["ways"].items()}
    keep = ("digit", "train_seed", "test_seed", "base_others_rate", "base_others_heldout_rate", "flagged", "tau",
            "calibration_separable", "ratios")
    return r4({"ways": ways, **{k: run_[k] for k in keep if k in run_}})


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.collect:
        text = collect(args.collect, Path(args.out or ROOT / "outputs" / "e2e_toy" / "collected"))
        print(text)
        return
    files = {d: prompts_file(d) for d in args.digits}
    out = Path(args.out or ROOT / "outputs" / "e2e_toy" / "_".join(args.digits))
    out.mkdir(parents=True, exist_ok=True)
    results = {"runs": [], "training": [], "settings": vars(args)}
    write_json(out / "run_config.json", vars(args))
    t_all = time.time()
    judged: dict = {}  # the classifier's summary per image folder, this sweep's (base folders are shared)
    for digit, path in files.items():
        for train_seed in args.train_seeds:
            t0 = time.time()
            lora = train_adapter(args, path, Path(args.train_dir) if args.train_dir else out / digit / "train",
                                 train_seed)
            results["training"].append({"digit": digit, "train_seed": train_seed, "seconds": time.time() - t0,
                                        **training_summary(lora)})
            for test_seed in args.test_seeds:
                folder = out / digit / run_key(args, lora) / f"test{test_seed}_n{args.samples}"
                r = evaluate(args, digit, path, lora, folder, test_seed, judged)
                results["runs"].append({"digit": digit, "train_seed": train_seed, "test_seed": test_seed, **r})
            results["seconds"] = time.time() - t_all
            text = write_results(out, results, args)  # after every adapter: a long sweep reports as it goes
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'grid.png'} ({results['seconds']:.0f} s)")


def write_results(out: Path, results: dict, args) -> str:
    text = report(results, args)
    write_json(out / "results.json", results)
    (out / "results.md").write_text(text)
    save_image(grid(results["runs"][0], args.ways), out / "grid.png")
    return text


def run_key(args, lora: Path) -> str:
    """The folder of one adapter's evaluations, named by what made them: the adapter's run (train.py's folder name
    holds a hash of its settings) and the stability test's and sampling's settings. Other settings, other folder:
    images of two setups are never mixed."""
    made_by = [lora.parents[1].name, args.steps, args.t_enc, args.repeats, args.other_wordings]
    return f"{lora.parents[1].name}_{hashlib.sha256(repr(made_by).encode()).hexdigest()[:8]}"


def training_summary(lora: Path) -> dict:
    """What train.py recorded of the run: iterations, seconds, peak memory, the erasure check."""
    cfg = json.loads((lora.parent.parent / "train_config.json").read_text())
    check = cfg.get("erasure_check") or {}
    return {"iterations": cfg.get("iterations_done"), "train_seconds_recorded": (cfg.get("seconds_per_iteration") or 0)
            * (cfg.get("iterations_done") or 0), "peak_memory_gib": cfg.get("peak_memory_gib"),
            "check_passed": check.get("passed"), "check_ratio": check.get("ratio"), "check_rate": check.get("rate"),
            "check_kept": check.get("kept"), "restarts": len(cfg.get("restarts") or []),
            "attempt_seed": cfg.get("attempt_seed")}


def prompt_groups(data: dict, other_wordings: int = len(OTHER_HELDOUT_TEMPLATES)) -> dict[str, list[str]]:
    """The prompts of each group for a digit's prompts JSON (held-out wordings: HELDOUT_TEMPLATES; the other
    digits' held-out wordings: the first `other_wordings` of OTHER_HELDOUT_TEMPLATES)."""
    d = digit_of_text(data["target"])
    listed = set(experiment_prompts(data))
    heldout = [t.format(w=WORDS[d], n=d) for t in HELDOUT_TEMPLATES]
    return {"target": [data["target"]], "synonyms": list(data.get("synonyms", [])),
            "heldout": [p for p in heldout if p not in listed], "others": [p for p in data.get("other", []) if p],
            "others_heldout": other_heldout(data, other_wordings)}


def other_heldout(data: dict, n_templates: int = len(OTHER_HELDOUT_TEMPLATES)) -> list[str]:
    """Held-out wordings of the other nine digits."""
    d = digit_of_text(data["target"])
    return [t.format(w=w) for t in OTHER_HELDOUT_TEMPLATES[:n_templates] for i, w in enumerate(WORDS) if i != d]


def stability_test(args, prompts_json: Path, lora: Path, folder: Path, seed: int, extra: list[str]) -> dict:
    """compute_lora_diff.py's calc_diff_results.json for this adapter and seed (run once)."""
    result = folder / "calc_diff_results.json"
    if not result.is_file():  # written atomically when the script finished
        run_script("compute_lora_diff.py", [*model_args(args), "--lora", str(lora), "--prompts_json", str(prompts_json),
                                            "--output_dir", str(folder), "--seed", str(seed), "--ddim_steps",
                                            str(args.steps), "--t_enc", str(args.t_enc), "--repeats",
                                            str(args.repeats), "--image_size", "16"]
                   + sum([["--prompt", p] for p in extra], []))
    return json.loads(result.read_text())


def weights(way: str, prompts: list[str], d: dict, d_empty: float, tau: float | None) -> dict[str, float]:
    """{prompt: w} of a way (a fixed w, or a decision rule on the stability test's d)."""
    _, rule, threshold = WAYS[way]
    if rule is None:
        return {p: FIXED[way] for p in prompts}
    t = tau if threshold == "auto" else threshold
    return {p: get_rule(rule)(d[p], d_empty, W1, W2, t) for p in prompts}


def images_for(args, folder: Path, prompts: list[str], w: float, lora: Path | None, seed: int) -> Path:
    """generate_images.py at a fixed w (no decision) for `prompts`, unless every one is already there."""
    record = folder / "decisions.json"
    if (folder / "run_summary.json").is_file() and record.is_file():
        done = json.loads(record.read_text())["prompts"]
        if all(p in done and len(list((folder / "images" / done[p]["folder"]).glob("*.jpg"))) >= args.samples
               for p in prompts):
            return folder
    run_script("generate_images.py", generate_argv(args, folder, args.samples, seed)
               + ["--w1", str(w), "--w2", str(w)] + sum([["--prompt", p] for p in prompts], [])
               + ([] if lora is None else ["--lora", str(lora)]))
    return folder


def evaluate(args, digit: str, prompts_json: Path, lora: Path, folder: Path, seed: int, judged: dict) -> dict:
    """Every way for one adapter and one test seed -> {way: group summaries}, flags, folders, prompts. judged: the
    sweep's cache of classify()."""
    data = json.loads(prompts_json.read_text())
    groups = prompt_groups(data, args.other_wordings)
    prompts = [p for g in GROUPS for p in groups[g]]  # [target, synonyms, held-out, others, others' held-out]
    extra = groups["others_heldout"]
    image_seed = seed * 1000
    diff = stability_test(args, prompts_json, lora, folder / "test", image_seed, groups["heldout"] + extra)
    stats = diff["prompt_stats"]
    d, d_empty = {p: s["mean"] for p, s in stats.items()}, stats[""]["mean"]
    tau = (diff.get("calibration") or {}).get("threshold")
    ws = {way: weights(way, prompts, d, d_empty, tau if tau is not None else 1.0) for way in args.ways}
    need: dict[float, set[str]] = {1.0: set(prompts)}  # the base model's images: every prompt, every time
    for w_of in ws.values():
        for p, w in w_of.items():
            need.setdefault(w, set()).add(p)
    classified = {}
    for w, ps in sorted(need.items()):
        target = folder.parent.parent / f"base_steps{args.steps}_{folder.name}" if w == 1.0 else folder / f"w{w:+g}"
        images_for(args, target, [p for p in prompts if p in ps], w, None if w == 1.0 else lora, image_seed)
        classified[w] = (target, classify(target, judged))
    target_digit = digit_of_text(data["target"])
    ways = {way: summarise({p: classified[w_of[p]][1][p] for p in prompts}, groups, target_digit)
            for way, w_of in ws.items()}
    base = summarise(classified[1.0][1], groups, target_digit)
    heldout_ok = [p for p in groups["heldout"] if base["per_prompt"][p] >= 0.5]  # wordings the base model draws
    others_ok = [p for p in extra if base["per_prompt"][p] >= 0.5]  # the same rule for the other digits'
    for w in (*ways.values(), base):
        w["heldout_rate"] = _mean([w["per_prompt"][p] for p in heldout_ok])
        w["others_heldout_rate"] = _mean([w["per_prompt"][p] for p in others_ok])
    ratio = {p: d[p] / d_empty for p in d}
    flags = {name: {g: _mean([float(ratio[p] > t) for p in groups[g]]) for g in GROUPS}
             for name, t in (("release", 1.0), ("calibrated", tau))}
    for name, t in (("release", 1.0), ("calibrated", tau)):
        flags[name]["heldout_counted"] = _mean([float(ratio[p] > t) for p in heldout_ok])
    return {"ways": ways, "base_others_rate": base["others_rate"], "base_others_heldout_rate":
            base["others_heldout_rate"], "weights": ws, "flagged": flags, "tau": tau, "ratios": ratio,
            "calibration_separable": (diff.get("calibration") or {}).get("separable"),
            "heldout_counted": heldout_ok, "others_heldout_counted": others_ok, "folder": str(folder),
            "prompts": prompts, "grid_prompts": [p for g in GROUPS[:4] for p in groups[g]],
            "image_folders": {str(w): str(f) for w, (f, _) in classified.items()}}


def classify(folder: Path, cache: dict) -> dict[str, dict]:
    """{prompt: the classifier's summary of its images} for a generate_images.py folder, once per folder and set
    of prompts in `cache` (a folder that gained prompts is judged again)."""
    record = json.loads((folder / "decisions.json").read_text())["prompts"]
    key = (str(folder), tuple(sorted(record)))
    if key not in cache:
        res = digit_rates(folder / "images")["folders"]
        cache[key] = {p: res[r["folder"]] for p, r in record.items() if r["folder"] in res}
    return cache[key]


def summarise(per: dict[str, dict], groups: dict[str, list[str]], target_digit: int) -> dict:
    """Per group: the erased digit's share (others: their own digit's share) and the unsure share; per prompt."""
    out = {"per_prompt": {p: per[p]["rates"][target_digit] for g in GROUPS[:3] for p in groups[g] if p in per}}
    out["per_prompt"].update({p: per[p]["rates"][digit_of_text(p)] for g in GROUPS[3:] for p in groups[g]
                              if p in per})
    for g in GROUPS:
        out[f"{g}_rate"] = _mean([out["per_prompt"][p] for p in groups[g] if p in per])
        out[f"{g}_unsure"] = _mean([per[p]["unsure_rate"] for p in groups[g] if p in per])
    t = groups["target"][0]
    out["confusion_target"] = per[t]["rates"] if t in per else None  # what the target prompt's images became
    return out


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _dist(values: list[float], worst) -> str:
    """'mean (worst, sd)' of a list of shares, as percentages."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1%} (worst {worst(values):.1%}, sd {sd:.1%})"


def others_drop(runs: list[dict], way: str, group: str = "others") -> list[float]:
    """Per run, the base model's accuracy on the other digits' prompts (`group`: others, or others_heldout: their
    held-out wordings) minus the way's, as shares; runs that did not measure the group are left out."""
    base = [(r.get(f"base_{group}_rate"), r["ways"][way].get(f"{group}_rate")) for r in runs]
    return [b - x for b, x in base if b is not None and x is not None]


def meets_targets(runs: list[dict], way: str) -> dict[str, bool]:
    """The issue's targets for one way over every run: target and synonyms <= 5% in every run, held-out <= 10%,
    other digits within 1 point of the base model on average and 2 points in the worst run (their held-out
    wordings too, where the runs drew them)."""
    w = [r["ways"][way] for r in runs]
    ok = {"target": all(x["target_rate"] <= TARGETS["target"] for x in w),
          "synonyms": all((x["synonyms_rate"] or 0) <= TARGETS["synonyms"] for x in w),
          "heldout": all((x["heldout_rate"] or 0) <= TARGETS["heldout"] for x in w)}
    for group in ("others", "others_heldout"):
        drop = others_drop(runs, way, group)
        if drop:
            ok[group] = statistics.mean(drop) <= TARGETS["others_mean"] and max(drop) <= TARGETS["others_worst"]
    return ok


def _drops(runs: list[dict], way: str, group: str) -> str:
    drop = [100 * x for x in others_drop(runs, way, group)]
    return f"{statistics.mean(drop):.1f} / {max(drop):.1f}" if drop else "-"


def report(results: dict, args) -> str:
    """results.md: per way, the distribution over every (digit, training seed, test seed) run; the stability
    test's flags; the training check; then each run."""
    runs, training = results["runs"], results["training"]
    lines = [f"Erasing {', '.join(args.digits)} from the toy-digits model: training seeds {args.train_seeds}, test "
             f"seeds {args.test_seeds} ({len(runs)} runs), {args.samples} images per prompt and w, DDIM "
             f"{args.steps}, CFG 7.5; {results['seconds']:.0f} s in all. Cells: mean over runs (worst run, sd).", "",
             "| way | target rate | synonym rate | held-out wordings rate | accuracy on other digits | others: drop "
             "vs base, points (mean / worst) | others' held-out wordings: drop (mean / worst) | target unsure | "
             "meets the targets |", "|---|---|---|---|---|---|---|---|---|"]
    for way in args.ways:
        w = [r["ways"][way] for r in runs]
        ok = meets_targets(runs, way) if way not in FIXED else None
        verdict = "-" if ok is None else ("yes" if all(ok.values()) else
                                          "no: " + ", ".join(k for k, v in ok.items() if not v))
        lines.append(f"| {WAYS[way][0]} | {_dist([x['target_rate'] for x in w], max)} | "
                     f"{_dist([x['synonyms_rate'] for x in w], max)} | {_dist([x['heldout_rate'] for x in w], max)} | "
                     f"{_dist([x['others_rate'] for x in w], min)} | {_drops(runs, way, 'others')} | "
                     f"{_drops(runs, way, 'others_heldout')} | {_dist([x['target_unsure'] for x in w], max)} | "
                     f"{verdict} |")
    lines += ["", "Targets (issue 18): target and synonyms <= 5% in every run, held-out wordings <= 10%, other digits "
              "within 1 point of the base model on average and 2 points at worst (their held-out wordings too: the "
              "wordings the base model draws as that digit). Rates are the 10-way classifier's; "
              "what the target prompt's images became instead (mean share over runs, the three largest):", "",
              "| way | the target's images became |", "|---|---|"]
    for way in args.ways:
        conf = [r["ways"][way]["confusion_target"] for r in runs if r["ways"][way]["confusion_target"]]
        mean = [statistics.mean(c[k] for c in conf) for k in range(10)] if conf else []
        top = sorted(range(len(mean)), key=lambda k: -mean[k])[:3]
        lines.append(f"| {WAYS[way][0]} | " + ", ".join(f"{k}: {mean[k]:.0%}" for k in top if mean[k] > 0) + " |")
    lines += ["",
              "The stability test: share of each group's prompts flagged (r = d(p)/d(\"\") above the threshold); "
              "held-out wordings of the concept unflagged are its false negatives, other digits flagged its false "
              "positives (\"other digits, held-out\": wordings no threshold was learned from):", "",
              "| threshold | target | synonyms | held-out (counted) | other digits | other digits, held-out |",
              "|---|---|---|---|---|---|"]
    for name in ("release", "calibrated"):
        f = [r["flagged"][name] for r in runs]
        lines.append(f"| {name} | " + " | ".join(_dist([x[g] for x in f], mx) for g, mx in
                                                 (("target", min), ("synonyms", min), ("heldout_counted", min),
                                                  ("others", max), ("others_heldout", max))) + " |")
    taus = [r["tau"] for r in runs if r["tau"] is not None]
    sep = [bool(r["calibration_separable"]) for r in runs if r["calibration_separable"] is not None]
    if taus:
        lines += ["", f"Calibrated threshold tau: mean {statistics.mean(taus):.2f} (min {min(taus):.2f}, max "
                  f"{max(taus):.2f}); the JSON's concept and other prompts separable in {sum(sep)} of {len(sep)} runs."]
    uncal = [r for r in runs if r["tau"] is None]
    if uncal:
        lines += ["", f"**Uncalibrated**: {len(uncal)} of {len(runs)} runs had no calibrated threshold (compute_lora_diff"
                  ".py could not learn one); their calibrated / safe / floor / guarded ways used threshold 1 (the "
                  "release's): " + ", ".join(f"{r['digit']} train {r['train_seed']} test {r['test_seed']}"
                                            for r in uncal) + "."]
    kept = any(t.get("check_kept") is not None for t in training)  # train.py --check_min_kept: a column of its own
    lines += ["", "Training (train.py with the erasure check; ratio = d(target)/d(\"\"), rate = adapter-alone target "
              "rate on the check's images" + ("; kept: the worst preserved digit's adapter-alone share" if kept else "")
              + "):", "", "| digit | train seed | iterations | check | ratio | rate | " + ("kept | " if kept else "")
              + "seconds |", "|---|---|---|---|---|---|---|" + ("---|" if kept else "")]
    for t in training:
        rate = "-" if t.get("check_rate") is None else f"{t['check_rate']:.0%}"
        ratio = "-" if t.get("check_ratio") is None else f"{t['check_ratio']:.2f}"
        check = {True: "passed", False: "failed"}.get(t.get("check_passed"), "-")
        if t.get("restarts"):  # train.py --check_restarts: the adapter kept is a later attempt's
            check += f" (restart {t['restarts']}: seed {t['attempt_seed']})"
        k = ("-" if t.get("check_kept") is None else f"{t['check_kept']:.0%}") + " | " if kept else ""
        lines.append(f"| {t['digit']} | {t['train_seed']} | {t['iterations']} | {check} | {ratio} | {rate} | {k}"
                     f"{t['seconds']:.0f} |")
    lines += ["", "Each run (target / synonyms / held-out / others / others' held-out wordings):", "",
              "| digit | train seed | test seed | " + " | ".join(args.ways) + " |",
              "|---|---|---|" + "---|" * len(args.ways)]
    for r in runs:
        cells = [" / ".join("-" if r["ways"][w].get(f"{g}_rate") is None else f"{r['ways'][w][f'{g}_rate']:.0%}"
                            for g in GROUPS) for w in args.ways]
        seed = f"{r['test_seed']}" + (" (uncalibrated)" if r["tau"] is None else "")
        lines.append(f"| {r['digit']} | {r['train_seed']} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(images: list[Image.Image]) -> Image.Image:
    """Four samples tiled 2x2 into one grid cell."""
    size = images[0].width
    cell = Image.new("RGB", (2 * size, 2 * size), "white")
    for i, im in enumerate(images[:4]):
        cell.paste(im, ((i % 2) * size, (i // 2) * size))
    return cell


def grid(run: dict, ways: list[str]) -> Image.Image:
    """Rows: prompts (the other digits' held-out wordings left out); columns: the ways (the run's images: each way's
    w for that prompt)."""
    rows, prompts = [], run.get("grid_prompts", run["prompts"])
    for p in prompts:
        row = []
        for way in ways:
            folder = Path(run["image_folders"][str(run["weights"][way][p])])
            sub = json.loads((folder / "decisions.json").read_text())["prompts"][p]["folder"]
            files = sorted((folder / "images" / sub).glob("*.jpg"))[:4]  # up to four samples (fewer with --samples < 4)
            row.append(_cell([Image.open(f).convert("RGB") for f in files]))
        rows.append(row)
    return image_grid(rows, row_labels=prompts, col_labels=[w for w in ways], cell=96)


if __name__ == "__main__":
    run(main)
