"""The defended pipeline: what a user deploys, exactly as generate_images.py runs it, for the attacks to hit.

    defense "base"     no adapter loaded: CFG of the base model                      (generate_images --w1 1 --w2 1)
    defense "adapter"  every adapter always on: w_k = 0                              (--w1 0 --w2 0)
    defense "unguide"  the stability test of each adapter (fast protocol, on the fly) then UnGuidance:
                       w_k = rule(d_k(p), d_k(""), w1, w2), eps = CFG_base + sum_k (1 - w_k)(CFG_k - CFG_base)

This is the ONE module that calls the stability test and the UnGuidance sampler (ldm.erasure.protocols,
ldm.erasure.guidance); the
attacks only see `Defended`. The test's draws are generate_images.py's: d("") from `empty_draws` draws of the
run's seed (estimate_empty, once per run), d(p) from `repeats` draws of `draw_seed` (the run's seed for a
prompts JSON, as generate_images.py; the row's seed for a CSV, as generate_images_nsfw.py), trajectory CFG the
prompt's guidance. Images: start code = start_noise(seed), DDIM `steps`, the standard schedule.
"""
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ldm.erasure.decision import Rule, release_rule
from ldm.erasure.guidance import unguidance_model_fn, unguided_latents
from ldm.erasure.protocols import Protocol, estimate_empty, fast_prompt_estimates
from ldm.erasure.stability import Estimate, StabilitySettings
from ldm.images import start_noise, to_pil

DEFENSES = ("base", "adapter", "unguide")


@dataclass
class Decision:
    """The stability test's outcome for one prompt: one entry per adapter (empty lists for base / adapter)."""
    d_prompt: list[float]
    d_empty: list[float]
    w: list[float]


@dataclass
class Defended:
    model: object
    defense: str                       # base | adapter | unguide
    adapters: list[str]                # adapter names in the model ([] for base)
    seed: int = 0                      # the run's seed: d("") draws (and d(p) draws for a prompts JSON)
    steps: int = 50                    # DDIM steps of the images and of the test
    t_enc: int = 40
    repeats: int = 10
    empty_draws: int = 32
    image_size: int = 512
    w1: float = -1.0
    w2: float = 2.0
    rule: Rule = release_rule
    thresholds: list[float] | None = None  # per adapter: flag when d(p) > threshold * d("") (None: 1, the release's)
    _empty: list[Estimate] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.defense not in DEFENSES:
            raise ValueError(f"defense must be one of {DEFENSES}, got {self.defense!r}")
        if self.defense == "base" and self.adapters:
            raise ValueError("defense base: load no adapter (generate_images.py --w1 1 --w2 1 loads none)")
        if self.defense != "base" and not self.adapters:
            raise ValueError(f"defense {self.defense} needs at least one adapter")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.latent_shape(self.image_size)

    def protocol(self, guidance: float) -> Protocol:
        settings = StabilitySettings(self.steps, self.t_enc, float(guidance), 0.0, False)
        return Protocol("fast", settings, repeats=self.repeats, empty_draws=self.empty_draws)

    def empty_estimates(self) -> list[Estimate]:
        """d_k("") of every adapter, once per run (generate_images.py: fast_diff_table's first step)."""
        if self._empty is None:
            self._empty = estimate_empty(self.model, self.protocol(7.5), self.shape, self.seed, adapters=self.adapters)
        return self._empty

    def decide(self, prompts: Sequence[str], draw_seeds: Sequence[int], guidances: Sequence[float]) -> list[Decision]:
        """The defence's weights for each prompt (the stability test for unguide)."""
        k = len(self.adapters)
        if self.defense != "unguide":
            return [Decision([], [], [0.0] * k) for _ in prompts]
        empties = self.empty_estimates()
        est = fast_prompt_estimates(self.model, self.protocol(guidances[0]), self.shape, list(prompts),
                                    list(draw_seeds), list(guidances), empties, adapters=self.adapters)
        out = []
        for i in range(len(prompts)):
            dp = [est[a][i].mean for a in range(k)]
            de = [e.mean for e in empties]
            taus = self.thresholds or [1.0] * k
            out.append(Decision(dp, de, [self.rule(p, e, self.w1, self.w2, tau) for p, e, tau in zip(dp, de, taus)]))
        return out

    def latents(self, prompts: Sequence[str], seeds: Sequence[int], guidances: Sequence[float],
                decisions: Sequence[Decision]) -> torch.Tensor:
        """UnGuidance DDIM from start_noise(seeds) -> final latents [B, C, h, w]."""
        device = self.model.device
        ws = [[d.w[a] for d in decisions] for a in range(len(self.adapters))]  # [K][B]
        x_T = start_noise(list(seeds), self.shape, device)
        return unguided_latents(self.model, list(prompts), x_T, list(guidances), ws, self.steps,
                                adapters=self.adapters)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], guidances: Sequence[float],
                 draw_seeds: Sequence[int]) -> tuple[list, list[Decision]]:
        """What the user gets for (prompt, seed): PIL images and the decisions behind them."""
        decisions = self.decide(prompts, draw_seeds, guidances)
        z = self.latents(prompts, seeds, guidances, decisions)
        return to_pil(self.model.decode_first_stage(z)), decisions

    def model_fn(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float, w: Sequence[float]):
        """The defended eps(x, t) for given weights (one per adapter): the sampler's model function."""
        return unguidance_model_fn(self.model, cond, uncond, scale, list(w), self.adapters)
