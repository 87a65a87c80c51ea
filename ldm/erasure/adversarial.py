"""Adversarial erasure training (ours, off by default): AdvUnlearn's idea (Zhang et al., NeurIPS 2024) on the
erasure objective's adapter. Plain erasure training sees one context, the target prompt's c_p; an attacker who
puts a few searched words in front of it (UnlearnDiffAtk, ldm/attacks/unlearndiffatk.py) can find a context
the adapter does not erase. Here an attacker runs INSIDE training, against the current adapter, and its prompt
joins the erasure term:

    every `every` iterations (the attack step, the adapter frozen):
        e [K, D]  K tokens in front of the target prompt, warm-started from the last ones; `steps` Adam steps
                  on the test attack's own objective (ldm.attacks.unlearndiffatk.objective) with the ADAPTED model
                  alone (w = 0: the erased model is attacked),
            L_att(e) = E_{t, n} || eps_theta(x_t, t, c(e + target)) - n ||^2,  x_t = q_sample(z0, t, n)
                       + decision_weight * L_dec    (optional: pushes the stability test's d(p) under 0.9 d(""),
                                                     at the test's t range, as the test attack does)
                  z0 [N, 4, h, w]: latents of the concept, drawn once by the base model (adapters off)
                  projected onto whole-word vocabulary tokens (straight-through, as the attack: a prompt a user
                  can type)
        c_adv = c(adv + target) [1, 77, D], no grad
    every iteration (the erasure step):
        loss = loss_erasure + weight * || eps_theta(z_t, t, c_adv) - (e_0 - eta (e_p - e_0)) ||^2
               the same z_t, t and negative-guidance target as the erasure term: whatever the words in front,
               the target prompt is mapped to the erased concept

Notation as ldm/erasure/objective.py. The attack's draws come from a generator of its own (seeded by the run's
seed), so the erasure term's draws are those of a run without the attacker; its state (tokens, generator,
iteration) goes into the run's state.pt and a resumed run continues bit-exactly.
"""
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

from ldm.attacks.tokens import TokenSpace
from ldm.attacks.unlearndiffatk import encode, frozen, objective
from ldm.erasure.delta import adapters_disabled
from ldm.models.diffusion.ddim import cfg_model_fn, ddim_timesteps, ddpm_t_range, sample_ddim


@dataclass(frozen=True)
class AdversarySettings:
    every: int = 10          # iterations between attack steps (1: every iteration)
    tokens: int = 3          # K adversarial tokens in front of the target prompt
    steps: int = 5           # Adam steps per attack step
    lr: float = 0.5          # in units of the vocabulary embeddings' standard deviation (as UDAConfig)
    batch: int = 2           # concept latents per attack step
    images: int = 8          # N concept latents, drawn once by the base model
    weight: float = 1.0      # of the adversarial erasure term
    guidance: float = 7.5    # CFG of the concept latents' sampling
    decision_weight: float = 0.0  # of the attack's decision term (0: the denoising loss alone)
    t_enc: int | None = None      # the stability test's t_enc that term aims at (None: steps // 2)

    def __post_init__(self):
        for name in ("every", "tokens", "steps", "batch", "images"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"adversarial {name} must be >= 1, got {getattr(self, name)}")
        if not self.weight > 0 or not self.lr > 0 or self.decision_weight < 0:
            raise ValueError(f"adversarial weight and lr must be > 0 and decision_weight >= 0, got {self.weight}, "
                             f"{self.lr}, {self.decision_weight}")

    def record(self) -> dict:
        return asdict(self)


class Adversary:
    """The attacker inside training. context() -> c_adv [1, 77, D] for this iteration (refreshed every
    `every` calls by an attack step against the model's current adapters)."""

    def __init__(self, model, target_prompt: str, latent_shape: tuple[int, ...], steps: int,
                 settings: AdversarySettings, seed: int):
        self.model, self.prompt, self.s = model, target_prompt, settings
        self.space = TokenSpace(model.cond_stage_model, settings.tokens)
        self.generator = torch.Generator().manual_seed(seed)
        self.z0 = self._concept_latents(latent_shape, steps)                       # [N, 4, h, w]
        self.uncond = model.get_learned_conditioning([""]).detach()                # [1, 77, D]
        t_enc = settings.t_enc if settings.t_enc is not None else steps // 2
        self.t_range = ddpm_t_range(steps, t_enc, model.num_timesteps) if settings.decision_weight > 0 else None
        self.attacked = SimpleNamespace(model=model, adapters=["lora"])  # the attack's view: one adapter, w = 0
        self.idx = torch.randint(0, len(self.space.ids), (settings.tokens,), generator=self.generator)  # [K]
        self.calls = 0
        self.last: dict = {}
        self._context: torch.Tensor | None = None

    @torch.no_grad()
    def _concept_latents(self, shape: tuple[int, ...], steps: int) -> torch.Tensor:
        """N samples of the target prompt by the base model (adapters off): DDIM `steps`, CFG `guidance`."""
        m, n = self.model, self.s.images
        c, u = m.get_learned_conditioning([self.prompt, ""]).chunk(2)              # [1, 77, D] each
        x_T = torch.randn((n, *shape), generator=self.generator).to(m.device)
        fn = cfg_model_fn(m.apply_model, c.expand(n, -1, -1), u.expand(n, -1, -1), self.s.guidance)
        with adapters_disabled(m.unet):
            return sample_ddim(fn, x_T, m.alphas_cumprod, ddim_timesteps(steps, m.num_timesteps)).float()

    def attack_loss(self, cond: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """L_att for cond [1, 77, D] on concept latents z0[pick]: the test attack's objective against the adapter
        alone (its denoising loss, plus its decision term when decision_weight > 0)."""
        loss, _ = objective(self.attacked, cond, self.uncond, self.z0[pick], [0.0], self.generator, self.t_range,
                            self.s.decision_weight)
        return loss

    def search(self) -> None:
        """One attack step: `steps` Adam steps on the tokens (warm start), the adapters' weights frozen."""
        table = self.space.table()
        soft = table[self.idx].clone().float().requires_grad_(True)                # [K, D]
        opt = torch.optim.Adam([soft], lr=self.s.lr * float(table.float().std()))
        losses = []
        with frozen(self.model):
            for _ in range(self.s.steps):
                pick = torch.randint(0, len(self.z0), (self.s.batch,), generator=self.generator)
                loss = self.attack_loss(encode(self.space, self.idx, soft, self.prompt), pick)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                self.idx = self.space.nearest(soft)
        self.last = {"text": self.space.text(self.space.ids[self.idx], self.prompt), "loss_first": losses[0],
                     "loss_last": losses[-1]}

    def context(self) -> torch.Tensor:
        """c_adv [1, 77, D] of this iteration (no grad)."""
        if self.calls % self.s.every == 0:
            self.search()
            self._context = None
        if self._context is None:
            with torch.no_grad():
                self._context = encode(self.space, self.idx, None, self.prompt)
        self.calls += 1
        return self._context

    def state_dict(self) -> dict:
        return {"idx": self.idx.clone(), "generator": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.idx = state["idx"].clone()
        self.generator.set_state(state["generator"])
        self.calls = int(state["calls"])
        self._context = None  # re-encoded from idx at the next call (the same tokens: the same context)
