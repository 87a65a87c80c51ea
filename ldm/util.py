"""Config instantiation, device choice and the one model loader every script uses."""
import importlib
from pathlib import Path

import torch
from omegaconf import OmegaConf


class UserError(Exception):
    """A problem with the user's input (a path, a value, a file's content). Scripts print it in one line, exit 2."""


def get_obj_from_str(name: str):
    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def instantiate_from_config(config):
    """Build `target(**params)` from a {target, params} mapping (CompVis convention)."""
    if "target" not in config:
        raise KeyError("expected a config with a 'target' key")
    params = config.get("params", None) or {}
    if not isinstance(params, dict):
        params = OmegaConf.to_container(params, resolve=True)
    return get_obj_from_str(config["target"])(**params)


def load_config(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found" if not path.exists() else f"{path}: is not a file")
    try:
        config = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several classes
        raise UserError(f"{path}: not a readable YAML config ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    if "model" not in config or "target" not in config.model:
        raise UserError(f"{path}: config has no model.target")
    return config


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU. Also 'cpu', 'cuda', 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs CUDA; on the CPU use fp32 (or bf16)")
    return PRECISIONS[precision]


def build_model(config_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The model of a config with freshly initialised (random) weights: for tests and benchmarks."""
    config = load_config(config_path)
    return instantiate_from_config(config.model).to(device=device, dtype=dtype).eval()


def load_model_from_config(config_path: str | Path, ckpt_path: str | Path, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, unsafe_pickle_load: bool = False,
                           verbose: bool = True):
    """Build the LatentDiffusion model of `config_path` and load `ckpt_path` (.ckpt or .safetensors) into it.

    The modules are built on the meta device and the checkpoint's tensors are assigned to them, so loading
    holds the state dict once, never a second, randomly initialised model. Every key is accounted for
    (ldm.checkpoint.load_weights); the model comes back in eval mode on `device` in `dtype`.
    """
    from ldm.checkpoint import load_weights, read_checkpoint  # late import: checkpoint imports this module

    config = load_config(config_path)
    state_dict, extras = read_checkpoint(ckpt_path, unsafe_pickle_load=unsafe_pickle_load)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    report = load_weights(model, state_dict, source=str(ckpt_path), assign=True)
    del state_dict
    model.rebuild_buffers()
    stray = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if stray:
        raise RuntimeError(f"loader bug: tensors left on the meta device: {stray[:5]}")
    if verbose:
        print(f"loaded {ckpt_path}: {report}" + (f"; top-level entries ignored: {', '.join(extras)}" if extras else ""))
    return model.to(device=device, dtype=dtype).eval()
