"""ESD on the toy-digits model: ESD-x and ESD-u alone, and UnGuidance on top of them ("UnGuide-ESD").

    python -m scripts.experiments.esd_toy --digit three                    # ESD's defaults (1000 it, lr 1e-5)
    python -m scripts.experiments.esd_toy --digit three --iterations 300 --lr 1e-4 --samples 20

Runs the project's scripts as a user would (each in its own process), on models/toy-digits.safetensors:
    1. train.py --method esd --train_method xattn / noxattn   (ESD-x, ESD-u: ESD's objective, reference "")
    2. compute_lora_diff.py   the stability test of each ESD delta (t_enc 25, 10 repeats)
    3. generate_images.py     base (w1 = w2 = 1), ESD alone (w1 = w2 = 0), UnGuide-ESD (w1 = -1, w2 = 2,
                              the stability test's decisions); DDIM 50, CFG 7.5, seed 0
    4. the digit classifier (ldm/evaluation/digits.py)
and writes --out (default outputs/esd_toy/<digit>/): results.md (target rate / synonym rate / accuracy on the
other digits, as scripts/experiments/e2e_toy.py), results.json and run_config.json.
"""
import argparse
import json
import time
from pathlib import Path

from ldm.cli import HelpFormatter, run, write_json
from ldm.evaluation.digits import digit_of_text, digit_rates
from ldm.evaluation.toy_benchmark import CKPT, CONFIG, IMAGE_SIZE, ROOT, prompt_rate, prompts_file, run_script
from ldm.prompts import class_dirs, experiment_prompts

VARIANTS = {"x": "xattn", "u": "noxattn"}
# ESD's defaults (train-esd.py); the toy model may need others (--iterations / --lr), SD keeps these
ESD_DEFAULTS = {"iterations": 1000, "lr": 1e-5, "start_guidance": 3.0, "negative_guidance": 1.0}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--digit", default="three", help="a name of data/digits/<name>.json (zero .. nine)")
    p.add_argument("--out", default=None, help="output folder (default outputs/esd_toy/<digit>)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="x: ESD-x (--train_method xattn), u: ESD-u (noxattn)")
    p.add_argument("--samples", type=int, default=50, help="images per prompt and way")
    for key, value in ESD_DEFAULTS.items():
        p.add_argument(f"--{key}", type=type(value), default=value, help=f"train.py --{key} (ESD's: {value})")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of training, the test and sampling")
    p.add_argument("--t_enc", type=int, default=25, help="stability test: partial trajectory down to t_enc")
    p.add_argument("--repeats", type=int, default=10, help="stability test draws per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one is the fastest for this model)")
    p.add_argument("--no_base", action="store_true", help="skip the base model's row")
    return p


def model_args(args) -> list[str]:
    return ["--config", str(CONFIG), "--ckpt", str(CKPT), "--device", args.device, "--threads", str(args.threads),
            "--image_size", str(IMAGE_SIZE)]


def train_esd(args, prompts_json: Path, train_method: str, out: Path) -> Path:
    """train.py --method esd (reused when that exact run finished before); returns the delta file it wrote."""
    settings = [x for key in ESD_DEFAULTS for x in (f"--{key}", str(getattr(args, key)))]
    name = f"esd_{train_method}_" + "_".join(settings[1::2]) + f"_seed{args.seed}"
    delta = out / name / "models" / "lora.safetensors"
    if not delta.is_file():
        run_script("train.py", ["--method", "esd", "--train_method", train_method, *model_args(args),
                                "--prompts_json", prompts_json, "--output_dir", out, "--run_name", name,
                                "--ddim_steps", args.steps, "--seed", args.seed, *settings])
    return delta


def sample(args, prompts_json: Path, out: Path, w: tuple[float, float], delta: Path | None = None,
           diff: Path | None = None) -> dict:
    """generate_images.py for every prompt of the JSON, then the digit classifier -> digit_rates' result."""
    run_script("generate_images.py", [*model_args(args), "--output_dir", out, "--prompts_json", prompts_json,
                                      "--samples", args.samples, "--steps", args.steps, "--seed", args.seed,
                                      "--batch_size", "100", "--guidance", "7.5", "--w1", w[0], "--w2", w[1],
                                      "--decision", "release", "--threshold", "1"]  # the README's table: the release's rule
               + (["--lora", delta] if delta else []) + (["--diff_results", diff] if diff else []))
    return digit_rates(out / "images")


def stability_test(args, prompts_json: Path, delta: Path) -> Path:
    exp = delta.parent.parent
    run_script("compute_lora_diff.py", [*model_args(args), "--lora", delta, "--prompts_json", prompts_json,
                                        "--output_dir", exp, "--seed", args.seed, "--ddim_steps", args.steps,
                                        "--t_enc", args.t_enc, "--repeats", args.repeats])
    return exp / "calc_diff_results.json"


def rows_of_variant(args, prompts_json: Path, data: dict, folders: dict, v: str, out: Path) -> dict:
    """ESD-v alone and UnGuide-ESD-v: {row name: summary}, seconds included (training in the ESD row)."""
    t0 = time.time()
    delta = train_esd(args, prompts_json, VARIANTS[v], out / "train")
    t_train = time.time() - t0
    t0 = time.time()
    alone = summarise(sample(args, prompts_json, out / f"esd_{v}", (0.0, 0.0), delta), data, folders,
                      time.time() - t0)
    t0 = time.time()
    diff = stability_test(args, prompts_json, delta)
    guided = summarise(sample(args, prompts_json, out / f"unguide_esd_{v}", (-1.0, 2.0), delta, diff), data,
                       folders, time.time() - t0)
    alone["train_seconds"] = guided["train_seconds"] = t_train
    return {f"ESD-{v} alone (w1 = w2 = 0)": alone, f"UnGuide-ESD-{v} (w1 = -1, w2 = 2)": guided}


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    prompts_json = prompts_file(args.digit)
    data = json.loads(prompts_json.read_text())
    out = Path(args.out or ROOT / "outputs" / "esd_toy" / args.digit)
    out.mkdir(parents=True, exist_ok=True)
    folders = class_dirs(experiment_prompts(data))
    start, rows = time.time(), {}
    if not args.no_base:
        t0 = time.time()
        res = sample(args, prompts_json, out / "base", (1.0, 1.0))
        rows["base model (w1 = w2 = 1)"] = summarise(res, data, folders, time.time() - t0)
    write_json(out / "run_config.json", vars(args))
    for v in args.variants:
        rows.update(rows_of_variant(args, prompts_json, data, folders, v, out))
        text = report(args, data, rows, time.time() - start)  # written after each variant: a long run shows its rows
        (out / "results.md").write_text(text)
        write_json(out / "results.json", {"rows": rows, "wall_seconds": time.time() - start})
    print(text)


def report(args, data: dict, rows: dict, wall: float) -> str:
    table = ["| way | target rate | synonym rate | accuracy on other digits | sampling s | training s |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        table.append(f"| {name} | {r['target_rate']:.1%} | {r['synonym_rate']:.1%} | {r['other_accuracy']:.1%} | "
                     f"{r['seconds']:.0f} | {r.get('train_seconds', 0):.0f} |")
    return (f"ESD on the toy-digits model, erasing `{data['target']}`: train.py --method esd, {args.iterations} "
            f"iterations, lr {args.lr:g}, start guidance {args.start_guidance:g}, negative guidance "
            f"{args.negative_guidance:g}, DDIM {args.steps}; {args.samples} images per prompt, CFG 7.5, seed "
            f"{args.seed}; stability test t_enc {args.t_enc}, {args.repeats} repeats. Wall time {wall / 60:.1f} min "
            f"({args.threads} thread(s)).\n\n" + "\n".join(table) + "\n")


def summarise(res: dict, data: dict, folders: dict, seconds: float) -> dict:
    """Target / synonym rates of the erased digit and the accuracy on the other digits' prompts."""
    target = digit_of_text(data["target"])
    f = res["folders"]
    return {"target_rate": prompt_rate(f, folders, [data["target"]], lambda p: target),
            "synonym_rate": prompt_rate(f, folders, data.get("synonyms", []), lambda p: target),
            "other_accuracy": prompt_rate(f, folders, [p for p in data.get("other", []) if p], digit_of_text),
            "seconds": seconds}


if __name__ == "__main__":
    run(main)
