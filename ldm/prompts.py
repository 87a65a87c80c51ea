"""The prompts JSON every script reads: {"target", "reference", "synonyms": [...], "other": [..., ""]}."""
import json
from pathlib import Path

from ldm.errors import UserError


def read_prompts_json(path: str | Path, need_reference: bool = False) -> dict:
    """Read and check a prompts file; UserError naming the file and the problem otherwise.

    target: a non-empty string (the concept); reference: the anchor prompt (required for training);
    synonyms / other: lists of strings (optional).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: prompts JSON not found" if not p.exists() else f"{path}: is not a file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})")
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
