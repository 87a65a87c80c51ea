"""Export an UnGuide adapter to the layouts other tools load.

    python -m scripts.tools.export_lora --lora out/lora.safetensors --format diffusers --output exports/lora_diffusers.safetensors
    python -m scripts.tools.export_lora --lora lora.pth --format kohya --output exports/lora_kohya.safetensors   # release file

    python -m scripts.tools.export_lora --lora esd/models/lora.safetensors --format merged --ckpt models/sd-v1-4.ckpt --output exports/esd.safetensors
    python -m scripts.tools.export_lora --lora esd/models/lora.safetensors --format diffusers_unet --ckpt models/sd-v1-4.ckpt --output exports/unet/diffusion_pytorch_model.safetensors

merged: base + delta as a single-file checkpoint (CompVis keys; A1111 / ComfyUI models folder, or --ckpt here);
diffusers_unet: the merged UNet under diffusers' keys (a model folder's unet/, or --unet_weights here). These
take any delta file, ESD's full deltas (train.py --method esd) among them, and need the base --ckpt.
diffusers: `pipe.load_lora_weights("exports", weight_name="lora_diffusers.safetensors")` (PEFT keys, alpha folded
           into lora_B). kohya: AUTOMATIC1111 / ComfyUI LoRA folders (lora_unet_* keys, .alpha = alpha x rank).
Exports keep the adapter, always applied; they lose UnGuidance's per-prompt gating, which needs this project's
sampler. See ldm/erasure/export.py for the key map.
"""
import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from ldm.cli import HelpFormatter, run
from ldm.erasure.io import read_adapter
from ldm.erasure.export import FORMATS, MERGED_FORMATS, RELEASE_ALPHA, export_adapter, export_merged, summary
from ldm.errors import UserError

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
REMINDER = ("note: the export keeps the adapter (always applied, to every prompt); it loses UnGuidance's "
            "per-prompt gating, which needs this project's sampler")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--lora", required=True, help="our adapter (.safetensors) or a release lora.pth")
    p.add_argument("--format", required=True, choices=FORMATS + MERGED_FORMATS,
                   help="diffusers (PEFT keys) or kohya (A1111/ComfyUI): a LoRA file; merged (single-file "
                        "checkpoint) or diffusers_unet (UNet state dict): base + any delta, needs --ckpt")
    p.add_argument("--ckpt", default=None, help="the base model (merged / diffusers_unet)")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument("--config", default=None,
                   help="the base model's config (its UNet layout decides the key map); default: the one the adapter "
                        f"was trained with (its metadata), else {DEFAULT_CONFIG}")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"adapter scale for a release lora.pth (default {RELEASE_ALPHA:g}); our files carry theirs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.config = args.config or trained_config(args.lora) or DEFAULT_CONFIG
    if args.config == DEFAULT_CONFIG and not Path(args.config).exists() and (ROOT / DEFAULT_CONFIG).exists():
        args.config = str(ROOT / DEFAULT_CONFIG)  # the default, run from outside the repository
    if args.format in MERGED_FORMATS:
        if args.ckpt is None:
            raise UserError(f"--format {args.format}: give the base model with --ckpt")
        res = export_merged(args.lora, args.format, args.output, args.config, args.ckpt, args.overwrite)
    else:
        res = export_adapter(args.lora, args.format, args.output, config=args.config, alpha=args.alpha,
                             overwrite=args.overwrite)
    print(summary(res))
    print(REMINDER)


def trained_config(lora: str) -> str | None:
    """The config an adapter file says it was trained with (train.py records it), when that file exists here."""
    path = Path(lora)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    config = read_adapter(path)[1].get("config")
    if config and (Path(config).is_file() or (ROOT / config).is_file()):
        print(f"config: {config} (recorded in {path})")
        return config if Path(config).is_file() else str(ROOT / config)
    return None


if __name__ == "__main__":
    run(main)
