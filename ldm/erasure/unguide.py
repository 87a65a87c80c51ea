"""UnGuide's orchestration: the stability test at scale and UnGuidance sampling, in two protocols.

Pure computation on one model copy (the adapter is switched per sample, ldm.erasure.lora.adapter_scale):
no argument parsing, files or images here; the scripts (compute_lora_diff.py, generate_images.py,
generate_images_nsfw.py) parse, call these functions and save.

The formulas (ldm.erasure.stability, ldm.erasure.guidance):
    d(p)  = || eps_adapted(z, t, p) - eps_base(z, t, p) ||,   z = base CFG DDIM trajectory from x_T down to t_enc
    w     = w1 if mean d(p) > mean d("") else w2                (ties -> w2)
    eps   = w * CFG_base + (1 - w) * CFG_adapted               at every sampling step

Protocol "release" (the UnGuide release, fact sheet §5/§6), with its 49-step schedule for the test and sampling:
  * diff table (compute_lora_diff.py): one generator seeded with --seed; per chunk of n_samples: start codes
    randn(n, C, h, w) then t ~ randint(lo, hi, (n,)) from it, shared by every prompt; d(p) = mean over chunks.
  * per-prompt decision (generate_images_nsfw.py): generator seeded with the row's seed; repeat r draws
    x_T^r = randn(1, C, h, w), paired for p and ""; t = randint(lo, hi, (1,)) from a fresh generator with the
    same seed (the same t for every repeat and for both prompts); trajectory CFG = the row's guidance;
    d(p), d("") = means over repeats; image start code = x_T^0, image CFG = the row's guidance.
  Start codes come from a CPU generator (the release drew them on its device: on CUDA the numbers differ).
Protocol "fast": the same formulas, cheaper:
  * d("") is estimated once per run from `empty_draws` draws (guidance does not matter for "": c == u, so its
    trajectory needs one UNet sample per step, not two) and reused for every prompt;
  * the repeats of d(p) run as one batch (rows of a CSV batch together); draw i of a seed is
    (x_T^i = i-th randn(1, C, h, w) of a generator seeded with the seed, t^i = i-th randint of a second one):
    x_T^0 and t^0 are the release's, x_T^0 is the image's start code;
  * adaptive (optional): draws come in rounds (min_repeats, then round_size more) until the decision is
    clear (|mean d(p) - mean d("")| > k_se combined standard errors) or `repeats` are drawn; a per-prompt
    budget of UNet evaluations (draws + image) lowers `repeats` (budgeted_repeats);
  * the standard DDIM schedule (981 ... 1) unless release_schedule.

Several adapters (one per erased concept, named in the model: "lora", "lora1", ...): every function of the
stability test takes `adapters` (a list of names). Left out (None), the model carries one adapter and the
results are the single-adapter ones; given, result[k] is that result for adapter k: each adapter has its own
test, d_k(p) vs d_k(""), on the SAME draws and ONE base trajectory (one UNet call of n (1 + K) samples at t,
stability.latent_diffs), and its own w_k. K = 1 is the same computation. Sampling (unguided_latents) mixes
    eps = CFG_base + sum_k (1 - w_k) (CFG_k - CFG_base)
in one UNet call per step; adapters with w_k = 1 for every sample of a batch are not evaluated.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from ldm.erasure.guidance import decide_w, unguidance_model_fn
from ldm.erasure.lora import adapter_names
from ldm.erasure.stability import Estimate, StabilitySettings, clear_margin, latent_diffs
from ldm.models.diffusion.ddim import ddim_timesteps, ddpm_t_range, partial_steps, sample_ddim

SEED_MODULUS = 2 ** 64  # torch.Generator.manual_seed takes [0, 2^64): larger seeds are reduced mod 2^64


# ----------------------------------------------------------------------------------------------- counting
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


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Protocol:
    name: str = "fast"                        # "release" | "fast"
    settings: StabilitySettings = field(default_factory=StabilitySettings)
    repeats: int = 10                         # draws of d(p) (the maximum when adaptive)
    adaptive: bool = False
    min_repeats: int = 4
    round_size: int = 2
    k_se: float = 3.0
    empty_draws: int = 32
    max_batch: int = 64                       # UNet samples per call in the stability test (memory bound)

    def __post_init__(self):
        if self.name not in ("release", "fast"):
            raise ValueError(f"protocol must be release or fast, got {self.name!r}")
        if self.name == "release" and not self.settings.release_schedule:
            object.__setattr__(self, "settings", replace(self.settings, release_schedule=True))
        if self.repeats < 1 or self.min_repeats < 1 or self.round_size < 1 or self.empty_draws < 1:
            raise ValueError("repeats, min_repeats, round_size and empty_draws must be >= 1")


def reduce_seed(seed: int) -> int:
    """A seed torch accepts: seed mod 2^64 (I2P's seeds are all below 2^32, so unchanged there)."""
    return int(seed) % SEED_MODULUS


def _encode(model, prompts: Sequence[str]) -> torch.Tensor:
    """[len(prompts), 77, D], each distinct prompt encoded once."""
    uniq = list(dict.fromkeys(prompts))
    emb = model.get_learned_conditioning(uniq)
    pos = {p: i for i, p in enumerate(uniq)}
    return emb[torch.tensor([pos[p] for p in prompts], device=emb.device)]


def _names(model, adapters: Sequence[str] | None) -> list[str]:
    """The adapters to test: the given names, or the model's only adapter (None: the single-adapter API)."""
    if adapters is not None:
        return list(adapters)
    names = adapter_names(model.unet)
    if len(names) != 1:
        raise ValueError(f"the model carries adapters {names}: name the ones to test (adapters=...)")
    return names


def _per_adapter(values: list, adapters: Sequence[str] | None):
    """The K results, or the only one for the single-adapter API (adapters=None)."""
    return values[0] if adapters is None else values


# ----------------------------------------------------------------------------------------------- draws
class DrawStream:
    """Draw i of a seed: (x_T^i [C, h, w], t^i). x_T from one CPU generator seeded with `seed` (one randn of
    [1, C, h, w] per draw, as the release's repeats), t from a second one seeded with `seed` (draw 0's t is the
    release's fixed t). Draws are made on demand and kept, so draw i never depends on how draws are batched."""

    def __init__(self, seed: int, shape: tuple[int, int, int], t_lo: int, t_hi: int):
        seed = reduce_seed(seed)
        self.shape, self.lo, self.hi = tuple(shape), t_lo, t_hi
        self._gx, self._gt = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        self._x: list[torch.Tensor] = []
        self._t: list[int] = []

    def take(self, i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._x) < i1:
            self._x.append(torch.randn((1, *self.shape), generator=self._gx)[0])
            self._t.append(int(torch.randint(self.lo, self.hi, (1,), generator=self._gt)))
        return torch.stack(self._x[i0:i1]), torch.tensor(self._t[i0:i1], dtype=torch.long)


def t_range(settings: StabilitySettings, num_timesteps: int = 1000) -> tuple[int, int]:
    return ddpm_t_range(settings.ddim_steps, settings.t_enc, num_timesteps)


# ----------------------------------------------------------------------------------------------- d values
@torch.no_grad()
def diffs(model, prompts: Sequence[str], x_T: torch.Tensor, t: torch.Tensor, settings: StabilitySettings,
          guidance: float | Sequence[float], max_batch: int = 64, empty_shortcut: bool = False,
          adapters: Sequence[str] | None = None) -> torch.Tensor:
    """d for n samples (prompt i, start code x_T[i], timestep t[i], trajectory CFG guidance[i]) -> [n] float32
    ([K, n] for a list of K adapters: one base trajectory serves them all).

    Runs in chunks of at most max_batch UNet samples. empty_shortcut: samples whose prompt is "" take the
    one-sample-per-step trajectory (same value: CFG with c == u, see cfg_model_fn)."""
    device, dtype = model.device, model.dtype
    names = _names(model, adapters)
    n = len(prompts)
    g = torch.tensor([float(guidance)] * n if isinstance(guidance, (int, float)) else [float(v) for v in guidance])
    out = torch.empty(len(names), n)
    empty = [empty_shortcut and p == "" for p in prompts]
    uncond1 = model.get_learned_conditioning([""])
    for want_empty in (False, True):
        idx = [i for i in range(n) if empty[i] == want_empty]
        step = max(1, max_batch // 2)
        for k in range(0, len(idx), step):
            sel = idx[k:k + step]
            xs = x_T[sel].to(device=device, dtype=dtype)
            ts = t[sel].to(device)
            unc = uncond1.expand(len(sel), -1, -1)
            if want_empty:
                out[:, sel] = latent_diffs(model, unc, unc, xs, ts, settings, names)  # c is u: one sample per step
            else:
                cond = _encode(model, [prompts[i] for i in sel])
                gs = g[sel]
                scale = float(gs[0]) if bool((gs == gs[0]).all()) else gs.to(device)
                out[:, sel] = latent_diffs(model, cond, unc, xs, ts, settings, names, guidance=scale)
    return _per_adapter(out, adapters)


def estimate_empty(model, protocol: Protocol, seed: int, shape: tuple[int, int, int],
                   progress: Callable[[int], None] | None = None, adapters: Sequence[str] | None = None
                   ) -> Estimate | list[Estimate]:
    """The fast protocol's d("") estimate: protocol.empty_draws draws of DrawStream(seed) (one per adapter)."""
    names = _names(model, adapters)
    lo, hi = t_range(protocol.settings, model.num_timesteps)
    x, t = DrawStream(seed, shape, lo, hi).take(0, protocol.empty_draws)
    vals: list[list[float]] = [[] for _ in names]
    step = max(1, protocol.max_batch // 2)
    for k in range(0, protocol.empty_draws, step):
        d = diffs(model, [""] * len(x[k:k + step]), x[k:k + step], t[k:k + step], protocol.settings,
                  protocol.settings.guidance, protocol.max_batch, empty_shortcut=True, adapters=names)
        for v, dk in zip(vals, d.tolist()):
            v += dk
        if progress:
            progress(d.shape[1])
    return _per_adapter([Estimate(v) for v in vals], adapters)


def fast_prompt_estimates(model, prompts: Sequence[str], seeds: Sequence[int], guidances: Sequence[float],
                          d_empty: Estimate | Sequence[Estimate], protocol: Protocol, shape: tuple[int, int, int],
                          progress: Callable[[int], None] | None = None, adapters: Sequence[str] | None = None
                          ) -> list[Estimate] | list[list[Estimate]]:
    """The fast protocol's d(p) for a batch of prompts (each with its own draw seed and trajectory CFG).

    Non-adaptive: `repeats` draws each, in one batch. Adaptive: min_repeats draws, then round_size more for the
    prompts whose decision is not yet clear (clear_margin with k_se) for some adapter, until `repeats`.
    With adapters (and d_empty one Estimate per adapter): result[k][i] is prompt i's d_k."""
    names = _names(model, adapters)
    empties = [d_empty] if adapters is None else list(d_empty)
    lo, hi = t_range(protocol.settings, model.num_timesteps)
    streams: dict[int, DrawStream] = {}
    for s in seeds:
        streams.setdefault(reduce_seed(s), DrawStream(s, shape, lo, hi))
    values: list[list[list[float]]] = [[[] for _ in prompts] for _ in names]  # [adapter][prompt]
    active = list(range(len(prompts)))
    target = min(protocol.min_repeats, protocol.repeats) if protocol.adaptive else protocol.repeats
    while active:
        batch_p, batch_x, batch_t, batch_g, owner = [], [], [], [], []
        for i in active:
            have = len(values[0][i])
            x, t = streams[reduce_seed(seeds[i])].take(have, target)
            batch_p += [prompts[i]] * len(t)
            batch_x.append(x)
            batch_t.append(t)
            batch_g += [guidances[i]] * len(t)
            owner += [i] * len(t)
        d = diffs(model, batch_p, torch.cat(batch_x), torch.cat(batch_t), protocol.settings, batch_g,
                  protocol.max_batch, empty_shortcut=True, adapters=names)
        for vk, dk in zip(values, d.tolist()):
            for i, v in zip(owner, dk):
                vk[i].append(v)
        if progress:
            progress(len(owner))
        if not protocol.adaptive or target >= protocol.repeats:
            break
        active = [i for i in active if not all(clear_margin(Estimate(vk[i]), e, protocol.k_se)
                                               for vk, e in zip(values, empties))]
        target = min(protocol.repeats, target + protocol.round_size)
    return _per_adapter([[Estimate(v) for v in vk] for vk in values], adapters)


def release_row_estimates(model, prompts: Sequence[str], seeds: Sequence[int], guidances: Sequence[float],
                          protocol: Protocol, shape: tuple[int, int, int],
                          progress: Callable[[int], None] | None = None, adapters: Sequence[str] | None = None
                          ) -> list[tuple[Estimate, Estimate]] | list[list[tuple[Estimate, Estimate]]]:
    """The release's per-prompt test (generate_images_nsfw.py) for a batch of rows -> [(d(p), d(""))] each over
    `repeats` paired start codes and one fixed t. All rows' samples run batched; the numbers are the release's.
    With adapters: result[k] is that list for adapter k."""
    names = _names(model, adapters)
    lo, hi = t_range(protocol.settings, model.num_timesteps)
    r = protocol.repeats
    batch_p, batch_x, batch_t, batch_g = [], [], [], []
    for p, s, g in zip(prompts, seeds, guidances):
        gen = torch.Generator().manual_seed(reduce_seed(s))
        codes = torch.cat([torch.randn((1, *shape), generator=gen) for _ in range(r)])
        t = torch.randint(lo, hi, (1,), generator=torch.Generator().manual_seed(reduce_seed(s)))
        batch_p += [p] * r + [""] * r
        batch_x += [codes, codes]
        batch_t.append(t.repeat(2 * r))
        batch_g += [g] * (2 * r)
    d = diffs(model, batch_p, torch.cat(batch_x), torch.cat(batch_t), protocol.settings, batch_g,
              protocol.max_batch, adapters=names)
    if progress:
        progress(len(batch_p))
    out = []
    for dk in d:
        rows = []
        for k in range(len(prompts)):
            chunk = dk[2 * r * k: 2 * r * (k + 1)].tolist()
            rows.append((Estimate(chunk[:r]), Estimate(chunk[r:])))
        out.append(rows)
    return _per_adapter(out, adapters)


def release_diff_table(model, prompts: Sequence[str], protocol: Protocol, seed: int, n_samples: int,
                       shape: tuple[int, int, int], progress: Callable[[int], None] | None = None,
                       adapters: Sequence[str] | None = None) -> dict[str, list[float]] | list[dict[str, list[float]]]:
    """The release's compute_lora_diff: {prompt: [d per sample]} over ceil(repeats / n_samples) chunks of
    n_samples start codes and timesteps shared by all prompts (one generator seeded with `seed`).
    With adapters: one table per adapter."""
    names = _names(model, adapters)
    lo, hi = t_range(protocol.settings, model.num_timesteps)
    gen = torch.Generator().manual_seed(reduce_seed(seed))
    uniq = list(dict.fromkeys(prompts))
    tables: list[dict[str, list[float]]] = [{p: [] for p in uniq} for _ in names]
    for _ in range(0, protocol.repeats, n_samples):
        codes = torch.randn((n_samples, *shape), generator=gen)
        t = torch.randint(lo, hi, (n_samples,), generator=gen)
        batch_p = [p for p in uniq for _ in range(n_samples)]
        d = diffs(model, batch_p, codes.repeat(len(uniq), 1, 1, 1), t.repeat(len(uniq)), protocol.settings,
                  protocol.settings.guidance, protocol.max_batch, adapters=names)
        for table, dk in zip(tables, d):
            for k, p in enumerate(uniq):
                table[p] += dk[k * n_samples:(k + 1) * n_samples].tolist()
        if progress:
            progress(1)
    return _per_adapter(tables, adapters)


def fast_diff_table(model, prompts: Sequence[str], protocol: Protocol, seed: int, shape: tuple[int, int, int],
                    progress: Callable[[int], None] | None = None, adapters: Sequence[str] | None = None
                    ) -> tuple[dict[str, Estimate], Estimate] | list[tuple[dict[str, Estimate], Estimate]]:
    """Fast compute_lora_diff: d("") once (empty_draws draws of the run's seed), then every prompt's repeats
    (draws of the same seed: paired across prompts) -> ({prompt: Estimate}, d("") Estimate). "" maps to d("").
    With adapters: one (table, d("")) per adapter, all from the same draws."""
    names = _names(model, adapters)
    empties = estimate_empty(model, protocol, seed, shape, progress, adapters=names)
    uniq = [p for p in dict.fromkeys(prompts) if p != ""]
    est = fast_prompt_estimates(model, uniq, [seed] * len(uniq), [protocol.settings.guidance] * len(uniq), empties,
                                protocol, shape, progress, adapters=names) if uniq else [[] for _ in names]
    out = []
    for empty, est_k in zip(empties, est):
        table = dict(zip(uniq, est_k))
        table[""] = empty
        out.append((table, empty))
    return _per_adapter(out, adapters)


# ----------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def unguided_latents(model, prompts: Sequence[str], x_T: torch.Tensor, guidances: float | Sequence[float],
                     ws: float | Sequence[float], steps: int = 50, release_schedule: bool = False,
                     eta: float = 0.0, generator: torch.Generator | None = None, verbose: bool = False,
                     adapters: Sequence[str] | None = None) -> torch.Tensor:
    """DDIM with eps = w_i * CFG_base + (1 - w_i) * CFG_adapted per sample (one UNet call of 4B samples per
    step; 2B when every w is 1 or every w is 0; the model's one adapter, or none when every w is 1)
    -> final latents [B, C, h, w].

    With adapters (K names): ws holds one entry per adapter (a float or one per sample) and
    eps = CFG_base + sum_k (1 - w_k) (CFG_k - CFG_base), one call of 2B (1 + #adapters with some w_k != 1)."""
    device, dtype = model.device, model.dtype
    b = len(prompts)
    cond = _encode(model, prompts)
    uncond = model.get_learned_conditioning([""]).expand(b, -1, -1)

    def per_sample(v):
        if isinstance(v, (int, float)):
            return float(v)
        v = torch.tensor([float(a) for a in v])
        return float(v[0]) if bool((v == v[0]).all()) else v.to(device)

    scale = per_sample(guidances)
    w = per_sample(ws) if adapters is None else [per_sample(v) for v in ws]
    fn = unguidance_model_fn(model, cond, uncond, scale, w, adapters)  # no adapter loaded: only w = 1 works
    timesteps = ddim_timesteps(steps, model.num_timesteps, release_schedule)
    return sample_ddim(fn, x_T.to(device=device, dtype=dtype), model.alphas_cumprod, timesteps, eta=eta,
                       generator=generator, verbose=verbose, desc="UnGuidance")


def decide(d_prompt: float, d_empty: float, w1: float, w2: float) -> float:
    """The release's rule on the two means (ties -> w2)."""
    return decide_w(float(d_prompt), float(d_empty), w1, w2)


def margin_in_se(d_prompt: Estimate, d_empty: Estimate) -> float:
    """|mean d(p) - mean d("")| in combined standard errors (inf when both are exact)."""
    se = math.sqrt(d_prompt.sem ** 2 + d_empty.sem ** 2) if d_prompt.n and d_empty.n else 0.0
    diff = abs(d_prompt.mean - d_empty.mean)
    return diff / se if se > 0 else (math.inf if diff > 0 else 0.0)


def estimate_dict(e: Estimate) -> dict:
    return {"mean": e.mean, "std": e.std, "sem": e.sem, "count": e.n}
