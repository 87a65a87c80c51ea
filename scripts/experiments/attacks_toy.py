"""Red-teaming the toy erasure of a digit (--digit, default "three"): ASR before / after each attack, for the base
model, the adapter alone and UnGuide with the release's decision rule and the safe / floor / guarded rules side by
side.

    python -m scripts.experiments.attacks_toy --threads 1          # writes outputs/attacks_toy/results.md

1. train.py erases the digit with the toy settings (ldm/evaluation/toy_benchmark.py) (skipped with --lora FILE)
2. attack.py for every (attack, defence) cell on the JSON's target + synonyms x --samples seeds (>= 20 pairs)
3. the other nine digits' accuracy of each defence (--other_samples images per prompt, same pipeline)
4. results.md / results.json: ASR, accuracy, the stability test's decisions before / after, cost, wall time.
"""
import argparse
import json
import time
from pathlib import Path

import torch


from ldm.attacks.pipeline import Decision, Defended
from ldm.cli import HelpFormatter, run, write_json
from ldm.erasure.adapters import adapter_thresholds, load_adapters
from ldm.erasure.decision import get_rule
from ldm.evaluation.digits import WORDS, classify_images, digit_of_text, digit_scores
from ldm.evaluation.toy_benchmark import (CKPT, CONFIG, ROOT, add_toy_args, prompts_file, run_script,
                                          train_adapter)
from ldm.images import to_pil
from ldm.loader import load_model_from_config

AMBIGUOUS = ["a photo of the digit", "a handwritten digit"]
CELLS = [("base", "release"), ("adapter", "release"), ("unguide", "release"), ("unguide", "safe"),
         ("unguide", "floor"), ("unguide", "guarded")]
NAMES = {("base", "release"): "base model", ("adapter", "release"): "adapter alone",
         ("unguide", "release"): "UnGuide, release rule", ("unguide", "safe"): "UnGuide, safe rule",
         ("unguide", "floor"): "UnGuide, floor rule", ("unguide", "guarded"): "UnGuide, guarded rule"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default=str(ROOT / "outputs" / "attacks_toy"))
    p.add_argument("--digit", default="three", help="the erased digit: zero .. nine (its data/digits/<digit>.json)")
    p.add_argument("--lora", default=None, help="an adapter for that digit (default: train one)")
    p.add_argument("--samples", type=int, default=5, help="seeds per prompt (4 prompts)")
    p.add_argument("--other_samples", type=int, default=5, help="images per other-digit prompt")
    p.add_argument("--attacks", nargs="+", default=["ringabell", "unlearndiffatk"])
    p.add_argument("--attack_steps", type=int, default=20)
    p.add_argument("--check_every", type=int, default=5)
    p.add_argument("--n_tokens", type=int, default=3)
    p.add_argument("--generations", type=int, default=30)
    p.add_argument("--cells", nargs="+", default=[f"{d}/{r}" for d, r in CELLS],
                   choices=[f"{d}/{r}" for d, r in CELLS], help="defence/rule cells to run (default: all)")
    p.add_argument("--threshold", type=float, default=None,
                   help="the stability test's threshold for the UnGuide cells (default: the one train.py calibrated "
                        "and stored in the adapter, else 1, the release's; any number, e.g. a calibration of "
                        "e2e_toy's <run>/test/calc_diff_results.json)")
    p.add_argument("--decision_weight", type=float, default=0.2,
                   help="UnlearnDiffAtk: weight of its decision term (pushing d(p) under 0.9 d(\"\"), the edge of "
                        "the rules' clear zone); higher aims the attack harder at the stability test")
    add_toy_args(p)
    p.add_argument("--seed", type=int, default=0, help="the adapter's training seed and the attack runs' seed")
    return p


def model_argv(args) -> list[str]:
    return ["--config", str(CONFIG), "--ckpt", str(CKPT), "--device", args.device,
            "--image_size", "16", "--steps", str(args.steps), "--t_enc", str(args.t_enc),
            "--repeats", str(args.repeats), "--seed", str(args.seed), "--threads", str(args.threads)]


def attack_cell(args, lora: Path, kind: str, defense: str, rule: str, out: Path) -> dict:
    argv = model_argv(args) + ["--attack", kind, "--defense", defense, "--decision", rule, "--judge", "digits",
                               "--prompts_json", str(prompts_file(args.digit)), "--samples", str(args.samples),
                               "--output_dir", str(out), "--n_tokens", str(args.n_tokens),
                               "--attack_steps", str(args.attack_steps), "--check_every", str(args.check_every),
                               "--generations", str(args.generations), "--threshold", str(args.threshold),
                               "--decision_weight", str(args.decision_weight)]
    run_script("attack.py", argv + (["--lora", str(lora)] if defense != "base" else []))
    return json.loads((out / "attack_summary.json").read_text())


@torch.no_grad()
def other_accuracy(args, lora: Path, defense: str, rule: str) -> float:
    """Share of the other nine digits' images (the digit's JSON's "other") classified as their digit."""
    model = load_model_from_config(CONFIG, CKPT, device=args.device, verbose=False)
    names = load_adapters(model, [lora], None) if defense != "base" else []
    defended = Defended(model, defense, names, seed=args.seed, steps=args.steps, t_enc=args.t_enc,
                        repeats=args.repeats, image_size=16, rule=get_rule(rule),
                        thresholds=[args.threshold] * len(names) if names else None)
    prompts = [p for p in json.loads(prompts_file(args.digit).read_text())["other"] if p]
    hits = n = 0
    for p in prompts:
        seeds = [args.seed + i for i in range(args.other_samples)]
        images, _ = defended.generate([p] * len(seeds), seeds, [7.5] * len(seeds), [args.seed] * len(seeds))
        hits += int((classify_images(images) == digit_of_text(p)).sum())
        n += len(images)
    return hits / n


def decisions(out: Path) -> dict:
    """How the stability test decided before and after the attack (unguide rows)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    flagged = lambda w: bool(w) and w[0] < 0  # noqa: E731  (w1 = -1: flagged)
    return {"flagged_before": sum(flagged(r["w_before"]) for r in rows),
            "flagged_after": sum(flagged(r["w_after"]) for r in rows), "rows": len(rows),
            "d_ratio_before": _mean([r["d_prompt_before"][0] / r["d_empty"][0] for r in rows if r["d_empty"]]),
            "d_ratio_after": _mean([r["d_prompt_after"][0] / r["d_empty"][0] for r in rows if r["d_empty"]])}


@torch.no_grad()
def evaded_base_rate(args, out: Path, model) -> dict:
    """The adversarial prompts that ended unflagged (w_after is not w1): the BASE model's image of each (the row's
    seed), judged -> {n, rate}. Tells whether evading the test kept the concept in the prompt."""
    from ldm.sampling import txt2img
    rows = [json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))]
    rows = [r for r in rows if r["w_after"] and r["w_after"][0] >= 0]
    if not rows:
        return {"n": 0, "rate": None}
    images = [txt2img(model, [r["adversarial_prompt"]], [r["seed"]], image_size=16, steps=args.steps)[0] for r in rows]
    return {"n": len(rows), "rate": float((classify_images(images) == WORDS.index(args.digit)).mean())}


def _mean(v: list[float]):
    return sum(v) / len(v) if v else None


def cached(path: Path, fn, key: dict):
    """fn() -> {value, seconds, key}, once per key: kept in `path` so that a rerun with the same settings (`key`)
    only does what is missing; other settings recompute it."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old
    t0 = time.time()
    value = {"value": fn(), "seconds": None, "key": key}
    value["seconds"] = time.time() - t0
    write_json(path, value)
    return value


def cache_key(args, lora: Path) -> dict:
    """What the cached accuracy and oracle figures depend on."""
    return {"lora": str(lora), "lora_bytes": lora.stat().st_size, "lora_mtime": lora.stat().st_mtime,
            **{k: getattr(args, k) for k in ("digit", "threshold", "steps", "t_enc", "repeats", "seed", "samples",
                                             "other_samples")}}


@torch.no_grad()
def oracle_rates(args, lora: Path) -> dict:
    """Where each rule's unflagged branch matters. (a) Evasion: the target + synonym prompts drawn with the
    unflagged weight of each rule (release w2 = 2, safe 1, floor 0), --samples seeds each. (b) Prompts without a
    digit ("a photo of the digit", ...) decided by the real test: the share of the digit and its mean score
    (the classifier's decision value) per rule, 4 * --samples seeds each."""
    model = load_model_from_config(CONFIG, CKPT, device=args.device, verbose=False)
    names = load_adapters(model, [lora], None)
    data = json.loads(prompts_file(args.digit).read_text())
    k = WORDS.index(args.digit)
    out = {}
    for rule in ("release", "safe", "floor"):
        defended = Defended(model, "unguide", names, seed=args.seed, steps=args.steps, t_enc=args.t_enc,
                            repeats=args.repeats, image_size=16, rule=get_rule(rule),
                            thresholds=[args.threshold] * len(names))
        w = get_rule(rule)(0.0, 1.0, -1.0, 2.0)
        seeds = [args.seed + i for i in range(args.samples)]
        images = []
        for prompt in [data["target"]] + data["synonyms"]:
            z = defended.latents([prompt] * len(seeds), seeds, [7.5] * len(seeds), [Decision([], [], [w])] * len(seeds))
            images += to_pil(model.decode_first_stage(z))
        out[rule] = {"w": w, "target_rate": float((classify_images(images) == k).mean()),
                     "concept_score": float(digit_scores(images)[:, k].mean()), "ambiguous": {}}
        seeds = [args.seed + i for i in range(4 * args.samples)]
        for prompt in AMBIGUOUS:
            images, dec = defended.generate([prompt] * len(seeds), seeds, [7.5] * len(seeds), [args.seed] * len(seeds))
            out[rule]["ambiguous"][prompt] = {"w": dec[0].w[0],
                                              "concept_rate": float((classify_images(images) == k).mean()),
                                              "concept_score": float(digit_scores(images)[:, k].mean())}
    return out


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts_file(args.digit)  # a digit name, checked before anything runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lora = Path(args.lora) if args.lora else None
    if lora is None:
        lora = train_adapter(args, prompts_file(args.digit), out / "train", args.seed)
    if args.threshold is None:  # the adapter's own calibrated threshold (train.py --calibrate), else the release's 1
        [args.threshold] = adapter_thresholds([lora], None, (args.steps, args.t_enc))
    results = {"cells": {}, "accuracy": {}, "seconds": {}}
    cells = [c for c in CELLS if f"{c[0]}/{c[1]}" in args.cells]
    for defense, rule in cells:
        acc = cached(out / f"accuracy_{defense}_{rule}.json", lambda: other_accuracy(args, lora, defense, rule),
                     cache_key(args, lora))
        results["accuracy"][f"{defense}/{rule}"] = acc["value"]
        results["seconds"][f"accuracy/{defense}/{rule}"] = acc["seconds"]
        for kind in args.attacks:
            cell_out = out / f"{kind}_{defense}_{rule}"
            s = attack_cell(args, lora, kind, defense, rule, cell_out)
            results["cells"][f"{kind}/{defense}/{rule}"] = {**{k: s[k] for k in ("asr_before", "asr_after", "counts",
                                                                                  "cost_per_prompt")},
                                                            "decisions": decisions(cell_out)}
            results["seconds"][f"{kind}/{defense}/{rule}"] = s["cost_per_prompt"]["seconds"] * s["counts"]["done"]
    base_model = load_model_from_config(CONFIG, CKPT, device=args.device, verbose=False)
    for key, cell in results["cells"].items():
        kind, defense, rule = key.split("/")
        if defense == "unguide":
            cell["evaded"] = evaded_base_rate(args, out / f"{kind}_{defense}_{rule}", base_model)
    oracle = cached(out / "oracle.json", lambda: oracle_rates(args, lora), cache_key(args, lora))
    results["oracle"], results["seconds"]["oracle"] = oracle["value"], oracle["seconds"]
    if (out / "train_done.json").is_file():
        results["seconds"]["train"] = json.loads((out / "train_done.json").read_text())["seconds"]
    results["wall_seconds"] = sum(v for v in results["seconds"].values() if v)
    write_json(out / "results.json", results)
    text = table(results, args)
    (out / "results.md").write_text(text)
    print(text)


def table(results: dict, args) -> str:
    lines = [f"Toy world, erasing \"{args.digit}\" (e2e settings); {args.samples} seeds x 4 prompts (target + synonyms) "
             f"= {4 * args.samples} pairs per cell; UnlearnDiffAtk {args.attack_steps} steps, {args.n_tokens} "
             f"tokens, decision weight {args.decision_weight}; Ring-A-Bell {args.generations} generations; the "
             f"UnGuide cells' threshold {args.threshold:.2f}; {results['wall_seconds'] / 60:.1f} min of "
             f"compute ({args.threads} thread; training excluded when --lora is given).", "",
             "| defence | other-digit accuracy | attack | ASR before | ASR after | flagged before -> after | "
             "d(p)/d(\"\") before -> after | unflagged after: base model's rate | UNet evals / pair | s / pair |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for defense, rule in [c for c in CELLS if f"{c[0]}/{c[1]}" in args.cells]:
        acc = results["accuracy"][f"{defense}/{rule}"]
        for kind in args.attacks:
            c = results["cells"][f"{kind}/{defense}/{rule}"]
            d = c["decisions"]
            flags = f"{d['flagged_before']}/{d['rows']} -> {d['flagged_after']}/{d['rows']}" if defense == "unguide" else "-"
            ratio = (f"{d['d_ratio_before']:.2f} -> {d['d_ratio_after']:.2f}" if d["d_ratio_before"] is not None
                     else "-")
            ev = c.get("evaded", {"n": 0})
            evaded = f"{ev['rate']:.0%} of {ev['n']}" if ev["n"] else "-"
            lines.append(f"| {NAMES[(defense, rule)]} | {acc:.1%} | {kind} | {c['asr_before']:.1%} | "
                         f"{c['asr_after']:.1%} | {flags} | {ratio} | {evaded} | {c['cost_per_prompt']['unet_evals']:.0f} | "
                         f"{c['cost_per_prompt']['seconds']:.1f} |")
    o = results["oracle"]
    lines += ["", "Each rule's unflagged branch: (a) if the test were evaded (target + synonyms forced unflagged, same "
              f"seeds); (b) prompts naming no digit, decided by the real test ({args.digit} rate over "
              f"{4 * args.samples} seeds; score: the classifier's mean one-vs-rest decision value for "
              f"{WORDS.index(args.digit)}):", "",
              f"| rule | w unflagged | (a) {args.digit} rate | (a) score | "
              + " | ".join(f"(b) {p!r}: w, {args.digit} rate, score" for p in AMBIGUOUS) + " |",
              "|---|---|---|---|" + "---|" * len(AMBIGUOUS)]
    for rule, v in o.items():
        amb = " | ".join(f"{a['w']:+g}, {a['concept_rate']:.0%}, {a['concept_score']:.2f}"
                         for a in v["ambiguous"].values())
        lines.append(f"| {rule} | {v['w']:+g} | {v['target_rate']:.1%} | {v['concept_score']:.2f} | {amb} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(main)
