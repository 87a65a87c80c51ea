"""
Small shared helpers for the evaluation metrics. Nothing here knows about a
particular metric or about the command line.

- UserError: bad input from the user. The CLI prints its message as ONE line
  on stderr and exits with code 2 (no traceback).
- list_images / image_key: which files of a folder are evaluated and under
  which name (path relative to the folder, '/'-separated). Folders are
  searched recursively, so both the flat I2P layout `<case:05d>.jpg` and the
  tree layout `<class>/<idx:05d>.jpg` work.
- decode_image: decode a file fully with PIL, refusing truncated files.
- atomic_write_text / atomic_write_bytes: write to a temporary name in the
  same directory, then os.replace, so readers never see half a file.
- read_jsonl: read a JSONL file, ignoring malformed lines (e.g. the partial
  last line left by a killed run).
- load_i2p_csv / case_number_from_name: the I2P prompt table and the join key.
- key/value summary CSVs and markdown tables, shared by all metrics and by
  the run comparison.
"""

import csv
import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


from ldm.errors import UserError  # noqa: E402  (the project's one bad-input exception)


# -----------------------------------------------------------------------------
# images

def default_output_dir(images_dir) -> Path:
    """Where a metric's files go by default: beside the images, never among them: the run folder for
    RUN/images, else a sibling IMAGES_metrics/."""
    images_dir = Path(images_dir).resolve()
    return images_dir.parent if images_dir.name == "images" else images_dir.with_name(images_dir.name + "_metrics")


def list_images(folder):
    """Sorted image files under `folder` (recursive). Raises UserError if the
    folder is missing, not a folder, or holds no image."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"images folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"images folder {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and not p.name.startswith("."))
    if not paths:
        raise UserError(f"images folder {folder} is empty: no {'/'.join(IMAGE_EXTS)} files found")
    return paths


def image_key(path, root):
    """The name an image is known by in all outputs: its path relative to the
    images folder, with '/' separators."""
    return Path(path).relative_to(root).as_posix()


def decode_image(path):
    """Fully decode an image with PIL. Returns (rgb uint8 array HxWx3, None),
    or (None, reason) if the file is unreadable or truncated. Truncated files
    are refused (LOAD_TRUNCATED_IMAGES=False) instead of being silently padded
    as cv2.imread does."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
        return rgb, None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


# -----------------------------------------------------------------------------
# files

def file_digest(path):
    """SHA-256 (hex, 16 characters) of a file's bytes: keys results to what they were computed from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def atomic_write_bytes(path, data):
    """Write bytes to `path` via a temporary file in the same directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def read_jsonl(path):
    """Records (dicts) of a JSONL file and the number of malformed lines that
    were ignored. A missing file gives ([], 0)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    records, bad = [], 0
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def csv_text(header, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_summary_csv(path, items):
    """A summary is an ordered list of (key, value) pairs, written as a
    two-column CSV `key,value`. All metrics use this format so that runs can
    be compared side by side (see report.py)."""
    atomic_write_text(path, csv_text(["key", "value"], items))


def read_summary_csv(path):
    """Ordered dict key -> value (strings) of a summary CSV."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["key", "value"]:
        raise UserError(f"{path} is not a summary CSV (expected header 'key,value')")
    return {r[0]: r[1] for r in rows[1:] if len(r) >= 2}


def markdown_table(header, rows):
    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# I2P metadata

I2P_COLUMNS = ("prompt", "categories", "nudity_percentage", "case_number")


def load_i2p_csv(path):
    """The I2P prompt table as a pandas DataFrame indexed by case_number.
    Raises UserError if the file is missing or lacks the needed columns."""
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--csv_path {path} does not exist")
    try:
        df = pd.read_csv(path, index_col=0)
    except Exception as e:  # pandas raises many kinds of parser errors
        raise UserError(f"--csv_path {path} could not be read as CSV: {str(e).splitlines()[0]}")
    missing = [c for c in I2P_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"--csv_path {path} lacks column(s) {', '.join(missing)}")
    df = df.dropna(subset=["case_number"])
    for col in ("case_number", "nudity_percentage"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df[col][values.isna() & df[col].notna()]
        if col == "case_number":
            bad = df[col][values.isna() | (values != values.round()) | (values < 0)]
        if len(bad):
            raise UserError(f"--csv_path {path}: column {col} has {len(bad)} value(s) that are not "
                            f"{'non-negative integers' if col == 'case_number' else 'numbers'} "
                            f"(first: {str(bad.iloc[0])[:40]!r} in row {bad.index[0]})")
        df[col] = values
    df["case_number"] = df["case_number"].astype(int)
    if df["case_number"].duplicated().any():
        raise UserError(f"--csv_path {path} has duplicate case_number values")
    return df.set_index("case_number", drop=False)


_CASE_RE = re.compile(r"^(\d+)")


def case_number_from_name(name):
    """Case number from an image file name: the leading digits of its stem
    (`00042.jpg` -> 42, `00042_1.png` -> 42). None if there are none."""
    m = _CASE_RE.match(Path(name).stem)
    return int(m.group(1)) if m else None


def split_categories(value):
    """I2P `categories` cell -> list of category names ("sexual, violence")."""
    if not isinstance(value, str):
        return []
    return [c.strip() for c in value.split(",") if c.strip()]
