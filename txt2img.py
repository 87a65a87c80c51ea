"""Text to image with the base model: one PNG per (prompt, seed).

    python txt2img.py --prompt "a photo of the cat" --seed 42 --outdir outputs/txt2img
"""
import re
from pathlib import Path

from ldm.cli import Parser, add_model_args, ddim_steps_arg, finite, load_model, positive, run
from ldm.images import save_image
from ldm.sampling import txt2img


def main() -> None:
    p = Parser(description=__doc__)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to draw")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image")
    p.add_argument("--n_samples", type=positive(), default=1, help="images, seeds seed .. seed+n-1")
    p.add_argument("--steps", type=ddim_steps_arg, default=50, help="DDIM steps")
    p.add_argument("--scale", type=finite, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=finite, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--image_size", type=positive(), default=None,
                   help="image side in px (default: the config's, 512 for SD, 16 for the toy model)")
    p.add_argument("--outdir", default="outputs/txt2img", help="where the PNGs go")
    args = p.parse_args()

    model, _ = load_model(args)
    seeds = [args.seed + i for i in range(args.n_samples)]
    images = txt2img(model, [args.prompt] * len(seeds), seeds, args.image_size, args.steps, args.scale, args.eta,
                     verbose=True)
    stem = re.sub(r"[^a-zA-Z0-9]+", "_", args.prompt).strip("_")[:60] or "empty"
    for seed, img in zip(seeds, images):
        path = Path(args.outdir) / f"{stem}_{seed}.png"
        save_image(img, path)
        print(path)


if __name__ == "__main__":
    run(main)
