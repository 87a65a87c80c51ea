"""
Evaluation metrics for concept-erased Stable Diffusion runs.

METRICS maps a `compute_metrics.py -m NAME` to a function `run(args)` that
takes the parsed command-line namespace (images, output_dir, threshold,
csv_path, resume, plus its own flags), writes its outputs and returns the
written paths. To add a metric, write `ldm/evaluation/<name>.py` with a
`run(args)` and add one entry here (plus its flags, if any, in
compute_metrics.py). Metric modules import their heavy dependencies
(nudenet, transformers) lazily, so importing this package is cheap.

Every metric writes `<name>_summary.csv` (key,value), which `report.compare`
reads to put runs side by side.
"""

from ldm.evaluation import clip_score, digits, nudity
from ldm.evaluation.common import UserError

METRICS = {
    "nudenet": nudity.run,
    "clip": clip_score.run,
    "digits": digits.run,
}

__all__ = ["METRICS", "UserError"]
