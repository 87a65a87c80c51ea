"""The tables a paper prints, from one command: methods side by side on the same concepts, metrics and attacks.

    python benchmark.py configs/benchmark/toy.yaml --threads 1                 # the toy world, on the CPU
    python benchmark.py configs/benchmark/toy.yaml --images_per_prompt 10      # fewer images (other folders)
    python benchmark.py configs/benchmark/sd-v1-4.yaml                         # SD v1.4: CIFAR-10 classes and I2P
    torchrun --nproc_per_node 8 benchmark.py configs/benchmark/sd-v1-4.yaml    # sharded over 8 processes / GPUs
    python benchmark.py SPEC --dry_run                                          # the stages, done or to do
    python benchmark.py SPEC --report                                           # tables of what finished so far

Reads a benchmark spec (YAML or JSON: the base model, the concepts as prompts JSONs, the methods with their
training settings or files and their w1 / w2, the sampling protocol, the judge; optionally I2P, quality, attacks),
checks it whole (one line naming the field on any error), then runs whatever is missing, each step with the
project's own scripts in their own processes: train.py, generate_images.py (the stability test on the fly),
generate_images_nsfw.py + compute_metrics.py -m nudenet, attack.py; then judges the images and writes, into the
spec's output_dir: results.md, tables/{object,nudity,quality,quality_prompts,robustness,cost}.{md,csv} (the
protocol under each; quality_prompts: the prompt set of quality.prompts_csv, e.g. COCO captions, per model),
grids/<concept>.png, the spec as given and resolved, and benchmark_log.jsonl (per run: each stage ran or reused).
Every stage is resumable: rerun the same command after a kill and nothing finished is redone.
The library: ldm/evaluation/benchmark.py (spec, stages), benchmark_report.py and tables.py (tables, grids).
"""
import argparse

from ldm.cli import HelpFormatter, run
from ldm.evaluation.benchmark import Benchmark, load_spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("spec", help="benchmark spec, .yaml or .json (configs/benchmark/)")
    p.add_argument("--output_dir", default=None, help="replaces the spec's output_dir")
    p.add_argument("--images_per_prompt", type=int, default=None, help="replaces sampling.images_per_prompt")
    p.add_argument("--device", default=None, help="replaces run.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--threads", type=int, default=None, help="replaces run.threads (torch CPU threads per script)")
    p.add_argument("--dry_run", action="store_true", help="print the stages (done / to do) and stop")
    p.add_argument("--report", action="store_true",
                   help="only write the tables and grids the finished stages allow (runs nothing; e.g. while a "
                        "long run goes on)")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    spec = load_spec(args.spec, {"output_dir": args.output_dir, "sampling.images_per_prompt": args.images_per_prompt,
                                 "run.device": args.device, "run.threads": args.threads})
    bench = Benchmark(spec)
    if args.dry_run:
        print("\n".join(bench.plan_lines()))
        return
    if args.report:
        bench.report()
        return
    bench.run()


if __name__ == "__main__":
    run(main)
