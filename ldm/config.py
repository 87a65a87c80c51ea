"""Model configs (CompVis YAML: {target, params}) -> modules, instantiating only this project's model classes.

A config is a user file like a checkpoint: its `target:` strings name code to run. Only the classes in
ALLOWED_TARGETS may appear anywhere in the config's tree unless the caller passes unsafe=True (the scripts'
--unsafe_config flag); load_config checks the whole tree once, before anything is imported.
"""
import importlib
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.errors import UserError

ALLOWED_TARGETS = frozenset({
    "ldm.models.diffusion.ddpm.LatentDiffusion",
    "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "ldm.models.autoencoder.AutoencoderKL",
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "torch.nn.Identity",  # CompVis configs name it as the VAE's loss in inference configs
})


def check_targets(node, source: str, unsafe: bool = False) -> None:
    """Every `target` in the config tree is a dotted class path of ALLOWED_TARGETS (any dotted path if unsafe)."""
    if isinstance(node, (dict, DictConfig)):
        for key, value in node.items():
            if key == "target":
                if not isinstance(value, str) or "." not in value:
                    raise UserError(f"{source}: target {value!r} is not a dotted class path such as "
                                    "ldm.models.diffusion.ddpm.LatentDiffusion")
                if not unsafe and value not in ALLOWED_TARGETS:
                    raise UserError(f"{source}: target {value!r} is not one of this project's model classes; "
                                    "refusing to import it (pass --unsafe_config if you trust this config)")
            else:
                check_targets(value, source, unsafe)
    elif isinstance(node, (list, tuple, ListConfig)):
        for value in node:
            check_targets(value, source, unsafe)


def get_obj_from_str(name: str):
    """The class a dotted path names (targets are checked once, when the config is read: check_targets)."""
    module, cls = name.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"config target {name!r}: cannot be imported ({exc})")


def instantiate_from_config(config):
    """Build `target(**params)` from a {target, params} mapping (CompVis convention)."""
    if not isinstance(config, (dict, DictConfig)) or "target" not in config:
        raise UserError(f"expected a config block with a 'target' key, got {str(config)[:80]!r}")
    params = config.get("params", None) or {}
    if not isinstance(params, dict):
        params = OmegaConf.to_container(params, resolve=True)
    cls = get_obj_from_str(config["target"])
    try:
        return cls(**params)
    except TypeError as exc:  # a misspelt or unknown parameter
        raise UserError(f"config target {config['target']}: bad params ({exc})")


def load_config(path: str | Path, unsafe: bool = False):
    """Read a YAML model config; UserError naming the file when it is missing, unreadable, has no model.target
    or names a class outside ALLOWED_TARGETS (unless unsafe)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found" if not path.exists() else f"{path}: is not a file")
    try:
        config = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in several classes
        raise UserError(f"{path}: not a readable YAML config ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    if not isinstance(config, DictConfig) or "model" not in config or "target" not in config.model:
        raise UserError(f"{path}: config has no model.target")
    check_targets(config, str(path), unsafe)
    return config
