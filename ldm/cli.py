"""What every script shares: model flags, device/precision resolution, one-line errors, resolved-config dumps."""
import argparse
import sys

import torch

from ldm.errors import UserError
from ldm.loader import image_size_facts, load_model_from_config, resolve_device, resolve_dtype
from ldm.runs import write_json  # noqa: F401  (the scripts' atomic JSON writer)


def finite(text: str) -> float:
    """argparse type: a finite float (NaN and inf are refused with the value named)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not finite")
    return value


class Parser(argparse.ArgumentParser):
    """The scripts' parser: --help in HelpFormatter; a bad flag is one line on stderr and exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring as written, one line per flag with its default shown."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".strip()


def add_decision_args(p: argparse.ArgumentParser, unit: str = "prompts") -> None:
    """UnGuidance's decision flags, the same in every script that samples: eps = w CFG_base + (1 - w) CFG_adapted with
    w = w1 for flagged `unit` (d(p) > threshold d("")) and the --decision rule's unflagged weight for the rest."""
    from ldm.erasure.decision import RULES
    g = p.add_argument_group("UnGuidance's decision")
    g.add_argument("--w1", type=finite, default=-1.0,
                   help=f"w for {unit} the stability test flags; 1 = the base model, 0 = the adapter alone")
    g.add_argument("--w2", type=finite, default=2.0, help=f"w for the other {unit}")
    g.add_argument("--decision", choices=list(RULES), default=None,
                   help="what unflagged prompts get: release (w2), safe (at most the base model, min(w2, 1)), floor "
                        "(at most the adapter alone, min(w2, 0)), guarded (the adapter alone where d(\"\") < d(p) <= "
                        "threshold d(\"\"), the base model where d(p) <= d(\"\")); ldm/erasure/decision.py. "
                        "Default: guarded; release under --protocol release")
    g.add_argument("--threshold", type=threshold_arg, default=None,
                   help="flag when d(p) > threshold * d(\"\"): 1 is the release's rule; auto: the threshold "
                        "calibrated on the adapter's own prompts (compute_lora_diff.py's calibration; an error where "
                        "there is none). Default: the calibrated threshold where the run has one, else 1 (said in "
                        "one line); 1 under --protocol release")


def resolve_decision(args) -> None:
    """The decision defaults, once, from the protocol: --protocol release keeps the release's rule (release, threshold
    1); otherwise guarded, and --threshold None stays None = "calibrated where available, else 1"
    (ldm.erasure.adapters.threshold_of / adapter_thresholds)."""
    release = getattr(args, "protocol", None) == "release"
    if args.decision is None:
        args.decision = "release" if release else "guarded"
    if args.threshold is None and release:
        args.threshold = 1.0


def add_model_args(p: argparse.ArgumentParser, config_flag: str = "--config", ckpt_flag: str = "--ckpt",
                   config_default: str = "configs/stable-diffusion/v1-inference.yaml",
                   ckpt_default: str = "models/sd-v1-4.ckpt") -> None:
    """Flags naming the base model. The release spells them --config/--ckpt (generation) or --config_path/
    --ckpt_path (train.py): every script takes both, the script's own spelling shown first in --help."""
    g = p.add_argument_group("model")
    other = {"--config": "--config_path", "--config_path": "--config", "--ckpt": "--ckpt_path", "--ckpt_path": "--ckpt"}
    g.add_argument(config_flag, other[config_flag], dest="config", default=config_default, help="model config (YAML)")
    g.add_argument(ckpt_flag, other[ckpt_flag], dest="ckpt", default=ckpt_default,
                   help="SD v1.x checkpoint (.ckpt or .safetensors) or a diffusers model folder")
    g.add_argument("--unet_weights", default=None,
                   help="a UNet state dict (diffusers or CompVis layout, e.g. ESD's published files) to replace the "
                        "checkpoint's UNet")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights' dtype for sampling (fp16 needs CUDA)")
    g.add_argument("--threads", type=positive(int), default=None,
                   help="torch CPU threads (default: torch's choice; 1 is the fastest for the 16 px toy model)")
    g.add_argument("--unsafe_pickle_load", action="store_true",
                   help="allow arbitrary unpickling of a .ckpt (runs code from the file: trusted sources only)")
    g.add_argument("--unsafe_config", action="store_true",
                   help="allow the config to name classes outside this project's models (imports them: trusted only)")


def resolve_image_size(args) -> int:
    """--image_size, or (when not given) the size the config's model was trained at (512 for SD, 16 for the toy
    model); set on args and returned. Call before anything is recorded."""
    default, multiple = image_size_facts(args.config)
    if getattr(args, "image_size", None) is None:
        args.image_size = default
    if args.image_size % multiple:
        raise UserError(f"--image_size {args.image_size}: must be a multiple of {multiple} for {args.config} "
                        f"(e.g. {max(1, round(args.image_size / multiple)) * multiple})")
    return args.image_size


def image_autocast(args) -> str | None:
    """--precision under --protocol release: the release keeps fp32 weights, runs the stability test in fp32 and
    generates the image under autocast at that precision -> the autocast precision, or None where the weights are
    cast to --precision instead (our protocol: test and image both at --precision)."""
    release = getattr(args, "protocol", None) == "release"
    return args.precision if release and args.precision != "fp32" else None


def load_model(args, precision: str | None = None):
    """Device and dtype are decided here, once, from --device and --precision, and returned with the model.
    Weights stay fp32 where image_autocast(args) says the image alone runs in half precision."""
    if precision is None and image_autocast(args):
        precision = "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(precision or args.precision, device)
    if hasattr(args, "image_size"):
        resolve_image_size(args)
    model = load_model_from_config(args.config, args.ckpt, device=device, dtype=dtype,
                                   unsafe_pickle_load=args.unsafe_pickle_load, unsafe_config=args.unsafe_config,
                                   unet_weights=args.unet_weights)
    if device.type == "cpu" and getattr(args, "image_size", 0) >= 256:
        print(f"note: {args.image_size} px on the CPU ({torch.get_num_threads()} threads): one UNet sample-evaluation "
              f"is ~{0.84 * (args.image_size / 512) ** 2:.2f} TFLOP, roughly 5-30 s here; a 50-step CFG image takes "
              "~100 of them (use a GPU, --device cuda, for Stable Diffusion)", file=sys.stderr)
    return model, device


def ddim_steps_arg(text: str) -> int:
    """argparse type of --steps / --ddim_steps: an integer in 1..1000 (the model's training timesteps)."""
    value = positive(int)(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"{text} must be at most 1000 (the model's training timesteps)")
    return value


def threshold_arg(text: str):
    """argparse type of --threshold: "auto" or a positive finite number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a number")
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} must be a positive finite number")
    return value


def positive(kind=int):
    """argparse type: a number > 0 with an error that names the value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be > 0")
        return value
    return parse


def run(main) -> None:
    """Call main(); a UserError becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except torch.cuda.OutOfMemoryError as exc:
        print(f"error: out of GPU memory ({str(exc).splitlines()[0]}); lower --batch_size or use --precision fp16",
              file=sys.stderr)
        sys.exit(3)
