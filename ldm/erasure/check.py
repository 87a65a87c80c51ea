"""The in-training erasure check: is the adapter, as trained so far, one that the stability test can find and
that erases on its own? (Issue 18: at some training seeds an adapter left d(target) ~ d("") and drew the
concept as the base model did; UnGuidance then amplified it.)

Two measurements of the adapter named `adapter`, each with fixed draws (the same at every check, and apart
from the training run's generator, so checking never changes what is trained):

    ratio   r = d(target) / d("")                the stability test (fast protocol: `repeats` draws of the
                                                 target, `empty_draws` of ""), ldm.erasure.protocols
    rate    share of `samples` adapter-alone     optional: a judge (latents [n, C, h, w] -> n booleans, e.g. the
            images (w = 0) of the target that    toy world's digit classifier, NudeNet); the caller decodes
            a judge reads as the concept

    passed  r >= min_ratio  and  (no judge or rate <= max_rate)

The rule that uses it (ldm.erasure.training.TrainingRun): the check runs every `every` iterations (its history
lands in train_config.json) and at the planned last iteration; an adapter that has not passed by then trains on,
`every` iterations at a time, until it passes or reaches `max_iterations`, and the run records which.
"""
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ldm.erasure.guidance import unguided_latents
from ldm.models.diffusion.ddim import start_noise
from ldm.erasure.protocols import Protocol, fast_diff_table
from ldm.erasure.stability import StabilitySettings

Judge = Callable[[torch.Tensor], list]  # final latents [n, C, h, w] -> n booleans (True: shows the concept)


@dataclass(frozen=True)
class CheckSettings:
    every: int = 0                  # check every N iterations; 0: no check
    min_ratio: float = 1.5          # passed needs d(target) / d("") >= this
    max_rate: float = 0.1           # ... and an adapter-alone concept rate <= this (when there is a judge)
    max_iterations: int = 0         # train on (if not passed) up to this many iterations; <= planned: never
    samples: int = 8                # adapter-alone images of the target per check (with a judge)
    repeats: int = 8                # stability-test draws of the target
    empty_draws: int = 16           # ... and of ""
    seed: int = 0                   # the checks' draws (start codes, t) and the images' seeds

    def record(self) -> dict:
        return asdict(self)


class ErasureCheck:
    """check() -> {"iteration", "ratio", "d_target", "d_empty", "rate" (None without a judge), "passed"}."""

    def __init__(self, model, target: str, settings: CheckSettings, stability: StabilitySettings,
                 latent_shape: tuple[int, ...], judge: Judge | None = None, adapter: str = "lora",
                 steps: int = 50, guidance: float = 7.5):
        if settings.every < 1:
            raise ValueError("an ErasureCheck needs every >= 1")
        self.model, self.target, self.s, self.judge, self.adapter = model, target, settings, judge, adapter
        self.shape, self.steps, self.guidance = tuple(latent_shape), int(steps), float(guidance)
        self.protocol = Protocol("fast", stability, repeats=settings.repeats, empty_draws=settings.empty_draws)

    @torch.no_grad()
    def ratio(self) -> tuple[float, float]:
        """(mean d(target), mean d("")) with the check's fixed draws."""
        [(est, empty)] = fast_diff_table(self.model, self.protocol, self.shape, [self.target], self.s.seed,
                                         adapters=[self.adapter])
        return est[self.target].mean, empty.mean

    @torch.no_grad()
    def rate(self) -> float | None:
        """Share of the adapter-alone images of the target the judge reads as the concept (None: no judge)."""
        if self.judge is None:
            return None
        n = self.s.samples
        x_T = start_noise([self.s.seed + i for i in range(n)], self.shape, self.model.device, self.model.dtype)
        z = unguided_latents(self.model, [self.target] * n, x_T, self.guidance, [[0.0] * n], steps=self.steps,
                             adapters=[self.adapter])
        hits = list(self.judge(z))
        return sum(map(bool, hits)) / max(len(hits), 1)

    def __call__(self, iteration: int) -> dict:
        d_target, d_empty = self.ratio()
        rate = self.rate()
        if d_empty > 0:
            ratio = d_target / d_empty
        else:  # the adapter moves nothing (e.g. still zero): no separation, not a pass
            ratio = float("inf") if d_target > 0 else 1.0
        passed = ratio >= self.s.min_ratio and (rate is None or rate <= self.s.max_rate)
        return {"iteration": int(iteration), "ratio": ratio, "d_target": d_target, "d_empty": d_empty,
                "rate": rate, "passed": bool(passed)}
