"""UnGuidance: mix the base and the adapted models' classifier-free guidance per sample.

    CFG_m = u_m + s * (c_m - u_m)                  m in {base, adapted}; s the CFG scale
    eps   = w * CFG_base + (1 - w) * CFG_adapted   w = w1 (default -1) for prompts the adapter reacts to,
                                                    w2 (default 2) for all others (see ldm.erasure.stability)

w = 1 is the base model alone, w = 0 the adapter alone. With K adapters k (one per erased concept), each with
its own stability test and w_k:

    eps = CFG_base + sum_k (1 - w_k) * (CFG_k - CFG_base)           (K = 1: the rule above)

The predictions of a step come from ONE UNet call: for B prompts, [u, c] of the base model (adapters scaled
to 0) and [u, c] of each adapter k (adapter k scaled to 1, the others to 0), 2B (1 + K) samples on one copy
of the weights. An adapter whose w_k is 1 for every sample contributes nothing and is not evaluated; nor is
the base when its total weight 1 - sum_k (1 - w_k) is 0 (a single adapter with w = 0).

Here: the rule (decide), the model function of a step (unguidance_model_fn) and the sampler (unguided_latents).
The stability test that feeds the rule is ldm.erasure.stability (one batch) and ldm.erasure.protocols (draws,
repeats, the release's and the fast protocol).
"""
from typing import Sequence

import torch

from ldm.erasure.lora import adapter_names, adapter_scale
from ldm.models.diffusion.ddim import ModelFn, cfg_model_fn, ddim_timesteps, sample_ddim

Weight = float | torch.Tensor  # a float, or one value per sample [B]


def _all(v: Weight, value: float) -> bool:
    return bool((v == value).all()) if isinstance(v, torch.Tensor) else v == value


def _col(v: Weight, like: torch.Tensor) -> Weight:
    return v.view(-1, 1, 1, 1).to(like) if isinstance(v, torch.Tensor) else v


def _in_chunk(name: str, chunk) -> bool:
    """Is adapter `name` on in `chunk` ("base", an adapter's name, or a tuple of names acting together)?"""
    return name in chunk if isinstance(chunk, tuple) else name == chunk


def unguidance_model_fn(model, cond: torch.Tensor, uncond: torch.Tensor, scale: Weight,
                        w: Weight | list[Weight], adapters: list[str] | None = None) -> ModelFn:
    """eps(x, t) = CFG_base + sum_k (1 - w_k) (CFG_k - CFG_base), in one UNet call per step.

    cond, uncond [B, 77, D]; scale a float or [B]; w one weight (single adapter) or a list, one per entry of
    `adapters` (default: every adapter of the model, in injection order). An entry may be a tuple of names: those
    adapters act together in one chunk (the model with the sum of their weight deltas, SepCE's composition).
    """
    names = adapter_names(model.unet) if adapters is None else list(adapters)
    ws = list(w) if isinstance(w, (list, tuple)) else [w]
    if not names and all(_all(wk, 1.0) for wk in ws):  # no adapter loaded: the base model alone
        return cfg_model_fn(model.apply_model, cond, uncond, scale)
    if len(ws) != len(names):
        raise ValueError(f"unguidance: {len(ws)} guidance weights for adapters {names}")
    active = [k for k, wk in enumerate(ws) if not _all(wk, 1.0)]          # w_k = 1 everywhere: contributes 0
    base_weight = 1.0 - sum(1.0 - ws[k] for k in active)                    # float or [B]
    with_base = not _all(base_weight, 0.0)
    chunks = (["base"] if with_base else []) + [names[k] for k in active]  # each chunk: [uncond; cond], 2B
    b = cond.shape[0]
    context = torch.cat([uncond, cond] * len(chunks))                       # [2B * chunks, 77, D]
    scales = {n: torch.cat([torch.full((2 * b,), float(_in_chunk(n, c))) for c in chunks]).to(cond.device)
              for n in adapter_names(model.unet)}
    coeffs = ([base_weight] if with_base else []) + [1.0 - ws[k] for k in active]

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = len(chunks)
        with adapter_scale(model.unet, scales):
            out = model.apply_model(torch.cat([x] * (2 * n)), torch.cat([t] * (2 * n)), context)
        s = _col(scale, x)
        eps = 0.0
        for (u, c), coeff in zip(zip(*[iter(out.chunk(2 * n))] * 2), coeffs):
            eps = eps + _col(coeff, x) * (u + s * (c - u))                  # coeff * CFG of this chunk
        return eps
    return fn


def decide(d_prompt: float, d_empty: float, w1: float, w2: float, threshold: float = 1.0) -> float:
    """w1 when d(p) > threshold * d("") (the release: threshold 1; a calibrated one: ldm.erasure.calibration),
    else w2; the means as floats or 0-d tensors, ties -> w2."""
    return w1 if float(d_prompt) > threshold * float(d_empty) else w2


def encode_prompts(model, prompts: Sequence[str]) -> torch.Tensor:
    """[len(prompts), 77, D], each distinct prompt encoded once."""
    uniq = list(dict.fromkeys(prompts))
    emb = model.get_learned_conditioning(uniq)
    pos = {p: i for i, p in enumerate(uniq)}
    return emb[torch.tensor([pos[p] for p in prompts], device=emb.device)]


def per_sample(values: float | Sequence[float], device: torch.device) -> Weight:
    """A float, or one value per sample: a float when they are all equal, else a tensor [B] on `device`."""
    if isinstance(values, (int, float)):
        return float(values)
    v = torch.tensor([float(a) for a in values])
    return float(v[0]) if bool((v == v[0]).all()) else v.to(device)


@torch.no_grad()
def unguided_latents(model, prompts: Sequence[str], x_T: torch.Tensor, guidances: float | Sequence[float],
                     ws: Sequence[float | Sequence[float]], steps: int = 50, release_schedule: bool = False,
                     eta: float = 0.0, generator: torch.Generator | None = None, verbose: bool = False,
                     adapters: Sequence[str] | None = None) -> torch.Tensor:
    """DDIM with eps = CFG_base + sum_k (1 - w_k) (CFG_k - CFG_base) per sample -> final latents [B, C, h, w].

    ws[k] is adapter k's weight (a float, or one per sample) for the k-th name of `adapters` (default: every
    adapter of the model, in injection order). One UNet call of 2B (1 + #adapters with some w_k != 1) samples
    per step (one adapter: 4B, or 2B when every w is 1 or every w is 0); no adapter and ws == []: the base model.
    """
    device, dtype = model.device, model.dtype
    names = adapter_names(model.unet) if adapters is None else list(adapters)
    cond = encode_prompts(model, prompts)
    uncond = model.get_learned_conditioning([""]).expand(len(prompts), -1, -1)
    fn = unguidance_model_fn(model, cond, uncond, per_sample(guidances, device),
                             [per_sample(v, device) for v in ws], names)
    timesteps = ddim_timesteps(steps, model.num_timesteps, release_schedule)
    return sample_ddim(fn, x_T.to(device=device, dtype=dtype), model.alphas_cumprod, timesteps, eta=eta,
                       generator=generator, verbose=verbose, desc="UnGuidance")
