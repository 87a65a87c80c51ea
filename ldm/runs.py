"""Output folders that explain themselves and never mix two runs: settings records, content fingerprints, locks.

Every resumable job writes `run_config.json` into its folder: the settings its outputs depend on, with the
inputs named by CONTENT (a fingerprint of the model's weights and of each adapter's tensors), not by path. A
rerun in the same folder continues only when those settings are the same; otherwise it stops with one line
naming what differs. The record is written only after the inputs were loaded and checked, so a run that failed
on a typo leaves nothing that blocks the next one. One process per folder and shard at a time (`folder_lock`).
"""
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ldm.errors import UserError


def write_json(path: str | Path, obj, indent: int | None = 2) -> None:
    """Atomic JSON write (temporary name, then rename); indent None: one compact line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    text = json.dumps(obj, indent=indent, default=str, ensure_ascii=False,
                      separators=None if indent is not None else (",", ":"))
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path, what: str = "JSON file"):
    """The parsed content of a JSON file; UserError naming the file when it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found" if not path.exists() else f"{path}: is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})")


def shard() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of this process (torchrun's variables; 0, 1 when unset), checked."""
    rank_text, world_text = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    try:
        rank, world = int(rank_text), int(world_text)
    except ValueError:
        raise UserError(f"RANK={rank_text!r} / WORLD_SIZE={world_text!r}: not integers")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex) of named tensors' values (float32 bytes, sorted names): the same tensors give the same
    fingerprint whatever file, format or metadata they came in."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A fingerprint of the base weights (the UNet's first and last layers, the VAE decoder's input, the text
    encoder's final norm): other weights at the same path give another fingerprint. Adapters do not count."""
    picks = {"unet.in": model.unet.input_blocks[0][0].weight, "unet.out": model.unet.out[-1].weight,
             "vae.post_quant": model.first_stage_model.post_quant_conv.weight}
    for name, p in model.cond_stage_model.transformer.named_parameters():
        if name.endswith("final_layer_norm.weight"):
            picks["text.norm"] = p
    return tensors_fingerprint(picks)


def check_run_config(folder: Path, config: dict, ignore: tuple[str, ...] = ()) -> None:
    """Refuse a folder whose run_config.json was written with other settings (keys in `ignore` may differ);
    a record that is not valid JSON is named as such."""
    path = Path(folder) / "run_config.json"
    if not path.is_file():
        return
    old = read_json(path, "run record")
    if not isinstance(old, dict):
        raise UserError(f"{path}: not a run record (expected a JSON object)")
    diff = sorted(k for k in config if k not in ignore and k in old and old[k] != config[k])
    if diff:
        what = "; ".join(f"{k}: {old[k]!r} there, {config[k]!r} now" for k in diff[:4])
        raise UserError(f"{folder} holds a run with other settings ({what}); use another --output_dir or the same "
                        "settings")


@contextmanager
def _flock(path: Path, busy: str | None = None):
    """Hold an exclusive lock on the file `path` for the block (released by the OS when the process dies, so no
    stale lock survives a kill). busy None: wait while another process holds it; else UserError(busy) at once."""
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if busy is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def waiting_lock(path: Path):
    """Hold the file lock `path` for the block, waiting while another process holds it (a job that several
    processes may want to do once: the first does it, the others wait and then find it done)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _flock(path):
        yield


@contextmanager
def folder_lock(folder: Path, rank: int = 0):
    """Hold `folder/.lock.rank{rank}` for the block: a second process on the same folder and shard is refused
    at once (the lock is released by the OS when a process dies, so no stale lock survives a kill)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder (an output folder is needed)")
    folder.mkdir(parents=True, exist_ok=True)
    with _flock(folder / f".lock.rank{rank}", busy=f"{folder}: another process is writing this folder (shard "
                f"{rank}); wait for it or use another --output_dir"):
        yield
