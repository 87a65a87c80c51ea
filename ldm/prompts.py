"""The prompts JSON every script reads: {"target", "reference", "synonyms": [...], "other": [..., ""]}, the prompt
lists the scripts take from it, and the image folder of each prompt (generate_images.py's layout)."""
import re
from pathlib import Path

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


def extend_class_dirs(known: dict[str, str], prompts: list[str]) -> dict[str, str]:
    """{prompt: folder} for `prompts`, keeping the folders of `known` prompts (an earlier run's manifest) and
    giving each new prompt a folder no other prompt uses: a rerun with more prompts never mixes two prompts."""
    out = {p: known[p] for p in prompts if p in known}
    taken = set(known.values())
    fresh = class_dirs([p for p in prompts if p not in known])
    for p, folder in fresh.items():
        candidate, n = folder, 1
        while candidate in taken:
            candidate, n = f"{folder}_{n}", n + 1
        out[p] = candidate
        taken.add(candidate)
    return {p: out[p] for p in prompts}


def class_dirs(prompts: list[str]) -> dict[str, str]:
    """{prompt: folder}: the last word (the release's class_name), or a slug of the prompt on collisions."""
    last = {p: _slug(p.split(" ")[-1]) for p in prompts}
    counts: dict[str, int] = {}
    for v in last.values():
        counts[v] = counts.get(v, 0) + 1
    out = {p: (v if counts[v] == 1 else _slug(p)[:120]) for p, v in last.items()}
    if len(set(out.values())) != len(out):  # slugs collide too (e.g. prompts differing by punctuation)
        out = {p: f"{i:03d}_{v}" for i, (p, v) in enumerate(out.items())}
    return out
