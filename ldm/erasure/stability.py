"""The stability test: how far the adapter moves the noise prediction for a prompt.

For prompt p, start code x_T and DDPM timestep t (UnGuide, the release's compute_lora_diff):
    1. z   = the base model's CFG DDIM trajectory from x_T, stopped after partial_steps(S, t_enc) steps
    2. d   = || eps_adapted(z, t, p) - eps_base(z, t, p) ||_2        per sample, over [C, h, w]
with t drawn uniformly in ddpm_t_range(S, t_enc). d(p) is averaged over repeats (start codes and t), and
compared with d("") for the decision (ldm.erasure.guidance.decide).

Step 2 is one UNet call of 2n samples with per-sample adapter scales [0]*n + [1]*n (with K adapters, one
call of n (1 + K) samples, each adapter alone in its chunk).

Here: the settings of the test, latent_diffs (one batch of samples) and Estimate (repeated measurements) with
its margins. Draws, repeats and the two protocols: ldm.erasure.draws and ldm.erasure.protocols.
"""
import math
from dataclasses import dataclass

import torch

from ldm.erasure.lora import adapter_names, adapter_scale, adapters_disabled
from ldm.models.diffusion.ddim import cfg_model_fn, ddim_timesteps, partial_steps, sample_ddim


@dataclass(frozen=True)
class StabilitySettings:
    ddim_steps: int = 50
    t_enc: int = 40
    guidance: float = 7.5
    eta: float = 0.0
    release_schedule: bool = False


@torch.no_grad()
def latent_diffs(model, cond: torch.Tensor, uncond: torch.Tensor, x_T: torch.Tensor, t: torch.Tensor,
                 settings: StabilitySettings, adapters: list[str], guidance: float | torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """d of each named adapter for n samples: cond, uncond [n, 77, D], x_T [n, C, h, w], t [n] -> [K, n].

    One base trajectory serves all K adapters; step 2 is one call of n (1 + K) samples.
    """
    s = settings
    timesteps = ddim_timesteps(s.ddim_steps, model.num_timesteps, s.release_schedule)
    scale = s.guidance if guidance is None else guidance
    with adapters_disabled(model.unet):  # 1. the base model's partial trajectory
        z = sample_ddim(cfg_model_fn(model.apply_model, cond, uncond, scale), x_T, model.alphas_cumprod, timesteps,
                        eta=s.eta, generator=generator,
                        stop_after=partial_steps(s.ddim_steps, s.t_enc, s.release_schedule))
    n, k = z.shape[0], len(adapters)
    chunks = [None] + list(adapters)  # chunk 0: base; chunk j: adapter j alone
    scales = {a: torch.cat([torch.full((n,), float(c == a)) for c in chunks]).to(z.device)
              for a in adapter_names(model.unet)}
    with adapter_scale(model.unet, scales):  # 2. base | adapter 1 | ... | adapter K, one call
        eps = model.apply_model(torch.cat([z] * (k + 1)), torch.cat([t] * (k + 1)), torch.cat([cond] * (k + 1)))
    e_base, *e_adapted = eps.float().chunk(k + 1)
    return torch.stack([(e - e_base).flatten(1).norm(dim=1) for e in e_adapted]).cpu()


@dataclass
class Estimate:
    """Mean, standard deviation and count of repeated d measurements."""
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n) if self.n else float("inf")


def clear_margin(d_prompt: Estimate, d_empty: Estimate, k: float) -> bool:
    """True when |mean d(p) - mean d("")| exceeds k combined standard errors: more draws won't flip the decision."""
    if d_prompt.n < 2:
        return False
    se = math.sqrt(d_prompt.sem ** 2 + d_empty.sem ** 2)
    return abs(d_prompt.mean - d_empty.mean) > k * se


def margin_in_se(d_prompt: Estimate, d_empty: Estimate) -> float:
    """|mean d(p) - mean d("")| in combined standard errors (inf when both are exact)."""
    se = math.sqrt(d_prompt.sem ** 2 + d_empty.sem ** 2) if d_prompt.n and d_empty.n else 0.0
    diff = abs(d_prompt.mean - d_empty.mean)
    return diff / se if se > 0 else (math.inf if diff > 0 else 0.0)


def estimate_dict(e: Estimate) -> dict:
    return {"mean": e.mean, "std": e.std, "sem": e.sem, "count": e.n}
