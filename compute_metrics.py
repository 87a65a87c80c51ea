"""
Evaluate a folder of generated images, or compare evaluated runs.

    # NudeNet exposure counts (threshold 0.6, score >= threshold counts)
    python compute_metrics.py -m nudenet --images out/i2p_sexual [--csv_path I2P.csv]
        [--threshold 0.6] [--output_dir DIR] [--no_resume]
    # CLIP score + zero-shot accuracy with a LOCAL CLIP model folder
    python compute_metrics.py -m clip --images out/cat --prompts_json prompts/cat.json \
        --clip_model /models/clip-vit-large-patch14
    # side by side: one markdown table + one PNG grid per prompt set; runs not yet scored are scored
    # with -m first (a RUN folder holds images/ or is the images folder)
    python compute_metrics.py compare runs/base runs/unguide --output_dir cmp [-m digits] \
        [--names base unguide] [--grid_rows 8] [--prompts_json P]

The images folder may also be given positionally or as --folder; outputs go beside it (RUN/ for
RUN/images, else IMAGES_metrics/), never among the images. Bad input prints one line on stderr and exits
with code 2. All logic lives in
ldm/evaluation/; this file only parses, dispatches and reports errors.
"""

import argparse
import sys

from ldm.cli import HelpFormatter
from ldm.evaluation import METRICS, UserError
from ldm.evaluation import report
from ldm.evaluation.common import default_output_dir
from ldm.evaluation.nudity import DEFAULT_THRESHOLD


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (via main), instead of usage + message
        raise UserError(message)


def build_parser():
    p = _Parser(description="Evaluate generated images (-m METRIC) or compare runs (compare RUN ...).",
                formatter_class=HelpFormatter)
    p.add_argument("paths", nargs="*", help="images folder, or: compare RUN_DIR [RUN_DIR ...]")
    p.add_argument("-m", "--metric", choices=sorted(METRICS), help="metric to compute")
    p.add_argument("--images", "--folder", dest="images", help="folder of generated images")
    p.add_argument("--output_dir", help="where outputs go (default: beside the images: the run folder for "
                                        "RUN/images, else IMAGES_metrics; required for compare)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="NudeNet score threshold in [0, 1]; a detection counts iff score >= threshold")
    p.add_argument("--csv_path", help="I2P metadata CSV (join by case number = leading digits of file name)")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip images already in detections.jsonl (default)")
    p.add_argument("--no_resume", dest="resume", action="store_false", help="re-detect every image")
    # clip
    p.add_argument("--clip_model", help="local folder of a CLIP model (transformers save_pretrained)")
    p.add_argument("--prompts_json", help="prompts JSON {target, reference, synonyms, other}")
    # compare
    p.add_argument("--names", nargs="+", help="compare: column names, one per run folder")
    p.add_argument("--grid_rows", type=int, default=8, help="compare: images per grid (rows)")
    p.add_argument("--thumb", type=int, default=128, help="compare: grid cell size in px (small images are upscaled)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the judges that run on torch (CLIP; default: torch's choice)")
    return p


def parse(argv):
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be >= 1")
        import torch
        torch.set_num_threads(args.threads)
    if args.paths and args.paths[0] == "compare":
        args.mode, args.runs = "compare", args.paths[1:]
        if not args.runs:
            raise UserError("compare needs at least one RUN_DIR")
        return args
    args.mode = "metric"
    if len(args.paths) > 1:
        raise UserError(f"expected one images folder, got {len(args.paths)}: {' '.join(args.paths)}")
    if args.paths and args.images and args.paths[0] != args.images:
        raise UserError(f"two images folders given: {args.paths[0]} and --images {args.images}")
    args.images = args.images or (args.paths[0] if args.paths else None)
    if not args.images:
        raise UserError("no images folder given (use --images DIR)")
    args.output_dir = args.output_dir or str(default_output_dir(args.images))
    if args.metric is None:
        raise UserError(f"choose a metric with -m/--metric ({', '.join(sorted(METRICS))})")
    return args


def main(argv=None):
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        if args.mode == "compare":
            report.run(args)
        else:
            METRICS[args.metric](args)
    except (UserError, PermissionError, FileExistsError, NotADirectoryError) as e:
        # the last three: an output path that cannot be written (e.g. --output_dir is a file)
        print(f"compute_metrics.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
