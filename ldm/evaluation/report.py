"""
Side-by-side comparison of evaluated runs (`compute_metrics.py compare`).

    python compute_metrics.py compare RUN_DIR RUN_DIR ... --output_dir OUT \
        [--names base adapter unguide] [--grid_rows 8]

A RUN_DIR is a folder on which `compute_metrics.py -m ...` was run: it holds
one or more `<metric>_summary.csv` files (key,value; see common.py) and,
normally, the images. If the images live elsewhere, the `images_dir` key of a
summary is used to find them.

Writes into OUT (atomically):
- comparison.md: per metric, one table with a row per summary key and a
  column per run (keys missing from a run are left blank). Long bookkeeping
  keys (skipped image lists, paths) are left out of the table. If the runs
  differ in a protocol stamp (nudenet version, threshold, rule, score floor,
  CLIP model) a warning line says so under the table.
- grid_<set>.png per prompt set: a prompt set is a sub-folder of the images
  (`<class>/` in the tree layout; the flat layout is one set named "all").
  Rows are the first --grid_rows image names common to all runs (sorted),
  columns are runs; run names head the columns, image names label the rows.
"""

import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ldm.evaluation.common import (
    IMAGE_EXTS, UserError, atomic_write_bytes, atomic_write_text, decode_image,
    default_output_dir, markdown_table, read_summary_csv,
)

STAMP_KEYS = ("nudenet_version", "threshold", "rule", "score_floor", "clip_model")  # must match to compare
HIDDEN_KEYS = {"skipped_images", "images_dir", "classes", "clip_model", "zero_shot_classes"}
THUMB = 160  # grid cell size in pixels
LABEL_W = 140  # width of the row-label column
HEADER_H = 24


# -----------------------------------------------------------------------------
# inputs


def run_names(run_dirs, names=None):
    if names:
        if len(names) != len(run_dirs):
            raise UserError(f"--names gives {len(names)} name(s) for {len(run_dirs)} run folder(s)")
        return list(names)
    return [Path(d).resolve().name for d in run_dirs]


def run_folders(run_dir):
    """(where a run's scores are, where its images are): RUN/ and RUN/images for a run folder, the parent for an
    images folder named `images`, else IMAGES_metrics/ beside a flat images folder (compute_metrics' default)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist")
    if (run_dir / "images").is_dir():
        return run_dir, run_dir / "images"
    if any(run_dir.glob("*_summary.csv")):  # scores written into the folder itself (an explicit --output_dir)
        return run_dir, run_dir
    return default_output_dir(run_dir), run_dir


def read_run(run_dir, metric=None, args=None):
    """{metric: summary dict} of one run folder; with `metric`, a run not yet scored with it is scored now
    (the metric's flags from `args`)."""
    scores, images = run_folders(run_dir)
    if metric and not (scores / f"{metric}_summary.csv").is_file():
        from ldm.evaluation import METRICS
        print(f"scoring {images} with {metric} -> {scores}")
        METRICS[metric](argparse.Namespace(**{**vars(args or argparse.Namespace()), "images": str(images),
                                              "output_dir": str(scores)}))
    summaries = {}
    for p in sorted(scores.glob("*_summary.csv")) if scores.is_dir() else []:
        summaries[p.name[: -len("_summary.csv")]] = read_summary_csv(p)
    if not summaries:
        raise UserError(f"run folder {run_dir} is not scored yet: add -m digits|nudenet|clip to score it now "
                        "(or run compute_metrics.py -m ... on it first)")
    summaries.setdefault("_paths", {"images_dir": str(images)})
    return summaries


def run_images(run_dir, summaries):
    """{relative image name: path} of a run (its images folder, else a summary's images_dir)."""
    roots = [run_folders(run_dir)[1]] + [Path(s["images_dir"]) for s in summaries.values() if s.get("images_dir")]
    for root in roots:
        if root.is_dir():
            found = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
                     if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not p.name.startswith(".")}
            if found:
                return found
    return {}


# -----------------------------------------------------------------------------
# table


def comparison_markdown(names, runs):
    """One table per metric: rows = summary keys (in first-seen order), columns = runs."""
    metrics = []
    for r in runs:
        metrics += [m for m in r if m not in metrics and not m.startswith("_")]
    md = ["# Run comparison\n", "Runs: " + ", ".join(f"`{n}`" for n in names) + "\n"]
    for m in metrics:
        keys = []
        for r in runs:
            keys += [k for k in r.get(m, {}) if k not in keys and k not in HIDDEN_KEYS and k != "metric"]
        rows = [[k] + [r.get(m, {}).get(k, "") for r in runs] for k in keys]
        md += [f"## {m}\n", markdown_table(["key"] + list(names), rows)]
        differ = [k for k in STAMP_KEYS if len({r.get(m, {}).get(k) for r in runs}) > 1]
        if differ:
            md.append(f"**Warning:** the runs differ in {', '.join(differ)}; their {m} numbers are not comparable.\n")
    return "\n".join(md)


# -----------------------------------------------------------------------------
# grids


def prompt_sets(common_names):
    """{set name: sorted image names}: by first path component, or 'all' for flat files."""
    sets = {}
    for n in sorted(common_names):
        parts = n.split("/")
        sets.setdefault(parts[0] if len(parts) > 1 else "all", []).append(n)
    return sets


def _fit(img, size):
    """The image scaled to fill a size x size cell (keeping its aspect): small images (the toy model's 16 px) are
    upscaled with nearest-neighbour pixels, large ones reduced smoothly."""
    scale = size / max(img.width, img.height)
    resample = Image.NEAREST if scale >= 1 else Image.BICUBIC
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    cell = Image.new("RGB", (size, size), "white")
    cell.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return cell


def _font(size=14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def make_grid(names, row_names, images_by_run, thumb=THUMB):
    """PIL image: header row with run names, one row per image name; labels measured so none is cut."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max([probe.textlength(rn, font=font) for rn in row_names] + [LABEL_W])) + 12
    header_h = HEADER_H + 6
    cell_w = max(thumb, int(max(probe.textlength(n, font=font) for n in names)) + 12)
    grid = Image.new("RGB", (label_w + cell_w * len(names), header_h + thumb * len(row_names)), "white")
    draw = ImageDraw.Draw(grid)
    for j, n in enumerate(names):
        draw.text((label_w + j * cell_w + 4, 6), n, fill="black", font=font)
    for i, rn in enumerate(row_names):
        y = header_h + i * thumb
        draw.text((4, y + thumb // 2 - 8), rn, fill="black", font=font)
        for j, imgs in enumerate(images_by_run):
            rgb, err = decode_image(imgs[rn])
            if err is None:
                grid.paste(_fit(Image.fromarray(rgb), thumb - 4), (label_w + j * cell_w + 2, y + 2))
            else:
                draw.text((label_w + j * cell_w + 4, y + thumb // 2), "unreadable", fill="red", font=font)
    return grid


def _safe(name):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def compare(run_dirs, output_dir, names=None, grid_rows=8, metric=None, args=None, thumb=THUMB):
    """Write comparison.md and the grids (runs not yet scored are scored with `metric`); return the paths."""
    if len(run_dirs) < 1:
        raise UserError("compare needs at least one run folder")
    if not output_dir:
        raise UserError("compare needs --output_dir OUT")
    if grid_rows < 1:
        raise UserError(f"--grid_rows {grid_rows} must be at least 1")
    names = run_names(run_dirs, names)
    runs = [read_run(d, metric, args) for d in run_dirs]
    out = Path(output_dir)
    written = [out / "comparison.md"]
    atomic_write_text(written[0], comparison_markdown(names, runs))

    images_by_run = [run_images(d, r) for d, r in zip(run_dirs, runs)]
    common = set(images_by_run[0])
    for imgs in images_by_run[1:]:
        common &= set(imgs)
    for set_name, rows in prompt_sets(common).items():
        grid = make_grid(names, rows[:grid_rows], images_by_run, thumb)
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        path = out / f"grid_{_safe(set_name)}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


def run(args):
    written = compare(args.runs, args.output_dir, args.names, args.grid_rows, args.metric, args,
                      getattr(args, "thumb", THUMB))
    print("wrote " + ", ".join(str(p) for p in written))
    return written
