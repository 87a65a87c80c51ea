"""The erasure methods train.py knows, by name: each builds a `training.Method` for the one training loop.

    METHODS[name](model, settings, generator, autocast) -> Method

    unguide   a LoRA (rank r, alpha) on the settings' Linear targets, A drawn from `generator`; UnGuide's objective
              against the prompts JSON's reference (anchor) prompt, optional preservation term
    esd       ESD (Gandikota et al., ICCV 2023): a zero-initialised full-rank delta (ldm/erasure/full.py) on the
              layers owning ESD's parameter set (settings.train_method); the same objective with the reference ""
              and eta = negative guidance: eps(z, t, c) -> eps*(z, t, "") - eta (eps*(z, t, c) - eps*(z, t, ""))

    sepce     SepCE / SRS-ME: a basis delta (dW = alpha V B, B fixed: the null space of the preserved prompts'
              tokens) on the cross-attention keys and values, its correlation objective and momentum stop

A method adds itself with one line: METHODS["name"] = builder. Both methods keep ONE copy of the base weights:
the frozen predictions are the same UNet with its deltas switched off.
"""
from pathlib import Path
from typing import Callable

import torch

from ldm.erasure.delta import delta_state_dict
from ldm.erasure.full import inject_full
from ldm.erasure.io import save_adapter
from ldm.erasure.lora import inject_lora
from ldm.erasure.objective import UnGuideObjective, encode_prompts
from ldm.erasure.settings import TrainSettings, num
from ldm.erasure.targets import describe_targets
from ldm.erasure.training import Method

Builder = Callable[[object, TrainSettings, torch.Generator, object], Method]


def _objective(model, s: TrainSettings, reference: str, autocast) -> UnGuideObjective:
    emb = encode_prompts(model, s.target_prompt, reference, tuple(s.preserve or ()), tuple(s.erase_also or ()))
    if s.erase_also:
        print(f"erasing also {len(s.erase_also)} other wordings (one drawn per iteration with the target): "
              + ", ".join(repr(p) for p in s.erase_also))
    shape = model.latent_shape(s.image_size)
    adversary = None
    if s.adversarial:  # the attacker inside training (ldm/erasure/adversarial.py): its own generator
        from ldm.erasure.adversarial import Adversary, AdversarySettings
        a = AdversarySettings(**s.adversarial)
        adversary = Adversary(model, s.target_prompt, shape, s.ddim_steps, a, s.seed)
        print(f"adversarial term: {a.tokens} tokens searched in front of {s.target_prompt!r} every {a.every} "
              f"iterations ({a.steps} steps), weight {num(a.weight)}; {a.images} concept images drawn by the base model")
    return UnGuideObjective(model, emb, shape, s.ddim_steps, s.start_guidance,
                            s.negative_guidance, s.ddim_eta, s.schedule == "release", autocast_dtype=autocast,
                            preserve_weight=s.preserve_weight or 1.0, adversary=adversary)


def _method(model, s: TrainSettings, objective, alpha: float) -> Method:
    """The Method of the UNet's adapter "lora": its tensors, the objective, and how its file is written."""
    tensors = delta_state_dict(model.unet, keep_vars=True)

    def save(path: Path, extra: dict[str, str]) -> None:
        save_adapter(path, model.unet, alpha, base_sha256=s.base_sha256, extra=extra)
    return Method(tensors, objective, save)


def _device_note(model, s: TrainSettings, autocast) -> str:
    return f"device {model.device}" + (f", autocast {s.precision}" if autocast else "")


def build_unguide(model, s: TrainSettings, generator: torch.Generator, autocast) -> Method:
    """UnGuide's method: LoRA adapters on the settings' targets (A drawn from `generator`) and the objective."""
    inject_lora(model.unet, s.targets, rank=s.lora_rank, alpha=s.lora_alpha, generator=generator)
    method = _method(model, s, _objective(model, s, s.reference_prompt, autocast), s.lora_alpha)
    print(f"adapters: {describe_targets(s.targets)}; rank {s.lora_rank}, alpha {num(s.lora_alpha)}, "
          f"{sum(p.numel() for p in method.tensors.values()):,} trainable parameters; "
          + _device_note(model, s, autocast))
    if s.preserve:
        print(f"preserving {len(s.preserve)} prompts (weight {num(s.preserve_weight)}): "
              + ", ".join(repr(p) for p in s.preserve))
    return method


def build_esd(model, s: TrainSettings, generator: torch.Generator, autocast) -> Method:
    """ESD: full deltas (zero: no draws from `generator`) on the layers of ESD's train_method; reference ""."""
    inject_full(model.unet, s.targets)
    method = _method(model, s, _objective(model, s, "", autocast), 1.0)
    n = sum(p.numel() for p in method.tensors.values())
    print(f"ESD-{s.train_method}: full-rank deltas on {len(s.targets)} layers, {n:,} trainable parameters; "
          + _device_note(model, s, autocast))
    return method


def build_sepce(model, s: TrainSettings, generator: torch.Generator, autocast) -> Method:
    """SepCE: a basis delta per layer (dW = alpha V B, B spanning the null space of the preserved prompts' tokens),
    its objective and momentum stop (ldm/erasure/sepce.py); the concept's images drawn by the base model."""
    from ldm.erasure.sepce import SepCESettings, build_sepce_method, weight_residual
    sep = SepCESettings(preserve=list(s.preserve or []), iterations=s.iterations, lr=s.lr, seed=s.seed,
                        image_steps=s.ddim_steps, ddim_steps=s.ddim_steps, targets=list(s.targets), **s.sepce)
    method, info = build_sepce_method(model, s.target_prompt, sep, generator,
                                      latent_shape=model.latent_shape(s.image_size), base_sha256=s.base_sha256)
    print(f"SepCE: basis deltas on {len(s.targets)} layers, null space {info['dims']} dims, "
          f"{sum(p.numel() for p in method.tensors.values()):,} trainable parameters; preserving "
          f"{len(sep.preserve) + 1} prompts ('' included); " + _device_note(model, s, autocast))
    save = method.save

    def save_and_report(path: Path, extra: dict[str, str]) -> None:
        save(path, extra)
        r = weight_residual(model, "lora", sep.preserve)  # the separability the run's summary states
        print(f"SepCE separability: max ||dW e|| / ||W e|| over the preserved prompts' tokens = {r['content']:.2e} "
              f"(content tokens), {r['all']:.2e} (all 77)")
    method.save = save_and_report
    return method


METHODS: dict[str, Builder] = {"unguide": build_unguide, "esd": build_esd, "sepce": build_sepce}
