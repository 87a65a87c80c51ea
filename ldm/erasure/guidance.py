"""UnGuidance: mix the base and the adapted model's classifier-free guidance per sample.

    CFG_m = u_m + s * (c_m - u_m)                  m in {base, adapted}; s the CFG scale
    eps   = w * CFG_base + (1 - w) * CFG_adapted   w = w1 (default -1) for prompts the adapter reacts to,
                                                    w2 (default 2) for all others (see ldm.erasure.stability)

w = 1 is the base model alone, w = 0 the adapter alone. The four predictions of a step come from ONE UNet
call of 4B samples [u_base, c_base, u_adapted, c_adapted] with per-sample adapter scales [0, 0, 1, 1], on
one copy of the weights. `unguidance_model_fn` returns a model function for ldm.models.diffusion.ddim.
"""
import torch

from ldm.erasure.lora import adapter_scale, adapters_disabled
from ldm.models.diffusion.ddim import ModelFn, cfg_model_fn


def _per_sample(v: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    return v.view(-1, 1, 1, 1).to(like) if isinstance(v, torch.Tensor) else v


def unguidance_model_fn(model, cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor,
                        w: float | torch.Tensor) -> ModelFn:
    """eps(x, t) = w * CFG_base + (1 - w) * CFG_adapted.

    cond, uncond [B, 77, D]; scale and w floats or [B] tensors. When every sample has w == 1 (or w == 0) only
    the base (or adapted) half is evaluated: the result is the same, at half the cost.
    """
    w_all = w if isinstance(w, torch.Tensor) else torch.tensor([float(w)])
    if bool((w_all == 1).all()):
        base_fn = cfg_model_fn(model.apply_model, cond, uncond, scale)

        def base_only(x, t):
            with adapters_disabled(model.unet):
                return base_fn(x, t)
        return base_only
    if bool((w_all == 0).all()):
        return cfg_model_fn(model.apply_model, cond, uncond, scale)

    b = cond.shape[0]
    context = torch.cat([uncond, cond, uncond, cond])                     # [4B, 77, D]
    lora_scale = torch.cat([torch.zeros(2 * b), torch.ones(2 * b)]).to(cond.device)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with adapter_scale(model.unet, lora_scale):
            out = model.apply_model(torch.cat([x] * 4), torch.cat([t] * 4), context)
        u_b, c_b, u_a, c_a = out.chunk(4)                                  # each [B, C, h, w]
        s = _per_sample(scale, x)
        cfg_base, cfg_adapted = u_b + s * (c_b - u_b), u_a + s * (c_a - u_a)
        ww = _per_sample(w, x)
        return ww * cfg_base + (1 - ww) * cfg_adapted
    return fn


def decide_w(d_prompt: float, d_empty: float, w1: float = -1.0, w2: float = 2.0) -> float:
    """The release's rule: the adapter governs (w1) when it moves this prompt's prediction more than the
    empty prompt's; otherwise the base model does (w2). Ties go to w2."""
    return w1 if d_prompt > d_empty else w2
