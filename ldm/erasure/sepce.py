"""SepCE / SRS-ME: separable concept erasure with weight decoupling (math only: no argparse, PIL or file paths).

After "Separable Diffusion Model Unlearning" (Dlut-lab-zmn/SRS-ME, train-scripts/SRSME_Solution.py and
SRS_ME.py; re-derived here, not copied). Notation -> code:

    E_k        token embeddings the adapted layers must not react to: the empty prompt's and the preserved
               prompts' text-encoder outputs (the context attn2.to_k / to_v see)    [N, D]
    B_k        orthonormal basis of the null space of E_k, as rows                  [r, D]   (a fixed buffer)
    V_k        the trained factor, zero at the start                                [out, r] (per layer)
    dW_k       alpha * V_k B_k (alpha = scale_factor, the release's 1e-2 on B)     [out, D]: dW_k e = 0 on E_k
    z_0        latents of images of the concept (drawn by the base model from its prompt, or given)
    t          t_enc ~ U{0..S-1}, t ~ U[round(t_enc T/S), round((t_enc+1) T/S)) (the release's draw)
    z_t        q_sample(z_0, t, noise)
    corr       mean((eps_theta(z_t,t,c_k) - eps_theta(z_t,t,"")) * (eps*(z_t,t,c_k) - eps*(z_t,t,"")))
    reg        mean over layers of sum |dW_k|                 (the release's L1 of V (scale B))
    loss       corr + beta * reg                              minimised: the edited model's conditional
                                                              direction turns against the base model's
    stop       EMA_0.9(corr) < threshold (checked from the 12th iteration, the release's `i > 10`), or the cap

Several concepts: the UNet carries one "basis" delta per concept; they sum (every delta at scale 1), and
removing dW_k restores the model without concept k's erasure exactly (ldm.erasure.delta.remove_delta).

Differences from the release, on purpose: gradients are zeroed every iteration (the release never calls
zero_grad, so Adam sees accumulated gradients); B is orthonormalised by an SVD with a stated tolerance
(the release normalises sympy's exact null-space vectors one by one, not orthogonal to each other); the
concept's images are drawn in latent space (the release decodes images to files and encodes them again).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ldm.erasure.delta import Delta, adapters_disabled, delta_layers, delta_state_dict, inject_delta, register_delta
from ldm.erasure.targets import select_targets
from ldm.errors import UserError
from ldm.models.diffusion.ddim import cfg_model_fn, ddim_timesteps, ddpm_t_range, sample_ddim

EOS_ID = 49407  # <|endoftext|>, also the padding token of SD's tokenizer


@register_delta
class BasisDelta(Delta):
    """dW = alpha * V B: V [out, r] trained (zero at the start), B [r, in] a fixed buffer saved with V."""

    kind = "basis"
    tensor_names = ("V", "B")

    def __init__(self, basis: torch.Tensor, out_features: int, alpha: float, device=None, dtype=None):
        super().__init__(basis.shape[0], alpha)
        self.register_buffer("B", basis.detach().to(device=device, dtype=dtype).clone())              # [r, in]
        self.V = nn.Parameter(torch.zeros(out_features, basis.shape[0], device=device, dtype=dtype))  # [out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return (x @ self.B.to(x.dtype).T) @ self.V.to(x.dtype).T * self.alpha

    def delta_weight(self) -> torch.Tensor:  # [out, in]
        return self.V @ self.B * self.alpha

    @classmethod
    def fit(cls, in_features: int, out_features: int, tensors: dict[str, torch.Tensor]) -> int:
        v, b = tensors["V"], tensors["B"]
        if v.dim() != 2 or b.dim() != 2 or v.shape[0] != out_features or b.shape[1] != in_features \
                or v.shape[1] != b.shape[0]:
            raise ValueError(f"V {tuple(v.shape)} and B {tuple(b.shape)} do not fit a Linear "
                             f"{in_features} -> {out_features}")
        return b.shape[0]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], alpha: float, device=None, dtype=None) -> "BasisDelta":
        delta = cls(tensors["B"], tensors["V"].shape[0], alpha, device, dtype)
        with torch.no_grad():
            delta.V.copy_(tensors["V"])
        return delta


# -- 1. the null space ------------------------------------------------------------------------------------------
def null_space(rows: torch.Tensor, rtol: float) -> tuple[torch.Tensor, float]:
    """Orthonormal basis (rows) of the directions the `rows` [N, D] (almost) do not reach, and its residual.

    SVD in float64: a right-singular direction belongs to the null space when its singular value is at most
    rtol * s_max (directions beyond N, where N < D, have singular value 0). Returns (B [r, D] float64,
    residual = max_i ||B e_i|| / ||e_i||, 0.0 for an empty B).
    """
    e = rows.detach().double().reshape(-1, rows.shape[-1])                     # [N, D]
    _, s, vh = torch.linalg.svd(e, full_matrices=True)                          # s [min(N, D)], vh [D, D]
    rank = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    basis = vh[rank:]                                                           # [D - rank, D]
    return basis, relative_residual(basis, e)


def relative_residual(basis: torch.Tensor, rows: torch.Tensor) -> float:
    """max_i ||B e_i|| / ||e_i|| over the rows e_i of `rows` [N, D] (0.0 for an empty B)."""
    if basis.shape[0] == 0:
        return 0.0
    e = rows.double().reshape(-1, rows.shape[-1])
    return float(((e @ basis.T).norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-30)).max())


def token_rows(emb: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the prompts' token embeddings emb [P, 77, D] (token ids [P, 77]) into content rows (start token
    up to and including the first end-of-text token) [Nc, D] and padding rows (the end-of-text copies after
    it) [Np, D]."""
    content, padding = [], []
    for e, i in zip(emb, ids):
        n = int((i != EOS_ID).sum()) + 1                                          # tokens up to the first EOS
        content.append(e[:n])
        padding.append(e[n:])
    return torch.cat(content), torch.cat(padding)


def preserve_basis(emb: torch.Tensor, ids: torch.Tensor, tokens: str, rtol: float,
                   pad_rtol: float) -> tuple[torch.Tensor, dict]:
    """B [r, D] for the preserved prompts' embeddings emb [P, 77, D] and how it was made.

    tokens "all": every token, null space at rtol. "content": the content tokens exactly (rtol), then, inside
    that null space, the directions the padding tokens reach at most pad_rtol * their largest singular value
    (pad_rtol None or inf: padding ignored). Raises UserError when no direction is left.
    """
    content, padding = token_rows(emb, ids)
    if tokens == "all":
        basis, _ = null_space(emb.reshape(-1, emb.shape[-1]), rtol)
        exact_dims = basis.shape[0]
    elif tokens == "content":
        basis, _ = null_space(content, rtol)                                     # [r0, D]
        exact_dims = basis.shape[0]
        if pad_rtol is not None and math.isfinite(pad_rtol) and basis.shape[0] and padding.shape[0]:
            inner, _ = null_space(padding.double() @ basis.T, pad_rtol)          # [r1, r0]
            basis = inner @ basis                                                # [r1, D], orthonormal rows
    else:
        raise UserError(f"SepCE tokens {tokens!r}: use 'all' or 'content'")
    d = emb.shape[-1]
    info = {"tokens": tokens, "rtol": rtol, "pad_rtol": pad_rtol, "dims": int(basis.shape[0]), "width": d,
            "content_dims": int(exact_dims), "residual_content": relative_residual(basis, content),
            "residual_padding": relative_residual(basis, padding) if padding.shape[0] else 0.0}
    if basis.shape[0] == 0:
        raise UserError(f"SepCE: the preserved prompts' {content.shape[0] if tokens == 'content' else emb.shape[0] * emb.shape[1]}"
                        f" token embeddings leave 0 of {d} dimensions of the text space free ({tokens} tokens, rtol "
                        f"{rtol}, padding rtol {pad_rtol}); drop preserved prompts (each takes up to "
                        f"{emb.shape[1]} dimensions, its content tokens only with tokens 'content'), use tokens "
                        "'content', or a larger tolerance")
    return basis, info


# -- 2. the stop rule ---------------------------------------------------------------------------------------------
class MomentumStop:
    """The release's momentum stopping: ema = v_1, then ema = m * ema + (1 - m) * v_i; stop at the first
    iteration i >= warmup + 1 (1-based; the release's `i > 10` is warmup 11) where ema < threshold, or at cap."""

    def __init__(self, threshold: float, momentum: float = 0.9, warmup: int = 11, cap: int | None = None):
        self.threshold, self.momentum, self.warmup, self.cap = float(threshold), float(momentum), int(warmup), cap
        self.ema: float | None = None
        self.count = 0
        self.stopped = False
        self.reason: str | None = None   # "momentum" or "cap" once stopped

    def update(self, value: float) -> bool:
        """Record one iteration's correlation; True when training stops after this iteration."""
        self.count += 1
        self.ema = float(value) if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * float(value)
        if not self.stopped and self.count > self.warmup and self.ema < self.threshold:
            self.stopped, self.reason = True, "momentum"
        elif not self.stopped and self.cap is not None and self.count >= self.cap:
            self.stopped, self.reason = True, "cap"
        return self.stopped


def momentum_stop_at(values, threshold: float, momentum: float = 0.9, warmup: int = 11,
                     cap: int | None = None) -> int | None:
    """The 1-based iteration at which MomentumStop stops on the sequence `values` (None: it never does)."""
    rule = MomentumStop(threshold, momentum, warmup, cap)
    for i, v in enumerate(values, 1):
        if rule.update(v):
            return i
    return None


# -- 3. the settings ----------------------------------------------------------------------------------------------
@dataclass
class SepCESettings:
    preserve: list[str] = field(default_factory=list)  # prompts dW must not react to ("" is always added)
    reg_beta: float = 1e-5            # beta of the L1 term (release default)
    threshold: float = 5e-5           # momentum stop: EMA of corr below this (release default)
    scale_factor: float = 1e-2        # alpha: dW = alpha V B (the release scales B by it)
    iterations: int = 1000            # the cap (release --iter_break)
    lr: float = 1e-6                  # Adam (release default, SD)
    seed: int = 0
    momentum: float = 0.9
    tokens: str = "all"               # "all" (77 tokens a prompt) or "content" (start..end-of-text)
    rtol: float = 1e-6                # singular-value tolerance of the null space, relative to s_max
    pad_rtol: float | None = None     # tokens "content": tolerance for the padding tokens (None: ignore them)
    images: int = 20                  # concept images drawn by the base model (when none are given)
    image_steps: int = 50             # DDIM steps for drawing them
    image_guidance: float = 7.5       # their CFG scale
    ddim_steps: int = 50              # S of the t draw
    targets: list[str] = field(default_factory=lambda: ["default"])  # attn2.to_k / to_v

    def validate(self) -> None:
        for name in ("reg_beta", "threshold", "scale_factor", "lr", "momentum", "rtol", "image_guidance"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"SepCE {name} must be a finite number, got {v!r}")
        if self.pad_rtol is not None and not (isinstance(self.pad_rtol, (int, float)) and self.pad_rtol >= 0):
            raise UserError(f"SepCE pad_rtol must be a number >= 0 (inf: ignore the padding), got {self.pad_rtol!r}")
        if self.reg_beta < 0 or self.scale_factor <= 0 or self.lr <= 0 or not 0 <= self.momentum < 1 or self.rtol < 0:
            raise UserError(f"SepCE: reg_beta >= 0, scale_factor > 0, lr > 0, 0 <= momentum < 1 and rtol >= 0 "
                            f"(got {self.reg_beta}, {self.scale_factor}, {self.lr}, {self.momentum}, {self.rtol})")
        if self.iterations < 1 or self.images < 1:
            raise UserError(f"SepCE iterations and images must be >= 1, got {self.iterations} and {self.images}")
        if self.tokens not in ("all", "content"):
            raise UserError(f"SepCE tokens {self.tokens!r}: use 'all' or 'content'")

    def metadata(self) -> dict[str, str]:
        return {"method": "sepce", "preserve": list(self.preserve), "reg_beta": repr(float(self.reg_beta)),
                "threshold": repr(float(self.threshold)), "scale_factor": repr(float(self.scale_factor)),
                "sepce_tokens": self.tokens, "sepce_rtol": repr(float(self.rtol)),
                "sepce_pad_rtol": repr(self.pad_rtol)}


# -- 4. the objective ---------------------------------------------------------------------------------------------
@dataclass
class SepCEPlan:
    """The random draws of one iteration (t_enc and t as UnGuideObjective's plan, for the loop's log)."""
    index: int                 # which concept latent
    t_enc: int                 # DDIM index in [0, S)
    t: int                     # DDPM timestep
    noise: torch.Tensor        # [1, 4, h, w] on the CPU


class SepCEObjective:
    """loss(generator) -> (corr + beta * reg, plan) on ONE copy of the model: eps* is the same UNet with its
    adapters off. `stop_requested` turns True once the momentum rule fires (the loop then ends the run)."""

    def __init__(self, model, name: str, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 settings: SepCESettings):
        self.model, self.name, self.s = model, name, settings
        self.latents = latents                         # z_0 [N, 4, h, w], on the model's device
        self.conds = torch.cat([cond, uncond])         # [c_k, ""] [2, 77, D]
        self.layers = list(delta_layers(model.unet, name).values())
        self.rule = MomentumStop(settings.threshold, settings.momentum, cap=settings.iterations)
        self.history: list[float] = []                 # corr of every iteration
        self.device = model.device

    @property
    def stop_requested(self) -> bool:
        return self.rule.stopped

    def draw(self, generator: torch.Generator) -> SepCEPlan:
        """index, t_enc, t, noise from `generator` (CPU), always in this order."""
        index = int(torch.randint(self.latents.shape[0], (1,), generator=generator))
        t_enc = int(torch.randint(self.s.ddim_steps, (1,), generator=generator))
        lo, hi = ddpm_t_range(self.s.ddim_steps, t_enc, self.model.num_timesteps)
        t = int(torch.randint(lo, hi, (1,), generator=generator))
        noise = torch.randn((1, *self.latents.shape[1:]), generator=generator)
        return SepCEPlan(index, t_enc, t, noise)

    def terms(self, plan: SepCEPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(corr, reg) of one draw; both scalars, with grad to V."""
        t = torch.full((2,), plan.t, device=self.device, dtype=torch.long)                      # [2]
        z = self.model.q_sample(self.latents[plan.index:plan.index + 1], t[:1],
                                plan.noise.to(self.device, self.latents.dtype)).expand(2, -1, -1, -1)  # [2, 4, h, w]
        with torch.no_grad(), adapters_disabled(self.model.unet):
            base = self.model.apply_model(z, t, self.conds).float()                             # [2, 4, h, w]
        edited = self.model.apply_model(z, t, self.conds).float()                               # [2, 4, h, w]
        corr = ((edited[0] - edited[1]) * (base[0] - base[1])).mean()
        reg = torch.stack([getattr(m, self.name).delta_weight().abs().sum() for m in self.layers]).mean()
        return corr, reg

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, SepCEPlan]:
        plan = self.draw(generator)
        corr, reg = self.terms(plan)
        value = float(corr.detach())
        if math.isfinite(value):
            self.history.append(value)
            self.rule.update(value)
        return corr + self.s.reg_beta * reg, plan


# -- 5. the builder -----------------------------------------------------------------------------------------------
@torch.no_grad()
def concept_latents(model, cond: torch.Tensor, uncond: torch.Tensor, n: int, latent_shape: tuple[int, ...],
                    generator: torch.Generator, steps: int = 50, guidance: float = 7.5) -> torch.Tensor:
    """z_0 [n, C, h, w]: the base model's DDIM samples (CFG `guidance`) for the concept's context cond [1, 77, D]."""
    x_T = torch.randn((n, *latent_shape), generator=generator).to(model.device, model.dtype)   # [n, C, h, w]
    fn = cfg_model_fn(model.apply_model, cond.expand(n, -1, -1), uncond.expand(n, -1, -1), guidance)
    with adapters_disabled(model.unet):
        z = sample_ddim(fn, x_T, model.alphas_cumprod, ddim_timesteps(steps, model.num_timesteps))
    return z.float()


def encode_with_ids(model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [P, 77, D], token ids [P, 77]) of the prompts."""
    return model.get_learned_conditioning(prompts).float(), model.cond_stage_model.tokenize(prompts)


def build_sepce_method(model, target_prompt: str, settings: SepCESettings, generator: torch.Generator,
                       latents: torch.Tensor | None = None, latent_shape: tuple[int, ...] | None = None,
                       name: str = "lora", base_sha256: str | None = None):
    """Inject a fresh "basis" delta (V = 0) on the settings' layers and return (training.Method, info).

    latents: z_0 [N, C, h, w] of the concept's images (e.g. model.encode_first_stage of user images); None:
    `settings.images` drawn by the base model from `target_prompt` (latent_shape needed, e.g.
    model.latent_shape(image_size)). info: the null space's dims and residuals (for the run's summary line).
    """
    from ldm.erasure.training import Method  # the loop imports settings; kept local so this module stays light
    settings.validate()
    if target_prompt in settings.preserve or target_prompt == "":
        raise UserError(f"SepCE: the target {target_prompt!r} is among the preserved prompts ('' is always "
                        "preserved): its tokens would be in the null space's complement, nothing could move")
    preserve = ["", *[p for p in settings.preserve if p != ""]]
    emb, ids = encode_with_ids(model, preserve)                                   # [P, 77, D], [P, 77]
    basis, info = preserve_basis(emb, ids, settings.tokens, settings.rtol, settings.pad_rtol)
    target_emb, target_ids = encode_with_ids(model, [target_prompt])
    info["target_reach"] = relative_residual(basis, token_rows(target_emb, target_ids)[0])
    if info["target_reach"] < 1e-3:
        raise UserError(f"SepCE: the target {target_prompt!r}'s tokens lie in the preserved prompts' span "
                        f"(max ||B e|| / ||e|| = {info['target_reach']:.2e}); drop preserved prompts that repeat it")
    if latents is None:
        if latent_shape is None:
            raise ValueError("build_sepce_method: give latents or latent_shape")
        latents = concept_latents(model, target_emb.to(model.dtype), emb[:1].to(model.dtype), settings.images,
                                  latent_shape, generator, settings.image_steps, settings.image_guidance)
    targets = select_targets(model.unet, settings.targets)

    def make(path: str, layer: nn.Linear) -> BasisDelta:
        if layer.in_features != basis.shape[1]:
            raise UserError(f"SepCE: {path} sees {layer.in_features}-wide inputs, not the text context's "
                            f"{basis.shape[1]}: only layers fed by the text context (attn2.to_k / to_v) qualify")
        return BasisDelta(basis, layer.out_features, settings.scale_factor, layer.weight.device, layer.weight.dtype)
    inject_delta(model.unet, targets, make, name)
    objective = SepCEObjective(model, name, latents.to(model.device), target_emb.to(model.dtype),
                               emb[:1].to(model.dtype), settings)

    def save(path, extra: dict[str, str]) -> None:
        from ldm.erasure.io import save_adapter  # io registers this kind by importing this module
        meta = {**settings.metadata(), "target_prompt": target_prompt, "null_dims": str(info["dims"]),
                "stop": objective.rule.reason or "cap", **extra}
        save_adapter(path, model.unet, alpha=settings.scale_factor, base_sha256=base_sha256, extra=meta, name=name)
    return Method(delta_state_dict(model.unet, name, keep_vars=True), objective, save), info


# -- 6. the separability in the weights ---------------------------------------------------------------------------
@torch.no_grad()
def weight_residual(model, name: str, prompts: list[str]) -> dict[str, float]:
    """max over the adapter's layers and the prompts' tokens e of ||dW e|| / ||W e||, for every token
    ("all") and for the content tokens only ("content"). The empty prompt is always included."""
    emb, ids = encode_with_ids(model, ["", *[p for p in prompts if p != ""]])
    content, _ = token_rows(emb, ids)
    rows = {"all": emb.reshape(-1, emb.shape[-1]).double(), "content": content.double()}    # [N, D]
    out = {k: 0.0 for k in rows}
    for layer in delta_layers(model.unet, name).values():
        dw = getattr(layer, name).delta_weight().double()                                   # [out, D]
        w = layer.weight.double()                                                           # [out, D]
        for k, e in rows.items():
            ratio = (e @ dw.T).norm(dim=-1) / (e @ w.T).norm(dim=-1).clamp_min(1e-30)
            out[k] = max(out[k], float(ratio.max()))
    return out
