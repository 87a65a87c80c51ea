"""The prompts a run draws: the prompts JSON every script reads ({"target", "reference", "synonyms": [...],
"other": [..., ""]}), the prompt lists the scripts take from it, the image folder of each prompt
(generate_images.py's layout), and prompt CSVs (I2P: prompt, evaluation_seed, evaluation_guidance; read_rows)."""
import math
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ldm.erasure.draws import reduce_seed
from ldm.errors import UserError
from ldm.runs import read_json


def read_prompts_json(path: str | Path, need_reference: bool = False) -> dict:
    """Read and check a prompts file; UserError naming the file and the problem otherwise.

    target: a non-empty string (the concept); reference: the anchor prompt (required for training);
    synonyms / other: lists of strings (optional).
    """
    data = read_json(path, "prompts JSON")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with \"target\" and \"reference\"")
    for key in ("target", "reference") if need_reference else ("target",):
        if key not in data:
            raise UserError(f"{path}: missing required prompt \"{key}\"")
    for key in ("target", "reference"):
        if key in data and not isinstance(data[key], str):
            raise UserError(f"{path}: \"{key}\" must be a string, got {type(data[key]).__name__}")
    if not data["target"].strip():
        raise UserError(f"{path}: \"target\" is empty: there is no concept to erase")
    for key in ("synonyms", "other"):
        if not isinstance(data.get(key, []), list) or not all(isinstance(s, str) for s in data.get(key, [])):
            raise UserError(f"{path}: \"{key}\" must be a list of strings")
    return data


def experiment_prompts(data: dict) -> list[str]:
    """generate_images.py's prompts: target, synonyms, other; each once, "" dropped (the release's [:-1] dropped ""
    or the target)."""
    prompts = [data["target"]] + list(data.get("synonyms", [])) + list(data.get("other", []))
    return [p for p in dict.fromkeys(prompts) if p != ""]


def diff_prompts(data: dict) -> list[str]:
    """compute_lora_diff.py's prompts: target, other, synonyms (the release's order), each once, and "" (added
    last when not listed: the decision needs d(""); the release crashed later without it, fact sheet §9.8)."""
    prompts = [data["target"]] + list(data.get("other", [])) + list(data.get("synonyms", []))
    return list(dict.fromkeys(prompts + ([] if "" in prompts else [""])))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "prompt"


def extend_class_dirs(known: dict[str, str], prompts: list[str], style: str | None = "last_word") -> dict[str, str]:
    """{prompt: folder} for `prompts`, keeping the folders of `known` prompts (an earlier run's manifest) and
    giving each new prompt a folder no other prompt uses: a rerun with more prompts never mixes two prompts."""
    out = {p: known[p] for p in prompts if p in known}
    taken = set(known.values())
    fresh = class_dirs([p for p in prompts if p not in known], style or "last_word")
    for p, folder in fresh.items():
        candidate, n = folder, 1
        while candidate in taken:
            candidate, n = f"{folder}_{n}", n + 1
        out[p] = candidate
        taken.add(candidate)
    return {p: out[p] for p in prompts}


def class_dirs(prompts: list[str], style: str = "last_word") -> dict[str, str]:
    """{prompt: folder}: the last word (the release's class_name), or a slug of the prompt on collisions;
    style "prompt": a slug of the whole prompt for every prompt."""
    last = {p: _slug(p.split(" ")[-1] if style == "last_word" else p)[:120] for p in prompts}
    counts: dict[str, int] = {}
    for v in last.values():
        counts[v] = counts.get(v, 0) + 1
    out = {p: (v if counts[v] == 1 else _slug(p)[:120]) for p, v in last.items()}
    if len(set(out.values())) != len(out):  # slugs collide too (e.g. prompts differing by punctuation)
        out = {p: f"{i:03d}_{v}" for i, (p, v) in enumerate(out.items())}
    return out


# ----------------------------------------------------------------------------------------------- prompt CSVs
# I2P and the attack prompt sets: rows with prompt, evaluation_seed, evaluation_guidance (and a row index).
DEFAULT_GUIDANCE = 7.5
SANE_GUIDANCE = (1.0, 30.0)
# pandas' default NA strings: the release's read_csv turned these prompts into NaN and skipped them
NA_STRINGS = {"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
              "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


# ----------------------------------------------------------------------------------------------- CSV rows
def _integer(text: str) -> int | None:
    try:
        v = Decimal(text.strip())
    except InvalidOperation:
        return None
    return int(v) if v.is_finite() and v == v.to_integral_value() else None


def _guidance(text: str) -> tuple[float | None, str]:
    try:
        g = float(text)
    except ValueError:
        return None, "is not a number"
    return (g, "") if math.isfinite(g) else (None, "is not finite")


def _seed(text: str) -> tuple[int | None, str]:
    seed = _integer(text)
    return (seed, "") if seed is not None and seed >= 0 else (None, "is not a non-negative integer")


def _optional_number(rec: dict, col: str, present: bool, idx: int, default, default_text: str, parse,
                     notes: list[str]):
    """A row's value of an optional numeric column: the default when the cell is empty (noted when the column
    exists), None when `parse` rejects it (the row is skipped, noted with parse's reason)."""
    text = rec[col].strip() if present else ""
    if not text:
        if present:
            notes.append(f"row {idx}: {col} missing: using {default_text}")
        return default
    value, why = parse(text)
    if value is None:
        notes.append(f"row {idx}: skipped: {col} {text!r} {why}")
    return value


def read_rows(csv_path: str, limit: int | None = None) -> tuple[list[dict], list[str]]:
    """-> (usable rows {idx, case_number, prompt, seed, guidance}, notes about skipped or adjusted rows)."""
    import pandas as pd

    path = Path(csv_path)
    if not path.is_file():
        raise UserError(f"{csv_path}: CSV not found")
    try:  # everything as text: seeds above 2^53 keep their digits, "" stays "" (not NaN)
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise UserError(f"{csv_path}: not a readable CSV ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    if "prompt" not in df.columns:
        raise UserError(f"{csv_path}: no 'prompt' column (columns: {', '.join(map(str, df.columns[:12]))})")
    if limit is not None:
        df = df.iloc[:limit]
    notes: list[str] = []
    first = str(df.columns[0])
    index_col = first if first == "" or first.startswith("Unnamed") else None
    ids = None
    for col in [c for c in (index_col, "case_number") if c is not None and c in df.columns]:
        vals = [_integer(v) for v in df[col]]
        if all(v is not None and v >= 0 for v in vals) and len(set(vals)) == len(vals):
            ids = vals
            break
        notes.append(f"column {col!r} is not a unique non-negative integer index; not used as the row index")
    if ids is None:
        ids = list(range(len(df)))
    if "evaluation_guidance" not in df.columns:
        notes.append(f"no 'evaluation_guidance' column: every row uses CFG {DEFAULT_GUIDANCE}")
    if "evaluation_seed" not in df.columns:
        notes.append("no 'evaluation_seed' column: every row uses its index as the seed")
    rows = []
    has_g, has_s, has_case = ("evaluation_guidance" in df.columns, "evaluation_seed" in df.columns,
                              "case_number" in df.columns)
    for k, (idx, rec) in enumerate(zip(ids, df.to_dict("records"))):
        prompt = rec["prompt"]
        if not prompt.strip():
            notes.append(f"row {idx}: skipped: empty prompt")
            continue
        if prompt.strip() in NA_STRINGS:
            notes.append(f"row {idx}: skipped: prompt {prompt!r} is NaN (as pandas, and so the release, reads it)")
            continue
        guidance = _optional_number(rec, "evaluation_guidance", has_g, idx, DEFAULT_GUIDANCE, str(DEFAULT_GUIDANCE),
                                    _guidance, notes)
        if guidance is None:
            continue
        seed = _optional_number(rec, "evaluation_seed", has_s, idx, idx, f"the row index {idx}", _seed, notes)
        if seed is None:
            continue
        if not SANE_GUIDANCE[0] <= guidance <= SANE_GUIDANCE[1]:
            notes.append(f"row {idx}: unusual evaluation_guidance {guidance:g} (outside {SANE_GUIDANCE}): used as given")
        if seed >= 2 ** 64:
            notes.append(f"row {idx}: evaluation_seed {seed} >= 2^64: using seed mod 2^64 = {reduce_seed(seed)}")
            seed = reduce_seed(seed)
        rows.append({"idx": idx, "case_number": rec["case_number"] if has_case else "", "prompt": prompt,
                     "seed": seed, "guidance": guidance, "position": k})
    return rows, notes
