"""Erase a concept from Stable Diffusion v1.x: train a LoRA adapter with the ESD/UnGuide objective.

    python train.py --ckpt_path models/sd-v1-4.ckpt --prompts_json data/cat.json --iterations 200 --lr 3e-5
    python train.py --method esd --train_method xattn --ckpt_path models/sd-v1-4.ckpt --prompts_json data/cat.json

--method esd is ESD (Gandikota et al. 2023): ESD's parameter set (--train_method xattn|noxattn|selfattn|full)
fine-tuned as a full-rank delta on one copy of the base model, reference prompt "" and ESD's defaults
(1000 iterations, lr 1e-5, start guidance 3, negative guidance 1, DDIM 50) where a flag is not given; it writes
<output_dir>/method_esd_class_name_<stem>_train_method_<m>_iterations_<n>_lr_<lr>_start_guidance_<g>
_negative_guidance_<eta>_ddim_steps_<S>/models/lora.safetensors (delta_kind "full"), which every generation
script takes as --lora. The LoRA flags (--lora_rank, --lora_alpha, --target_modules, --preserve) mean nothing
there and are refused. --method sepce is SepCE / SRS-ME (ldm/erasure/sepce.py): basis deltas on the cross-attention
keys and values that leave --preserve's prompts' tokens alone, stopped by its momentum rule (--reg_beta, --threshold,
--scale_factor, --sepce_*; SRS-ME's defaults: at most 1000 iterations, lr 1e-6).

Ours, off by default: --preserve (prompts the adapter must not move), the erasure check (--check_*: train on until
the adapter erases), the stored threshold (--calibrate) and adversarial training (--adv_every N: every N iterations
an attacker searches --adv_tokens words in front of the target prompt against the current adapter, UnlearnDiffAtk's
way, and that prompt joins the erasure term: ldm/erasure/adversarial.py; the folder name ends in
_adversarial_<tokens>x<N>).

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
import time
from dataclasses import replace
from pathlib import Path

import torch

from ldm.cli import Parser, add_model_args, ddim_steps_arg, finite, load_model, positive, resolve_image_size, run
from ldm.erasure.delta import remove_delta
from ldm.erasure.methods import METHODS, build_unguide
from ldm.erasure.settings import TrainSettings
from ldm.erasure.targets import DEFAULT_TARGETS, ESD_TRAIN_METHODS, esd_layers, select_targets
from ldm.erasure.training import RESTART_SEED_STRIDE, RunFiles, TrainingRun, seeded_generator
from ldm.errors import UserError
from ldm.loader import file_sha256, resolve_device, resolve_dtype
from ldm.prompts import read_prompts_json

DEFAULT_SEED = 42
# Each method's defaults, applied where the flag is not given (ESD's: its train-esd.py).
METHOD_DEFAULTS = {
    "unguide": {"iterations": 200, "lr": 3e-5, "start_guidance": 9.0, "negative_guidance": 2.0, "lora_rank": 1,
                "lora_alpha": 8, "target_modules": list(DEFAULT_TARGETS), "preserve_weight": 1.0},
    "esd": {"iterations": 1000, "lr": 1e-5, "start_guidance": 3.0, "negative_guidance": 1.0, "train_method": "xattn"},
    # SepCE's release defaults (SRS_ME.py); start/negative guidance are not used by its objective
    "sepce": {"iterations": 1000, "lr": 1e-6, "start_guidance": 3.0, "negative_guidance": 1.0},
}
LORA_ONLY = ("lora_rank", "lora_alpha", "target_modules", "preserve", "preserve_weight")
REFUSED = {"unguide": ("train_method",), "esd": LORA_ONLY,                  # flags that mean nothing for a method
           "sepce": ("lora_rank", "lora_alpha", "target_modules", "preserve_weight", "train_method")}
build_method = build_unguide  # the name tests and benchmarks know


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train.py", description=__doc__)
    add_model_args(p, "--config_path", "--ckpt_path")
    for action in p._actions:
        if action.dest == "precision":
            action.help = "autocast dtype of the UNet (CUDA; bf16 also on CPU); the weights and adapters stay fp32"
    p.add_argument("--prompts_json", default="data/cat.json",
                   help='{"target": ..., "reference": ...} (README: Files)')
    p.add_argument("--nsfw_preset", choices=["auto", "on", "off"], default="auto",
                   help="the nsfw layer preset: auto = when the JSON's name ends in nsfw.json (the release's rule, "
                        "said in the log); on; off (--target_modules as given)")
    p.add_argument("--method", choices=list(METHODS), default="unguide",
                   help="unguide (a LoRA, the release), esd (ESD's full fine-tuning of --train_method's parameters) "
                        "or sepce (SepCE's separable basis deltas; --preserve: the prompts they leave alone)")
    p.add_argument("--train_method", choices=list(ESD_TRAIN_METHODS), default=None,
                   help="--method esd: which UNet parameters ESD trains (default xattn)")
    p.add_argument("--iterations", type=positive(int), default=None, help="optimisation steps; default 200 (esd: 1000)")
    p.add_argument("--lr", type=positive(float), default=None, help="Adam learning rate; default 3e-5 (esd: 1e-5)")
    p.add_argument("--output_dir", default="output", help="the run folder goes under it")
    p.add_argument("--run_name", default=None,
                   help="the run's folder under --output_dir (default: the release's name, made of the settings)")
    p.add_argument("--lora_rank", type=positive(int), default=None, help="rank of the adapter; default 1")
    p.add_argument("--lora_alpha", type=positive(float), default=None,
                   help="adapter scale, default 8 (the release's: output = W x + alpha * x A B, not alpha/rank)")
    p.add_argument("--target_modules", nargs="+", default=None,
                   help="Linear-name suffixes, or one preset: default xattn noxattn nsfw selfattn full "
                        "(default: attn2.to_k attn2.to_v)")
    p.add_argument("--image_size", type=positive(int), default=None,
                   help="image side in px (default: the config's, 512 for SD, 16 for the toy model)")
    p.add_argument("--ddim_steps", type=ddim_steps_arg, default=50,
                   help="DDIM steps of the partial trajectory's schedule")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seeds adapter init and every random draw (default {DEFAULT_SEED}; the release had none)")
    p.add_argument("--ddim_eta", type=finite, default=0.0, help="DDIM eta of the partial trajectory")
    p.add_argument("--start_guidance", type=finite, default=None,
                   help="CFG scale of the partial trajectory, default 9 (esd: 3)")
    p.add_argument("--negative_guidance", type=finite, default=None,
                   help="eta of e_0 - eta (e_p - e_0), default 2 (esd: 1)")
    p.add_argument("--preserve", nargs="+", default=None, metavar="PROMPT",
                   help="ours, off by default: prompts the adapter must not move (adds lambda * mean_k "
                        "||eps_adapted(c_k) - eps_base(c_k)||^2 to the loss; ldm/erasure/objective.py)")
    p.add_argument("--preserve_weight", type=positive(float), default=None, help="lambda of --preserve (default 1)")
    p.add_argument("--erase_synonyms", action="store_true",
                   help="ours, off by default: each iteration erases the target or one of the JSON's \"synonyms\" "
                        "(drawn uniformly), not the target alone")
    p.add_argument("--schedule", choices=["standard", "release"], default="standard",
                   help="DDIM timesteps: standard (981..1) or release (drops 981: 49 steps from 961)")
    p.add_argument("--save_losses", action="store_true", help="write losses.csv and losses.png")
    g = p.add_argument_group("--method sepce (SRS-ME's release defaults)")
    g.add_argument("--reg_beta", type=finite, default=1e-5, help="beta of the L1 penalty on dW")
    g.add_argument("--threshold", type=finite, default=5e-5, help="momentum stop: EMA (0.9) of corr below this")
    g.add_argument("--scale_factor", type=finite, default=1e-2, help="alpha of dW = alpha V B")
    g.add_argument("--sepce_tokens", choices=["all", "content"], default="all",
                   help="preserved tokens: all 77 of each prompt, or its content tokens (narrow text spaces)")
    g.add_argument("--sepce_rtol", type=finite, default=1e-6, help="null space: singular values <= rtol * max")
    g.add_argument("--sepce_pad_rtol", type=finite, default=None,
                   help="--sepce_tokens content: tolerance for the padding tokens (default: ignore them)")
    g.add_argument("--sepce_images", type=positive(int), default=20, help="concept images drawn by the base model")
    c = p.add_argument_group("erasure check (ours, off by default: ldm/erasure/check.py)")
    c.add_argument("--check_every", type=int, default=0,
                   help="every N iterations and at the end: d(target)/d(\"\") (and, with --check_judge, the "
                        "adapter-alone concept rate); not passed at the end: train on up to --check_max_iterations")
    c.add_argument("--check_min_ratio", type=finite, default=1.5, help="passed needs d(target)/d(\"\") >= this")
    c.add_argument("--check_judge", choices=["none", "digits", "nudenet"], default="none",
                   help="judge of the adapter-alone images (digits: the toy world's classifier)")
    c.add_argument("--check_max_rate", type=finite, default=0.1,
                   help="passed needs an adapter-alone concept rate <= this (with a judge)")
    c.add_argument("--check_samples", type=positive(int), default=8, help="adapter-alone images per check")
    c.add_argument("--check_min_kept", type=finite, default=0.0,
                   help="with --check_judge digits and --preserve: passed also needs every preserved prompt's "
                        "adapter-alone images judged as its own digit in at least this share (preserved prompts "
                        "naming no digit, e.g. '', have no class to keep and are not judged; 0: not checked)")
    c.add_argument("--check_restarts", type=int, default=0,
                   help="an adapter that has not passed by --check_max_iterations is dropped and the run starts over "
                        "from a fresh one, up to this many times (attempt k draws from --seed + 1000 k; the run keeps "
                        "the first attempt that passes, else the last; train_config.json records every attempt)")
    c.add_argument("--check_t_enc", type=int, default=None,
                   help="the check's stability test: t_enc (default --ddim_steps // 2: 25 of 50)")
    c.add_argument("--check_max_iterations", type=int, default=None,
                   help="train on while not passed, up to this many iterations (default 2 x --iterations)")
    a = p.add_argument_group("adversarial training (ours, off by default: ldm/erasure/adversarial.py)")
    a.add_argument("--adv_every", type=int, default=0,
                   help="every N iterations an attacker searches words in front of the target prompt against the "
                        "current adapter (UnlearnDiffAtk's loss); its prompt joins the erasure term (0: off)")
    a.add_argument("--adv_tokens", type=positive(int), default=3, help="the attacker's words")
    a.add_argument("--adv_steps", type=positive(int), default=5, help="its Adam steps per search")
    a.add_argument("--adv_weight", type=positive(float), default=1.0, help="beta of the adversarial erasure term")
    a.add_argument("--adv_images", type=positive(int), default=8, help="concept images the base model draws for it")
    a.add_argument("--adv_decision_weight", type=finite, default=0.0,
                   help="the attacker also pushes the stability test's d(p) under d(\"\") (at --calibrate_t_enc), "
                        "with this weight, as the test attack's decision term (0: its denoising loss alone)")
    k = p.add_argument_group("the adapter's threshold (ours: ldm/erasure/calibration.py)")
    k.add_argument("--calibrate", choices=["auto", "on", "off"], default="auto",
                   help="at the end, learn the stability test's threshold from the prompts JSON's concept and other "
                        "prompts and store it in the adapter (generation's default decision uses it); auto: when "
                        "the JSON lists other prompts")
    k.add_argument("--calibrate_repeats", type=positive(int), default=10, help="its stability-test draws per prompt")
    k.add_argument("--calibrate_t_enc", type=int, default=None,
                   help="its partial trajectory's t_enc (default 4/5 of --ddim_steps: 40 of 50, as "
                        "generate_images.py's on-the-fly test)")
    p.add_argument("--save_every", type=positive(int), default=50, help="resumable checkpoint every N iterations")
    p.add_argument("--resume", action="store_true", help="continue from <run dir>/checkpoint/state.pt")
    return p


def apply_method_defaults(args) -> None:
    """Fill in the method's defaults for the flags not given (in place; idempotent); UserError for flags that
    mean nothing for the chosen method."""
    given = getattr(args, "_given", None)
    if given is None:  # first call: remember which flags the user gave
        given = args._given = [k for k in (*LORA_ONLY, "train_method") if getattr(args, k, None) is not None]
    refused = [k for k in given if k in REFUSED[args.method]]
    if refused and args.method == "unguide":
        raise UserError("--train_method: ESD's parameter sets, for --method esd (UnGuide: --target_modules)")
    if refused:
        flags = ", ".join(f"--{k}" for k in refused)
        raise UserError(f"{flags}: not options of --method {args.method} (" + (
            "it trains a full-rank delta; choose its parameters with --train_method)" if args.method == "esd" else
            "its deltas sit on the cross-attention keys and values; --preserve names the prompts they leave alone)"))
    for key, value in METHOD_DEFAULTS[args.method].items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)


def settings_from_args(args, prompts: dict[str, str]) -> TrainSettings:
    """The run's settings; targets and base_sha256 are filled in once the model and checkpoint are read."""
    apply_method_defaults(args)
    if args.method != "unguide":
        settings = _full_rank_settings(args, prompts)
        if args.method == "sepce":
            settings = replace(settings, preserve=list(args.preserve or []), target_preset=["default"], train_method=None,
                               sepce={"reg_beta": args.reg_beta, "threshold": args.threshold,
                                      "scale_factor": args.scale_factor, "tokens": args.sepce_tokens,
                                      "rtol": args.sepce_rtol, "pad_rtol": args.sepce_pad_rtol,
                                      "images": args.sepce_images})
        return settings
    nsfw = (args.nsfw_preset == "on" or
            args.nsfw_preset == "auto" and os.path.basename(args.prompts_json).endswith("nsfw.json"))
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
        resume=args.resume, arguments=_arguments(args), adversarial=_adversarial(args),
        erase_also=_erase_also(args, prompts))


def _erase_also(args, prompts: dict) -> list[str] | None:
    """--erase_synonyms: the prompts JSON's synonyms (an error when it lists none)."""
    if not getattr(args, "erase_synonyms", False):
        return None
    also = [p for p in prompts.get("synonyms") or [] if p and p != prompts["target"]]
    if not also:
        raise UserError(f"--erase_synonyms: {args.prompts_json} lists no \"synonyms\"")
    return also


def _adversarial(args) -> dict | None:
    """--adv_*: the adversarial term's settings (None: off)."""
    if not getattr(args, "adv_every", 0):
        return None
    from ldm.erasure.adversarial import AdversarySettings
    try:
        return AdversarySettings(every=args.adv_every, tokens=args.adv_tokens, steps=args.adv_steps,
                                 weight=args.adv_weight, images=args.adv_images,
                                 decision_weight=args.adv_decision_weight,
                                 t_enc=args.calibrate_t_enc if args.adv_decision_weight > 0 else None).record()
    except ValueError as exc:
        raise UserError(f"--adv_*: {exc}")


def _arguments(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _full_rank_settings(args, prompts: dict[str, str]) -> TrainSettings:
    """ESD's settings: no LoRA fields, reference "" (ESD's e_0 = eps*(z, t, "")), its train_method."""
    return TrainSettings(
        lora_rank=None, lora_alpha=None, targets=[], lr=args.lr, target_prompt=prompts["target"],
        reference_prompt="", ddim_steps=args.ddim_steps, schedule=args.schedule, image_size=args.image_size,
        start_guidance=args.start_guidance, negative_guidance=args.negative_guidance, ddim_eta=args.ddim_eta,
        base_sha256=None, seed=args.seed, preserve=None, preserve_weight=None, method=args.method,
        train_method=args.train_method, iterations=args.iterations, config=args.config, ckpt=args.ckpt,
        prompts_json=args.prompts_json, class_name=Path(args.prompts_json).stem, output_dir=args.output_dir,
        target_modules=[], target_preset=[args.train_method], precision=args.precision,
        device=str(resolve_device(args.device)), save_every=args.save_every, save_losses=args.save_losses,
        resume=args.resume, arguments=_arguments(args), adversarial=_adversarial(args),
        erase_also=_erase_also(args, prompts))


def run_name(args, class_name: str) -> str:
    """The release's folder name of these arguments (for scripts that look for a run's files)."""
    blank = {"target": "", "reference": ""}
    return settings_from_args(argparse.Namespace(**{**vars(args), "prompts_json": f"{class_name}.json"}),
                              blank).run_name()


def check_input(args, prompts: dict[str, str]):
    """Everything cheap, before loading anything; returns the autocast dtype (None: plain fp32)."""
    if args.check_every < 0:
        raise UserError(f"--check_every {args.check_every}: must be >= 0 (0: no erasure check)")
    if args.check_t_enc is None:
        args.check_t_enc = args.ddim_steps // 2
    if args.check_every and not 0 <= args.check_t_enc < args.ddim_steps:
        raise UserError(f"--check_t_enc {args.check_t_enc}: must be in 0..{args.ddim_steps - 1} (--ddim_steps)")
    if args.calibrate_t_enc is None:
        args.calibrate_t_enc = (4 * args.ddim_steps) // 5
    if args.calibrate != "off" and not 0 <= args.calibrate_t_enc < args.ddim_steps:
        raise UserError(f"--calibrate_t_enc {args.calibrate_t_enc}: must be in 0..{args.ddim_steps - 1} "
                        "(--ddim_steps)")
    if args.check_every and args.check_min_kept > 0 and (args.check_judge != "digits" or not args.preserve):
        raise UserError(f"--check_min_kept {args.check_min_kept}: judges the --preserve prompts' images by their own "
                        "class, which needs --check_judge digits and --preserve")
    if args.check_restarts < 0 or (args.check_restarts and not args.check_every):
        raise UserError(f"--check_restarts {args.check_restarts}: must be >= 0, and restarts need the erasure check "
                        "(--check_every N)")
    if args.adv_every < 0:
        raise UserError(f"--adv_every {args.adv_every}: must be >= 0 (0: no adversarial term)")
    if args.adv_every and args.method == "sepce":
        raise UserError("--adv_every: the adversarial term joins the ESD objective (--method unguide or esd); "
                        "--method sepce has its own")
    if args.check_every and args.method == "sepce":
        raise UserError("--check_every: the erasure check trains on by the ESD objective's iterations; --method sepce "
                        "stops by its own momentum rule")
    if args.preserve and prompts["target"] in args.preserve:
        raise UserError(f"--preserve: {prompts['target']!r} is the target prompt of {args.prompts_json}")
    autocast = resolve_dtype(args.precision, resolve_device(args.device))
    return None if autocast == torch.float32 else autocast


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
    apply_method_defaults(args)
    prompts = read_prompts_json(args.prompts_json, need_reference=args.method == "unguide")
    resolve_image_size(args)
    autocast = check_input(args, prompts)
    settings = settings_from_args(args, prompts)
    if args.method == "unguide" and settings.target_preset != args.target_modules:
        print(f"{'--nsfw_preset on' if args.nsfw_preset == 'on' else args.prompts_json + ' ends in nsfw.json'}: using "
              f"the nsfw target preset (as the release; --nsfw_preset off to keep --target_modules "
              f"{' '.join(args.target_modules)})")
    run_dir = Path(args.output_dir) / (args.run_name or settings.run_name())
    print(f"run folder: {run_dir}")
    files = RunFiles(run_dir)
    files.check(args.resume)
    if not Path(args.ckpt).exists():
        raise UserError(f"{args.ckpt}: checkpoint not found")
    model, device = load_model(args, precision="fp32")  # weights stay fp32; --precision is the autocast dtype
    model.requires_grad_(False)
    try:
        targets = (esd_layers(model.unet, args.train_method) if args.method == "esd"
                   else select_targets(model.unet, settings.target_preset))
        model.latent_shape(settings.image_size)  # the image size against the VAE's factor
    except ValueError as exc:
        spec = " ".join(settings.target_preset)
        flag = "--target_modules" if args.method == "unguide" else "--train_method"
        raise UserError(f"{flag} {spec}: {exc}" if "target" in str(exc) or "train" in str(exc) else str(exc))
    settings = replace(settings, targets=targets, base_sha256=file_sha256(args.ckpt))
    generator = seeded_generator(settings.seed)  # CPU: adapter init, then every iteration's draws
    method = METHODS[args.method](model, settings, generator, autocast)
    check = erasure_check(args, model, settings)
    calibrate = calibration(args, model, settings, prompts)

    def restart(attempt: int):
        """--check_restarts: attempt k's fresh method, its draws from seed + RESTART_SEED_STRIDE * k."""
        remove_delta(model.unet, "lora")
        g = seeded_generator(settings.seed + RESTART_SEED_STRIDE * attempt)
        return METHODS[args.method](model, settings, g, autocast), g
    return TrainingRun(settings, method, generator, files, device, autocast, check, calibrate,
                       restart=restart, restarts=args.check_restarts).run()


def calibration(args, model, settings: TrainSettings, prompts: dict):
    """--calibrate: () -> the finished adapter's calibration record (None when off, or auto and the JSON lists no
    other prompts to separate the concept from)."""
    from ldm.erasure.calibration import json_prompts, measure
    _, others = json_prompts(prompts)
    if args.calibrate == "off" or (args.calibrate == "auto" and not others):
        if args.calibrate == "auto":
            print(f"{args.prompts_json}: no other prompts; the adapter stores no calibrated threshold "
                  "(--calibrate on to calibrate against d(\"\") alone)")
        return None
    from ldm.erasure.protocols import Protocol
    from ldm.erasure.stability import StabilitySettings
    protocol = Protocol("fast", StabilitySettings(settings.ddim_steps, args.calibrate_t_enc, 7.5),
                        repeats=args.calibrate_repeats)
    shape = model.latent_shape(settings.image_size)

    def run() -> dict | None:
        from ldm.erasure.budget import UNetCounter
        t0 = time.time()
        try:
            with torch.no_grad(), UNetCounter(model.unet) as counter:  # no graph: the adapter still requires grad
                record = measure(model, protocol, shape, prompts, settings.seed)
        except ValueError as exc:  # e.g. d("") = 0: an adapter that moves nothing
            print(f"note: no calibrated threshold stored: {exc}", file=sys.stderr)
            return None
        return {**record, "unet_sample_evaluations": counter.samples, "seconds": round(time.time() - t0, 2)}
    return run


def erasure_check(args, model, settings: TrainSettings):
    """The --check_* flags' ErasureCheck (None when --check_every is 0)."""
    if not args.check_every:
        return None
    from ldm.erasure.check import CheckSettings, ErasureCheck
    from ldm.erasure.stability import StabilitySettings
    cs = CheckSettings(every=args.check_every, min_ratio=args.check_min_ratio, max_rate=args.check_max_rate,
                       max_iterations=(args.check_max_iterations if args.check_max_iterations is not None
                                       else 2 * settings.iterations),
                       samples=args.check_samples, seed=settings.seed, min_kept=args.check_min_kept)
    stability = StabilitySettings(settings.ddim_steps, args.check_t_enc, 7.5)
    preserve = None
    if args.check_min_kept > 0:  # every preserved prompt that names a digit ("" names none: nothing to keep)
        from ldm.evaluation.digits import digit_of_text
        named = [p for p in settings.preserve or [] if digit_of_text(p) is not None]
        if not named:
            raise UserError(f"--check_min_kept {args.check_min_kept}: no --preserve prompt names a digit to keep")
        preserve = {p: _check_judge("digits", model, p) for p in named}
    return ErasureCheck(model, settings.target_prompt, cs, stability, model.latent_shape(settings.image_size),
                        judge=_check_judge(args.check_judge, model, settings.target_prompt),
                        steps=settings.ddim_steps, preserve=preserve)


def _check_judge(name: str, model, prompt: str):
    """--check_judge: latents -> booleans (decoded by the model's VAE, judged by ldm.attacks.judges: does the image
    show what `prompt` names)."""
    if name == "none":
        return None
    from ldm.attacks.judges import digits_judge, nudenet_judge
    from ldm.images import to_pil
    judge = digits_judge(prompt) if name == "digits" else nudenet_judge()
    return lambda z: judge(to_pil(model.decode_first_stage(z)))


if __name__ == "__main__":
    run(main)
