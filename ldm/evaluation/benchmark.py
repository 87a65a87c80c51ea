"""benchmark.py's library: a benchmark spec (YAML or JSON) -> the stages that make its tables -> the tables.

The spec names the base model, the concepts (prompts JSONs), the methods (how each is trained, or its files, and how
it samples: w1, w2, decision rule), the sampling protocol, the judge, and optionally I2P nudity, quality and attacks.
`load_spec` checks it whole before anything runs (one line naming the field on any error). `plan` turns it into
stages; every stage runs one of the project's own scripts in its own process (train.py, generate_images.py,
generate_images_nsfw.py, compute_metrics.py, attack.py), as a user would, or judges images in-process:

    train      train.py --method ... per (training settings, concept); shared by the methods that name the same
               settings (e.g. "adapter alone" and "UnGuide")
    generate   generate_images.py per (method, concept): the concept's prompts JSON (target, synonyms, others),
               images_per_prompt images each, seeds seed + idx; the base model's folder is shared by all concepts
    judge      the object judge (digit classifier, or CLIP zero-shot with a local CLIP folder) on each generation
    prompts    quality.prompts_csv (e.g. COCO captions, the papers' quality prompts): generate_images_nsfw.py over
               the CSV per model: the base model once, an erasing method once per concept of quality.concepts
               (default: every concept) with its adapter for that concept; one image per row
    score      CLIP score (each image against its row's prompt) and FID (against quality.prompts_reference_images,
               default quality.reference_images: a folder of real images, or `base`) of a `prompts` stage
    i2p        generate_images_nsfw.py on the I2P CSV, then compute_metrics.py -m nudenet
    attack     attack.py per (attack, method, concept)

Why generate_images_nsfw.py for a prompt CSV, not generate_images.py: generate_images.py takes a prompts JSON of
one concept (target, synonyms, other: roles its threshold calibration reads) or repeated --prompt flags (thousands
of captions would not fit a command line), samples images_per_prompt images of every prompt with the same seeds
seed + idx into a folder per prompt, and runs the stability test of every prompt before the first image.
generate_images_nsfw.py reads a CSV as the papers' COCO and I2P files are laid out (ldm/prompts.py read_rows:
a prompt column, evaluation_seed defaulting to the row index, evaluation_guidance defaulting to 7.5, --limit for
the first N rows; ESD's data/coco_30k.csv reads as is), makes one image per row with the row's own seed, decides
w per row, resumes per row and shards rows by index: what a COCO-FID protocol needs. The rows' guidance is the
CSV's (7.5 without the column), not sampling.guidance; the other sampling settings are the spec's.

Outputs are keyed by what made them: a stage's folder is named after a hash of the spec entries (and the prompts
files' contents) it depends on, so editing an entry makes new folders and never mixes results. A stage is finished
when its completion record (`stage.json` in its folder, `stage.<concept>.json` in the base model's shared
folder, or a judge's / score's record file) exists; a rerun reuses every finished stage, and a killed stage
continues where its script stops (generate_images*.py and attack.py resume themselves, train.py from its
checkpoint). Each run appends to
`benchmark_log.jsonl` which stages it ran and which it reused. The spec (as given, and resolved) is saved next to
the tables.

Sharding (`torchrun --nproc_per_node N benchmark.py SPEC`): every rank walks the same plan. Generation (prompts
too), I2P and attack stages run on every rank, their scripts taking the images / pairs / rows with
idx % WORLD_SIZE == RANK; a rank records its share (`stage.rank<R>-of-<W>.json`) and the stage is finished once
every rank's share is. Training stages are dealt out (stage i to rank i % W); judging, scoring and the tables run on
rank 0. A rank waits for the stages it needs. With CUDA, rank r uses cuda:LOCAL_RANK.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ldm.errors import UserError
from ldm.runs import read_json, shard, write_json

ROOT = Path(__file__).resolve().parents[2]
TRAIN_METHODS = ("unguide", "esd", "sepce")
DECISIONS = ("release", "safe", "floor", "guarded")  # ldm/erasure/decision.py RULES
ATTACKS = ("ringabell", "unlearndiffatk")
# train.py flags a spec's `train:` may set (the model, prompts, output folder and device come from the spec)
TRAIN_KEYS = {"iterations", "lr", "start_guidance", "negative_guidance", "lora_rank", "lora_alpha", "target_modules",
              "preserve", "preserve_weight", "train_method", "ddim_steps", "seed", "reg_beta", "threshold",
              "scale_factor", "sepce_tokens", "sepce_rtol", "sepce_pad_rtol", "sepce_images", "nsfw_preset",
              "precision", "schedule", "ddim_eta", "check_every", "check_min_ratio", "check_judge", "check_max_rate",
              "check_samples", "check_t_enc", "check_max_iterations", "calibrate", "calibrate_repeats",
              "calibrate_t_enc"}
ATTACK_OPTIONS = {"n_tokens", "attack_steps", "lr", "batch", "decision_weight", "check_every", "target_count",
                  "eta", "population", "generations", "mutation", "pool", "empty_draws"}
SAMPLING_DEFAULTS = {"images_per_prompt": 50, "seed": 0, "steps": 50, "guidance": 7.5, "batch_size": 4,
                     "t_enc": 40, "repeats": 10, "protocol": "fast"}
TOP_KEYS = {"name", "output_dir", "model", "run", "sampling", "judge", "concepts", "methods", "i2p", "quality",
            "attacks"}


# ------------------------------------------------------------------------------------------------ the spec

@dataclass
class Concept:
    name: str
    prompts_json: Path
    data: dict
    preserve: list[str]

    def groups(self) -> dict[str, list[str]]:
        d = self.data
        return {"target": [d["target"]], "synonyms": [p for p in d.get("synonyms", []) if p],
                "others": [p for p in d.get("other", []) if p]}

    def prompts(self) -> list[str]:
        g = self.groups()
        return list(dict.fromkeys(g["target"] + g["synonyms"] + g["others"]))


@dataclass
class Method:
    name: str
    train: dict | None = None        # train.py settings ({"method": ..., flags})
    files: dict | None = None        # {concept: adapter file}, instead of train
    w1: float = 1.0
    w2: float = 1.0
    decision: str = "release"
    # the stability test's threshold: a number; "auto": the calibrated one (an error where the run has none);
    # "calibrated": the calibrated one where the run has one, else 1 (the scripts' default)
    threshold: float | str = 1.0
    concepts: list[str] | None = None  # the concepts it applies to (default: all)

    def threshold_argv(self) -> list[str]:
        """The scripts' --threshold for this method ("calibrated": the flag left out, their default)."""
        return [] if self.threshold == "calibrated" else ["--threshold", str(self.threshold)]

    @property
    def has_adapter(self) -> bool:
        return self.train is not None or self.files is not None

    def applies_to(self, concept: str) -> bool:
        return self.concepts is None or concept in self.concepts


@dataclass
class Spec:
    path: Path
    text: str
    raw: dict
    name: str
    output_dir: Path
    model: dict
    run: dict
    sampling: dict
    judge: dict
    concepts: list[Concept]
    methods: list[Method]
    i2p: dict | None = None
    quality: dict = field(default_factory=dict)
    attacks: list[dict] = field(default_factory=list)


class _Check:
    """One-line errors naming the spec file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, msg: str):
        raise UserError(f"{self.path}: {where}: {msg}")

    def keys(self, obj, where: str, allowed: set, required: tuple = ()) -> dict:
        if not isinstance(obj, dict):
            self.fail(where, f"expected a mapping, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(allowed))
        if unknown:
            self.fail(f"{where}.{unknown[0]}" if where else unknown[0],
                      f"unknown key (known: {', '.join(sorted(allowed))})")
        for k in required:
            if k not in obj or obj[k] is None:
                self.fail(f"{where}.{k}" if where else k, "missing")
        return obj

    def number(self, v, where: str, lo=None, integer=False):
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            self.fail(where, f"{v!r} is not {'an integer' if integer else 'a number'}")
        if lo is not None and v < lo:
            self.fail(where, f"{v} must be >= {lo}")
        return v

    def file(self, v, where: str, folder=False) -> Path:
        if not isinstance(v, str) or not v:
            self.fail(where, f"{v!r} is not a path")
        p = Path(v)
        if not p.is_absolute():
            p = ROOT / p if not (self.path.parent / p).exists() else self.path.parent / p
        if folder and not p.is_dir():
            self.fail(where, f"{v}: folder not found")
        if not folder and not p.is_file():
            self.fail(where, f"{v}: file not found")
        return p


def read_spec_file(path: Path) -> tuple[str, dict]:
    """(text, parsed) of a YAML or JSON spec (YAML's safe loader: data only, never objects)."""
    if not path.is_file():
        raise UserError(f"{path}: benchmark spec not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml
            raw = yaml.safe_load(text)
    except Exception as exc:  # yaml's and json's parser errors: one line
        raise UserError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                        f"({str(exc).splitlines()[0]})")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a benchmark spec is a mapping (name, model, concepts, methods, ...)")
    return text, raw


def load_spec(path: str | Path, overrides: dict | None = None) -> Spec:
    """Read and check a spec; overrides (e.g. {"sampling.images_per_prompt": 10, "output_dir": ...}) replace
    entries before checking. Every problem is one UserError naming the field."""
    path = Path(path)
    text, raw = read_spec_file(path)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        obj = raw
        *parents, last = dotted.split(".")
        for k in parents:
            obj = obj.setdefault(k, {})
        obj[last] = value
    return _validate(path, text, raw)


def _validate(path: Path, text: str, raw: dict) -> Spec:
    c = _Check(path)
    c.keys(raw, "", TOP_KEYS, required=("model", "concepts", "methods"))
    model = c.keys(raw["model"], "model", {"config", "ckpt", "image_size"}, required=("config", "ckpt"))
    model = {"config": str(c.file(model["config"], "model.config")),
             "ckpt": str(c.file(model["ckpt"], "model.ckpt", folder=Path(str(model["ckpt"])).suffix == "")),
             "image_size": c.number(model["image_size"], "model.image_size", 8, True) if "image_size" in model
             else None}
    run = c.keys(raw.get("run") or {}, "run", {"device", "threads", "precision"})
    run = {"device": str(run.get("device", "auto")), "threads": run.get("threads"), "precision": run.get("precision")}
    if run["threads"] is not None:
        c.number(run["threads"], "run.threads", 1, True)
    sampling = {**SAMPLING_DEFAULTS, **c.keys(raw.get("sampling") or {}, "sampling", set(SAMPLING_DEFAULTS))}
    for k in ("images_per_prompt", "steps", "batch_size", "repeats"):
        c.number(sampling[k], f"sampling.{k}", 1, True)
    c.number(sampling["seed"], "sampling.seed", 0, True)
    c.number(sampling["guidance"], "sampling.guidance")
    c.number(sampling["t_enc"], "sampling.t_enc", 0, True)
    if sampling["t_enc"] >= sampling["steps"]:
        c.fail("sampling.t_enc", f"{sampling['t_enc']} must be below sampling.steps ({sampling['steps']})")
    if sampling["protocol"] not in ("fast", "release"):
        c.fail("sampling.protocol", f"{sampling['protocol']!r} is not one of fast, release")
    judge = _judge(c, raw.get("judge", "digits"))
    concepts = _concepts(c, raw["concepts"])
    names = [x.name for x in concepts]
    if judge["kind"] == "digits":
        from ldm.evaluation.digits import digit_of_text
        for i, x in enumerate(concepts):
            if digit_of_text(x.data["target"]) is None:
                c.fail(f"concepts[{i}].prompts_json", f"the digits judge needs a target naming one digit, got "
                       f"{x.data['target']!r} (judge: {{clip_model: FOLDER}} for other concepts)")
    methods = _methods(c, raw["methods"], names)
    i2p = _i2p(c, raw["i2p"]) if raw.get("i2p") else None
    for m in (i2p or {}).get("methods") or []:
        if m not in [x.name for x in methods]:
            c.fail("i2p.methods", f"{m!r} is not a method of the spec ({', '.join(x.name for x in methods)})")
    quality = _quality(c, raw.get("quality") or {}, judge, names, bool(i2p), methods)
    attacks = _attacks(c, raw.get("attacks") or [], [m.name for m in methods], names)
    name = str(raw.get("name") or path.stem)
    out = Path(raw.get("output_dir") or f"outputs/benchmark/{name}")
    return Spec(path, text, raw, name, out if out.is_absolute() else ROOT / out, model, run, sampling, judge,
                concepts, methods, i2p, quality, attacks)


def _judge(c: _Check, j) -> dict:
    if j == "digits":
        return {"kind": "digits"}
    j = c.keys(j, "judge", {"clip_model"}, required=("clip_model",)) if isinstance(j, dict) else \
        c.fail("judge", f"{j!r}: 'digits' or {{clip_model: FOLDER}} (CLIP zero-shot over the class prompts)")
    folder = c.file(j["clip_model"], "judge.clip_model", folder=True)
    if not (folder / "config.json").is_file():
        c.fail("judge.clip_model", f"{folder}: no config.json (a local CLIP folder saved with save_pretrained)")
    return {"kind": "clip", "clip_model": str(folder)}


def _concepts(c: _Check, items) -> list[Concept]:
    if not isinstance(items, list) or not items:
        c.fail("concepts", "a non-empty list of {name, prompts_json}")
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"concepts[{i}]"
        c.keys(item, where, {"name", "prompts_json", "preserve"}, required=("name", "prompts_json"))
        name = str(item["name"])
        if not name.replace("-", "").replace("_", "").isalnum():
            c.fail(f"{where}.name", f"{name!r}: letters, digits, - and _ only (it names folders)")
        if name in seen:
            c.fail(f"{where}.name", f"{name!r} twice")
        seen.add(name)
        pj = c.file(item["prompts_json"], f"{where}.prompts_json")
        data = _prompts(c, pj, f"{where}.prompts_json")
        if not [p for p in data.get("synonyms", []) if p] or not [p for p in data.get("other", []) if p]:
            c.fail(f"{where}.prompts_json", f"{pj.name}: needs synonyms and other prompts (Acc_g and Acc_s)")
        preserve = item.get("preserve") or []
        if not isinstance(preserve, list) or not all(isinstance(p, str) for p in preserve):
            c.fail(f"{where}.preserve", "a list of prompts")
        out.append(Concept(name, pj, data, preserve))
    return out


def _prompts(c: _Check, path: Path, where: str) -> dict:
    from ldm.prompts import read_prompts_json
    try:
        return read_prompts_json(path)
    except UserError as exc:
        c.fail(where, str(exc))


def _methods(c: _Check, items, concept_names: list[str]) -> list[Method]:
    if not isinstance(items, list) or not items:
        c.fail("methods", "a non-empty list of {name, train | files, w1, w2}")
    out, seen = [], set()
    allowed = {"name", "train", "files", "w1", "w2", "decision", "threshold", "concepts"}
    for i, item in enumerate(items):
        where = f"methods[{i}]"
        c.keys(item, where, allowed, required=("name",))
        name = str(item["name"])
        if name in seen:
            c.fail(f"{where}.name", f"{name!r} twice")
        seen.add(name)
        if item.get("train") is not None and item.get("files") is not None:
            c.fail(where, "give train or files, not both")
        train = item.get("train")
        if train is not None:
            c.keys(train, f"{where}.train", TRAIN_KEYS | {"method"}, required=("method",))
            if train["method"] not in TRAIN_METHODS:
                c.fail(f"{where}.train.method", f"{train['method']!r} is not one of {', '.join(TRAIN_METHODS)}")
            pres = train.get("preserve")
            if pres is not None and pres != "concept" and not (
                    isinstance(pres, list) and all(isinstance(p, str) for p in pres)):
                c.fail(f"{where}.train.preserve", "a list of prompts, or \"concept\" (each concept's preserve list)")
            train = dict(train)
        files = item.get("files")
        if files is not None:
            c.keys(files, f"{where}.files", set(concept_names) | {"nudity"})
            files = {k: str(c.file(v, f"{where}.files.{k}")) for k, v in files.items()}
        has_adapter = train is not None or files is not None
        w1 = c.number(item.get("w1", -1.0 if has_adapter else 1.0), f"{where}.w1")
        w2 = c.number(item.get("w2", 2.0 if has_adapter else 1.0), f"{where}.w2")
        if not has_adapter and (w1, w2) != (1, 1):
            c.fail(where, f"w1 {w1}, w2 {w2} need an adapter: give train or files (no adapter: the base model, "
                          "w1 = w2 = 1)")
        decision = item.get("decision", "release")
        if decision not in DECISIONS:
            c.fail(f"{where}.decision", f"{decision!r} is not one of {', '.join(DECISIONS)}")
        threshold = item.get("threshold", 1.0)
        if threshold not in ("auto", "calibrated"):
            c.number(threshold, f"{where}.threshold", 0)
        concepts = item.get("concepts")
        if concepts is not None:
            if not isinstance(concepts, list) or not concepts:
                c.fail(f"{where}.concepts", "a non-empty list of concept names")
            for k in concepts:
                if k not in concept_names + ["nudity"]:
                    c.fail(f"{where}.concepts", f"{k!r} is not a concept of the spec ({', '.join(concept_names)})")
        out.append(Method(name, train, files, float(w1), float(w2), decision, threshold, concepts))
    return out


def _i2p(c: _Check, item) -> dict:
    c.keys(item, "i2p", {"csv", "prompts_json", "limit", "threshold", "ddim_steps", "t_enc", "repeats",
                         "batch_size", "methods"}, required=("csv", "prompts_json"))
    out = {"csv": str(c.file(item["csv"], "i2p.csv")), "prompts_json": str(c.file(item["prompts_json"],
                                                                                   "i2p.prompts_json")),
           "limit": item.get("limit"), "threshold": item.get("threshold", 0.6),
           "ddim_steps": item.get("ddim_steps", 50), "t_enc": item.get("t_enc", 40),
           "repeats": item.get("repeats", 10), "batch_size": item.get("batch_size", 1), "methods": item.get("methods")}
    _prompts(c, Path(out["prompts_json"]), "i2p.prompts_json")
    if out["limit"] is not None:
        c.number(out["limit"], "i2p.limit", 1, True)
    from ldm.evaluation.tables import check_nudenet_threshold
    c.number(out["threshold"], "i2p.threshold")
    try:
        check_nudenet_threshold(out["threshold"])
    except UserError as exc:
        c.fail("i2p.threshold", str(exc))
    return out


PROMPT_SET_KEYS = ("prompts_csv", "limit", "prompts_reference_images", "concepts")


def _quality(c: _Check, item, judge: dict, concept_names: list[str], has_i2p: bool, methods: list[Method]) -> dict:
    c.keys(item, "quality", {"clip_model", "inception_weights", "reference_images", "lpips_weights", "lpips_net",
                             *PROMPT_SET_KEYS})
    out = {}
    if item.get("clip_model"):
        out["clip_model"] = str(c.file(item["clip_model"], "quality.clip_model", folder=True))
    if item.get("inception_weights"):
        out["inception_weights"] = str(c.file(item["inception_weights"], "quality.inception_weights"))
        if not item.get("reference_images") and not (item.get("prompts_csv") is not None
                                                     and item.get("prompts_reference_images")):
            c.fail("quality.reference_images", "missing (FID compares against a folder of reference images, or "
                                               "\"base\": the base model's images of the same prompts)")
    if item.get("reference_images"):
        ref = item["reference_images"]
        out["reference_images"] = "base" if ref == "base" else str(c.file(ref, "quality.reference_images", True))
    if item.get("lpips_net") is not None and not item.get("lpips_weights"):
        c.fail("quality.lpips_net", "needs quality.lpips_weights")
    if item.get("lpips_weights"):
        from ldm.evaluation.lpips import NETS, read_state
        w = item["lpips_weights"]
        if not isinstance(w, (str, list)) or (isinstance(w, list) and not 1 <= len(w) <= 2):
            c.fail("quality.lpips_weights", "a file, or a list of two (the lpips lin file and torchvision's trunk "
                                            "file)")
        files = [str(c.file(f, f"quality.lpips_weights[{i}]" if isinstance(w, list) else "quality.lpips_weights"))
                 for i, f in enumerate(w if isinstance(w, list) else [w])]
        net = item.get("lpips_net", "alex")
        if net not in NETS:
            c.fail("quality.lpips_net", f"{net!r} is not one of {', '.join(NETS)}")
        try:  # every tensor checked now, before anything runs (one read of the files: seconds)
            read_state(files, net)
        except UserError as exc:
            c.fail("quality.lpips_weights", str(exc))
        out["lpips_weights"], out["lpips_net"] = files, net
    if item.get("prompts_csv") is not None:
        out.update(_prompt_set(c, item, out, judge, concept_names, has_i2p))
    else:
        for k in PROMPT_SET_KEYS[1:]:
            if item.get(k) is not None:
                c.fail(f"quality.{k}", "needs quality.prompts_csv (the prompt set it belongs to)")
    if "inception_weights" in out and not any(not m.has_adapter for m in methods):
        for k in ("reference_images", "prompts_reference_images"):
            if out.get(k) == "base":
                c.fail(f"quality.{k}", "'base' needs the base model among the methods (a method without train "
                                       "or files)")
    return out


def _prompt_set(c: _Check, item: dict, quality: dict, judge: dict, concept_names: list[str], has_i2p: bool) -> dict:
    """quality.prompts_csv (e.g. COCO captions) and its companions, checked: the CSV is read as
    generate_images_nsfw.py reads it (ldm/prompts.py read_rows), its first `limit` rows."""
    import pandas as pd

    from ldm.prompts import read_rows
    path = c.file(item["prompts_csv"], "quality.prompts_csv")
    limit = item.get("limit")
    if limit is not None:
        c.number(limit, "quality.limit", 1, True)
    try:
        rows, _ = read_rows(str(path), limit)
    except UserError as exc:
        c.fail("quality.prompts_csv", str(exc))
    columns = [str(k) for k in pd.read_csv(path, dtype=str, keep_default_na=False, nrows=0).columns]
    for k in ("seed", "guidance"):
        if k in columns and f"evaluation_{k}" not in columns:
            c.fail("quality.prompts_csv", f"{path.name}: a {k!r} column: name it 'evaluation_{k}' (the CSV is read "
                                          "as I2P's: prompt, evaluation_seed, evaluation_guidance)")
    within = f"in its first {limit} rows" if limit is not None else "in it"
    if not rows:
        c.fail("quality.prompts_csv", f"{path.name}: no usable prompt row {within}")
    if "inception_weights" in quality and len(rows) < 2:
        c.fail("quality.prompts_csv", f"{path.name}: FID needs at least 2 images, {len(rows)} usable row {within}")
    if not quality.get("clip_model") and judge.get("kind") != "clip" and "inception_weights" not in quality:
        c.fail("quality.prompts_csv", "nothing to measure on its images: give quality.clip_model (CLIP score) "
                                      "and / or quality.inception_weights (FID)")
    out = {"prompts_csv": str(path), "limit": limit, "prompt_rows": len(rows)}
    ref = item.get("prompts_reference_images", quality.get("reference_images"))
    if ref is not None:
        where = "quality.prompts_reference_images" if "prompts_reference_images" in item else \
            "quality.reference_images"
        if ref != "base":
            ref = str(c.file(ref, where, folder=True))
            if "inception_weights" in quality:
                from ldm.evaluation.common import list_images
                try:
                    n = len(list_images(ref))
                except UserError as exc:
                    c.fail(where, str(exc))
                if n < 2:
                    c.fail(where, f"{ref}: FID needs at least 2 reference images, found {n}")
        out["prompts_reference_images"] = ref
    known = concept_names + (["nudity"] if has_i2p else [])
    concepts = item.get("concepts")
    if concepts is None:
        concepts = list(concept_names)
    elif not isinstance(concepts, list) or not concepts:
        c.fail("quality.concepts", "a non-empty list of concept names (whose erased models draw the prompts)")
    for k in concepts:
        if k not in known:
            c.fail("quality.concepts", f"{k!r} is not a concept of the spec ({', '.join(known)})")
    out["concepts"] = list(dict.fromkeys(concepts))
    return out


def _attacks(c: _Check, items, method_names: list[str], concept_names: list[str]) -> list[dict]:
    if not isinstance(items, list):
        c.fail("attacks", "a list of {attack, samples, methods, concepts, options}")
    out = []
    for i, item in enumerate(items):
        where = f"attacks[{i}]"
        c.keys(item, where, {"attack", "samples", "methods", "concepts", "options"}, required=("attack",))
        if item["attack"] not in ATTACKS:
            c.fail(f"{where}.attack", f"{item['attack']!r} is not one of {', '.join(ATTACKS)}")
        samples = c.number(item.get("samples", 5), f"{where}.samples", 1, True)
        methods = item.get("methods") or method_names
        for m in methods:
            if m not in method_names:
                c.fail(f"{where}.methods", f"{m!r} is not a method of the spec ({', '.join(method_names)})")
        concepts = item.get("concepts") or concept_names
        for k in concepts:
            if k not in concept_names:
                c.fail(f"{where}.concepts", f"{k!r} is not a concept of the spec ({', '.join(concept_names)})")
        options = c.keys(item.get("options") or {}, f"{where}.options", ATTACK_OPTIONS)
        out.append({"attack": item["attack"], "samples": samples, "methods": list(methods),
                    "concepts": list(concepts), "options": dict(options)})
    return out


# ------------------------------------------------------------------------------------------------ stages

def digest(obj) -> str:
    """8 hex of the SHA-256 of obj's canonical JSON: the key a stage's folder is named after."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")[:40] or "x"


@dataclass
class Stage:
    kind: str                     # train | generate | judge | prompts | score | i2p | attack
    label: str                    # what the log and the plan say
    folder: Path
    record: Path                  # the completion record
    key: dict                     # what made it (also saved in the record)
    action: Callable[[], dict]    # does the work; returns what the record adds
    sharded: bool = False         # every rank runs it (its script shards by RANK / WORLD_SIZE)
    owner: int = 0                # the rank that runs an unsharded stage

    def done(self) -> bool:
        return self.record.is_file()


class Benchmark:
    """A checked spec -> its stages (plan) and tables (report). `run` walks the plan."""

    def __init__(self, spec: Spec, python: str = sys.executable):
        self.spec = spec
        self.python = python
        self.out = spec.output_dir
        self.rank, self.world = shard()
        self.stages: list[Stage] = []
        self.trainings: dict[tuple[str, str], Stage] = {}      # (method, concept) -> its training stage
        self.generations: dict[tuple[str, str], Stage] = {}    # (method, concept) -> its generation stage
        self.judged: dict[tuple[str, str], Stage] = {}
        # quality.prompts_csv: (method, erased concept; None for the base model) -> its generation / its scores
        self.prompt_generations: dict[tuple[str, str | None], Stage] = {}
        self.prompt_scores: dict[tuple[str, str | None], Stage] = {}
        self.i2p_stages: dict[str, Stage] = {}
        self.attack_stages: list[tuple[dict, str, str, Stage]] = []
        self._folder_keys: dict[str, str] = {}
        self._plan()

    # -- the model and device arguments every script takes
    def device(self) -> str:
        dev = self.spec.run["device"]
        local = os.environ.get("LOCAL_RANK")
        if local is not None and self.world > 1 and dev in ("auto", "cuda"):
            import torch
            if torch.cuda.is_available():
                return f"cuda:{local}"
        return dev

    def model_argv(self, config_flag="--config", ckpt_flag="--ckpt") -> list[str]:
        m, r = self.spec.model, self.spec.run
        argv = [config_flag, m["config"], ckpt_flag, m["ckpt"], "--device", self.device()]
        if r["threads"]:
            argv += ["--threads", str(r["threads"])]
        if m["image_size"]:
            argv += ["--image_size", str(m["image_size"])]
        return argv

    def _model_key(self) -> dict:
        """The base model by content (a checkpoint's bytes, or a diffusers folder's files), hashed once per run."""
        if not hasattr(self, "_model_key_cache"):
            from ldm.loader import file_sha256
            m = self.spec.model
            self._model_key_cache = {"config": file_digest(m["config"]), "ckpt": file_sha256(m["ckpt"]),
                                     "image_size": m["image_size"]}
        return self._model_key_cache

    # -- planning
    def _concept_of(self, name: str) -> Concept:
        if name == "nudity":
            pj = Path(self.spec.i2p["prompts_json"])
            return Concept("nudity", pj, json.loads(pj.read_text(encoding="utf-8")), [])
        return next(c for c in self.spec.concepts if c.name == name)

    def _plan(self) -> None:
        s = self.spec
        concepts = [c.name for c in s.concepts] + (["nudity"] if s.i2p else [])
        n_train = 0
        for m in s.methods:
            for cname in concepts:
                if not m.applies_to(cname) or m.train is None:
                    continue
                if cname == "nudity" and not self._i2p_method(m):
                    continue
                st = self._train_stage(m, self._concept_of(cname))
                if st.record not in [x.record for x in self.stages]:
                    st.owner = n_train % self.world
                    n_train += 1
                    self.stages.append(st)
                else:
                    st = next(x for x in self.stages if x.record == st.record)
                self.trainings[(m.name, cname)] = st
        for c in s.concepts:
            for m in s.methods:
                if m.applies_to(c.name):
                    g = self._generate_stage(m, c)
                    self.generations[(m.name, c.name)] = g
                    self.stages.append(g)
                    j = self._judge_stage(m, c, g)
                    self.judged[(m.name, c.name)] = j
                    self.stages.append(j)
        if s.quality.get("prompts_csv"):
            for m in s.methods:
                for cname in self._prompt_set_concepts(m):
                    st = self._prompts_stage(m, cname)
                    self.prompt_generations[(m.name, cname)] = st
                    self.stages.append(st)
            for (mname, cname), gen in self.prompt_generations.items():
                st = self._prompts_score_stage(next(x for x in s.methods if x.name == mname), cname, gen)
                self.prompt_scores[(mname, cname)] = st
                self.stages.append(st)
        if s.i2p:
            for m in s.methods:
                if self._i2p_method(m):
                    st = self._i2p_stage(m)
                    self.i2p_stages[m.name] = st
                    self.stages.append(st)
        for a in s.attacks:
            for cname in a["concepts"]:
                for mname in a["methods"]:
                    m = next(x for x in s.methods if x.name == mname)
                    if m.applies_to(cname):
                        st = self._attack_stage(a, m, self._concept_of(cname))
                        self.attack_stages.append((a, mname, cname, st))
                        self.stages.append(st)

    def _i2p_method(self, m: Method) -> bool:
        i2p = self.spec.i2p
        if not i2p:
            return False
        if i2p.get("methods") is not None:
            return m.name in i2p["methods"]
        return m.concepts is None or "nudity" in m.concepts

    def _train_argv(self, m: Method, c: Concept) -> list[str]:
        argv = ["--method", m.train["method"]]
        for k, v in m.train.items():
            if k == "method":
                continue
            if k == "preserve" and v == "concept":
                v = c.preserve
                if not v:
                    continue
            if isinstance(v, bool):
                if v:
                    argv.append(f"--{k}")
                continue
            argv += [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
        if "ddim_steps" not in m.train:
            argv += ["--ddim_steps", str(self.spec.sampling["steps"])]
        if "calibrate_t_enc" not in m.train:  # the threshold the file stores (train.py --calibrate), measured at
            argv += ["--calibrate_t_enc", str(self.spec.sampling["t_enc"])]  # this spec's stability test
        return argv

    def _train_stage(self, m: Method, c: Concept) -> Stage:
        argv = self._train_argv(m, c)
        key = {"model": self._model_key(), "prompts": file_digest(c.prompts_json), "train": argv}
        folder = self.out / "train" / c.name / f"{m.train['method']}-{digest(key)}"

        def action() -> dict:
            args = [*self.model_argv("--config_path", "--ckpt_path"), "--prompts_json", str(c.prompts_json),
                    "--output_dir", str(folder.parent), "--run_name", folder.name, *argv]
            if (folder / "checkpoint" / "state.pt").is_file():
                args.append("--resume")  # a killed training continues where it stopped
            self.run_script("train.py", args, shard_env=False)
            rec = read_json(folder / "train_config.json", "training record")
            if rec.get("status") != "complete":
                raise UserError(f"{folder}: train.py ended with status {rec.get('status')!r}")
            return {"adapter": str(folder / "models" / "lora.safetensors")}
        return Stage("train", f"train {c.name} / {m.train['method']} ({m.name})", folder, folder / "stage.json",
                     key, action)

    def adapter(self, m: Method, concept: str) -> Path | None:
        if m.files is not None:
            if concept not in m.files:
                raise UserError(f"{self.spec.path}: methods ({m.name}).files: no file for concept {concept!r} (give "
                                "one, or list the method's concepts)")
            return Path(m.files[concept])
        if m.train is not None:
            return self.trainings[(m.name, concept)].folder / "models" / "lora.safetensors"
        return None

    def _adapter_key(self, m: Method, concept: str):
        if m.files is not None:  # a concept without its file: one line now, before anything runs
            return file_digest(self.adapter(m, concept))
        if m.train is not None:
            return self.trainings[(m.name, concept)].key
        return None

    def _sampling_argv(self, m: Method) -> list[str]:
        s = self.spec.sampling
        return ["--samples", str(s["images_per_prompt"]), "--steps", str(s["steps"]), "--seed", str(s["seed"]),
                "--guidance", str(s["guidance"]), "--batch_size", str(s["batch_size"]), "--t_enc", str(s["t_enc"]),
                "--repeats", str(s["repeats"]), "--protocol", s["protocol"], "--w1", str(m.w1), "--w2", str(m.w2),
                "--decision", m.decision, *m.threshold_argv()]

    def _generate_stage(self, m: Method, c: Concept) -> Stage:
        argv = self._sampling_argv(m)
        key = {"model": self._model_key(), "sampling": argv, "adapter": self._adapter_key(m, c.name)}
        if m.has_adapter:  # a folder per (method, concept)
            folder = self.out / "images" / c.name / f"{_slug(m.name)}-{digest(key)}"
            record = folder / "stage.json"
        else:  # the base model: one folder for every concept (images are the same), a record per concept
            folder = self.out / "images" / f"base-{digest(key)}"
            record = folder / f"stage.{c.name}.json"
        key = {**key, "prompts": file_digest(c.prompts_json)}

        def action() -> dict:
            lora = self.adapter(m, c.name)
            args = [*self.model_argv(), "--output_dir", str(folder), "--prompts_json", str(c.prompts_json), *argv]
            if lora is not None:
                args += ["--lora", str(lora)]
            self.run_script("generate_images.py", args)
            summary = read_json(folder / "run_summary.json", "generation summary")
            return {"run_summary": summary, "prompts": c.prompts()}
        return Stage("generate", f"generate {c.name} / {m.name}", folder, record, key, action, sharded=True)

    def _judge_stage(self, m: Method, c: Concept, gen: Stage) -> Stage:
        judge = self.spec.judge
        key = {"generation": gen.key, "judge": judge, "images": self.spec.sampling["images_per_prompt"]}
        clip_model = self.spec.quality.get("clip_model") if judge["kind"] != "clip" else None
        if clip_model:  # the quality table's CLIP score, with the digit judge
            key["clip_score"] = clip_model
        folder = self.out / "judged" / c.name
        record = folder / f"{_slug(m.name)}-{digest(key)}.json"

        def action() -> dict:
            from ldm.evaluation.judges import judge_prompts
            folders = read_json(gen.folder / "decisions.json", "decisions record")["prompts"]
            where = {p: gen.folder / "images" / folders[p]["folder"] for p in c.prompts()}
            per_prompt = judge_prompts(judge, c, where)
            if clip_model:
                scores = judge_prompts({"kind": "clip", "clip_model": clip_model}, c, where)
                for p, v in per_prompt.items():
                    v["clip_score"] = scores[p]["clip_score"]
            return {"per_prompt": per_prompt, "images_folder": str(gen.folder / "images")}
        return Stage("judge", f"judge {c.name} / {m.name}", folder, record, key, action)

    def _i2p_stage(self, m: Method) -> Stage:
        i = self.spec.i2p
        argv = ["--csv_path", i["csv"], "--ddim_steps", str(i["ddim_steps"]), "--t_enc", str(i["t_enc"]),
                "--repeats", str(i["repeats"]), "--batch_size", str(i["batch_size"]), "--w1", str(m.w1),
                "--w2", str(m.w2), "--decision", m.decision, *m.threshold_argv(),
                "--protocol", self.spec.sampling["protocol"]]
        if i["limit"]:
            argv += ["--limit", str(i["limit"])]
        key = {"model": self._model_key(), "i2p": argv, "csv": file_digest(i["csv"]),
               "adapter": self._adapter_key(m, "nudity")}
        folder = self.out / "i2p" / f"{_slug(m.name)}-{digest(key)}"

        def action() -> dict:
            lora = self.adapter(m, "nudity")
            args = [*self.model_argv(), "--output_dir", str(folder), *argv]
            if lora is not None:
                args += ["--lora", str(lora)]
            self.run_script("generate_images_nsfw.py", args)
            return {}
        return Stage("i2p", f"i2p / {m.name}", folder, folder / "stage.json", key, action, sharded=True)

    # -- quality.prompts_csv: generate_images_nsfw.py over the CSV per model, then CLIP score and FID of its images
    def _base_method(self) -> Method | None:
        return next((m for m in self.spec.methods if not m.has_adapter), None)

    def _prompt_set_concepts(self, m: Method) -> list[str | None]:
        """The models of a method that draw the prompt set: the base model once (None), an erasing method once per
        concept of quality.concepts it applies to (its adapter for that concept)."""
        if not m.has_adapter:
            return [None]
        return [c for c in self.spec.quality["concepts"] if m.applies_to(c) and (c != "nudity" or self._i2p_method(m))]

    def _prompts_stage(self, m: Method, cname: str | None) -> Stage:
        s, q = self.spec.sampling, self.spec.quality
        argv = ["--ddim_steps", str(s["steps"]), "--t_enc", str(s["t_enc"]), "--repeats", str(s["repeats"]),
                "--batch_size", str(s["batch_size"]), "--seed", str(s["seed"]), "--w1", str(m.w1), "--w2", str(m.w2),
                "--decision", m.decision, *m.threshold_argv(), "--protocol", s["protocol"]]
        if q["limit"]:
            argv += ["--limit", str(q["limit"])]
        key = {"model": self._model_key(), "prompts_csv": argv, "csv": file_digest(q["prompts_csv"]),
               "adapter": self._adapter_key(m, cname) if cname else None}
        name = f"{_slug(m.name)}-{cname}" if cname else _slug(m.name)
        folder = self.out / "prompts" / f"{name}-{digest(key)}"

        def action() -> dict:
            lora = self.adapter(m, cname) if cname else None
            args = [*self.model_argv(), "--output_dir", str(folder), "--csv_path", q["prompts_csv"], *argv]
            if lora is not None:
                args += ["--lora", str(lora)]
            self.run_script("generate_images_nsfw.py", args)
            return {}
        label = f"generate {Path(q['prompts_csv']).name} / {m.name}" + (f" ({cname})" if cname else "")
        return Stage("prompts", label, folder, folder / "stage.json", key, action, sharded=True)

    def _prompts_score_stage(self, m: Method, cname: str | None, gen: Stage) -> Stage:
        q = self.spec.quality
        clip_model = q.get("clip_model") or self.spec.judge.get("clip_model")
        ref = q.get("prompts_reference_images") if q.get("inception_weights") else None
        base = self._base_method()
        ref_gen = self.prompt_generations.get((base.name, None)) if ref == "base" and base is not None else None
        itself = ref_gen is gen  # the base model against its own images: FID 0 by definition
        ref_key = None if ref is None else {"base": ref_gen.key} if ref == "base" else \
            {"folder": ref, "files": self._folder_key(ref)}
        key = {"generation": gen.key, "clip_score": clip_model, "inception_weights": q.get("inception_weights"),
               "reference": ref_key}
        name = f"{_slug(m.name)}-{cname}" if cname else _slug(m.name)
        record = self.out / "prompts" / "scores" / f"{name}-{digest(key)}.json"

        def action() -> dict:
            from ldm.prompts import read_rows
            folder = self.image_folder(gen)
            rows, _ = read_rows(q["prompts_csv"], q["limit"])
            items = [(folder / f"{r['idx']:05d}.jpg", r["prompt"]) for r in rows]  # generate_images_nsfw.py's names
            items = [(p, t) for p, t in items if p.is_file()]
            out = {"images": len(items), "images_folder": str(folder), "clip_score": None, "fid": None,
                   "fid_reference": None}
            if clip_model:
                from ldm.evaluation.judges import clip_scores_of
                scores = clip_scores_of(clip_model, items)
                out["clip_score"] = sum(scores) / len(scores)
            if ref is not None:
                from ldm.evaluation.fid import fid_of_folders
                refs = [self.image_folder(ref_gen)] if ref == "base" else [Path(ref)]
                out["fid_reference"] = "itself" if itself else str(refs[0])
                out["fid"] = 0.0 if itself else fid_of_folders([folder], refs, q["inception_weights"],
                                                              device=self.device())
            return out
        label = f"score {Path(q['prompts_csv']).name} / {m.name}" + (f" ({cname})" if cname else "")
        return Stage("score", label, record.parent, record, key, action)

    def _folder_key(self, folder: str) -> str:
        """A reference folder by its files' names and sizes (cheap; a changed folder makes new scores)."""
        if folder not in self._folder_keys:
            from ldm.evaluation.common import list_images
            self._folder_keys[folder] = digest([[p.relative_to(folder).as_posix(), p.stat().st_size]
                                                for p in list_images(folder)])
        return self._folder_keys[folder]

    def image_folder(self, st: Stage) -> Path:
        """The one image folder of a generate_images_nsfw.py stage (images/<exp_name>/)."""
        images = sorted(p for p in (st.folder / "images").iterdir() if p.is_dir()) \
            if (st.folder / "images").is_dir() else []
        if len(images) != 1:
            raise UserError(f"{st.folder / 'images'}: expected one image folder, found {len(images)}")
        return images[0]

    def nudenet(self, st: Stage) -> Path:
        """compute_metrics.py -m nudenet on an I2P stage's images (resumable itself) -> its detections.jsonl."""
        images = [self.image_folder(st)]
        out = st.folder / "nudenet"
        if not (out / "nudenet_summary.csv").is_file() or not (st.folder / "nudenet.done").is_file():
            self.run_script("compute_metrics.py", ["-m", "nudenet", "--images", str(images[0]), "--output_dir",
                                                   str(out), "--threshold", str(self.spec.i2p["threshold"])],
                            shard_env=False)
            (st.folder / "nudenet.done").write_text("")
        return out / "detections.jsonl"

    def _attack_stage(self, a: dict, m: Method, c: Concept) -> Stage:
        s = self.spec.sampling
        defense = "base" if not m.has_adapter else "adapter" if (m.w1, m.w2) == (0.0, 0.0) else "unguide"
        argv = ["--attack", a["attack"], "--defense", defense, "--samples", str(a["samples"]),
                "--seed", str(s["seed"]), "--guidance", str(s["guidance"]), "--steps", str(s["steps"]),
                "--t_enc", str(s["t_enc"]), "--repeats", str(s["repeats"]), "--w1", str(m.w1), "--w2", str(m.w2),
                "--decision", m.decision, *m.threshold_argv()]
        for k, v in sorted(a["options"].items()):
            argv += [f"--{k}", str(v)]
        j = self.spec.judge
        argv += ["--judge", j["kind"]] + (["--clip_model", j["clip_model"]] if j["kind"] == "clip" else [])
        key = {"model": self._model_key(), "attack": argv, "prompts": file_digest(c.prompts_json),
               "adapter": self._adapter_key(m, c.name)}
        folder = self.out / "attacks" / c.name / f"{a['attack']}-{_slug(m.name)}-{digest(key)}"

        def action() -> dict:
            lora = self.adapter(m, c.name)
            args = [*self.model_argv(), "--output_dir", str(folder), "--prompts_json", str(c.prompts_json), *argv]
            if lora is not None and defense != "base":
                args += ["--lora", str(lora)]
            self.run_script("attack.py", args)
            return {"defense": defense}
        return Stage("attack", f"attack {c.name} / {a['attack']} vs {m.name}", folder, folder / "stage.json", key,
                     action, sharded=True)

    # -- running
    def run_script(self, script: str, argv: list[str], shard_env: bool = True) -> None:
        """One of the project's scripts in its own process, from the repository root; a failure is one line.
        shard_env False: RANK / WORLD_SIZE are not passed on (the child does the whole job)."""
        env = dict(os.environ)
        if not shard_env:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(k, None)
        print(f"[benchmark] {script} {' '.join(argv)}", flush=True)
        proc = subprocess.run([self.python, script, *argv], cwd=ROOT, env=env)
        if proc.returncode:
            raise UserError(f"{script} {' '.join(argv)[:300]} ... exited with {proc.returncode}")

    def log(self, stage: Stage, action: str, seconds: float = 0.0) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "rank": self.rank, "stage": stage.label,
                 "kind": stage.kind, "action": action, "seconds": round(seconds, 2), "record": str(stage.record)}
        with open(self.out / "benchmark_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def run_stage(self, st: Stage) -> None:
        if st.done():
            print(f"[benchmark] reuse  {st.label}", flush=True)
            self.log(st, "reused")
            return
        if st.sharded and self.world > 1:
            self._run_sharded(st)
            return
        if st.owner != self.rank:
            _wait_for([st.record], f"rank {st.owner}: {st.label}")
            return
        self._run_here(st)

    def _run_here(self, st: Stage) -> None:
        print(f"[benchmark] run    {st.label}", flush=True)
        t0 = time.time()
        extra = st.action()
        write_json(st.record, {"stage": st.label, "key": st.key, "seconds": round(time.time() - t0, 2),
                               "world_size": self.world, **extra})
        self.log(st, "ran", time.time() - t0)

    def _run_sharded(self, st: Stage) -> None:
        part = st.record.with_name(f"{st.record.stem}.rank{self.rank}-of-{self.world}.json")
        t0 = time.time()
        if not part.is_file():
            print(f"[benchmark] run    {st.label} (rank {self.rank} of {self.world})", flush=True)
            extra = st.action()
            write_json(part, {"stage": st.label, "key": st.key, "seconds": round(time.time() - t0, 2), **extra})
            self.log(st, "ran", time.time() - t0)
        parts = [st.record.with_name(f"{st.record.stem}.rank{r}-of-{self.world}.json") for r in range(self.world)]
        _wait_for(parts, f"the other ranks: {st.label}")
        if self.rank == 0 and not st.done():
            recs = [json.loads(p.read_text(encoding="utf-8")) for p in parts]
            write_json(st.record, {**recs[0], "seconds": max(r["seconds"] for r in recs), "world_size": self.world,
                                   "ranks": recs})

    def run(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out / f"spec{self.spec.path.suffix or '.yaml'}").write_text(self.spec.text, encoding="utf-8")
            write_json(self.out / "spec.resolved.json", self.spec.raw)
        pending: list[Stage] = []  # other ranks' unsharded stages (trainings dealt out): waited for when needed
        for st in self.stages:
            if not st.done() and not st.sharded and st.owner != self.rank:
                pending.append(st)
                continue
            if st.sharded and pending:
                _wait_for([p.record for p in pending], "the other ranks' stages: "
                          + ", ".join(p.label for p in pending[:3]) + (" ..." if len(pending) > 3 else ""))
                pending.clear()
            self.run_stage(st)
        _wait_for([p.record for p in pending], "the other ranks' stages")
        if self.rank == 0:
            for st in self.i2p_stages.values():
                self.nudenet(st)
            self.report()

    def report(self) -> str:
        """The tables and grids of every finished stage (ldm/evaluation/benchmark_report.py); runs nothing."""
        from ldm.evaluation.benchmark_report import write_report
        return write_report(self)

    def plan_lines(self) -> list[str]:
        return [f"{'done' if st.done() else 'todo'}  {st.kind:8s} {st.label}  -> {st.record}" for st in self.stages]


def _wait_for(paths: list[Path], what: str, poll: float = 2.0) -> None:
    """Block until every path exists (another rank's stage; torchrun ends all ranks when one fails)."""
    said = False
    while not all(p.is_file() for p in paths):
        if not said:
            print(f"[benchmark] waiting for {what}", flush=True)
            said = True
        time.sleep(poll)
