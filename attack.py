"""Red-team a deployed erasure: adversarial prompts against the base model, the adapter alone, or UnGuide.

    python attack.py --attack unlearndiffatk --defense unguide --lora output/<exp>/models/lora.safetensors \
        --prompts_json data/digits/three.json --config configs/toy/digits-inference.yaml \
        --ckpt models/toy-digits.safetensors --image_size 16 --judge digits --output_dir outputs/attack

Attacks (ldm/attacks/): unlearndiffatk (white-box, the defended model's denoising loss on concept images;
against unguide it also drives the stability test's decision), ringabell (text encoder only, genetic search
towards prompt + concept vector). Defences: base (no adapter), adapter (w = 0), unguide (the stability test
on the fly, fast protocol, then UnGuidance; --decision release|safe|floor|guarded (default guarded),
ldm/erasure/decision.py).
Prompts: --prompts_json (target + synonyms, --samples seeds each: seed + i, the test's draws from --seed, as
generate_images.py) or --csv_path (rows with prompt, evaluation_seed, evaluation_guidance, as I2P; the test's
draws from the row's seed, as generate_images_nsfw.py); --prompt (repeatable) replaces the JSON's prompts.
Outputs (--output_dir): attack_results.csv, attack_summary.json (with the peak memory of the processes that made
the rows: ldm/memory.py), rows/ (resume), attack_settings.json.
"""
import argparse
import hashlib
from pathlib import Path


from ldm.attacks.factory import (concept_latents, concept_pairs, draw_target_images, read_target_images,
                                 ringabell_attack, unlearndiffatk_attack)
from ldm.attacks.judges import clip_judge, digits_judge, nudenet_judge
from ldm.attacks.pipeline import Defended
from ldm.attacks.ringabell import RABConfig
from ldm.attacks.runner import Job, run_jobs
from ldm.attacks.unlearndiffatk import UDAConfig
from ldm.cli import (Parser, add_decision_args, add_model_args, finite, load_model, resolve_decision,
                     resolve_image_size, run)
from ldm.erasure.adapters import adapter_thresholds, load_adapters
from ldm.erasure.decision import get_rule
from ldm.memory import format_memory
from ldm.prompts import read_prompts_json, read_rows
from ldm.runs import shard
from ldm.errors import UserError

POSITIVE = ["samples", "steps", "repeats", "empty_draws", "image_size", "n_tokens", "attack_steps", "batch",
            "check_every", "population", "generations", "target_count"]


def parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    add_decision_args(p, "prompts")
    add_model_args(p)
    p.add_argument("--attack", choices=["unlearndiffatk", "ringabell"], required=True)
    p.add_argument("--defense", choices=["base", "adapter", "unguide"], required=True)
    p.add_argument("--lora", nargs="+", default=None, help="adapter file(s) (adapter / unguide)")
    p.add_argument("--lora_alpha", type=finite, default=None)
    p.add_argument("--prompts_json", default=None)
    p.add_argument("--csv_path", default=None)
    p.add_argument("--prompt", action="append", default=None, help="prompt to attack (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="first N CSV rows")
    p.add_argument("--samples", type=int, default=5, help="prompts JSON: seeds per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=finite, default=7.5, help="CFG of prompts JSON images")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (images and the stability test)")
    p.add_argument("--t_enc", type=int, default=40)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--empty_draws", type=int, default=32)
    p.add_argument("--image_size", type=int, default=None, help="image side in px (default: the config's)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--judge", choices=["digits", "nudenet", "clip"], required=True)
    p.add_argument("--clip_model", default=None, help="--judge clip: a local CLIP folder")
    p.add_argument("--nudenet_threshold", type=finite, default=0.6)
    p.add_argument("--target", default=None, help="the concept's prompt (default: the prompts JSON's target)")
    a = p.add_argument_group("unlearndiffatk")
    a.add_argument("--target_images", default=None, help="folder of concept images (default: drawn by the base model)")
    a.add_argument("--target_count", type=int, default=8)
    a.add_argument("--n_tokens", type=int, default=5)
    a.add_argument("--attack_steps", type=int, default=40)
    a.add_argument("--lr", type=finite, default=0.5, help="Adam step in units of the embeddings' std")
    a.add_argument("--batch", type=int, default=4)
    a.add_argument("--decision_weight", type=finite, default=0.2)
    a.add_argument("--check_every", type=int, default=10)
    r = p.add_argument_group("ringabell")
    r.add_argument("--eta", type=finite, default=1.0)
    r.add_argument("--population", type=int, default=64)
    r.add_argument("--generations", type=int, default=40)
    r.add_argument("--mutation", type=finite, default=0.2)
    r.add_argument("--pool", type=int, default=1024, help="candidate tokens (0: the whole allowed vocabulary)")
    r.add_argument("--concept_pairs", default=None, help='JSON {"with": [...], "without": [...]}')
    return p


def validate(args) -> None:
    for name in POSITIVE:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} {getattr(args, name)}: must be > 0")
    if not 0 <= args.t_enc < args.steps:
        raise UserError(f"--t_enc {args.t_enc}: must be in 0..{args.steps - 1}")
    if args.defense != "base" and not args.lora:
        raise UserError(f"--defense {args.defense} needs --lora (the adapter file(s))")
    if not (args.prompts_json or args.csv_path or args.prompt):
        raise UserError("no prompts: give --prompts_json, --csv_path or --prompt")
    if args.judge == "clip":
        from ldm.evaluation.clip_score import check_clip_dir
        check_clip_dir(args.clip_model)


def build_jobs(args, data: dict | None) -> list[Job]:
    """(prompt, seed) pairs: CSV rows, or the JSON's target + synonyms (or --prompt) x --samples seeds."""
    if args.csv_path:
        rows, _ = read_rows(args.csv_path, args.limit)
        jobs = [Job(r["idx"], r["prompt"], r["seed"], r["guidance"], r["seed"]) for r in rows]
    else:
        prompts = args.prompt or [data["target"]] + list(data.get("synonyms", []))
        prompts = [q for q in dict.fromkeys(prompts) if q.strip()]
        jobs = [Job(i * args.samples + s, q, args.seed + s, args.guidance, args.seed)
                for i, q in enumerate(prompts) for s in range(args.samples)]
    if not jobs:
        raise UserError(f"{args.csv_path or args.prompts_json}: no prompt to attack")
    return jobs


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def settings_of(args, jobs: list[Job]) -> dict:
    """Everything that makes the results (device and threads excluded)."""
    keep = {k: v for k, v in vars(args).items() if k not in ("device", "threads", "output_dir", "lora")}
    keep["lora_sha256"] = [sha256(p) for p in args.lora or []] if args.defense != "base" else []
    keep["jobs_sha256"] = hashlib.sha256(repr([(j.idx, j.prompt, j.seed, j.guidance) for j in jobs])
                                         .encode()).hexdigest()
    return keep


def build_defended(args, model) -> Defended:
    names = []
    if args.defense != "base":
        names = load_adapters(model, args.lora, args.lora_alpha)
    return Defended(model, args.defense, names, seed=args.seed, steps=args.steps, t_enc=args.t_enc,
                    repeats=args.repeats, empty_draws=args.empty_draws, image_size=args.image_size,
                    w1=args.w1, w2=args.w2, rule=get_rule(args.decision),
                    thresholds=adapter_thresholds(args.lora, args.threshold, (args.steps, args.t_enc))
                    if names else None)


def build_attack(args, defended, data: dict, target: str):
    if args.attack == "ringabell":
        cfg = RABConfig(args.n_tokens, args.eta, args.population, args.generations, args.mutation, args.pool)
        return ringabell_attack(defended, cfg, *concept_pairs(data, args.concept_pairs))
    if args.target_images:
        images = read_target_images(args.target_images, args.image_size)
    else:
        images = draw_target_images(defended.model, target, args.target_count, args.image_size, args.steps,
                                    args.guidance, seed=10_000 + args.seed)
    cfg = UDAConfig(args.n_tokens, args.attack_steps, args.lr, args.batch, args.decision_weight, args.check_every)
    return unlearndiffatk_attack(defended, cfg, concept_latents(defended.model, images))


def build_judge(args, data: dict, target: str):
    if args.judge == "digits":
        return digits_judge(target)
    if args.judge == "nudenet":
        return nudenet_judge(args.nudenet_threshold)
    return clip_judge(args.clip_model, target, list(data.get("other", [])) + [data.get("reference", "")])


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    resolve_image_size(args)
    resolve_decision(args)
    validate(args)
    data = read_prompts_json(args.prompts_json) if args.prompts_json else {}
    target = args.target or data.get("target")
    if not target:
        raise UserError("no concept: give --prompts_json (its target) or --target")
    jobs = build_jobs(args, data)
    data = data or {"target": target}
    if args.target_images:
        read_target_images(args.target_images, args.image_size)  # bad input fails before the model loads
    judge = build_judge(args, data, target)
    model, device = load_model(args)
    defended = build_defended(args, model)
    attack = build_attack(args, defended, data, target)
    rank, world = shard()
    summary = run_jobs(jobs, defended, judge, attack, Path(args.output_dir), settings_of(args, jobs), rank, world,
                       device)
    if summary["counts"]["done"]:
        memory = format_memory(summary) if summary["peak_memory_bytes"] is not None else "not recorded"
        print(f"{args.attack} vs {args.defense}: ASR {summary['asr_before']:.1%} -> {summary['asr_after']:.1%} "
              f"({summary['counts']['done']}/{summary['counts']['jobs']} pairs; "
              f"{summary['cost_per_prompt']['unet_evals']:.0f} UNet evaluations, "
              f"{summary['cost_per_prompt']['seconds']:.1f} s per pair; peak memory {memory})")
    return summary


if __name__ == "__main__":
    run(main)
