"""The weight-delta interface (ldm/erasure/delta.py) with a second kind beside LoRA: a full-rank delta
D [out, in] (ESD's full-weight update), defined here, on the tiny model. CPU.

It must plug into the same layer (W0 x + s_i * D x per sample, switched off, merged / unmerged), the same file
I/O (save_adapter / load_adapter through the registry) and the same training step as LoRA.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers_model import tiny_model
from ldm.erasure.delta import (DELTA_KINDS, Delta, DeltaLinear, adapter_names, adapter_scale, adapters_disabled,
                               delta_layers, delta_parameters, delta_state_dict, inject_delta, register_delta,
                               remove_delta)
from ldm.erasure.io import load_adapter, read_adapter, save_adapter
from ldm.erasure.lora import inject_lora
from ldm.erasure.objective import UnGuideObjective, encode_prompts
from ldm.erasure.targets import select_targets
from ldm.erasure.training import Method, Trainer
from ldm.errors import UserError
from test_lora import eps, inputs


class FullDelta(Delta):
    """A full-rank update D [out, in], zero-initialised: delta(x) = alpha * x D^T."""
    kind = "full_test"
    tensor_names = ("D",)

    def __init__(self, in_features, out_features, alpha=1.0, device=None, dtype=None):
        super().__init__(min(in_features, out_features), alpha)
        self.D = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))  # [out, in]

    def forward(self, x):
        return F.linear(x, self.D.to(x.dtype)) * self.alpha  # [..., in] -> [..., out]

    def delta_weight(self):
        return self.D * self.alpha

    @classmethod
    def fit(cls, in_features, out_features, tensors):
        if tuple(tensors["D"].shape) != (out_features, in_features):
            raise ValueError(f"D {tuple(tensors['D'].shape)} does not fit a Linear {in_features} -> {out_features}")
        return min(in_features, out_features)

    @classmethod
    def from_tensors(cls, tensors, alpha, device=None, dtype=None):
        d = tensors["D"]
        delta = cls(d.shape[1], d.shape[0], alpha, device, dtype)
        with torch.no_grad():
            delta.D.copy_(d)
        return delta


@pytest.fixture(scope="module")
def base():
    return tiny_model(0).requires_grad_(False)


@pytest.fixture
def full_kind():
    register_delta(FullDelta)
    yield FullDelta
    DELTA_KINDS.pop(FullDelta.kind)


def inject_full(model, spec="xattn", name="esd", seed=0, scale=0.02):
    """A FullDelta with random D (seeded) on the layers `spec` selects (a preset, or a list of module paths)."""
    g = torch.Generator().manual_seed(seed)
    targets = spec if isinstance(spec, list) else select_targets(model.unet, spec)

    def make(path, layer):
        delta = FullDelta(layer.in_features, layer.out_features, device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            delta.D.copy_(torch.randn(delta.D.shape, generator=g) * scale)
        return delta
    return inject_delta(model.unet, targets, make, name=name)


def test_layer_is_w0_x_plus_per_sample_scaled_d_x(base, full_kind):
    model = copy.deepcopy(base)
    path, layer = next(iter(inject_full(model).items()))
    w0, b0 = base.unet.get_submodule(path).weight, base.unet.get_submodule(path).bias
    assert isinstance(layer, DeltaLinear) and isinstance(layer, nn.Linear) and layer.esd.kind == "full_test"
    x = torch.randn(4, 7, layer.in_features, generator=torch.Generator().manual_seed(2))  # [B, tokens, in]
    s = torch.tensor([0.0, 0.5, 1.0, -1.0])
    d = layer.esd.D.detach()                                                          # [out, in]
    with torch.no_grad(), adapter_scale(model.unet, s):
        got = layer(x)
    want = F.linear(x, w0, b0) + s.view(-1, 1, 1) * F.linear(x, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), adapters_disabled(model.unet):
        assert torch.equal(layer(x), F.linear(x, w0, b0))
    with torch.no_grad():  # merged: W0 + D in the weight, the same output
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
        with pytest.raises(RuntimeError, match="merged"), adapter_scale(model.unet, s):
            layer(x)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)
        layer.esd.D[0, 0] = float("nan")
        with pytest.raises(RuntimeError, match="non-finite"):
            layer.merge()


def test_model_scale_disable_gradients_and_removal(base, full_kind):
    model = copy.deepcopy(base)
    inject_full(model, "full")
    x, t, c = inputs(b=4)
    base_out, adapted = eps(base, x, t, c), eps(model, x, t, c)
    assert not torch.allclose(adapted, base_out)
    with adapters_disabled(model.unet):
        assert torch.equal(eps(model, x, t, c), base_out)
    with adapter_scale(model.unet, torch.tensor([0.0, 1.0, 0.0, 1.0])):
        mixed = eps(model, x, t, c)
    torch.testing.assert_close(mixed[0::2], base_out[0::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1::2], adapted[1::2], atol=1e-5, rtol=1e-5)
    model.apply_model(x, t, c).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta_parameters(model.unet))
    assert all(p.grad is None for n, p in model.unet.named_parameters() if ".esd." not in n)
    remove_delta(model.unet)
    assert not delta_layers(model.unet) and list(model.state_dict()) == list(base.state_dict())
    assert torch.equal(eps(model, x, t, c), base_out)


def test_saves_and_reloads_through_the_same_file_io(base, full_kind, tmp_path):
    model = copy.deepcopy(base)
    xattn = select_targets(model.unet, "xattn")
    inject_lora(model.unet, select_targets(model.unet, "default"), 1, 8.0, torch.Generator().manual_seed(1))
    inject_full(model, xattn)  # beside a LoRA (on 14 of its 28 layers), as its own adapter
    assert adapter_names(model.unet) == ["lora", "esd"]
    x, t, c = inputs(b=4)
    want = eps(model, x, t, c)
    save_adapter(tmp_path / "esd.safetensors", model.unet, alpha=1.0, name="esd", extra={"complete": "true"})
    save_adapter(tmp_path / "lora.safetensors", model.unet, alpha=8.0)
    tensors, meta = read_adapter(tmp_path / "esd.safetensors")
    assert meta["delta_kind"] == "full_test" and meta["complete"] == "true" and len(tensors) == 28
    assert all(k.endswith(".full_test.D") for k in tensors)
    assert read_adapter(tmp_path / "lora.safetensors")[1]["delta_kind"] == "lora"
    with pytest.raises(ValueError, match="LoRA adapters only"):
        save_adapter(tmp_path / "esd.pth", model.unet, alpha=1.0, name="esd")
    fresh = copy.deepcopy(base)
    load_adapter(tmp_path / "lora.safetensors", fresh.unet)
    info = load_adapter(tmp_path / "esd.safetensors", fresh.unet, name="esd")
    assert info.kind == "full_test" and info.name == "esd" and len(info.targets) == 28
    assert torch.equal(eps(fresh, x, t, c), want)
    saved = delta_state_dict(model.unet, "esd")
    assert all(torch.equal(v, saved[k]) for k, v in delta_state_dict(fresh.unet, "esd").items())
    DELTA_KINDS.pop(FullDelta.kind)  # a file naming a kind this toolkit does not know is refused
    try:
        with pytest.raises(UserError, match="delta kind 'full_test'"):
            load_adapter(tmp_path / "esd.safetensors", copy.deepcopy(base).unet)
    finally:
        register_delta(FullDelta)


def test_shapes_of_another_model_are_refused(base, full_kind, tmp_path):
    model = copy.deepcopy(base)
    inject_full(model, "default")
    save_adapter(tmp_path / "esd.safetensors", model.unet, alpha=1.0, name="esd")
    tensors, meta = read_adapter(tmp_path / "esd.safetensors")
    key = next(iter(tensors))
    from safetensors.torch import save_file
    save_file({**tensors, key: torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"), metadata=meta)
    fresh = copy.deepcopy(base)
    with pytest.raises(UserError, match="does not fit"):
        load_adapter(tmp_path / "bad.safetensors", fresh.unet)
    assert not delta_layers(fresh.unet)


def test_the_training_step_trains_a_full_delta(base, full_kind):
    """The shared loop's step works on any kind: only D moves, and the loss falls on a fixed draw."""
    model = copy.deepcopy(base)
    layers = inject_full(model, "default", name="lora", scale=0.0)  # zero-initialised, as ESD's
    emb = encode_prompts(model, "a photo of the cat", "a photo of the forest")
    objective = UnGuideObjective(model, emb, model.latent_shape(16), ddim_steps=4, fixed_t_enc=3)
    method = Method(delta_state_dict(model.unet, keep_vars=True), objective, save=lambda path, extra: None)
    assert all(k.endswith(".full_test.D") for k in method.tensors) and len(method.parameters()) == len(layers)
    trainer = Trainer(method, 1e-3, torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        trainer.generator.manual_seed(11)  # the same draw every step
        losses.append(trainer.step()[0])
    assert trainer.done == 20 and losses[-1] < 0.5 * losses[0], losses
    assert all(m.lora.D.abs().sum() > 0 for m in layers.values())
    before = dict(base.unet.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.unet.named_parameters() if ".lora." not in n)
