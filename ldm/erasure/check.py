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

    kept    optional: the share of `samples` adapter-alone images of each PRESERVED prompt that a judge of its
            own class reads as that class (e.g. "a handwritten 0" drawn as a 0), at the worst preserved prompt:
            the adapter's collateral on what it must leave alone, which gathers on the one class most like the
            concept (issue 18: an adapter for "nine" drew a quarter of its zeros as 4s, every other digit intact)

    passed  r >= min_ratio  and  (no judge or rate <= max_rate)  and  (no preservation judges or
            kept >= min_kept)

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
    samples: int = 8                # adapter-alone images of the target (and of each preserved prompt) per check
    min_kept: float = 0.0           # passed needs the preserved prompts' kept share >= this (with their judges)
    repeats: int = 8                # stability-test draws of the target
    empty_draws: int = 16           # ... and of ""
    seed: int = 0                   # the checks' draws (start codes, t) and the images' seeds

    def record(self) -> dict:
        return asdict(self)


class ErasureCheck:
    """check() -> {"iteration", "ratio", "d_target", "d_empty", "rate" (None without a judge), "kept" (None
    without preservation judges), "passed"}. preserve: {preserved prompt: the judge of its own class}."""

    def __init__(self, model, target: str, settings: CheckSettings, stability: StabilitySettings,
                 latent_shape: tuple[int, ...], judge: Judge | None = None, adapter: str = "lora",
                 steps: int = 50, guidance: float = 7.5, preserve: dict[str, Judge] | None = None):
        if settings.every < 1:
            raise ValueError("an ErasureCheck needs every >= 1")
        self.model, self.target, self.s, self.judge, self.adapter = model, target, settings, judge, adapter
        self.preserve = dict(preserve or {})
        self.shape, self.steps, self.guidance = tuple(latent_shape), int(steps), float(guidance)
        self.protocol = Protocol("fast", stability, repeats=settings.repeats, empty_draws=settings.empty_draws)

    @torch.no_grad()
    def ratio(self) -> tuple[float, float]:
        """(mean d(target), mean d("")) with the check's fixed draws."""
        [(est, empty)] = fast_diff_table(self.model, self.protocol, self.shape, [self.target], self.s.seed,
                                         adapters=[self.adapter])
        return est[self.target].mean, empty.mean

    @torch.no_grad()
    def _share(self, prompt: str, judge: Judge) -> float:
        """Share of `samples` adapter-alone images of `prompt` (the check's fixed seeds) that `judge` accepts."""
        n = self.s.samples
        x_T = start_noise([self.s.seed + i for i in range(n)], self.shape, self.model.device, self.model.dtype)
        z = unguided_latents(self.model, [prompt] * n, x_T, self.guidance, [[0.0] * n], steps=self.steps,
                             adapters=[self.adapter])
        hits = list(judge(z))
        return sum(map(bool, hits)) / max(len(hits), 1)

    def rate(self) -> float | None:
        """Share of the adapter-alone images of the target the judge reads as the concept (None: no judge)."""
        return None if self.judge is None else self._share(self.target, self.judge)

    def kept(self) -> float | None:
        """The smallest, over the preserved prompts, share of their adapter-alone images judged as their own
        class (None: no preservation judges)."""
        if not self.preserve:
            return None
        return min(self._share(p, j) for p, j in self.preserve.items())

    def __call__(self, iteration: int) -> dict:
        d_target, d_empty = self.ratio()
        rate, kept = self.rate(), self.kept()
        if d_empty > 0:
            ratio = d_target / d_empty
        else:  # the adapter moves nothing (e.g. still zero): no separation, not a pass
            ratio = float("inf") if d_target > 0 else 1.0
        passed = (ratio >= self.s.min_ratio and (rate is None or rate <= self.s.max_rate)
                  and (kept is None or kept >= self.s.min_kept))
        return {"iteration": int(iteration), "ratio": ratio, "d_target": d_target, "d_empty": d_empty,
                "rate": rate, "kept": kept, "passed": bool(passed)}
