"""Erase a concept from Stable Diffusion v1.x: train a LoRA adapter with the ESD/UnGuide objective.

    python train.py --ckpt_path models/sd-v1-4.ckpt --prompts_json data/cat.json --iterations 200 --lr 3e-5

One copy of the base model is loaded: the frozen predictions e_0/e_p come from the same weights with the
adapters switched off (ldm/erasure/objective.py). Output, as the UnGuide release:
    <output_dir>/class_name_<json stem>_lora_rank_<r>_lora_alpha_<a>_iterations_<n>_lr_<lr>_start_guidance_<g>
        _negative_guidance_<eta>_ddim_steps_<S>/
        models/lora.safetensors     the adapter (only a finished run writes it; release format: see ldm/erasure/io.py)
        train_config.json           the release's keys + every argument, losses, timing, memory, status
        losses.csv, losses.png      with --save_losses
        checkpoint/state.pt         resumable state (every --save_every iterations, and on Ctrl-C or SIGTERM)
        models/lora_partial.safetensors  an interrupted or diverged run's adapter (metadata complete=false)

Determinism: --seed (default 42; the release had none) seeds one CPU generator that initialises the
adapters and then draws every iteration's t_enc, t and start code: the same seed on the CPU gives a
bitwise-identical adapter, and --resume continues a run exactly where it stopped.
Exit codes: 0 done, 2 bad input, 130 interrupted by Ctrl-C / 143 by SIGTERM (state saved), 1 loss became NaN/inf
(last good adapter kept). The loop itself (resume, snapshots, signals, records) is ldm/erasure/training.py; the
run's settings are one ldm.erasure.settings.TrainSettings.
"""
import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ldm.cli import Parser, add_model_args, ddim_steps_arg, finite, load_model, positive, resolve_image_size, run
from ldm.erasure.io import save_adapter
from ldm.erasure.lora import inject_lora, lora_state_dict
from ldm.erasure.objective import UnGuideObjective, encode_prompts
from ldm.erasure.settings import TrainSettings, num
from ldm.erasure.targets import DEFAULT_TARGETS, describe_targets, select_targets
from ldm.erasure.training import Method, RunFiles, TrainingRun, seeded_generator
from ldm.errors import UserError
from ldm.loader import file_sha256, resolve_device, resolve_dtype
from ldm.prompts import read_prompts_json

DEFAULT_SEED = 42


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train.py", description=__doc__)
    add_model_args(p, "--config_path", "--ckpt_path")
    for action in p._actions:
        if action.dest == "precision":
            action.help = "autocast dtype of the UNet (CUDA; bf16 also on CPU); the weights and adapters stay fp32"
    p.add_argument("--prompts_json", default="data/cat.json",
                   help='{"target": ..., "reference": ...}; a name ending in nsfw.json selects the nsfw preset')
    p.add_argument("--iterations", type=positive(int), default=200,
                   help="optimisation steps")
    p.add_argument("--lr", type=positive(float), default=3e-5,
                   help="Adam learning rate")
    p.add_argument("--output_dir", default="output",
                   help="the run folder goes under it")
    p.add_argument("--run_name", default=None,
                   help="the run's folder under --output_dir (default: the release's name, made of the settings)")
    p.add_argument("--lora_rank", type=positive(int), default=1,
                   help="rank of the adapter")
    p.add_argument("--lora_alpha", type=positive(float), default=8,
                   help="adapter scale (the release's: output = W x + alpha * x A B, not alpha/rank)")
    p.add_argument("--target_modules", nargs="+", default=list(DEFAULT_TARGETS),
                   help="Linear-name suffixes, or one preset: default xattn noxattn nsfw selfattn full")
    p.add_argument("--image_size", type=positive(int), default=None,
                   help="image side in px (default: the config's, 512 for SD, 16 for the toy model)")
    p.add_argument("--ddim_steps", type=ddim_steps_arg, default=50,
                   help="DDIM steps of the partial trajectory's schedule")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seeds adapter init and every random draw (default {DEFAULT_SEED}; the release had none)")
    p.add_argument("--ddim_eta", type=finite, default=0.0,
                   help="DDIM eta of the partial trajectory")
    p.add_argument("--start_guidance", type=finite, default=9.0, help="CFG scale of the partial trajectory")
    p.add_argument("--negative_guidance", type=finite, default=2.0, help="eta of e_0 - eta (e_p - e_0)")
    p.add_argument("--preserve", nargs="+", default=None, metavar="PROMPT",
                   help="ours, off by default: prompts the adapter must not move (adds lambda * mean_k "
                        "||eps_adapted(c_k) - eps_base(c_k)||^2 to the loss; ldm/erasure/objective.py)")
    p.add_argument("--preserve_weight", type=positive(float), default=1.0, help="lambda of --preserve")
    p.add_argument("--schedule", choices=["standard", "release"], default="standard",
                   help="DDIM timesteps: standard (981..1) or release (drops 981: 49 steps from 961)")
    p.add_argument("--save_losses", action="store_true", help="write losses.csv and losses.png")
    p.add_argument("--save_every", type=positive(int), default=50, help="resumable checkpoint every N iterations")
    p.add_argument("--resume", action="store_true", help="continue from <run dir>/checkpoint/state.pt")
    return p


def settings_from_args(args, prompts: dict[str, str]) -> TrainSettings:
    """The run's settings; targets and base_sha256 are filled in once the model and checkpoint are read."""
    nsfw = os.path.basename(args.prompts_json).endswith("nsfw.json")
    preserve = list(args.preserve) if args.preserve else None
    return TrainSettings(
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, targets=[], lr=args.lr,
        target_prompt=prompts["target"], reference_prompt=prompts["reference"], ddim_steps=args.ddim_steps,
        schedule=args.schedule, image_size=args.image_size, start_guidance=args.start_guidance,
        negative_guidance=args.negative_guidance, ddim_eta=args.ddim_eta, base_sha256=None, seed=args.seed,
        preserve=preserve, preserve_weight=args.preserve_weight if preserve else None,
        iterations=args.iterations, config=args.config, ckpt=args.ckpt, prompts_json=args.prompts_json,
        class_name=Path(args.prompts_json).stem, output_dir=args.output_dir, target_modules=args.target_modules,
        target_preset=["nsfw"] if nsfw else args.target_modules, precision=args.precision,
        device=str(resolve_device(args.device)), save_every=args.save_every, save_losses=args.save_losses,
        resume=args.resume, arguments=vars(args))


def run_name(args, class_name: str) -> str:
    """The release's folder name of these arguments (for scripts that look for a run's files)."""
    blank = {"target": "", "reference": ""}
    return settings_from_args(argparse.Namespace(**{**vars(args), "prompts_json": f"{class_name}.json"}),
                              blank).run_name()


def check_input(args, prompts: dict[str, str]):
    """Everything cheap, before loading anything; returns the autocast dtype (None: plain fp32)."""
    if args.preserve and prompts["target"] in args.preserve:
        raise UserError(f"--preserve: {prompts['target']!r} is the target prompt of {args.prompts_json}")
    autocast = resolve_dtype(args.precision, resolve_device(args.device))
    return None if autocast == torch.float32 else autocast


def build_method(model, s: TrainSettings, generator: torch.Generator, autocast) -> Method:
    """UnGuide's method: LoRA adapters on the settings' targets (A drawn from `generator`) and the objective."""
    inject_lora(model.unet, s.targets, rank=s.lora_rank, alpha=s.lora_alpha, generator=generator)
    tensors = lora_state_dict(model.unet, keep_vars=True)
    print(f"adapters: {describe_targets(s.targets)}; rank {s.lora_rank}, alpha {num(s.lora_alpha)}, "
          f"{sum(p.numel() for p in tensors.values()):,} trainable parameters; device {model.device}"
          + (f", autocast {s.precision}" if autocast else ""))
    emb = encode_prompts(model, s.target_prompt, s.reference_prompt, tuple(s.preserve or ()))
    objective = UnGuideObjective(model, emb, model.latent_shape(s.image_size), s.ddim_steps, s.start_guidance,
                                 s.negative_guidance, s.ddim_eta, s.schedule == "release", autocast_dtype=autocast,
                                 preserve_weight=s.preserve_weight or 1.0)
    if s.preserve:
        print(f"preserving {len(s.preserve)} prompts (weight {num(s.preserve_weight)}): "
              + ", ".join(repr(p) for p in s.preserve))

    def save(path: Path, extra: dict[str, str]) -> None:
        save_adapter(path, model.unet, s.lora_alpha, base_sha256=s.base_sha256, extra=extra)
    return Method(tensors, objective, save)


def main(argv: list[str] | None = None) -> int:
    """Train; returns 0, or exits with 2 (bad input), 130 / 143 (interrupted) or 1 (diverged)."""
    try:
        code = _train(build_parser().parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)
    return 0


def _train(args) -> int:
    prompts = read_prompts_json(args.prompts_json, need_reference=True)
    resolve_image_size(args)
    autocast = check_input(args, prompts)
    settings = settings_from_args(args, prompts)
    if settings.target_preset != args.target_modules:
        print(f"{args.prompts_json} ends in nsfw.json: using the nsfw target preset (as the release), "
              f"--target_modules {' '.join(args.target_modules)} ignored")
    run_dir = Path(args.output_dir) / (args.run_name or settings.run_name())
    print(f"run folder: {run_dir}")
    files = RunFiles(run_dir)
    files.check(args.resume)
    if not Path(args.ckpt).exists():
        raise UserError(f"{args.ckpt}: checkpoint not found")
    model, device = load_model(args, precision="fp32")  # weights stay fp32; --precision is the autocast dtype
    model.requires_grad_(False)
    try:
        targets = select_targets(model.unet, settings.target_preset)
        model.latent_shape(settings.image_size)  # the image size against the VAE's factor
    except ValueError as exc:
        spec = " ".join(settings.target_preset)
        raise UserError(f"--target_modules {spec}: {exc}" if "target" in str(exc) else str(exc))
    settings = replace(settings, targets=targets, base_sha256=file_sha256(args.ckpt))
    generator = seeded_generator(settings.seed)  # CPU: adapter init, then every iteration's draws
    method = build_method(model, settings, generator, autocast)
    return TrainingRun(settings, method, generator, files, device, autocast).run()


if __name__ == "__main__":
    run(main)
