"""Erase a concept from Stable Diffusion v1.x: train a LoRA adapter with the ESD/UnGuide objective.

    python train.py --ckpt_path models/sd-v1-4.ckpt --prompts_json data/cat.json --iterations 200 --lr 3e-5

One copy of the base model is loaded: the frozen predictions e_0/e_p come from the same weights with the
adapters switched off (ldm/erasure/objective.py). Output, as the UnGuide release:
    <output_dir>/class_name_<json stem>_lora_rank_<r>_lora_alpha_<a>_iterations_<n>_lr_<lr>_start_guidance_<g>
        _negative_guidance_<eta>_ddim_steps_<S>/
        models/lora.safetensors     the adapter (only a finished run writes it; release format: see ldm/erasure/io.py)
        train_config.json           the release's keys + every argument, losses, timing, memory, status
        losses.csv, losses.png      with --save_losses
        checkpoint/state.pt         resumable state (every --save_every iterations, and on Ctrl-C)
        models/lora_partial.safetensors  an interrupted or diverged run's adapter (metadata complete=false)

Determinism: --seed (default 42; the release had none) seeds one CPU generator that initialises the
adapters and then draws every iteration's t_enc, t and start code: the same seed on the CPU gives a
bitwise-identical adapter, and --resume continues a run exactly where it stopped.
Exit codes: 0 done, 2 bad input, 130 interrupted (state saved), 1 loss became NaN/inf (last good adapter kept).
"""
import argparse
import csv
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldm.loader import file_sha256
from ldm.cli import add_model_args, load_model, positive, run, write_json
from ldm.erasure.io import save_adapter
from ldm.erasure.lora import inject_lora, lora_parameters, lora_state_dict
from ldm.erasure.objective import UnGuideObjective, encode_prompts
from ldm.erasure.targets import DEFAULT_TARGETS, describe_targets, select_targets
from ldm.prompts import read_prompts_json
from ldm.errors import UserError
from ldm.loader import resolve_device, resolve_dtype

DEFAULT_SEED = 42
EXIT_DIVERGED = 1
EXIT_INTERRUPTED = 130
# Arguments that must match for --resume to continue a run (everything that changes what is trained).
RESUME_KEYS = ("lora_rank", "lora_alpha", "targets", "lr", "target_prompt", "reference_prompt", "ddim_steps",
               "schedule", "image_size", "start_guidance", "negative_guidance", "ddim_eta", "base_sha256", "seed",
               "preserve", "preserve_weight")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, "--config_path", "--ckpt_path")
    for action in p._actions:
        if action.dest == "precision":
            action.help = "autocast dtype of the UNet (CUDA; bf16 also on CPU); the weights and adapters stay fp32"
    p.add_argument("--prompts_json", default="data/cat.json",
                   help='{"target": ..., "reference": ...}; a name ending in nsfw.json selects the nsfw preset')
    p.add_argument("--iterations", type=positive(int), default=200)
    p.add_argument("--lr", type=positive(float), default=3e-5)
    p.add_argument("--output_dir", default="output")
    p.add_argument("--lora_rank", type=positive(int), default=1)
    p.add_argument("--lora_alpha", type=positive(float), default=8,
                   help="adapter scale (the release's: output = W x + alpha * x A B, not alpha/rank)")
    p.add_argument("--target_modules", nargs="+", default=list(DEFAULT_TARGETS),
                   help="Linear-name suffixes, or one preset: default xattn noxattn nsfw selfattn full")
    p.add_argument("--image_size", type=positive(int), default=512)
    p.add_argument("--ddim_steps", type=positive(int), default=50)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seeds adapter init and every random draw (default {DEFAULT_SEED}; the release had none)")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--start_guidance", type=float, default=9.0, help="CFG scale of the partial trajectory")
    p.add_argument("--negative_guidance", type=float, default=2.0, help="eta of e_0 - eta (e_p - e_0)")
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


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def run_name(args, class_name: str) -> str:
    """The release's directory name, e.g. class_name_cat_lora_rank_1_lora_alpha_8_iterations_200_lr_3e-05_..."""
    parts = {"class_name": class_name, "lora_rank": args.lora_rank, "lora_alpha": _num(args.lora_alpha),
             "iterations": args.iterations, "lr": args.lr, "start_guidance": args.start_guidance,
             "negative_guidance": args.negative_guidance, "ddim_steps": args.ddim_steps}
    if args.preserve:  # ours, not the release's: its own folder
        parts.update(preserve=len(args.preserve), preserve_weight=_num(args.preserve_weight))
    return "_".join(f"{k}_{v}" for k, v in parts.items())


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Interrupts:
    """SIGINT outside the optimizer update raises KeyboardInterrupt at once (the iteration in progress is
    dropped: nothing of it was applied); during the update it is deferred to the end of the iteration."""

    def __init__(self):
        self.critical, self.pending = False, False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: keep the default behaviour
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handler(self, signum, frame):
        if self.critical:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def leave_critical(self):
        self.critical = False
        if self.pending:
            raise KeyboardInterrupt


def _write_losses(run_dir: Path, losses: list[float]) -> str:
    with open(run_dir / "losses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "loss"])
        w.writerows((i, repr(v)) for i, v in enumerate(losses))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "losses.csv written; losses.png skipped (matplotlib is not installed)"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8, label="loss")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = torch.tensor(losses).unfold(0, k, 1).mean(1).tolist()
        ax.plot(range(k - 1, len(losses)), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MSE loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "losses.png", dpi=100)
    plt.close(fig)
    return "losses.csv and losses.png written"


def main(argv: list[str] | None = None) -> int:
    """Train; returns 0, or exits with 2 (bad input), 130 (interrupted) or 1 (diverged)."""
    try:
        code = _train(build_parser().parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)
    return 0


def _train(args) -> int:
    # ---- validate everything cheap before loading anything ---------------------------------------------
    prompts = read_prompts_json(args.prompts_json, need_reference=True)
    if args.preserve and prompts["target"] in args.preserve:
        raise UserError(f"--preserve: {prompts['target']!r} is the target prompt of {args.prompts_json}")
    if args.ddim_steps > 1000:
        raise UserError(f"--ddim_steps {args.ddim_steps}: at most 1000")
    if args.image_size % 8:
        raise UserError(f"--image_size {args.image_size}: must be a multiple of 8")
    device = resolve_device(args.device)
    autocast = resolve_dtype(args.precision, device)
    autocast = None if autocast == torch.float32 else autocast
    class_name = Path(args.prompts_json).stem
    spec = args.target_modules
    if os.path.basename(args.prompts_json).endswith("nsfw.json"):
        print(f"{args.prompts_json} ends in nsfw.json: using the nsfw target preset (as the release), "
              f"--target_modules {' '.join(args.target_modules)} ignored")
        spec = ["nsfw"]
    run_dir = Path(args.output_dir) / run_name(args, class_name)
    state_path = run_dir / "checkpoint" / "state.pt"
    final_path = run_dir / "models" / "lora.safetensors"
    partial_path = run_dir / "models" / "lora_partial.safetensors"
    if args.resume and not state_path.is_file():
        raise UserError(f"--resume: no checkpoint at {state_path}"
                        + (" (that run already finished)" if final_path.is_file() else ""))
    if not args.resume and state_path.is_file():
        raise UserError(f"{run_dir} holds an unfinished run ({state_path}); pass --resume to continue it, "
                        "or delete that directory to start over")
    if not Path(args.ckpt).is_file():
        raise UserError(f"{args.ckpt}: checkpoint not found")

    # ---- one copy of the model, frozen, with adapters ---------------------------------------------------
    model, device = load_model(args, precision="fp32")  # weights stay fp32; --precision is the autocast dtype
    model.requires_grad_(False)
    try:
        targets = select_targets(model.unet, spec)
        latent_shape = model.latent_shape(args.image_size)
    except ValueError as exc:
        raise UserError(f"--target_modules {' '.join(spec)}: {exc}" if "target" in str(exc) else str(exc))
    base_sha256 = file_sha256(args.ckpt)
    generator = torch.Generator().manual_seed(args.seed)  # CPU: adapter init, then every iteration's draws
    torch.manual_seed(args.seed)
    inject_lora(model.unet, targets, rank=args.lora_rank, alpha=args.lora_alpha, generator=generator)
    params = lora_parameters(model.unet)
    print(f"adapters: {describe_targets(targets)}; rank {args.lora_rank}, alpha {_num(args.lora_alpha)}, "
          f"{sum(p.numel() for p in params):,} trainable parameters; device {device}"
          + (f", autocast {args.precision}" if autocast else ""))
    preserve = tuple(args.preserve or ())
    emb = encode_prompts(model, prompts["target"], prompts["reference"], preserve)
    objective = UnGuideObjective(model, emb, latent_shape, args.ddim_steps, args.start_guidance,
                                 args.negative_guidance, args.ddim_eta, args.schedule == "release",
                                 autocast_dtype=autocast, preserve_weight=args.preserve_weight)
    if preserve:
        print(f"preserving {len(preserve)} prompts (weight {_num(args.preserve_weight)}): "
              + ", ".join(repr(p) for p in preserve))
    optimizer = torch.optim.Adam(params, lr=args.lr)
    scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None

    fingerprint = {"lora_rank": args.lora_rank, "lora_alpha": float(args.lora_alpha), "targets": targets,
                   "lr": float(args.lr), "target_prompt": prompts["target"], "reference_prompt": prompts["reference"],
                   "ddim_steps": args.ddim_steps, "schedule": args.schedule, "image_size": args.image_size,
                   "start_guidance": float(args.start_guidance), "negative_guidance": float(args.negative_guidance),
                   "ddim_eta": float(args.ddim_eta), "base_sha256": base_sha256, "seed": args.seed,
                   "preserve": list(preserve) or None,
                   "preserve_weight": float(args.preserve_weight) if preserve else None}
    losses: list[float] = []
    start, train_seconds = 0, 0.0
    if args.resume:
        start, losses, train_seconds = _load_state(state_path, fingerprint, model, optimizer, generator, scaler)
        print(f"resumed from {state_path} at iteration {start}/{args.iterations}")

    config = {  # the release's keys first, then ours
        "config": args.config, "ckpt": args.ckpt, "lora_rank": args.lora_rank,
        "lora_alpha": int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha,
        "target_modules": args.target_modules, "iterations": args.iterations, "lr": args.lr,
        "image_size": args.image_size, "ddim_steps": args.ddim_steps, "ddim_eta": args.ddim_eta,
        "start_guidance": args.start_guidance, "negative_guidance": args.negative_guidance,
        "target_prompt": prompts["target"], "reference_prompt": prompts["reference"],
        "preserve": list(preserve), "preserve_weight": args.preserve_weight if preserve else None,
        "prompts_json": args.prompts_json, "class_name": class_name, "final_loss": None, "average_loss": None,
        "arguments": vars(args), "seed": args.seed, "schedule": args.schedule, "precision": args.precision,
        "target_preset": spec, "target_layers": targets, "base_sha256": base_sha256, "device": str(device),
        "torch_version": torch.__version__, "status": "running", "iterations_done": start,
    }

    def save_state(done: int, gen_state: torch.Tensor) -> None:
        _atomic_torch_save({
            "iteration": done, "args": fingerprint, "generator": gen_state,
            "torch_rng": torch.get_rng_state(),
            "lora": {k: v.cpu().clone() for k, v in lora_state_dict(model.unet).items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {},
            "losses": torch.tensor(losses, dtype=torch.float64), "train_seconds": float(train_seconds),
        }, state_path)

    def finish(status: str, path: Path, done: int) -> None:
        mem, kind = peak_memory(device)
        extra = {"complete": "true" if status == "complete" else "false", "status": status,
                 "iterations_done": str(done), "class_name": class_name, "target_prompt": prompts["target"],
                 "reference_prompt": prompts["reference"], "lr": repr(float(args.lr)), "seed": str(args.seed),
                 "schedule": args.schedule, "ddim_steps": str(args.ddim_steps)}
        save_adapter(path, model.unet, args.lora_alpha, base_sha256=base_sha256, extra=extra)
        n_new = done - start
        config.update({
            "status": status, "iterations_done": done, "adapter": str(path),
            "final_loss": losses[-1] if losses else None,
            "average_loss": sum(losses) / len(losses) if losses else None,
            "seconds_per_iteration": train_seconds / done if done else None,
            "seconds_per_iteration_this_session": session_seconds / n_new if n_new > 0 else None,
            "peak_memory_bytes": mem, "peak_memory_kind": kind, "peak_memory_gib": round(mem / 2 ** 30, 3),
        })
        write_json(run_dir / "train_config.json", config)
        if args.save_losses:
            print(_write_losses(run_dir, losses))

    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "train_config.json", config)

    session_seconds = 0.0
    done = start
    gen_state = generator.get_state()
    snapshot = None  # the adapter of the last iteration whose loss was finite
    interrupts = _Interrupts()
    bar = tqdm(total=args.iterations, initial=start, desc=f"erasing {class_name}", dynamic_ncols=True)
    try:
        with interrupts:
            for i in range(start, args.iterations):
                gen_state = generator.get_state()
                tic = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss, plan = objective.loss(generator)
                value = float(loss.detach())
                if not torch.isfinite(torch.tensor(value)):
                    bar.close()
                    if snapshot is not None:
                        _restore(model.unet, snapshot)
                        finish("diverged", partial_path, i - 1)
                        where = f"the adapter of iteration {i - 1} (the last finite loss) saved as {partial_path}"
                    else:
                        where = "no adapter saved (the first loss was already non-finite)"
                    print(f"error: the loss became {value} at iteration {i} (t_enc {plan.t_enc}, t {plan.t}); "
                          f"stopped; {where}; try a lower --lr", file=sys.stderr)
                    return EXIT_DIVERGED
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                snapshot = {k: v.clone() for k, v in lora_state_dict(model.unet).items()}
                interrupts.critical = True  # the update, the loss record and the count belong together
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                losses.append(value)
                done = i + 1
                dt = time.perf_counter() - tic
                session_seconds += dt
                train_seconds += dt
                gen_state = generator.get_state()
                interrupts.leave_critical()
                bar.update(1)
                bar.set_postfix(loss=f"{value:.5f}", t_enc=plan.t_enc)
                if done % args.save_every == 0 and done < args.iterations:
                    save_state(done, gen_state)
    except KeyboardInterrupt:
        bar.close()
        save_state(done, gen_state)
        finish("interrupted", partial_path, done)
        print(f"interrupted at iteration {done}/{args.iterations}: resumable state in {state_path}, partial adapter "
              f"in {partial_path}; continue with the same command plus --resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    bar.close()
    finish("complete", final_path, done)
    for stale in (partial_path, state_path):
        stale.unlink(missing_ok=True)
    print(f"saved {final_path} and {run_dir / 'train_config.json'}; final loss {losses[-1]:.6f}, "
          f"mean {config['average_loss']:.6f}, {config['seconds_per_iteration']:.3f} s/it, peak memory "
          f"{config['peak_memory_gib']} GiB ({config['peak_memory_kind']})")
    return 0


@torch.no_grad()
def _restore(unet, tensors: dict[str, torch.Tensor]) -> None:
    for k, v in lora_state_dict(unet).items():  # views of the adapter parameters
        v.copy_(tensors[k])


def _load_state(path: Path, fingerprint: dict, model, optimizer, generator, scaler):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
    if not isinstance(state, dict) or not {"iteration", "args", "generator", "lora", "optimizer"} <= set(state):
        raise UserError(f"{path}: not a training checkpoint of train.py")
    saved = state["args"]
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {fingerprint[k]!r}" for k in RESUME_KEYS
            if saved.get(k) != fingerprint[k]]
    if diff:
        raise UserError(f"{path}: cannot resume, the run's settings differ ({'; '.join(diff)[:400]})")
    if set(lora_state_dict(model.unet)) != set(state["lora"]):
        raise UserError(f"{path}: its adapter tensors do not match the selected layers")
    _restore(model.unet, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["iteration"]), [float(v) for v in state["losses"]], float(state.get("train_seconds", 0.0))


if __name__ == "__main__":
    run(main)
