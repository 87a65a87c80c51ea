"""Train the toy-digits world: a tiny text-to-image latent diffusion model of SD v1's classes, on a CPU.

The 1,797 8x8 handwritten digits of scikit-learn (`sklearn.datasets.load_digits`, shipped with the package)
are the images: grey values 0..16 -> [-1, 1] (background -1, ink +1), bilinearly upsampled to 16x16 and
repeated to RGB; training shifts them by up to 1 pixel (background fill). 16x16 (not 32x32) keeps the VAE
and the UNet cheap enough to train on 2 shared CPU cores in minutes and to sample 50 images in seconds. Captions come from the templates
in CAPTION_TEMPLATES ("a photo of the digit three", "a handwritten 3", "three", ...), one drawn per image
and step; about 10% of captions are empty, for classifier-free guidance.

Stages, in one run (CPU only, deterministic for a given --seed and --threads):
  1. VAE (AutoencoderKL, 16x16x3 -> 8x8x4, factor 2): L1 + MSE reconstruction + a small KL term.
     Afterwards scale_factor = 1 / std of the latents (how SD's 0.18215 was chosen).
  2. UNet (cross-attention) + CLIP-architecture text encoder (SD's tokenizer, width 64, 2 layers), trained
     from scratch together on the frozen VAE's latents: eps-prediction MSE with the model's own q_sample and
     linear schedule (the SD v1 one). A batch holds batch/4 captions with 4 images of each caption's digit
     (the text encoder runs once per caption). An exponential moving average of the weights is what gets saved.
     --resume PATH continues from saved weights (with --vae_steps 0 the VAE and scale_factor are kept).

Outputs: models/toy-digits.safetensors (released SD key names, fp16; `ldm.loader.load_model_from_config`
loads it like any SD checkpoint), configs/toy/digits-inference.yaml, and the prompt files data/digits/<name>.json.

Prompt files {"target", "reference", "synonyms", "other"}, one per digit (zero.json .. nine.json):
  target    "a photo of the digit three" (a trained template)
  synonyms  "a handwritten 3", "the number 3", "a photo of the number three" (all trained templates)
  other     the nine other digits' targets and ""
  reference ""  -- the anchor. The release's anchors ("a photo of the forest") are concepts the model renders
            well that are not the target and not among the other classes. The digit world has no non-digit
            concept; the empty prompt is the one prompt the toy model renders (10% of training captions are
            empty) that is no particular digit: its images are the prior over all ten digits. Another digit as
            anchor would turn erasure into replacement (three -> eight) and would push up exactly the rate of
            one of the "other" digits that erasure must spare. "" is also ESD's own anchor (its objective uses
            the unconditional prediction). Caveat: "" is also the CFG unconditional branch.

    python -m scripts.tools.train_toy_model                     # ~12 min (one thread), seed 0: the shipped model
    python -m scripts.tools.train_toy_model --vae_steps 300 --unet_steps 500 --out /tmp/toy.safetensors  # smoke run
    python -m scripts.tools.train_toy_model --prompts_only      # (re)write data/digits/*.json only
    python -m scripts.experiments.toy_quality                          # the quality bar (>= 90% per digit)
"""
import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]

from ldm.loader import release_state_dict
from ldm.config import instantiate_from_config

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# {w}: the digit's word, {n}: its numeral. Every phrasing used in data/digits/*.json is one of these.
CAPTION_TEMPLATES = [
    "a photo of the digit {w}", "a photo of the number {w}", "a photo of the digit {n}", "a photo of the number {n}",
    "a handwritten {n}", "a handwritten {w}", "a handwritten digit {w}", "a drawing of the digit {w}",
    "the digit {n}", "the digit {w}", "the number {n}", "the number {w}", "{w}", "{n}",
]
TARGET_TEMPLATE = "a photo of the digit {w}"
SYNONYM_TEMPLATES = ["a handwritten {n}", "the number {n}", "a photo of the number {w}"]
REFERENCE = ""
EMPTY_CAPTION_RATE = 0.1
IMAGE_SIZE = 16
SHIFT = 1  # pixels at 16x16 (a half pixel of the 8x8 originals)

DEFAULT_OUT = ROOT / "models" / "toy-digits.safetensors"
DEFAULT_CONFIG = ROOT / "configs" / "toy" / "digits-inference.yaml"
DEFAULT_PROMPTS = ROOT / "data" / "digits"

TEXT_WIDTH = 64

CONFIG_TEMPLATE = """\
# The toy-digits world: a text-to-image latent diffusion model of SD v1's classes, trained from scratch on
# scikit-learn's 8x8 digits (16x16 RGB images, 8x8x4 latents) by scripts/train_toy_model.py.
# Weights: models/toy-digits.safetensors. Sample with image size 16.
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    image_size: 8           # latent side: 16 px images
    channels: 4
    scale_factor: {scale_factor}
    conditioning_key: crossattn

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 4
        out_channels: 4
        model_channels: {model_channels}
        attention_resolutions: [2]   # cross-attention at 4x4 (input, middle and output blocks)
        num_res_blocks: 1
        channel_mult: {channel_mult}
        num_heads: 2
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: {text_width}    # the text encoder's width
        legacy: false

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 16
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1]       # downsampling factor 2: 16x16 -> 8x8
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        width: {text_width}
        layers: 2
        heads: 2
"""


# ----------------------------------------------------------------------------- prompts

def digit_prompts(d: int) -> dict:
    """The prompt file of digit d (see the module docstring for the choice of reference)."""
    w, n = WORDS[d], str(d)
    return {
        "target": TARGET_TEMPLATE.format(w=w, n=n),
        "reference": REFERENCE,
        "synonyms": [t.format(w=w, n=n) for t in SYNONYM_TEMPLATES],
        "other": [TARGET_TEMPLATE.format(w=WORDS[o], n=o) for o in range(10) if o != d] + [""],
    }


def write_prompt_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d, w in enumerate(WORDS):
        path = folder / f"{w}.json"
        atomic_write_bytes(path, (json.dumps(digit_prompts(d), indent=4) + "\n").encode())
        paths.append(path)
    return paths


def all_captions() -> tuple[list[str], list[int]]:
    """Every training caption and its digit (-1 for the empty caption, the last entry)."""
    caps, labels = [], []
    for d in range(10):
        for t in CAPTION_TEMPLATES:
            caps.append(t.format(w=WORDS[d], n=d))
            labels.append(d)
    return caps + [""], labels + [-1]


# ----------------------------------------------------------------------------- data

def digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as [1797, 3, 32, 32] images in [-1, 1] and their labels [1797]."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0   # 0..16 -> [-1, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1).repeat(1, 3, 1, 1).contiguous(), torch.tensor(data.target, dtype=torch.long)


def shifted(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image [B, C, H, W] by (dx[i], dy[i]) pixels, filling with background (-1)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT), value=-1.0)
    out = torch.empty_like(x)
    for i in range(b):
        oy, ox = SHIFT - int(dy[i]), SHIFT - int(dx[i])
        out[i] = padded[i, :, oy:oy + h, ox:ox + w]
    return out


def all_shifts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image at every shift in [-SHIFT, SHIFT]^2 -> ([N*(2S+1)^2, C, H, W], index of the source image)."""
    outs, idx = [], []
    n = x.shape[0]
    for dy in range(-SHIFT, SHIFT + 1):
        for dx in range(-SHIFT, SHIFT + 1):
            outs.append(shifted(x, torch.full((n,), dx), torch.full((n,), dy)))
            idx.append(torch.arange(n))
    return torch.cat(outs), torch.cat(idx)


# ----------------------------------------------------------------------------- helpers

def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def config_text(scale_factor: float, model_channels: int, channel_mult: list[int]) -> str:
    return CONFIG_TEMPLATE.format(scale_factor=f"{scale_factor:.5f}", model_channels=model_channels,
                                  channel_mult=list(channel_mult), text_width=TEXT_WIDTH)


def build(scale_factor: float, model_channels: int, channel_mult: list[int]):
    from omegaconf import OmegaConf
    config = OmegaConf.create(config_text(scale_factor, model_channels, channel_mult))
    return instantiate_from_config(config.model)


# ----------------------------------------------------------------------------- stage 1: VAE

def train_vae(model, images: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float,
              gen: torch.Generator) -> None:
    vae = model.first_stage_model
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="VAE", dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        d = torch.randint(-SHIFT, SHIFT + 1, (2, batch), generator=gen)
        x = shifted(images[idx], d[0], d[1])
        post = vae.encode(x)
        rec = vae.decode(post.sample(gen))
        rec_loss = (rec - x).abs().mean() + F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.std.pow(2) - 1.0 - post.logvar).mean()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(model, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every image, unscaled."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = model.first_stage_model.encode(images[i:i + batch])
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- stage 2: UNet + text encoder

def train_diffusion(model, lat_mean: torch.Tensor, lat_std: torch.Tensor, lat_label: torch.Tensor, steps: int,
                    batch: int, lr: float, ema_decay: float, gen: torch.Generator,
                    per_caption: int = 4) -> dict[str, torch.Tensor]:
    """Train UNet + text encoder; return the EMA weights of both (our module names)."""
    captions, cap_labels = all_captions()
    by_digit = [[i for i, l in enumerate(cap_labels) if l == d] for d in range(10)]
    images_of = [torch.nonzero(lat_label == d).flatten() for d in range(10)]
    empty_id = len(captions) - 1
    tokens = model.cond_stage_model.tokenize(captions)  # [n_captions, 77], tokenized once
    n_groups = batch // per_caption

    text = model.cond_stage_model.transformer
    text.train().requires_grad_(True)
    unet = model.model
    unet.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    trained = {f"model.{k}": v for k, v in unet.named_parameters()}
    trained.update({f"cond_stage_model.transformer.{k}": v for k, v in text.named_parameters()})
    ema = {k: v.detach().clone() for k, v in trained.items()}

    bar = tqdm(range(steps), desc="UNet+text", dynamic_ncols=True, mininterval=2.0)
    avg = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, min(300, steps // 10 + 1))
        digits = torch.randint(0, 10, (n_groups,), generator=gen)
        pick = torch.randint(0, len(CAPTION_TEMPLATES), (n_groups,), generator=gen)
        drop = torch.rand(n_groups, generator=gen) < EMPTY_CAPTION_RATE
        cap = torch.tensor([empty_id if dr else by_digit[int(d)][int(p)] for d, p, dr in zip(digits, pick, drop)])
        idx = torch.cat([images_of[int(d)][torch.randint(0, len(images_of[int(d)]), (per_caption,), generator=gen)]
                         for d in digits])
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * model.scale_factor
        ctx = text(input_ids=tokens[cap]).last_hidden_state  # same as cond_stage_model(prompts)
        ctx = ctx.repeat_interleave(per_caption, dim=0)
        t = torch.randint(0, model.num_timesteps, (idx.shape[0],), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        xt = model.q_sample(z0, t, noise)
        loss = F.mse_loss(model.apply_model(xt, t, ctx), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in trained.items():
                ema[k].lerp_(v.detach(), 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{avg:.4f}")
    text.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    return ema


# ----------------------------------------------------------------------------- main

def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, fixed for reproducibility (1: two OpenMP threads on shared cores thrash)")
    p.add_argument("--vae_steps", type=int, default=400)
    p.add_argument("--vae_batch", type=int, default=32)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-3, help="weight of the per-element KL term")
    p.add_argument("--unet_steps", type=int, default=3000)
    p.add_argument("--unet_batch", type=int, default=64)
    p.add_argument("--unet_lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--model_channels", type=int, default=32)
    p.add_argument("--channel_mult", type=int, nargs=2, default=[1, 2], help="UNet channel multipliers (8x8, 4x4)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="weights (.safetensors)")
    p.add_argument("--config_out", type=Path, default=DEFAULT_CONFIG, help="inference config written beside them")
    p.add_argument("--prompts_dir", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--prompts_only", action="store_true", help="write the prompt files and exit")
    p.add_argument("--fp32", action="store_true", help="store float32 weights (default fp16)")
    p.add_argument("--resume", type=Path, help="start from these weights (config: --config_out) instead of random")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    written = write_prompt_files(args.prompts_dir)
    print(f"wrote {len(written)} prompt files to {args.prompts_dir}")
    if args.prompts_only:
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    images, labels = digits_32()
    if args.resume:
        from ldm.loader import load_model_from_config
        model = load_model_from_config(args.config_out, args.resume).float()
    else:
        model = build(1.0, args.model_channels, args.channel_mult)
    print("parameters:", {name: sum(q.numel() for q in m.parameters()) for name, m in
                          [("unet", model.model), ("vae", model.first_stage_model), ("text", model.cond_stage_model)]})
    lat_mean, lat_std, src = train_vae_stage(model, images, args, gen, t0)
    ema = train_diffusion(model, lat_mean, lat_std, labels[src], args.unet_steps, args.unet_batch, args.unet_lr,
                          args.ema, gen)
    state = model.state_dict()
    state.update(ema)
    model.load_state_dict(state)
    save(model, args, time.time() - t0)


def train_vae_stage(model, images, args, gen, t0):
    """Stage 1: the VAE (unless resumed with --vae_steps 0), then every shifted digit's latent and the
    scale_factor -> (latent means, latent stds, source index of each latent)."""
    if args.vae_steps:
        train_vae(model, images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, gen)
    with torch.no_grad():
        rec = model.first_stage_model.decode(model.first_stage_model.encode(images[:256]).mode())
        print(f"VAE reconstruction MAE on 256 digits: {(rec - images[:256]).abs().mean().item():.4f}")
    shifted_images, src = all_shifts(images)
    lat_mean, lat_std = encode_all(model, shifted_images)
    del shifted_images
    z = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=gen)
    if args.vae_steps or not args.resume:
        model.scale_factor = float(f"{1.0 / z.std().item():.5f}")
    print(f"latents {tuple(lat_mean.shape)}; std {z.std().item():.4f} -> scale_factor {model.scale_factor}; "
          f"t = {time.time() - t0:.0f}s")
    return lat_mean, lat_std, src


def save(model, args, train_seconds: float) -> None:
    """The weights (released key names, fp16 unless --fp32) and the inference config, atomically."""
    dtype = torch.float32 if args.fp32 else torch.float16
    sd = {k: v.detach().to(dtype).contiguous() for k, v in release_state_dict(model).items()}
    meta = {"format": "pt", "trained_by": "scripts/tools/train_toy_model.py", "seed": str(args.seed),
            "resumed_from": str(args.resume or ""),
            "vae_steps": str(args.vae_steps), "unet_steps": str(args.unet_steps),
            "train_seconds": f"{train_seconds:.0f}", "scale_factor": str(model.scale_factor)}
    from safetensors.torch import save_file
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, args.out)
    atomic_write_bytes(args.config_out, config_text(model.scale_factor, args.model_channels, args.channel_mult).encode())
    size = args.out.stat().st_size / 2 ** 20
    print(f"wrote {args.out} ({size:.1f} MiB, {len(sd)} tensors, {str(dtype)[6:]}) and {args.config_out}; "
          f"training took {train_seconds:.0f}s")


if __name__ == "__main__":
    main()
