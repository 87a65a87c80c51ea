"""Cost accounting of UnGuide in UNet sample-evaluations: a counter, the cost of one stability draw and of one
UnGuided image, and the draw cap a per-prompt budget allows.

A sample-evaluation is one sample of one UNet forward call (a call on a batch of n samples counts n).
"""
from typing import Sequence

import torch

from ldm.erasure.stability import StabilitySettings
from ldm.models.diffusion.ddim import ddim_timesteps, partial_steps


class UNetCounter:
    """Counts UNet sample-evaluations: the batch sizes of every forward call of `unet`, summed (a forward hook).

        with UNetCounter(model.unet) as c: ...;  c.samples, c.calls
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.samples, self.calls, self._handle = unet, 0, 0, None

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        self.samples += int(output.shape[0])

    def __enter__(self) -> "UNetCounter":
        self._handle = self.unet.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def evals_per_draw(settings: StabilitySettings, empty_only: bool = False) -> int:
    """UNet sample-evaluations of one stability draw: the CFG trajectory (1 per step for "" in the fast path)
    plus the base|adapted evaluation at t."""
    steps = partial_steps(settings.ddim_steps, settings.t_enc, settings.release_schedule)
    return steps * (1 if empty_only else 2) + 2


def evals_per_image(settings: StabilitySettings, n_adapters: int = 1) -> int:
    """UNet sample-evaluations of one UnGuided image: base and every adapter, unconditional and conditional,
    at each of the schedule's steps (4 per step with one adapter)."""
    steps = len(ddim_timesteps(settings.ddim_steps, release_schedule=settings.release_schedule))
    return steps * 2 * (1 + n_adapters)


def repeats_within_budget(settings: StabilitySettings, budget: int, n_adapters: int = 1) -> int:
    """The most d(p) draws for which one prompt's stability test and its image together cost at most `budget`
    UNet sample-evaluations (README settings: (300 - 200) // 20 = 5). May be < 1 when the image alone exceeds it."""
    per_draw = evals_per_draw(settings) + n_adapters - 1  # K adapters: 1 + K evaluations at t, one trajectory
    return (budget - evals_per_image(settings, n_adapters)) // per_draw


def budgeted_repeats(settings: StabilitySettings, repeats: int, min_repeats: int, budget: int | None,
                     n_adapters: int = 1) -> int:
    """The draw cap of one prompt: `repeats`, lowered to what `budget` affords (None or 0: no budget), never
    below min(min_repeats, repeats) (a budget the image alone nearly spends cannot be met)."""
    if not budget:
        return repeats
    return max(min(min_repeats, repeats), min(repeats, repeats_within_budget(settings, budget, n_adapters)))


def stability_evals(settings: StabilitySettings, prompt: str, draws: int, n_adapters: int = 1,
               empty_shortcut: bool = True) -> int:
    """UNet sample-evaluations of `draws` stability draws of one prompt run alone: its trajectory (1 per step for
    "" with the shortcut, else 2) and 1 + K evaluations at t."""
    steps = partial_steps(settings.ddim_steps, settings.t_enc, settings.release_schedule)
    return draws * (steps * (1 if empty_shortcut and prompt == "" else 2) + 1 + n_adapters)


def image_evals(settings: StabilitySettings, ws: Sequence[float]) -> int:
    """UNet sample-evaluations of one prompt's UnGuided image sampled alone with weights ws (one per adapter; []:
    the base model), as guidance.unguidance_model_fn runs it: 2 per step for the base unless its weight
    1 - sum_k (1 - w_k) is 0, and for each adapter whose w_k is not 1. Batch-independent: a row's own cost."""
    steps = len(ddim_timesteps(settings.ddim_steps, release_schedule=settings.release_schedule))
    active = [w for w in ws if w != 1.0]
    with_base = 1.0 - sum(1.0 - w for w in active) != 0.0
    return steps * 2 * (int(with_base) + len(active))
