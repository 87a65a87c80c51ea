"""The reference implementations the verification tests compare against: the lpips package (LPIPS), pytorch-fid
(FID) and the torchvision both are built on.

They are installed beside the environment, not in it (requirements-reference.txt says why and how):
    python -m pip install --no-deps --target "$(python -c 'import sys; print(sys.prefix)')/reference" \\
        -r requirements-reference.txt
(LDM_REFERENCE_DIR=folder names another folder.) `reference()` puts that folder on sys.path while it imports
them and takes it off again. The torchvision wheels that fit torch 2.13 are CUDA builds whose C ops do not load
next to a CPU torch, and torchvision then fails at import while registering fake kernels for those ops
(`torchvision::nms`); nothing the references use (the model classes) needs them, so that one module is replaced
by an empty one. `block_downloads` makes every weight fetcher raise while the references are built.
"""
import importlib
import os
import sys
import types
from pathlib import Path

import pytest

INSTALL = ("python -m pip install --no-deps --target \"$(python -c 'import sys; print(sys.prefix)')/reference\" "
           "-r requirements-reference.txt")


def reference_dir() -> Path:
    return Path(os.environ.get("LDM_REFERENCE_DIR") or Path(sys.prefix) / "reference")


def _import_torchvision():
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as exc:  # its C ops did not load (a CUDA wheel next to a CPU torch)
        if "torchvision::" not in str(exc):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    return importlib.import_module("torchvision")


def reference(*names: str) -> list[types.ModuleType]:
    """Import the named reference modules (e.g. "lpips", "pytorch_fid.inception") with torchvision first."""
    folder = str(reference_dir())
    added = folder not in sys.path
    if added:
        sys.path.append(folder)
    try:
        _import_torchvision()
        return [importlib.import_module(n) for n in names]
    except ImportError as exc:
        pytest.fail(f"the reference implementations are not installed ({exc}); install them with: {INSTALL}")
    finally:
        if added:
            sys.path.remove(folder)


FETCHERS = ("load_state_dict_from_url", "load_url", "download_url_to_file")


def block_downloads(monkeypatch) -> None:
    """Every function torch, torchvision and the references fetch weights with raises instead (in each module that
    holds one under its name, so `from torch.hub import load_state_dict_from_url` copies are covered too)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("torch.hub", "torch.utils.model_zoo", "torchvision", "lpips",
                                                  "pytorch_fid")):
            continue
        for attr in FETCHERS:
            if callable(getattr(module, attr, None)):
                monkeypatch.setattr(module, attr, refuse)
