"""The stability test at scale: d(p) and d("") over repeated draws, in two protocols, for K adapters at once.

Pure computation on one model copy (the adapter is switched per sample, ldm.erasure.lora.adapter_scale): no
argument parsing, files or images here; the scripts (compute_lora_diff.py, generate_images.py,
generate_images_nsfw.py) build their Protocol with protocol_from_flags, call these functions and save.

The formulas (ldm.erasure.stability, ldm.erasure.guidance):
    d(p)  = || eps_adapted(z, t, p) - eps_base(z, t, p) ||,   z = base CFG DDIM trajectory from x_T down to t_enc
    w     = w1 if mean d(p) > mean d("") else w2                (ties -> w2)
    eps   = w * CFG_base + (1 - w) * CFG_adapted               at every sampling step (guidance.unguided_latents)

Protocol "release" (the UnGuide release, fact sheet §5/§6), with its 49-step schedule for the test and sampling:
  * diff table (compute_lora_diff.py): one generator seeded with --seed; per chunk of n_samples: start codes
    randn(n, C, h, w) then t ~ randint(lo, hi, (n,)) from it, shared by every prompt; d(p) = mean over chunks.
  * per-prompt decision (generate_images_nsfw.py): generator seeded with the row's seed; repeat r draws
    x_T^r = randn(1, C, h, w), paired for p and ""; t = randint(lo, hi, (1,)) from a fresh generator with the
    same seed (the same t for every repeat and for both prompts); trajectory CFG = the row's guidance;
    d(p), d("") = means over repeats; image start code = x_T^0, image CFG = the row's guidance.
  Each row's (each prompt's) samples run in UNet calls of their own, so its numbers do not depend on its batch.
  Start codes come from a CPU generator (ldm.erasure.draws; the release drew them on its device).
Protocol "fast": the same formulas, cheaper:
  * d("") is estimated once per run from `empty_draws` draws (guidance does not matter for "": c == u, so its
    trajectory needs one UNet sample per step, not two) and reused for every prompt;
  * the repeats of d(p) of a prompt run as one batch, in UNet calls of their own (never mixed with another
    prompt's: a prompt's numbers are the same bytes whatever batch or shard it lands in); draw i of a seed is
    (x_T^i = i-th randn(1, C, h, w) of a generator seeded with the seed, t^i = i-th randint of a second one):
    x_T^0 and t^0 are the release's, x_T^0 is the image's start code (draws.DrawStream);
  * adaptive (optional): draws come in rounds (min_repeats, then round_size more) until the decision is
    clear (|mean d(p) - mean d("")| > k_se combined standard errors) or `repeats` are drawn; a per-prompt
    budget of UNet evaluations (draws + image) lowers `repeats` (budget.budgeted_repeats);
  * the standard DDIM schedule (981 ... 1) unless release_schedule.

Adapters (one per erased concept, named in the model: "lora", "lora1", ...): every estimator takes
`adapters` (a list of names; default: every adapter of the model, in injection order) and returns ONE shape,
a list with result[k] for adapter k. Each adapter has its own test, d_k(p) vs d_k(""), on the SAME draws and
ONE base trajectory (one UNet call of n (1 + K) samples at t, stability.latent_diffs). K = 1 is the same
computation as a single adapter.

Every estimator is called (model, protocol, shape, <its inputs>, adapters=..., progress=...): shape is the
latent's [C, h, w], progress(n) is told of n finished units (draws; chunks for the release's table).
"""
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from ldm.erasure.draws import DrawStream, reduce_seed, release_row_draws, t_range
from ldm.erasure.guidance import encode_prompts, per_sample
from ldm.erasure.lora import adapter_names
from ldm.erasure.stability import Estimate, StabilitySettings, clear_margin, latent_diffs
from ldm.errors import UserError
from ldm.models.diffusion.ddim import partial_steps

Shape = tuple[int, int, int]
Progress = Callable[[int], None] | None
Pair = tuple[Estimate, Estimate]  # (d(p), d("")) of one prompt and one adapter


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
    stop_rule: str = "se"                     # adaptive: when a prompt's draws stop (STOP_RULES, stop_after)

    def __post_init__(self):
        if self.name not in ("release", "fast"):
            raise ValueError(f"protocol must be release or fast, got {self.name!r}")
        if self.name == "release" and not self.settings.release_schedule:
            object.__setattr__(self, "settings", replace(self.settings, release_schedule=True))
        if self.repeats < 1 or self.min_repeats < 1 or self.round_size < 1 or self.empty_draws < 1:
            raise ValueError("repeats, min_repeats, round_size and empty_draws must be >= 1")
        if self.stop_rule not in STOP_RULES:
            raise ValueError(f"stop_rule must be one of {', '.join(STOP_RULES)}, got {self.stop_rule!r}")


STOP_RULES = {
    "se": "stop once |mean d(p) - d(\"\")| > k_se combined standard errors, the prompt's own (2 draws at least)",
    "cv": "as se from the 3rd draw on; before, the prompt's per-draw spread is taken as d(\"\")'s relative spread "
          "times its mean d(p) (at the 2nd draw: the larger of that and its own), so a clear prompt stops after 1 draw",
}
OWN_SPREAD_FROM = 3  # "cv": from this many draws on, a prompt's own standard deviation alone is its spread


def stop_after(d_prompt: Estimate, d_empty: Estimate, protocol: Protocol) -> bool:
    """Whether a prompt's draws so far decide it under the protocol's stop_rule (the adaptive protocol's test)."""
    if protocol.stop_rule == "se":
        return clear_margin(d_prompt, d_empty, protocol.k_se)
    if d_prompt.n < 1 or d_empty.n < 2 or d_empty.mean <= 0:
        return False
    prior = d_empty.std / d_empty.mean * d_prompt.mean  # d("")'s coefficient of variation, at this prompt's mean
    spread = d_prompt.std if d_prompt.n >= OWN_SPREAD_FROM else max(d_prompt.std, prior)
    se = math.sqrt(spread ** 2 / d_prompt.n + d_empty.sem ** 2)
    return abs(d_prompt.mean - d_empty.mean) > protocol.k_se * se


def protocol_from_flags(name: str, ddim_steps: int, t_enc: int, guidance: float = 7.5, eta: float = 0.0,
                        schedule: str | None = None, **options) -> Protocol:
    """The scripts' Protocol from their flags (--protocol, --ddim_steps, --t_enc, --schedule, ...), checked:
    UserError naming the flag. schedule None: the protocol's own (release: the 49-step one; fast: standard).
    options: the other Protocol fields (repeats, adaptive, min_repeats, k_se, empty_draws, max_batch)."""
    if not 1 <= ddim_steps <= 1000:
        raise UserError(f"--ddim_steps {ddim_steps}: must be in 1..1000 (the model's 1000 training timesteps)")
    if not 0 <= t_enc < ddim_steps:
        raise UserError(f"--t_enc {t_enc} must be in 0..{ddim_steps - 1}")
    if name == "release" and (schedule == "standard" or options.get("adaptive")):
        raise UserError("--protocol release is the release's procedure: no --schedule standard or --adaptive")
    release_schedule = name == "release" or schedule == "release"
    return Protocol(name, StabilitySettings(ddim_steps, t_enc, guidance, eta, release_schedule), **options)


def _names(model, adapters: Sequence[str] | None) -> list[str]:
    """The adapters to test: the given names, or every adapter of the model."""
    return adapter_names(model.unet) if adapters is None else list(adapters)


# ----------------------------------------------------------------------------------------------- d values
@torch.no_grad()
def diffs(model, protocol: Protocol, prompts: Sequence[str], x_T: torch.Tensor, t: torch.Tensor,
          guidances: float | Sequence[float], empty_shortcut: bool = False,
          adapters: Sequence[str] | None = None) -> torch.Tensor:
    """d of each adapter for n samples (prompt i, start code x_T[i], timestep t[i], trajectory CFG guidances[i])
    -> [K, n] float32: one base trajectory serves all K adapters.

    Runs in chunks of at most protocol.max_batch UNet samples. empty_shortcut: samples whose prompt is "" take
    the one-sample-per-step trajectory (same value: CFG with c == u, see cfg_model_fn)."""
    device, dtype = model.device, model.dtype
    names = _names(model, adapters)
    n = len(prompts)
    g = [float(guidances)] * n if isinstance(guidances, (int, float)) else [float(v) for v in guidances]
    out = torch.empty(len(names), n)
    empty = [empty_shortcut and p == "" for p in prompts]
    uncond1 = model.get_learned_conditioning([""])
    step = max(1, protocol.max_batch // 2)
    for want_empty in (False, True):
        idx = [i for i in range(n) if empty[i] == want_empty]
        for k in range(0, len(idx), step):
            sel = idx[k:k + step]
            xs = x_T[sel].to(device=device, dtype=dtype)
            ts = t[sel].to(device)
            unc = uncond1.expand(len(sel), -1, -1)
            if want_empty:  # c is u: one sample per step
                out[:, sel] = latent_diffs(model, unc, unc, xs, ts, protocol.settings, names)
            else:
                cond = encode_prompts(model, [prompts[i] for i in sel])
                scale = per_sample([g[i] for i in sel], device)  # float32, as the trajectory's
                out[:, sel] = latent_diffs(model, cond, unc, xs, ts, protocol.settings, names, guidance=scale)
    return out


# ----------------------------------------------------------------------------------------------- fast protocol
def estimate_empty(model, protocol: Protocol, shape: Shape, seed: int, adapters: Sequence[str] | None = None,
                   progress: Progress = None) -> list[Estimate]:
    """The fast protocol's d("") per adapter: protocol.empty_draws draws of DrawStream(seed)."""
    names = _names(model, adapters)
    x, t = DrawStream(seed, shape, *t_range(protocol.settings, model.num_timesteps)).take(0, protocol.empty_draws)
    vals: list[list[float]] = [[] for _ in names]
    step = max(1, protocol.max_batch // 2)
    for k in range(0, protocol.empty_draws, step):
        d = diffs(model, protocol, [""] * len(x[k:k + step]), x[k:k + step], t[k:k + step],
                  protocol.settings.guidance, empty_shortcut=True, adapters=names)
        for v, dk in zip(vals, d.tolist()):
            v += dk
        if progress:
            progress(d.shape[1])
    return [Estimate(v) for v in vals]


def fast_prompt_estimates(model, protocol: Protocol, shape: Shape, prompts: Sequence[str], seeds: Sequence[int],
                          guidances: Sequence[float], d_empty: Sequence[Estimate],
                          adapters: Sequence[str] | None = None, progress: Progress = None
                          ) -> list[list[Estimate]]:
    """The fast protocol's d(p) for a batch of prompts (each with its own draw seed and trajectory CFG), compared
    with d_empty[k] for adapter k -> result[k][i], prompt i's d_k.

    Non-adaptive: `repeats` draws each, in one batch. Adaptive: min_repeats draws, then round_size more for the
    prompts whose decision is not yet clear (clear_margin with k_se) for some adapter, until `repeats`."""
    names = _names(model, adapters)
    lo, hi = t_range(protocol.settings, model.num_timesteps)
    streams: dict[int, DrawStream] = {}
    for s in seeds:
        streams.setdefault(reduce_seed(s), DrawStream(s, shape, lo, hi))
    values: list[list[list[float]]] = [[[] for _ in prompts] for _ in names]  # [adapter][prompt]
    active = list(range(len(prompts)))
    target = min(protocol.min_repeats, protocol.repeats) if protocol.adaptive else protocol.repeats
    while active:
        for i in active:  # each prompt's draws in calls of their own: its numbers never depend on the others
            x, t = streams[reduce_seed(seeds[i])].take(len(values[0][i]), target)
            d = diffs(model, protocol, [prompts[i]] * len(t), x, t, [guidances[i]] * len(t),
                      empty_shortcut=True, adapters=names)
            for vk, dk in zip(values, d.tolist()):
                vk[i] += dk
            if progress:
                progress(len(t))
        if not protocol.adaptive or target >= protocol.repeats:
            break
        active = [i for i in active if not all(stop_after(Estimate(vk[i]), e, protocol)
                                               for vk, e in zip(values, d_empty))]
        target = min(protocol.repeats, target + protocol.round_size)
    return [[Estimate(v) for v in vk] for vk in values]


def fast_diff_table(model, protocol: Protocol, shape: Shape, prompts: Sequence[str], seed: int,
                    adapters: Sequence[str] | None = None, progress: Progress = None
                    ) -> list[tuple[dict[str, Estimate], Estimate]]:
    """Fast compute_lora_diff: d("") once (empty_draws draws of the run's seed), then every prompt's repeats
    (draws of the same seed: paired across prompts) -> per adapter ({prompt: Estimate}, d("")), all from the
    same draws. "" maps to d("")."""
    names = _names(model, adapters)
    empties = estimate_empty(model, protocol, shape, seed, names, progress)
    uniq = [p for p in dict.fromkeys(prompts) if p != ""]
    est = fast_prompt_estimates(model, protocol, shape, uniq, [seed] * len(uniq),
                                [protocol.settings.guidance] * len(uniq), empties, names, progress
                                ) if uniq else [[] for _ in names]
    return [({**dict(zip(uniq, est_k)), "": empty}, empty) for empty, est_k in zip(empties, est)]


# ----------------------------------------------------------------------------------------------- release protocol
def release_row_estimates(model, protocol: Protocol, shape: Shape, prompts: Sequence[str], seeds: Sequence[int],
                          guidances: Sequence[float], adapters: Sequence[str] | None = None,
                          progress: Progress = None) -> list[list[Pair]]:
    """The release's per-prompt test (generate_images_nsfw.py) for a batch of rows -> result[k][i] = (d_k(p),
    d_k("")) of row i, each over `repeats` paired start codes and one fixed t (draws.release_row_draws). Each row's
    samples run in calls of their own; the numbers are the release's."""
    names = _names(model, adapters)
    lo, hi = t_range(protocol.settings, model.num_timesteps)
    r = protocol.repeats
    rows: list[torch.Tensor] = []  # per row [K, 2r]: its samples in calls of their own (batch-independent numbers)
    for p, s, g in zip(prompts, seeds, guidances):
        codes, t = release_row_draws(s, r, shape, lo, hi)
        rows.append(diffs(model, protocol, [p] * r + [""] * r, torch.cat([codes, codes]), t.repeat(2 * r),
                          [g] * (2 * r), adapters=names))
        if progress:
            progress(2 * r)
    return [[(Estimate(d[k, :r].tolist()), Estimate(d[k, r:].tolist())) for d in rows] for k in range(len(names))]


def release_diff_table(model, protocol: Protocol, shape: Shape, prompts: Sequence[str], seed: int,
                       n_samples: int, adapters: Sequence[str] | None = None, progress: Progress = None
                       ) -> list[dict[str, list[float]]]:
    """The release's compute_lora_diff: per adapter {prompt: [d per sample]} over ceil(repeats / n_samples)
    chunks of n_samples start codes and timesteps shared by all prompts (one generator seeded with `seed`, which
    the release also hands to its sampler: the draws it makes between chunks are made and discarded here).
    progress: one unit per chunk."""
    names = _names(model, adapters)
    lo, hi = t_range(protocol.settings, model.num_timesteps)
    gen = torch.Generator().manual_seed(reduce_seed(seed))
    uniq = list(dict.fromkeys(prompts))
    tables: list[dict[str, list[float]]] = [{p: [] for p in uniq} for _ in names]
    sampler_steps = partial_steps(protocol.settings.ddim_steps, protocol.settings.t_enc,
                                  protocol.settings.release_schedule)
    for _ in range(0, protocol.repeats, n_samples):
        codes = torch.randn((n_samples, *shape), generator=gen)
        t = torch.randint(lo, hi, (n_samples,), generator=gen)
        for _ in range(len(uniq) * sampler_steps):  # the release's DDIM sampler shares `gen`: at every step of each
            torch.randn((n_samples, *shape), generator=gen)  # prompt's trajectory it draws eta-noise (x 0 at eta 0)
        for p in uniq:  # each prompt in calls of its own: its numbers do not depend on the JSON's other prompts
            d = diffs(model, protocol, [p] * n_samples, codes, t, protocol.settings.guidance, adapters=names)
            for table, dk in zip(tables, d):
                table[p] += dk.tolist()
        if progress:
            progress(1)
    return tables


# ----------------------------------------------------------------------------------------------- either protocol
def diff_table(model, protocol: Protocol, shape: Shape, prompts: Sequence[str], seed: int, n_samples: int = 1,
               adapters: Sequence[str] | None = None, progress: Progress = None
               ) -> list[tuple[dict[str, Estimate], Estimate]]:
    """compute_lora_diff's table in the protocol's way -> per adapter ({prompt: d(p)}, d("")); "" is always
    measured (added last when missing) and maps to d(""). n_samples: the release's start codes per chunk."""
    if protocol.name == "fast":
        return fast_diff_table(model, protocol, shape, prompts, seed, adapters, progress)
    prompts = list(prompts) + ([] if "" in prompts else [""])
    tables = release_diff_table(model, protocol, shape, prompts, seed, n_samples, adapters, progress)
    return [({p: Estimate(v) for p, v in table.items()}, Estimate(table[""])) for table in tables]


def diff_table_units(protocol: Protocol, n_prompts: int, n_samples: int = 1) -> int:
    """The progress units of diff_table for n_prompts prompts ("" included): chunks (release) or draws (fast)."""
    if protocol.name == "release":
        return -(-protocol.repeats // n_samples)
    return protocol.empty_draws + protocol.repeats * (n_prompts - 1)


def row_estimates(model, protocol: Protocol, shape: Shape, prompts: Sequence[str], seeds: Sequence[int],
                  guidances: Sequence[float], d_empty: Sequence[Estimate] | None = None,
                  adapters: Sequence[str] | None = None, progress: Progress = None) -> list[list[Pair]]:
    """generate_images_nsfw.py's per-row test in the protocol's way -> result[k][i] = (d_k(p), d_k("")) of row i.
    fast: d_empty (estimate_empty, once per run) is every row's d(""); release: each row measures its own."""
    if protocol.name == "release":
        return release_row_estimates(model, protocol, shape, prompts, seeds, guidances, adapters, progress)
    est = fast_prompt_estimates(model, protocol, shape, prompts, seeds, guidances, d_empty, adapters, progress)
    return [[(e, empty) for e in est_k] for est_k, empty in zip(est, d_empty)]
