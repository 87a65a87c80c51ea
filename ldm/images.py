"""Latents to pictures and pictures to disk: start noise from seeds, decoding, atomic image writes, grids."""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.models.diffusion.ddim import start_noise  # noqa: F401  (the start codes live with the sampler)


# How image files are written. "ours": rounded to the nearest level, JPEG quality 95. "release": as the UnGuide
# release (and CompVis' scripts) write them: clamp((x + 1) / 2, 0, 1) * 255 truncated to uint8, then PIL's
# default JPEG quality (75), so NudeNet or CLIP on the files reproduce the release's numbers.
IMAGE_FORMATS = {"ours": {"rounding": "round", "quality": 95}, "release": {"rounding": "truncate", "quality": 75}}


def image_format(protocol: str) -> str:
    """The files a protocol writes: the release's under --protocol release, ours otherwise."""
    return "release" if protocol == "release" else "ours"


def to_pil(images: torch.Tensor, rounding: str = "round") -> list[Image.Image]:
    """Decoded images [B, 3, H, W] in [-1, 1] -> PIL RGB images (rounding: "round" or the release's "truncate")."""
    if rounding == "truncate":  # the release's arithmetic, step by step, in numpy float32
        x = np.clip((images.float().cpu().numpy() + 1.0) / 2.0, 0.0, 1.0)
        return [Image.fromarray((255.0 * a.transpose(1, 2, 0)).astype(np.uint8)) for a in x]
    if rounding != "round":
        raise ValueError(f"to_pil: rounding must be 'round' or 'truncate', got {rounding!r}")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]


def image_complete(path: str | Path) -> bool:
    """True when `path` is a whole, decodable image (a file cut short at its final name, by a full disk or an
    interrupted copy, is not: a resumed run makes it again)."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def save_image(img: Image.Image, path: str | Path, quality: int = 95) -> None:
    """Write atomically: a killed run never leaves a file that passes for an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    img.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    os.replace(tmp, path)


def save_images(images: torch.Tensor, paths: list[Path], image_format: str = "ours") -> None:
    """Decoded images [B, 3, H, W] -> files, in one of IMAGE_FORMATS."""
    fmt = IMAGE_FORMATS[image_format]
    for img, path in zip(to_pil(images, fmt["rounding"]), paths):
        save_image(img, path, fmt["quality"])


def image_grid(rows: list[list[Image.Image]], row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, cell: int | None = None, gap: int = 4) -> Image.Image:
    """A labelled grid: rows[i][j] is the image of row i, column j (each resized to a `cell` px square),
    with `gap` px of white between cells."""
    cell = cell or max(im.width for r in rows for im in r)
    n_cols = max(len(r) for r in rows)
    left = 0 if not row_labels else min(260, 6 * max(len(s) for s in row_labels) + 16)
    top = 0 if not col_labels else 20
    pitch = cell + gap
    grid = Image.new("RGB", (left + pitch * n_cols, top + pitch * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels or []):
        draw.text((left + j * pitch + 4, 4), label, fill="black")
    for i, row in enumerate(rows):
        if row_labels:
            draw.text((4, top + i * pitch + cell // 2 - 6), row_labels[i][:40], fill="black")
        for j, im in enumerate(row):
            resample = Image.NEAREST if im.width < cell else Image.BICUBIC
            grid.paste(im.convert("RGB").resize((cell, cell), resample), (left + j * pitch, top + i * pitch))
    return grid


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1)
