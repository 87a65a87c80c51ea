"""Export an UnGuide adapter to the layouts other tools load.

    python -m scripts.tools.export_lora --lora out/lora.safetensors --format diffusers --output exports/lora_diffusers.safetensors
    python -m scripts.tools.export_lora --lora lora.pth --format kohya --output exports/lora_kohya.safetensors   # release file

diffusers: `pipe.load_lora_weights("exports", weight_name="lora_diffusers.safetensors")` (PEFT keys, alpha folded
           into lora_B). kohya: AUTOMATIC1111 / ComfyUI LoRA folders (lora_unet_* keys, .alpha = alpha x rank).
Exports keep the adapter, always applied; they lose UnGuidance's per-prompt gating, which needs this project's
sampler. See ldm/erasure/export.py for the key map.
"""
import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from ldm.cli import run
from ldm.erasure.export import FORMATS, RELEASE_ALPHA, export_adapter, summary

DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
REMINDER = ("note: the export keeps the adapter (always applied, to every prompt); it loses UnGuidance's "
            "per-prompt gating, which needs this project's sampler")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", required=True, help="our adapter (.safetensors) or a release lora.pth")
    p.add_argument("--format", required=True, choices=FORMATS, help="diffusers (PEFT keys) or kohya (A1111/ComfyUI)")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="the base model's config (its UNet layout decides the key map)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"adapter scale for a release lora.pth (default {RELEASE_ALPHA:g}); our files carry theirs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.config == DEFAULT_CONFIG and not Path(args.config).exists() and (ROOT / DEFAULT_CONFIG).exists():
        args.config = str(ROOT / DEFAULT_CONFIG)  # the default, run from outside the repository
    res = export_adapter(args.lora, args.format, args.output, config=args.config, alpha=args.alpha,
                         overwrite=args.overwrite)
    print(summary(res))
    print(REMINDER)


if __name__ == "__main__":
    run(main)
