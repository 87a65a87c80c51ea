"""The toy-digits benchmarks' shared pieces: the toy model's erasure settings, running the project's own scripts
on it as a user would (each in its own process), and summarising what the digit classifier saw.

Used by scripts/experiments/ (e2e_toy.py, separability_toy.py, ...). The toy settings are this model's, found by
a small search; Stable Diffusion keeps the release's defaults in train.py.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from ldm.erasure.training import RunFiles
from ldm.errors import UserError
from ldm.evaluation.digits import WORDS, digit_of_text
from ldm.runs import waiting_lock

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/toy/digits-inference.yaml"
CKPT = ROOT / "models/toy-digits.safetensors"
DIGITS_DIR = ROOT / "data" / "digits"
IMAGE_SIZE = 16
TOY_SETTINGS = {"iterations": 300, "lr": 1e-3, "negative_guidance": 2.0, "t_enc": 25, "repeats": 10, "steps": 50,
                "lora_rank": 1, "lora_alpha": 8.0, "target_modules": ["default"], "start_guidance": 9.0,
                "preserve_weight": 10.0, "check_every": 100, "check_min_ratio": 1.5, "check_max_rate": 0.1,
                "check_max_iterations": 600}
# The erasure check (train.py --check_*; ldm/erasure/check.py) with the digit classifier as its judge: an adapter
# that at the planned 300 iterations has not moved d(target) to 1.5 d("") or still draws the digit alone in more
# than 10% of the check's images trains on, 100 iterations at a time, up to 600.
# Preservation prompts (train.py --preserve) for erasing digit d: the OTHER nine digits in a template the
# benchmarks never sample ("a handwritten 7"; the tables' prompts spell digits as words: "... the digit seven").
# More templates (--preserve_templates): {n} is the numeral, {w} the word ("a photo of the digit {w}").
PRESERVE_TEMPLATE = "a handwritten {n}"


def prompts_file(digit: str) -> Path:
    path = DIGITS_DIR / f"{digit}.json"
    if digit not in WORDS or not path.is_file():
        raise UserError(f"--digit {digit!r}: one of {', '.join(WORDS)}")
    return path


def two_digits(digits: list[str]) -> tuple[str, str]:
    """--digits A B of the two-concept benchmarks: two different digit names, checked."""
    a, b = digits
    if a == b or a not in WORDS or b not in WORDS:
        raise UserError(f"--digits {a} {b}: two different names of {', '.join(WORDS)}")
    return a, b


def preserve_prompts(prompts_json: Path, templates: list[str] = (PRESERVE_TEMPLATE,)) -> list[str]:
    """The preservation prompts for the digit that `prompts_json`'s target names: each template filled with each
    other digit ({n}: its numeral, {w}: its word), template by template."""
    for t in templates:
        if t.format(n="", w="") == t:
            raise UserError(f"--preserve_templates {t!r}: names no digit (write {{n}} for the numeral or {{w}} for "
                            "the word)")
    target = digit_of_text(json.loads(Path(prompts_json).read_text())["target"])
    return [t.format(n=d, w=WORDS[d]) for t in templates for d in range(10) if d != target]


def add_toy_args(p) -> None:
    """The flags shared by the toy benchmarks (their defaults: TOY_SETTINGS)."""
    s = TOY_SETTINGS
    p.add_argument("--steps", type=int, default=s["steps"], help="DDIM steps of sampling and of the test")
    p.add_argument("--iterations", type=int, default=s["iterations"])
    p.add_argument("--lr", type=float, default=s["lr"])
    p.add_argument("--negative_guidance", type=float, default=s["negative_guidance"])
    p.add_argument("--lora_rank", type=int, default=s["lora_rank"])
    p.add_argument("--lora_alpha", type=float, default=s["lora_alpha"])
    p.add_argument("--target_modules", nargs="+", default=s["target_modules"])
    p.add_argument("--start_guidance", type=float, default=s["start_guidance"])
    p.add_argument("--preserve_weight", type=float, default=s["preserve_weight"],
                   help="train.py --preserve_weight for the other nine digits' prompts (--preserve_templates); "
                        "0: the release's objective alone")
    p.add_argument("--preserve_templates", nargs="+", default=[PRESERVE_TEMPLATE], metavar="TEMPLATE",
                   help="the preserved prompts: each template with each other digit ({n}: numeral, {w}: word; e.g. "
                        "'a photo of the digit {w}', the template the tables' other-digit prompts use)")
    p.add_argument("--preserve_extra", nargs="+", default=[], metavar="PROMPT",
                   help="more preserved prompts, verbatim (e.g. '' : the empty prompt, whose d(\"\") the stability "
                        "test divides by; none by default, the sweep's setting)")
    p.add_argument("--train_check_every", type=int, default=s["check_every"],
                   help="train.py --check_every: the erasure check every N iterations (0: off)")
    p.add_argument("--train_check_min_ratio", type=float, default=s["check_min_ratio"], help="train.py --check_min_ratio")
    p.add_argument("--train_check_max_rate", type=float, default=s["check_max_rate"], help="train.py --check_max_rate")
    p.add_argument("--train_check_max_iterations", type=int, default=s["check_max_iterations"],
                   help="train.py --check_max_iterations")
    p.add_argument("--train_check_restarts", type=int, default=0,
                   help="train.py --check_restarts: an adapter not passed by the cap is dropped for a fresh one "
                        "(seed + 1000 k), up to this many times (0: the sweep's setting)")
    p.add_argument("--train_check_min_kept", type=float, default=0.0,
                   help="train.py --check_min_kept: every preserved digit's adapter-alone share at least this "
                        "(0: not checked, the sweep's setting)")
    p.add_argument("--train_erase_synonyms", action="store_true",
                   help="train.py --erase_synonyms: the JSON's synonyms erased with the target (off: the sweep's)")
    p.add_argument("--train_adv_every", type=int, default=0,
                   help="train.py --adv_every: adversarial training, an attacker's words against the adapter every N "
                        "iterations (0: off, the sweep's setting)")
    p.add_argument("--train_adv_tokens", type=int, default=3, help="train.py --adv_tokens")
    p.add_argument("--train_adv_steps", type=int, default=5, help="train.py --adv_steps")
    p.add_argument("--train_adv_weight", type=float, default=1.0, help="train.py --adv_weight")
    p.add_argument("--train_adv_decision_weight", type=float, default=0.0, help="train.py --adv_decision_weight")
    p.add_argument("--t_enc", type=int, default=s["t_enc"], help="stability test: partial trajectory down to t_enc")
    p.add_argument("--repeats", type=int, default=s["repeats"], help="stability test draws per prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is the fastest for this model)")


def model_args(args) -> list[str]:
    return ["--config", str(CONFIG), "--ckpt", str(CKPT), "--device", args.device, "--threads", str(args.threads)]


def train_argv(args, prompts_json: Path, output_dir: Path, seed: int) -> tuple[list[str], Path]:
    """train.py's arguments for the toy model with the toy flags of add_toy_args, and the adapter file it writes.
    The run folder is named after a hash of these arguments: a folder holds one set of settings."""
    argv = ["--prompts_json", str(prompts_json), "--image_size", str(IMAGE_SIZE),
            "--iterations", str(args.iterations), "--lr", str(args.lr), "--ddim_steps", str(args.steps),
            "--negative_guidance", str(args.negative_guidance), "--seed", str(seed),
            "--lora_rank", str(args.lora_rank), "--lora_alpha", str(args.lora_alpha),
            "--start_guidance", str(args.start_guidance), "--target_modules", *args.target_modules,
            "--calibrate_t_enc", str(args.t_enc), "--calibrate_repeats", str(args.repeats)]  # the threshold it
    # stores (train.py --calibrate) is measured as the toy benchmarks' stability test measures: t_enc, repeats
    if args.preserve_weight > 0:
        templates = getattr(args, "preserve_templates", [PRESERVE_TEMPLATE])
        extra = list(getattr(args, "preserve_extra", []))  # only when asked: the sweep's run names stay as they were
        argv += ["--preserve", *preserve_prompts(prompts_json, templates), *extra,
                 "--preserve_weight", str(args.preserve_weight)]
    if getattr(args, "train_check_every", 0):
        argv += ["--check_every", str(args.train_check_every), "--check_judge", "digits", "--check_min_ratio",
                 str(args.train_check_min_ratio), "--check_max_rate", str(args.train_check_max_rate),
                 "--check_max_iterations", str(args.train_check_max_iterations), "--check_t_enc", str(args.t_enc)]
        if getattr(args, "train_check_min_kept", 0) > 0:  # only when asked: the sweep's run names stay as they were
            argv += ["--check_min_kept", str(args.train_check_min_kept)]
        if getattr(args, "train_check_restarts", 0) > 0:  # the same
            argv += ["--check_restarts", str(args.train_check_restarts)]
    if getattr(args, "train_erase_synonyms", False):  # only when asked, as the two below
        argv += ["--erase_synonyms"]
    if getattr(args, "train_adv_every", 0) > 0:  # the same: only when asked
        argv += ["--adv_every", str(args.train_adv_every), "--adv_tokens", str(args.train_adv_tokens),
                 "--adv_steps", str(args.train_adv_steps), "--adv_weight", str(args.train_adv_weight)]
        if getattr(args, "train_adv_decision_weight", 0) > 0:
            argv += ["--adv_decision_weight", str(args.train_adv_decision_weight)]
    # the name's hash sees the prompts JSON relative to the repository: another checkout reuses the same runs
    key = " ".join(argv).replace(str(ROOT) + "/", "")
    name = f"{Path(prompts_json).stem}_seed{seed}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    argv = ["--config_path", str(CONFIG), "--ckpt_path", str(CKPT), "--device", args.device,
            "--threads", str(args.threads), "--output_dir", str(output_dir), "--run_name", name, *argv]
    return argv, Path(output_dir) / name / "models" / "lora.safetensors"


def train_adapter(args, prompts_json: Path, output_dir: Path, seed: int) -> Path:
    """The adapter of the toy settings for this digit and seed: trained with train.py, or reused when that exact
    run finished before (train.py's rule: RunFiles.finished). Benchmarks sharing --train_dir at the same time
    train each adapter once: the others wait for it (a lock per run folder)."""
    argv, lora = train_argv(args, prompts_json, output_dir, seed)
    with waiting_lock(Path(output_dir) / f".{lora.parents[1].name}.lock"):
        if RunFiles(lora.parents[1], lora.stem).finished():
            print(f"reusing {lora}")
            return lora
        run_script("train.py", argv)
    return lora


def run_script(script: str, argv: list[str]) -> None:
    """Run one of the project's scripts in its own process, from the repository root, as a user would; its output
    goes to ours. A failure is one line naming the command."""
    proc = subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT)
    if proc.returncode:
        raise UserError(f"{script} {' '.join(map(str, argv))[:300]} ... exited with {proc.returncode}")


def generate_argv(args, output_dir: Path, samples: int, seed: int, batch_size: int = 100) -> list[str]:
    """generate_images.py's common arguments on the toy model (add --lora, --prompt(s), --w1/--w2 ...)."""
    return [*model_args(args), "--output_dir", str(output_dir), "--samples", str(samples), "--steps", str(args.steps),
            "--seed", str(seed), "--image_size", str(IMAGE_SIZE), "--batch_size", str(batch_size),
            "--t_enc", str(args.t_enc), "--repeats", str(args.repeats)]


def prompt_rate(folders: dict, folder_of: dict[str, str], prompts: list[str], digit_of) -> float:
    """Share of the images of `prompts` that the classifier read as digit_of(prompt) (pooled over the prompts).
    folders: digit_rates(...)["folders"]; folder_of: {prompt: its image folder}."""
    n = sum(folders[folder_of[p]]["n"] for p in prompts)
    hits = sum(folders[folder_of[p]]["rates"][digit_of(p)] * folders[folder_of[p]]["n"] for p in prompts)
    return hits / max(n, 1)
