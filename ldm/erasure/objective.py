"""The ESD / UnGuide erasure objective on ONE copy of the base model (math only).

Notation (UnGuide arXiv 2508.05755, after ESD, Gandikota et al. 2023) -> code:

    c_p            target prompt's text context           emb.target     [1, 77, D]
    c_0            reference (anchor) prompt's context    emb.reference  [1, 77, D]
    c_u            empty prompt's context (CFG uncond)    emb.uncond     [1, 77, D]
    theta*         frozen base UNet                        the UNet with adapters off (adapters_disabled)
    theta          base + LoRA (the trained model)        the same UNet with adapters on
    S              DDIM steps                              ddim_steps
    t_enc          DDIM index, uniform in [0, S)           plan.t_enc  (int)
    z_t            partial-trajectory latent               z            [1, 4, h, w], no grad
    t              DDPM timestep, uniform in ddpm_t_range  plan.t       [1] long
    e_0 = eps_theta*(z_t, t, c_0)                          e_0          [1, 4, h, w], no grad
    e_p = eps_theta*(z_t, t, c_p)                          e_p          [1, 4, h, w], no grad
    e_n = eps_theta (z_t, t, c_p)                          e_n          [1, 4, h, w], with grad
    eta            negative guidance (2.0)                 negative_guidance
    loss = || e_n - (e_0 - eta (e_p - e_0)) ||^2 (mean)    F.mse_loss

Optional preservation term (ours, off by default; not in the release): prompts c_k the adapter must leave alone,
    loss += lambda * mean_k || eps_theta(z_t, t, c_k) - eps_theta*(z_t, t, c_k) ||^2     emb.preserve [P, 77, D]
at the same z_t and t. ESD's objective sees only the target prompt, so nothing stops a rank-1 adapter from
moving every prompt that shares its text features; this term names the ones that must not move.

Optional other wordings of the concept (ours, off by default: train.py --erase_synonyms): each iteration draws
its c_p from [target, *also] (the last draw of the iteration, so a run without them draws as before); the
trajectory, e_p and e_n all take that wording's context.

Optional adversarial term (ours, off by default; ldm/erasure/adversarial.py): an attacker's context c_adv
(searched words in front of the target prompt, refreshed every few iterations against the current adapter),
    loss += beta * || eps_theta(z_t, t, c_adv) - (e_0 - eta (e_p - e_0)) ||^2
at the same z_t, t and target as the erasure term.

One iteration (release train.py, fact sheet §3):
  1. draw t_enc ~ U{0..S-1}, t ~ U[round(t_enc/S*T), round((t_enc+1)/S*T)), x_T ~ N(0, I) [1, 4, h, w]
     (and a seed for DDIM's eta-noise), all from ONE CPU torch.Generator in that order, so a seed gives the
     same run on CPU and CUDA and a saved generator state resumes a run exactly;
  2. z = DDIM(x_T) with the CURRENT adapted model (as the release: its quick_sampler uses the LoRA model),
     CFG scale start_guidance with uncond c_u, for partial_steps(S, t_enc) steps, no grad;
  3. [e_0, e_p] = theta*([z, z], [t, t], [c_0, c_p])  -- ONE batched UNet call (batch 2; 2 + P with
     preservation prompts), adapters off, no grad.
     The release holds a second full copy of the model for this; here the base model is the same weights with
     the adapters switched off, so no copy is needed;
  4. e_n = theta(z, t, c_p) with grad (batch 1 + P with preservation); loss = MSE(e_n, e_0 - eta (e_p - e_0)).

The prompts are encoded once (the text encoder is frozen), not per iteration.
`frozen_model` (a separate, un-adapted copy) restates the release's two-copy computation for tests and
benchmarks; it is numerically the same objective at twice the weight memory.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.erasure.delta import adapters_disabled
from ldm.models.diffusion.ddim import cfg_model_fn, ddim_timesteps, ddpm_t_range, partial_steps, sample_ddim


@dataclass
class PromptEmbeddings:
    target: torch.Tensor                    # c_p [1, 77, D]
    reference: torch.Tensor                 # c_0 [1, 77, D]
    uncond: torch.Tensor                    # c_u [1, 77, D]
    preserve: torch.Tensor | None = None    # c_k [P, 77, D] (the optional preservation term), or None
    also: torch.Tensor | None = None        # [A, 77, D] other wordings of the concept erased too, or None


@torch.no_grad()
def encode_prompts(model, target: str, reference: str, preserve: tuple[str, ...] = (),
                   also: tuple[str, ...] = ()) -> PromptEmbeddings:
    """Encode the prompts once (in one text-encoder call)."""
    emb = model.get_learned_conditioning([target, reference, "", *preserve, *also])  # [3 + P + A, 77, D]
    p = 3 + len(preserve)
    return PromptEmbeddings(emb[0:1].clone(), emb[1:2].clone(), emb[2:3].clone(),
                            emb[3:p].clone() if preserve else None, emb[p:].clone() if also else None)


@dataclass
class Plan:
    """The random draws of one iteration."""
    t_enc: int                 # DDIM index in [0, S)
    t: int                     # DDPM timestep in ddpm_t_range(S, t_enc)
    start_code: torch.Tensor   # x_T [1, 4, h, w], on the CPU
    noise_seed: int            # seeds the DDIM eta-noise generator (unused when ddim_eta == 0)
    prompt: int = 0            # the wording erased this iteration: 0 the target, i >= 1 emb.also[i - 1]


class UnGuideObjective:
    """Loss of one iteration of ESD/UnGuide erasure training on a model whose UNet carries adapters (any delta kind).

    model: LatentDiffusion with adapters injected (ldm.erasure.lora.inject_lora); its base weights frozen.
    latent_shape: [C, h, w]. fixed_t_enc: use this t_enc every iteration (benchmarks; None = uniform draw).
    autocast_dtype: torch.bfloat16 / torch.float16 to run the UNet under autocast (weights stay fp32; fp16 is CUDA-only).
    preserve_weight: lambda of the preservation term (used when emb.preserve is given).
    """

    def __init__(self, model, emb: PromptEmbeddings, latent_shape: tuple[int, ...], ddim_steps: int = 50,
                 start_guidance: float = 9.0, negative_guidance: float = 2.0, ddim_eta: float = 0.0,
                 release_schedule: bool = False, fixed_t_enc: int | None = None,
                 autocast_dtype: torch.dtype | None = None, frozen_model: nn.Module | None = None,
                 preserve_weight: float = 1.0, adversary=None):
        self.model, self.emb = model, emb
        self.adversary = adversary  # an ldm.erasure.adversarial.Adversary, or None
        self.preserve_weight = float(preserve_weight)
        self.latent_shape = tuple(latent_shape)
        self.S = int(ddim_steps)
        self.start_guidance, self.negative_guidance = float(start_guidance), float(negative_guidance)
        self.ddim_eta, self.release_schedule = float(ddim_eta), bool(release_schedule)
        self.timesteps = ddim_timesteps(self.S, model.num_timesteps, self.release_schedule)
        if fixed_t_enc is not None and not 0 <= fixed_t_enc < self.S:
            raise ValueError(f"fixed_t_enc must be in 0..{self.S - 1}, got {fixed_t_enc}")
        self.fixed_t_enc = fixed_t_enc
        self.autocast_dtype = autocast_dtype
        self.frozen_model = frozen_model
        self.device = model.device

    # -- 1. draws -------------------------------------------------------------------------------------------
    def draw(self, generator: torch.Generator) -> Plan:
        """t_enc, t, x_T, noise seed from `generator` (a CPU generator), always in this order."""
        t_enc = int(torch.randint(self.S, (1,), generator=generator))
        if self.fixed_t_enc is not None:
            t_enc = self.fixed_t_enc
        lo, hi = ddpm_t_range(self.S, t_enc, self.model.num_timesteps)
        t = int(torch.randint(lo, hi, (1,), generator=generator))
        start_code = torch.randn((1, *self.latent_shape), generator=generator)
        noise_seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        prompt = 0 if self.emb.also is None else int(torch.randint(1 + len(self.emb.also), (1,), generator=generator))
        return Plan(t_enc, t, start_code, noise_seed, prompt)

    def target(self, plan: Plan) -> torch.Tensor:
        """c_p [1, 77, D] of this iteration: the target prompt's, or the drawn other wording's."""
        return self.emb.target if plan.prompt == 0 else self.emb.also[plan.prompt - 1:plan.prompt]

    def _autocast(self):
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- 2. partial trajectory of the current adapted model -----------------------------------------------
    @torch.no_grad()
    def partial_latent(self, plan: Plan) -> torch.Tensor:
        """z [1, 4, h, w]: DDIM with CFG (start_guidance, uncond "") of the adapted model, down to t_enc."""
        x_T = plan.start_code.to(self.device, torch.float32)
        n = partial_steps(self.S, plan.t_enc, self.release_schedule)
        fn = cfg_model_fn(self.model.apply_model, self.target(plan), self.emb.uncond, self.start_guidance)
        gen = torch.Generator(self.device).manual_seed(plan.noise_seed) if self.ddim_eta > 0 else None
        with self._autocast():
            z = sample_ddim(fn, x_T, self.model.alphas_cumprod, self.timesteps, eta=self.ddim_eta, generator=gen,
                            stop_after=n)
        return z.float()

    # -- 3. base-model predictions ---------------------------------------------------------------------------
    def _conds(self, *parts: torch.Tensor) -> torch.Tensor:
        """Contexts for one latent z [1, ...]: the given [1, 77, D] parts, then the preservation prompts."""
        extra = [] if self.emb.preserve is None else [self.emb.preserve]
        return torch.cat([*parts, *extra])                                 # [n + P, 77, D]

    @torch.no_grad()
    def frozen_eps(self, z: torch.Tensor, t: torch.Tensor, c_p: torch.Tensor | None = None) -> torch.Tensor:
        """[e_0, e_p, e_k...] as one tensor [2 + P, 4, h, w]: the base model on the reference, the target (c_p, default
        emb.target) and the preservation prompts, at z [1, 4, h, w]."""
        conds = self._conds(self.emb.reference, self.emb.target if c_p is None else c_p)
        n = conds.shape[0]
        with self._autocast():
            if self.frozen_model is not None:  # the release's two-copy restatement: one call a prompt, second copy
                return torch.cat([self.frozen_model.apply_model(z, t, c[None]).float() for c in conds])
            with adapters_disabled(self.model.unet):  # one copy: the same weights, adapters off, one call
                return self.model.apply_model(z.expand(n, -1, -1, -1), t.expand(n), conds).float()

    # -- 4. the loss -------------------------------------------------------------------------------------------
    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, Plan]:
        """One iteration's loss (a scalar with grad to the adapters) and the draws that produced it."""
        adv = None if self.adversary is None else self.adversary.context()         # c_adv [1, 77, D] or None
        plan = self.draw(generator)
        z = self.partial_latent(plan)                                               # [1, 4, h, w]
        t = torch.full((z.shape[0],), plan.t, device=self.device, dtype=torch.long)  # [1]
        c_p = self.target(plan)                                                     # [1, 77, D]
        frozen = self.frozen_eps(z, t, c_p)                                         # [2 + P, 4, h, w]
        e_0, e_p, e_k = frozen[0:1], frozen[1:2], frozen[2:]
        target = e_0 - self.negative_guidance * (e_p - e_0)                         # [1, 4, h, w]
        heads = [c_p] if adv is None else [c_p, adv]
        conds = self._conds(*heads)                                                 # [len(heads) + P, 77, D]
        with self._autocast():
            adapted = self.model.apply_model(z.expand(len(conds), -1, -1, -1), t.expand(len(conds)), conds)
        e_n, e_kn = adapted[0:1].float(), adapted[len(heads):].float()
        loss = F.mse_loss(e_n, target)
        if adv is not None:
            loss = loss + self.adversary.s.weight * F.mse_loss(adapted[1:2].float(), target)
        if len(e_k):
            loss = loss + self.preserve_weight * F.mse_loss(e_kn, e_k)
        return loss, plan

    def summary(self) -> dict:
        """For train_config.json: the attacker's last search (its prompt, its loss before / after), if any."""
        return {} if self.adversary is None or not self.adversary.last else {"adversary_last": self.adversary.last}

    def state_dict(self) -> dict:
        """What a resumed run needs besides the generator: the attacker's state (nothing without one)."""
        return {} if self.adversary is None else {"adversary": self.adversary.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.adversary is not None:
            self.adversary.load_state_dict(state["adversary"])

