"""The one loader: config -> model, safe and strict checkpoint reading, device and dtype resolution.

Every script and test gets its model here (ldm.cli adds the flags): `resolve_device` / `resolve_dtype` decide
device and dtype once; `load_model_from_config` builds the model of a config on the meta device and assigns a
checkpoint's tensors to it; `build_model` gives random weights (tests, benchmarks).

Safety: `.ckpt` files are read with torch.load(weights_only=True), which refuses to run code. Lightning
checkpoints may pickle a `ModelCheckpoint` callback object beside the weights; we let the restricted
unpickler build it as an inert placeholder (a plain object holding its attributes) and drop it.
Anything else that needs arbitrary unpickling is refused unless the caller opts in (`unsafe_pickle_load`).
Configs name classes to build: only this project's (ldm.config.ALLOWED_TARGETS) unless `unsafe_config`.

Key names: the released checkpoints name the text encoder `cond_stage_model.transformer.text_model.*`.
transformers 5.x's CLIPTextModel has no `text_model.` level in its own state dict; `release_key` maps our
module names to the released ones whichever version is installed, in both directions.
"""
import contextlib
import hashlib
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldm import layouts
from ldm.config import instantiate_from_config, load_config
from ldm.errors import UserError
from ldm.models.diffusion.ddpm import SCHEDULE_KEYS

TEXT_PREFIX = "cond_stage_model.transformer."
CONTEXT_PROBE = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # [320, context]


class _InertObject:
    """Stands in for a pickled training-time object (e.g. Lightning's ModelCheckpoint) so it can be dropped."""

    def __setstate__(self, state):
        self.state = state


_INERT_GLOBALS = [(_InertObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
                  (_InertObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")]


def release_key(module_key: str) -> str:
    """Our state-dict key -> the key the CompVis/Runway checkpoints use."""
    if module_key.startswith(TEXT_PREFIX) and not module_key.startswith(TEXT_PREFIX + "text_model."):
        return TEXT_PREFIX + "text_model." + module_key[len(TEXT_PREFIX):]
    return module_key


def is_known_extra(key: str) -> bool:
    """Keys of released checkpoints that are not weights of today's modules; skipped knowingly."""
    return (key in SCHEDULE_KEYS
            or key == TEXT_PREFIX + "text_model.embeddings.position_ids"  # a buffer, rebuilt on load
            or key == "logvar"                                            # CompVis' unused learned-logvar placeholder
            or key.startswith("model_ema.")                               # EMA copy (decay, num_updates, weights)
            or key.startswith("first_stage_model.loss."))                 # VAE training loss (LPIPS, discriminator)


def file_sha256(path: str | Path, prefix_chars: int = 16) -> str:
    """SHA-256 of a file, or of a folder's files (names and bytes, in sorted order: a diffusers model folder)
    (hex, shortened): identifies the base checkpoint an adapter was trained on."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:prefix_chars]


def sniff_file_kind(path: Path) -> str:
    """What a file is, from its first bytes: "zip" (PyTorch's format), "pickle" (legacy torch.save),
    "safetensors", "empty", or a description of something else (for the error message)."""
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    for magic, what in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                        (b"\x1f\x8b", "a gzip archive"), (b"<", "an HTML/XML page (a failed download?)"),
                        (b"{", "a JSON file"), (b"version https://git-lfs", "a Git LFS pointer (run git lfs pull)")):
        if head.startswith(magic):
            return what
    return "of unknown content"


def read_checkpoint(path: str | Path, unsafe_pickle_load: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a .ckpt/.pt/.pth (PyTorch zip or legacy pickle) or .safetensors file, whatever its suffix says
    -> (flat state dict, names of ignored top-level entries)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a checkpoint file (.ckpt or .safetensors)")
    kind = sniff_file_kind(path)
    if kind == "empty":
        raise UserError(f"{path}: is empty (0 bytes): an interrupted download or copy?")
    if kind == "safetensors" or (path.suffix == ".safetensors" and kind not in ("zip", "pickle")):
        try:
            return load_file(str(path)), []
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}")
    if kind not in ("zip", "pickle"):
        raise UserError(f"{path}: is {kind}, not a PyTorch or safetensors checkpoint")
    try:
        obj = _torch_load(path, unsafe_pickle_load)
    except pickle.UnpicklingError as exc:
        culprit = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UserError(f"{path}: needs arbitrary unpickling to load ({culprit[:160]}); convert it to .safetensors, "
                        "or pass --unsafe_pickle_load if you trust its source")
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, IndexError) as exc:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                        f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}")
    extras = []
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extras = sorted(str(k) for k in obj if k != "state_dict")
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    return obj, extras


def _torch_load(path: Path, unsafe: bool):
    if unsafe:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(_INERT_GLOBALS):
        try:  # memory-map: the tensors are paged in from the file instead of copied into fresh memory
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint",
                 assign: bool = False) -> str:
    """Load a released-format state dict into `model` strictly; return a one-line report of what was skipped.

    Missing keys, unexpected keys and shape mismatches are errors that name the keys. The known extras
    (is_known_extra) are skipped; the schedule buffers among them are checked against the config's schedule.
    """
    ours = model.state_dict()
    by_release = {release_key(k): k for k in ours}
    probe = by_release.get(CONTEXT_PROBE)
    if probe is not None and CONTEXT_PROBE in state_dict:
        want, got = ours[probe].shape[1], state_dict[CONTEXT_PROBE].shape[1]
        if want != got:
            raise UserError(f"{source}: cross-attention context width {got} (SD 2.x uses 1024) does not match the "
                            f"config's {want}: this checkpoint is of another architecture")
    _check_schedule(model, state_dict, source)

    mapped, skipped, unexpected = {}, [], []
    for key, value in state_dict.items():
        if key in by_release:
            mapped[by_release[key]] = value
        elif is_known_extra(key):
            skipped.append(key)
        else:
            unexpected.append(key)
    missing = [release_key(k) for k in ours if k not in mapped]
    wrong = [f"{release_key(k)} {tuple(v.shape)} vs {tuple(ours[k].shape)}"
             for k, v in mapped.items() if v.shape != ours[k].shape]
    wrong += [f"{release_key(k)} is {v.dtype}, not floating point"
              for k, v in mapped.items() if ours[k].is_floating_point() and not v.is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:4])}"
                        f"{', ...' if len(unexpected) > 4 else ''})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:3])})")
    if problems:
        raise UserError(f"{source}: does not match the config: " + "; ".join(problems))
    bad = [release_key(k) for k, v in mapped.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{source}: {len(bad)} tensors hold NaN or Inf values ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): a corrupt or diverged checkpoint")
    model.load_state_dict(mapped, strict=True, assign=assign)
    ema = sum(k.startswith("model_ema.") for k in skipped)
    return (f"{len(mapped)} tensors loaded; skipped {len(skipped)} known non-weight entries"
            + (f" ({ema} of them EMA)" if ema else "") if skipped else f"{len(mapped)} tensors loaded")


def _check_schedule(model, state_dict: dict, source: str) -> None:
    for name in SCHEDULE_KEYS:
        if name in state_dict and hasattr(model, name):
            ours = getattr(model, name)  # built on the CPU from the config, also when the model is on meta
            theirs = state_dict[name].float()
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours.float(), rtol=1e-4, atol=1e-6):
                raise UserError(f"{source}: its noise schedule ({name}) differs from the config's "
                                "(linear_start/linear_end/timesteps)")


def release_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our model's weights under the released key names (what load_weights reads back)."""
    return {release_key(k): v for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- device
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


def autocast(device: torch.device, precision: str | None):
    """torch.autocast at `precision` on `device` (None or fp32: no autocast)."""
    if precision is None or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=resolve_dtype(precision, device))


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs CUDA; on the CPU use fp32 (or bf16)")
    return PRECISIONS[precision]


# ----------------------------------------------------------------------------------------------- models
def image_size_facts(config_path: str | Path) -> tuple[int, int]:
    """(the image side a config's model was trained at, the multiple every image side must be), from the config
    alone: latent side (model.params.image_size) x VAE factor 2^(len(ch_mult) - 1); the multiple is the VAE
    factor x the UNet's downsampling 2^(len(channel_mult) - 1). SD v1: (512, 64); the toy-digits model: (16, 4)."""
    params = load_config(config_path).model.params
    vae = 2 ** (len(params.first_stage_config.params.ddconfig.ch_mult) - 1)
    unet = 2 ** (len(params.unet_config.params.channel_mult) - 1)
    return int(params.get("image_size", 64)) * vae, vae * unet


def build_model(config_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                unsafe_config: bool = False):
    """The model of a config with freshly initialised (random) weights: for tests and benchmarks."""
    config = load_config(config_path, unsafe=unsafe_config)
    return instantiate_from_config(config.model).to(device=device, dtype=dtype).eval()


def load_model_from_config(config_path: str | Path, ckpt_path: str | Path, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, unsafe_pickle_load: bool = False,
                           verbose: bool = True, unsafe_config: bool = False, unet_weights: str | Path | None = None):
    """Build the LatentDiffusion model of `config_path` and load `ckpt_path` into it: a CompVis .ckpt, a
    single-file .safetensors, or a diffusers model folder (ldm.layouts). `unet_weights`: a UNet state dict
    (diffusers or CompVis layout, e.g. ESD's published files) that replaces the checkpoint's UNet.

    The modules are built on the meta device and the checkpoint's tensors are assigned to them, so loading
    holds the state dict once, never a second, randomly initialised model. Every key is accounted for
    (load_weights); the model comes back in eval mode on `device` in `dtype`.
    """
    config = load_config(config_path, unsafe=unsafe_config)
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    ours = release_state_dict(model)  # meta tensors: the names and shapes a file must provide
    state_dict, extras = read_model_weights(ckpt_path, ours, unsafe_pickle_load)
    source = str(ckpt_path)
    if unet_weights is not None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(layouts.UNET_PREFIX)}
        state_dict.update(read_unet_weights(unet_weights, ours, unsafe_pickle_load))
        source += f" with the UNet of {unet_weights}"
    report = load_weights(model, state_dict, source=source, assign=True)
    del state_dict
    model.rebuild_buffers()
    stray = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if stray:
        raise RuntimeError(f"loader bug: tensors left on the meta device: {stray[:5]}")
    if verbose:
        print(f"loaded {source}: {report}" + (f"; top-level entries ignored: {', '.join(extras)}" if extras else ""))
    return model.to(device=device, dtype=dtype).eval()


def read_model_weights(path: str | Path, ours: dict[str, torch.Tensor], unsafe_pickle_load: bool = False
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The whole model's weights under our (released) key names, from a checkpoint file or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        if not layouts.is_diffusers_folder(path):
            raise UserError(f"{path}: is a directory but not a diffusers model folder (no model_index.json); "
                            "expected a checkpoint file (.ckpt or .safetensors) or a diffusers folder")
        layouts.read_model_index(path)
        converters = {"unet": layouts.convert_unet, "vae": layouts.convert_vae, "text_encoder": layouts.convert_text}
        state_dict = {}
        for component, convert in converters.items():
            file = layouts.component_file(path, component)
            state_dict.update(convert(read_checkpoint(file, unsafe_pickle_load)[0], ours, str(file)))
        return state_dict, []
    state_dict, extras = read_checkpoint(path, unsafe_pickle_load)
    if layouts.looks_like_diffusers_unet(state_dict) or layouts.looks_like_compvis_unet(state_dict):
        layout = "diffusers" if layouts.looks_like_diffusers_unet(state_dict) else "CompVis"
        raise UserError(f"{path}: a {layout} UNet state dict, not a whole model: pass it with --unet_weights "
                        "and give the base model with --ckpt")
    return state_dict, extras


def read_unet_weights(path: str | Path, ours: dict[str, torch.Tensor], unsafe_pickle_load: bool = False
                      ) -> dict[str, torch.Tensor]:
    """A UNet state dict in the diffusers or the CompVis layout (with or without `model.diffusion_model.`)
    -> {our key: tensor} of the UNet alone."""
    state_dict, _ = read_checkpoint(path, unsafe_pickle_load)
    if layouts.looks_like_diffusers_unet(state_dict):
        return layouts.convert_unet(state_dict, ours, str(path))
    if layouts.looks_like_compvis_unet(state_dict):
        return {k if k.startswith(layouts.UNET_PREFIX) else layouts.UNET_PREFIX + k: v for k, v in state_dict.items()}
    raise UserError(f"{path}: not a UNet state dict (neither the diffusers layout, down_blocks.*, nor the "
                    "CompVis one, input_blocks.*)")
