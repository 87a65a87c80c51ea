"""DDIM sampling (Song et al. 2021) as small functions over a model function.

A model function maps (x_t [B, C, h, w], t [B] DDPM timesteps) -> eps [B, C, h, w]. Guidance rules
(classifier-free guidance here, UnGuidance in ldm.erasure.guidance) are wrappers that build such a function,
so every rule runs through the one loop in `sample_ddim`.

Notation -> code: alpha_bar_t -> a_t, alpha_bar_{t_prev} -> a_prev, sigma_t -> sigma, eps_theta -> eps.
"""
from typing import Callable

import torch
from tqdm.auto import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def start_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """x_T [len(seeds), *shape]: one CPU generator per seed, so a seed gives the same image on CPU and CUDA.
    Seeds are taken modulo 2**64 (torch's seed range; I2P's seeds are all below 2**32)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s) % 2**64)) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, release_schedule: bool = False) -> list[int]:
    """The DDPM timesteps DDIM visits, noisiest first.

    Uniform spacing c = T // S with the +1 offset of CompVis (diffusers: "leading" spacing, steps_offset=1):
    S=50 gives 981, 961, ..., 1. release_schedule=True reproduces the UnGuide/ESD sampler, which drops the
    noisiest timestep: S=50 then runs 49 steps from 961.
    """
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"ddim steps must be in 1..{num_train_timesteps}, got {num_steps}")
    c = num_train_timesteps // num_steps
    steps = list(range(1, num_train_timesteps + 1, c))[:num_steps]  # ascending: 1, 1+c, ...
    if release_schedule:
        steps = steps[:-1]
    return steps[::-1]


def partial_steps(num_steps: int, t_enc: int, release_schedule: bool = False) -> int:
    """How many DDIM steps the partial trajectory "down to t_enc" runs (the release's till_T).

    The latent is then scored at a DDPM timestep t in [round(t_enc/S*T), round((t_enc+1)/S*T)).
    Standard schedule (981, 961, ..., 1): S - 1 - t_enc steps, ending at the latent of timestep
    ddim_timesteps[t_enc], whose noise level matches that t (S=50, t_enc=40: 9 steps, 981 -> 801).
    Release schedule (961, ..., 1): S - t_enc steps, as its sampler breaks after index t_enc - 1
    (S=50, t_enc=40: 10 steps, 961 -> 781, scored at t in [800, 820)); t_enc=0 runs all S - 1.
    """
    if not 0 <= t_enc < num_steps:
        raise ValueError(f"t_enc must be in 0..{num_steps - 1}, got {t_enc}")
    return min(num_steps - t_enc, num_steps - 1) if release_schedule else num_steps - 1 - t_enc


def ddpm_t_range(num_steps: int, t_enc: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """[lo, hi) of the DDPM timestep that scores the partial trajectory's latent (Python's round, as the release)."""
    return round(t_enc / num_steps * num_train_timesteps), round((t_enc + 1) / num_steps * num_train_timesteps)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al., eq. 12)."""
    # 1. sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
    # 2. predicted x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    # 3. direction pointing to x_t: sqrt(1 - a_prev - sigma^2) eps
    x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    # 4. random noise, only for eta > 0
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: list[int],
                eta: float = 0.0, generator: torch.Generator | None = None, stop_after: int | None = None,
                callback: Callable[[int, int, torch.Tensor], None] | None = None,
                verbose: bool = False, desc: str = "DDIM") -> torch.Tensor:
    """Run DDIM from x_T over `timesteps` (noisiest first, from ddim_timesteps) and return the final latent.

    The step at timesteps[i] goes to timesteps[i + 1], the last one to alpha_bar_0 (CompVis and diffusers
    with set_alpha_to_one=False). stop_after=k runs only the first k steps and returns that latent (the
    release's `till_T`). callback(i, t, x) sees the latent after each step. Noise for eta > 0 comes from
    `generator`, drawn on x's device.
    """
    n = len(timesteps) if stop_after is None else stop_after
    if not 0 <= n <= len(timesteps):
        raise ValueError(f"stop_after must be in 0..{len(timesteps)}, got {stop_after}")
    ac = alphas_cumprod.double().cpu()
    x = x_T
    for i in tqdm(range(n), desc=desc, disable=not verbose, leave=False):
        t = timesteps[i]
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else 0
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model_fn(x, t_batch)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddim_step(x, eps, float(ac[t]), float(ac[t_prev]), eta, noise)
        if callback is not None:
            callback(i, t, x)
    return x


def cfg_model_fn(apply_model: Callable, cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> ModelFn:
    """Classifier-free guidance in one batched call: eps = u + s * (c - u).

    apply_model(x, t, context) -> eps; cond, uncond [B, 77, D]; scale a float or a [B] tensor (per-sample).
    When cond is uncond (the empty prompt), u + s * (c - u) = u: one sample per step instead of two.
    """
    if cond is uncond:
        return lambda x, t: apply_model(x, t, uncond)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
        u, c = out.chunk(2)
        s = scale.view(-1, 1, 1, 1).to(x) if isinstance(scale, torch.Tensor) else scale
        return u + s * (c - u)
    return fn
