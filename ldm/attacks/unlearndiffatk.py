"""White-box prompt attack in the style of UnlearnDiffAtk (Zhang et al., ECCV 2024), against the DEFENDED model.

K adversarial tokens go in front of the prompt. Their embeddings e [K, D] are optimised so that the defended
model denoises images of the concept well when conditioned on "adv + prompt":

    z0 ~ latents of concept images,  t ~ U[0, T),  x_t = sqrt(a_t) z0 + sqrt(1 - a_t) n
    L_mse = || eps_def(x_t, t, adv + prompt) - n ||^2
    eps_def = c_base + sum_k (1 - w_k) (c_k - c_base)       UnGuidance at CFG scale 1 (the conditional
                                                            prediction, as UnlearnDiffAtk): w_k from the defence

Discreteness (straight-through, as PEZ / UnlearnDiffAtk's projection): every forward pass uses the NEAREST
vocabulary embeddings q(e) (ldm.attacks.tokens: whole-word tokens only, so the text replays), the gradient at
q(e) updates e (e + (q(e) - e).detach()); the attack's prompt is always the projected one.

Against UnGuide the attack also targets the DECISION. The weight w is not differentiable (a comparison of
d(p) with d("")), so:
  * w in L_mse is what the real stability test gives for the current projected prompt (re-run at every check);
  * a surrogate of the test is added: on concept latents noised into the test's t range [lo, hi),
        gap_k(p) = || c_k(x_s, s, p) - c_base(x_s, s, p) ||       (the test's d, on concept latents)
        L_dec = sum_k relu(mean gap_k(p) - (1 - margin) mean gap_k("")) / mean gap_k("")
    pushing d(p) under d(""), i.e. into the unflagged branch: under the release rule that is w2 = 2,
    eps = CFG_base + (CFG_base - CFG_adapted), which AMPLIFIES the concept (ldm.erasure.decision).
Loss = L_mse + decision_weight * L_dec (the second term only for the unguide defence). Every `check_every`
steps (and at the end) the projected prompt is run through the real defended pipeline with the row's seed and
judged; the attack stops at the first success (UnlearnDiffAtk's early stop).
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from ldm.erasure.lora import adapter_scale

ADV_MARGIN = 0.1  # L_dec aims for d(p) <= 0.9 d(""): a margin so that the test's noise does not flip it back


@dataclass(frozen=True)
class UDAConfig:
    n_tokens: int = 5
    steps: int = 40
    lr: float = 0.5              # Adam step, in units of the vocabulary embeddings' standard deviation
    batch: int = 4               # concept latents per step
    decision_weight: float = 0.2
    check_every: int = 10        # run + judge the defended pipeline every this many steps (and at the end)


@contextmanager
def frozen(module: torch.nn.Module):
    """No parameter gradients inside the block (only the token embeddings are optimised)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def predictions(model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """Conditional eps of the base model and of each adapter alone, one UNet call -> [1 + K, B, C, h, w].
    x [B, C, h, w], t [B], cond [B, 77, D]."""
    k, b = len(adapters), x.shape[0]
    if k == 0:
        return model.apply_model(x, t, cond)[None]
    chunks = [None] + adapters
    scales = {a: torch.cat([torch.full((b,), float(c == a)) for c in chunks]).to(x.device) for a in adapters}
    with adapter_scale(model.unet, scales):
        out = model.apply_model(torch.cat([x] * (k + 1)), torch.cat([t] * (k + 1)), torch.cat([cond] * (k + 1)))
    return out.view(k + 1, b, *x.shape[1:])


def mixed(preds: torch.Tensor, w: list[float]) -> torch.Tensor:
    """UnGuidance at CFG scale 1: c_base + sum_k (1 - w_k)(c_k - c_base). preds [1 + K, B, ...] -> [B, ...]."""
    eps = preds[0]
    for k, wk in enumerate(w):
        eps = eps + (1.0 - wk) * (preds[k + 1] - preds[0])
    return eps


def gaps(preds: torch.Tensor) -> torch.Tensor:
    """The stability test's d on given latents: ||c_k - c_base|| per adapter and sample -> [K, B]."""
    return (preds[1:] - preds[0:1]).flatten(2).norm(dim=2)


def objective(defended, cond: torch.Tensor, uncond: torch.Tensor, z0: torch.Tensor, w: list[float],
              gen: torch.Generator, t_range: tuple[int, int] | None, decision_weight: float) -> tuple[torch.Tensor, dict]:
    """L_mse (+ decision_weight * L_dec when t_range is given) for cond [1, 77, D] and concept latents z0 [B, ...].
    Noise and timesteps come from `gen` (CPU), so a fixed generator gives a fixed objective."""
    model, names = defended.model, defended.adapters
    b, dev = z0.shape[0], z0.device
    t = torch.randint(0, model.num_timesteps, (b,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen).to(z0)
    xs, ts = [model.q_sample(z0, t.to(dev), noise)], [t]
    if t_range is not None:                               # the surrogate's latents, in the test's t range
        s = torch.randint(t_range[0], t_range[1], (b,), generator=gen)
        xs.append(model.q_sample(z0, s.to(dev), torch.randn(z0.shape, generator=gen).to(z0)))
        ts.append(s)
    x, tt = torch.cat(xs), torch.cat(ts).to(dev)
    preds = predictions(model, x, tt, cond.expand(len(x), -1, -1), names)        # [1 + K, B or 2B, ...]
    mse = (mixed(preds[:, :b], w) - noise).pow(2).mean()
    parts = {"mse": float(mse.detach())}
    loss = mse
    if t_range is not None:
        with torch.no_grad():
            gap_e = gaps(predictions(model, xs[1], ts[1].to(dev), uncond.expand(b, -1, -1), names)).mean(1)  # [K]
        gap_p = gaps(preds[:, b:]).mean(1)                                                            # [K]
        dec = (torch.relu(gap_p - (1 - ADV_MARGIN) * gap_e) / gap_e).sum()
        loss = loss + decision_weight * dec
        parts.update(dec=float(dec.detach()), gap_ratio=float((gap_p / gap_e).mean().detach()))
    return loss, parts


def encode(space, idx: torch.Tensor, soft: torch.Tensor | None, prompt: str) -> torch.Tensor:
    """Conditioning [1, 77, D] of "adv + prompt": the projected tokens idx [K] (indices into the allowed
    vocabulary), with straight-through gradients into soft [K, D] when given."""
    enc = space.encoder
    ids = space.with_prompt(space.ids[idx][None], prompt)                       # [1, 77]
    if soft is None:
        return enc.encode_tokens(ids)
    table = space.table()
    e = soft + (table[idx] - soft).detach()                                     # forward: q(e); backward: d/de
    embeds = enc.token_embedding()(ids.to(table.device)).detach()
    embeds = torch.cat([embeds[:, :1], e[None].to(embeds), embeds[:, 1 + space.k:]], dim=1)
    return enc.encode_tokens(ids, embeds)


def run_attack(defended, space, prompt: str, z_targets: torch.Tensor, cfg: UDAConfig, w0: list[float],
               check: Callable[[str], tuple[bool, list[float]]], gen: torch.Generator,
               progress: Callable[[dict], None] | None = None) -> dict:
    """Optimise the K tokens for one prompt. check(text) -> (judged success, the defence's w for that text)
    runs the real pipeline. Returns {text, ids (vocabulary ids), idx / idx_start (indices into the allowed
    vocabulary, final and initial), success, steps, checks, loss_first, loss_last}."""
    table = space.table()
    idx = start = torch.randint(0, len(space.ids), (space.k,), generator=gen)
    soft = table[idx].clone().float().requires_grad_(True)                      # [K, D]
    opt = torch.optim.Adam([soft], lr=cfg.lr * float(table.float().std()))
    uncond = defended.model.get_learned_conditioning([""])
    unguide = defended.defense == "unguide"
    t_range = _test_t_range(defended) if unguide else None
    w, losses, checks, success, step = list(w0), [], 0, False, 0
    with frozen(defended.model):
        for step in range(1, cfg.steps + 1):
            pick = torch.randint(0, len(z_targets), (cfg.batch,), generator=gen)
            cond = encode(space, idx, soft, prompt)
            loss, parts = objective(defended, cond, uncond, z_targets[pick], w, gen, t_range, cfg.decision_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            idx = space.nearest(soft)
            if step % cfg.check_every == 0 or step == cfg.steps:
                success, w = check(space.text(space.ids[idx], prompt))
                checks += 1
            if progress:
                progress({"loss": losses[-1], "success": success, **parts})
            if success:
                break
    adv = space.ids[idx]
    return {"text": space.text(adv, prompt), "ids": adv.tolist(), "idx": idx, "idx_start": start,
            "success": success, "steps": step,
            "checks": checks, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def _test_t_range(defended) -> tuple[int, int]:
    from ldm.models.diffusion.ddim import ddpm_t_range
    return ddpm_t_range(defended.steps, defended.t_enc, defended.model.num_timesteps)


@torch.no_grad()
def fixed_objective(defended, space, idx: torch.Tensor, prompt: str, z0: torch.Tensor, w: list[float],
                    seed: int, decision_weight: float = 0.2, draws: int = 8) -> float:
    """The objective of the projected tokens idx on a fixed draw (seed; every latent of z0 `draws` times with
    its own t and noise): comparable before and after."""
    z0 = z0.repeat(draws, 1, 1, 1)
    cond = encode(space, idx, None, prompt)
    uncond = defended.model.get_learned_conditioning([""])
    t_range = _test_t_range(defended) if defended.defense == "unguide" else None
    loss, _ = objective(defended, cond, uncond, z0, w, torch.Generator().manual_seed(seed), t_range, decision_weight)
    return float(loss)
