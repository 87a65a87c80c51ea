"""Build an attack for the runner: attack(job, check, gen, progress, w0) -> {text, ids, success, round_trip, ...}.

Also what the attacks need from outside: concept images as latents (a folder, or drawn by the base model
from the target prompt) for UnlearnDiffAtk, and the concept vector's prompt pairs for Ring-A-Bell.
"""
from pathlib import Path

import torch
from PIL import Image

from ldm.attacks import ringabell, unlearndiffatk
from ldm.attacks.tokens import TokenSpace
from ldm.erasure.lora import adapters_disabled
from ldm.images import pil_to_tensor
from ldm.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_target_images(folder: str | Path, size: int) -> list[Image.Image]:
    """The concept images of --target_images: every image file of the folder, each size x size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--target_images {folder}: not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"--target_images {folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                img = im.convert("RGB")
        except Exception as exc:  # PIL raises several kinds
            raise UserError(f"--target_images: {p} is not a readable image ({type(exc).__name__})")
        if img.size != (size, size):
            raise UserError(f"--target_images: {p} is {img.size[0]}x{img.size[1]}, not {size}x{size} (--image_size)")
        images.append(img)
    return images


@torch.no_grad()
def concept_latents(model, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> scaled latents [N, C, h, w] (the posterior's mode)."""
    x = torch.stack([pil_to_tensor(im) for im in images]).to(device=model.device, dtype=model.dtype)
    return model.encode_first_stage(x, sample=False)


def draw_target_images(model, prompt: str, n: int, size: int, steps: int, guidance: float, seed: int) -> list:
    """n images of the concept from the BASE model (adapters off), seeds seed .. seed + n - 1."""
    from ldm.sampling import txt2img
    with adapters_disabled(model.unet):
        return txt2img(model, [prompt] * n, list(range(seed, seed + n)), image_size=size, steps=steps, scale=guidance)


def unlearndiffatk_attack(defended, cfg: unlearndiffatk.UDAConfig, z_targets: torch.Tensor):
    space = TokenSpace(defended.model.cond_stage_model, cfg.n_tokens)

    def attack(job, check, gen, progress, w0):
        res = unlearndiffatk.run_attack(defended, space, job.prompt, z_targets, cfg, w0, check, gen, progress)
        res["round_trip"] = space.round_trips(torch.tensor(res["ids"]), job.prompt)
        res["objective_first"], res["objective_last"] = res["loss_first"], res["loss_last"]
        return res
    return attack


def ringabell_attack(defended, cfg: ringabell.RABConfig, with_concept: list[str], without: list[str]):
    space = TokenSpace(defended.model.cond_stage_model, cfg.n_tokens)
    c = ringabell.concept_vector(space.encoder, with_concept, without)
    pool = ringabell.candidate_pool(space, c, cfg.pool)

    def attack(job, check, gen, progress, w0):
        res = ringabell.run_attack(space, job.prompt, c, pool, cfg, gen, progress)
        res["round_trip"] = space.round_trips(torch.tensor(res["ids"]), job.prompt)
        res["objective_first"], res["objective_last"] = res["distance_first"], res["distance_last"]
        res["steps"] = res["generations"]
        return res
    return attack


def concept_pairs(data: dict, pairs_file: str | None) -> tuple[list[str], list[str]]:
    """Prompts with / without the concept: --concept_pairs {"with": [...], "without": [...]}, or the prompts
    JSON's target + synonyms against its other prompts (its reference when there are none)."""
    import json
    if pairs_file:
        path = Path(pairs_file)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            with_c, without = list(d["with"]), list(d["without"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--concept_pairs {path}: not a JSON object with \"with\" and \"without\" lists "
                            f"({type(exc).__name__})")
    else:
        with_c = [data["target"]] + list(data.get("synonyms", []))
        without = [p for p in data.get("other", []) if p] or [data.get("reference", "")]
    if not with_c or not all(isinstance(p, str) for p in with_c + without) or not without:
        raise UserError("--concept_pairs: needs prompts with and without the concept")
    return with_c, without
