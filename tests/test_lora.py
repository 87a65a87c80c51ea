"""LoRA adapters, target presets and adapter files (ldm/erasure/lora.py, targets.py, io.py) on the tiny model. CPU."""
import copy

import pytest
import torch
import torch.nn as nn

from ldm.erasure.io import load_adapter, read_adapter, save_adapter
from ldm.erasure.lora import (LoRALinear, adapter_scale, adapters_disabled, inject_lora, lora_layers,
                              lora_parameters, lora_state_dict, remove_lora, set_enabled)
from ldm.erasure.targets import describe_targets, select_targets
from ldm.errors import UserError
from ldm.loader import build_model

TINY = "configs/tiny/tiny-inference.yaml"


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return build_model(TINY)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randn(b, 77, 64, generator=g))


@torch.no_grad()
def eps(model, x, t, c):
    return model.apply_model(x, t, c)


def adapt(model, spec="default", rank=2, alpha=8.0, seed=3):
    """Inject adapters and give B random values, so that the adapter changes the output."""
    names = select_targets(model.unet, spec)
    inject_lora(model.unet, names, rank=rank, alpha=alpha, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in lora_layers(model.unet).values():
            m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=g) * 0.01)
    return names


def test_fresh_adapter_changes_nothing(model):
    x, t, c = inputs()
    before = eps(model, x, t, c)
    names = select_targets(model.unet, "xattn")
    inject_lora(model.unet, names, rank=4, alpha=8, generator=torch.Generator().manual_seed(0))
    assert len(lora_layers(model.unet)) == len(names)
    assert all(p.requires_grad for p in lora_parameters(model.unet))
    assert torch.equal(eps(model, x, t, c), before)  # B = 0: bitwise unchanged
    layer = next(iter(lora_layers(model.unet).values()))
    assert isinstance(layer, nn.Linear) and layer.lora.A.shape == (layer.in_features, 4)
    assert layer.lora.B.shape == (4, layer.out_features) and not layer.lora.B.any()


def test_adapter_shares_base_weights(model):
    n_before = sum(p.numel() for p in model.parameters())
    names = adapt(model, rank=1)
    added = sum(m.lora.A.numel() + m.lora.B.numel() for m in lora_layers(model.unet).values())
    assert sum(p.numel() for p in model.parameters()) == n_before + added  # no copy of the base weights
    layer = model.unet.get_submodule(names[0])
    assert set(layer.state_dict()) == {"weight", "lora.A", "lora.B"} | ({"bias"} if layer.bias is not None else set())


def test_adapter_changes_output_and_gets_gradients(model):
    x, t, c = inputs()
    before = eps(model, x, t, c)
    model.requires_grad_(False)  # the trainer freezes the base; new adapters are trainable
    adapt(model)
    out = model.apply_model(x, t, c)
    assert not torch.allclose(out, before)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model.unet))
    assert all(p.grad is None for n, p in model.unet.named_parameters() if ".lora." not in n)


def test_merge_equals_unmerged_and_unmerge_restores(model):
    x, t, c = inputs()
    adapt(model)
    weights = {n: m.weight.detach().clone() for n, m in lora_layers(model.unet).items()}
    adapted = eps(model, x, t, c)
    for m in lora_layers(model.unet).values():
        m.merge()
    torch.testing.assert_close(eps(model, x, t, c), adapted, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError):
        with adapter_scale(model.unet, torch.ones(2)):
            eps(model, x, t, c)
    for m in lora_layers(model.unet).values():
        m.unmerge()
    for n, m in lora_layers(model.unet).items():
        torch.testing.assert_close(m.weight.detach(), weights[n], atol=1e-6, rtol=0)
    # the weights come back to float32 rounding (W + D - D), which moves eps by ~1e-6: the merged tolerance
    torch.testing.assert_close(eps(model, x, t, c), adapted, atol=1e-5, rtol=0)


def test_disabled_equals_base(model, base):
    x, t, c = inputs()
    want = eps(base, x, t, c)
    adapt(model, "full")
    with adapters_disabled(model.unet):
        assert torch.equal(eps(model, x, t, c), want)
    assert not torch.allclose(eps(model, x, t, c), want)  # back on after the block
    set_enabled(model.unet, False)
    assert torch.equal(eps(model, x, t, c), want)
    set_enabled(model.unet, True)
    with adapter_scale(model.unet, torch.zeros(2)):
        assert torch.equal(eps(model, x, t, c), want)


def test_per_sample_scale_equals_separate_calls(model, base):
    x, t, c = inputs(b=2)
    adapt(model, "noxattn")  # also the ResBlocks' emb_layers (2-D input) and ff layers
    base_out = eps(base, x, t, c)
    adapted_out = eps(model, x, t, c)
    with adapter_scale(model.unet, torch.tensor([0.0, 0.0, 1.0, 1.0])):
        mixed = eps(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c]))
    torch.testing.assert_close(mixed[:2], base_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2:], adapted_out, atol=1e-5, rtol=1e-5)
    # a fractional scale equals that alpha
    with adapter_scale(model.unet, torch.tensor([0.5, 0.5])):
        scaled = eps(model, x, t, c)
    for m in lora_layers(model.unet).values():
        m.lora.alpha *= 0.5
    torch.testing.assert_close(scaled, eps(model, x, t, c), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):  # wrong number of scales
        with adapter_scale(model.unet, torch.ones(3)):
            eps(model, x, t, c)


def test_remove_lora_restores_exactly(model, base):
    x, t, c = inputs()
    adapt(model, "full")
    for m in list(lora_layers(model.unet).values())[:3]:
        m.merge()  # remove_lora unmerges first
    remove_lora(model.unet)
    assert not lora_layers(model.unet)
    assert all(type(m) is nn.Linear for n, m in model.unet.named_modules() if isinstance(m, nn.Linear))
    assert list(model.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(eps(model, x, t, c), eps(base, x, t, c), atol=1e-5, rtol=0)  # merge+unmerge rounding


def test_remove_lora_without_merge_is_bitwise(model, base):
    x, t, c = inputs()
    adapt(model, "default")
    remove_lora(model.unet)
    assert torch.equal(eps(model, x, t, c), eps(base, x, t, c))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), base.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


# The tiny UNet: 7 transformer blocks (attn1/attn2 with to_q, to_k, to_v, to_out.0; ff.net.0.proj, ff.net.2),
# 8 ResBlocks (emb_layers.1) and time_embed.0 / time_embed.2.
PRESET_COUNTS = {"default": 14, "xattn": 28, "selfattn": 28, "noxattn": 50, "nsfw": 50, "full": 80}


@pytest.mark.parametrize("preset,count", PRESET_COUNTS.items())
def test_target_presets(base, preset, count):
    names = select_targets(base.unet, preset)
    assert len(names) == count and len(set(names)) == count
    assert all(type(base.unet.get_submodule(n)) is nn.Linear for n in names)
    parts = [n.split(".") for n in names]
    if preset == "default":
        assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
        assert names == select_targets(base.unet, ["attn2.to_k", "attn2.to_v"]) == select_targets(base.unet, None)
    elif preset == "xattn":
        assert all("attn2" in p for p in parts)
    elif preset == "selfattn":
        assert all("attn1" in p for p in parts)
    elif preset in ("noxattn", "nsfw"):
        assert not any("attn2" in p or "time_embed" in p or p[0] == "out" for p in parts)
        kinds = describe_targets(names)
        assert "attn1.to_q x7" in kinds and "ff.net.2 x7" in kinds and "emb_layers.1 x8" in kinds
    elif preset == "full":
        all_linear = [n for n, m in base.unet.named_modules() if type(m) is nn.Linear]
        assert names == all_linear


def test_target_suffixes_and_nothing_matched(base):
    assert len(select_targets(base.unet, ["attn1.to_q"])) == 7
    assert len(select_targets(base.unet, ["to_out.0"])) == 14
    with pytest.raises(ValueError, match="match no Linear"):
        select_targets(base.unet, ["attn3.to_k"])
    with pytest.raises(ValueError, match="match no Linear"):
        select_targets(base.unet, ["attn2.to_k", "nonsense"])
    with pytest.raises(ValueError, match="match no Linear"):
        select_targets(base.unet, ["proj_in"])  # a 1x1 convolution, never adapted


def test_release_pth_round_trip(model, base, tmp_path):
    x, t, c = inputs()
    adapt(model, rank=1, alpha=8.0)
    want = eps(model, x, t, c)
    save_adapter(tmp_path / "lora.pth", model.unet, alpha=8.0)
    sd = torch.load(tmp_path / "lora.pth", weights_only=True)
    assert set(sd) == set(lora_state_dict(model.unet)) and len(sd) == 2 * 14
    assert all(k.endswith((".lora.A", ".lora.B")) for k in sd)
    fresh = copy.deepcopy(base)
    info = load_adapter(tmp_path / "lora.pth", fresh.unet)
    assert info.fmt == "release-pth" and info.alpha == 8.0 and info.rank == 1 and len(info.targets) == 14
    assert torch.equal(eps(fresh, x, t, c), want)


def test_plain_release_dict_loads(base, tmp_path):
    """A lora.pth as the release wrote it: torch.save({name: tensor}) with '<path>.lora.A' [in, r] / '.lora.B' [r, out]."""
    x, t, c = inputs()
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name in select_targets(base.unet, "default"):
        lin = base.unet.get_submodule(name)
        sd[f"{name}.lora.A"] = torch.randn(lin.in_features, 1, generator=g)
        sd[f"{name}.lora.B"] = torch.randn(1, lin.out_features, generator=g) * 0.01
    torch.save(sd, tmp_path / "lora.pth")
    fresh = copy.deepcopy(base)
    info = load_adapter(tmp_path / "lora.pth", fresh.unet)  # alpha defaults to 8, as the release
    assert info.alpha == 8.0
    merged = copy.deepcopy(base)  # the release's apply_lora_to_model: W += alpha (A B)^T
    with torch.no_grad():
        for key, a in sd.items():
            if key.endswith(".lora.A"):
                name = key[: -len(".lora.A")]
                merged.unet.get_submodule(name).weight += 8.0 * (a @ sd[f"{name}.lora.B"]).T
    torch.testing.assert_close(eps(fresh, x, t, c), eps(merged, x, t, c), atol=1e-5, rtol=1e-5)


def test_safetensors_round_trip_with_metadata(model, base, tmp_path):
    x, t, c = inputs()
    adapt(model, "xattn", rank=3, alpha=4.0)
    want = eps(model, x, t, c)
    save_adapter(tmp_path / "a.safetensors", model.unet, alpha=4.0, base_sha256="abc123", extra={"complete": "true"})
    tensors, meta = read_adapter(tmp_path / "a.safetensors")
    assert meta["rank"] == "3" and float(meta["alpha"]) == 4.0 and meta["complete"] == "true"
    fresh = copy.deepcopy(base)
    info = load_adapter(tmp_path / "a.safetensors", fresh.unet)
    assert info.alpha == 4.0 and info.base_sha256 == "abc123" and len(info.targets) == 28
    assert torch.equal(eps(fresh, x, t, c), want)


def test_load_adapter_refuses_foreign_files(model, base, tmp_path):
    adapt(model, rank=1)
    good = {k: v.clone() for k, v in lora_state_dict(model.unet).items()}
    key_a = next(k for k in good if k.endswith(".lora.A"))
    cases = {
        "shape": {**good, key_a: torch.zeros(good[key_a].shape[0] + 1, 1)},
        "path": {**good, "input_blocks.99.1.attn2.to_k.lora.A": torch.zeros(64, 1),
                 "input_blocks.99.1.attn2.to_k.lora.B": torch.zeros(1, 32)},
        "half": {k: v for k, v in good.items() if k != key_a.replace(".lora.A", ".lora.B")},
        "key": {**good, "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1)},
    }
    messages = {"shape": "do not fit", "path": "not a Linear layer", "half": "only one of", "key": "not of the form"}
    for name, sd in cases.items():
        torch.save(sd, tmp_path / f"{name}.pth")
        fresh = copy.deepcopy(base)
        with pytest.raises(UserError, match=messages[name]):
            load_adapter(tmp_path / f"{name}.pth", fresh.unet)
        assert not lora_layers(fresh.unet)  # refused before injecting anything
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable"):
        load_adapter(tmp_path / "junk.pth", copy.deepcopy(base).unet)
    with pytest.raises(UserError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors", copy.deepcopy(base).unet)


def _bad_adapter_cases(good: dict, meta: dict) -> dict:
    """{case: (tensors, metadata, what the one line must say)}: bad adapter files of the kinds issue 15 names
    (zero rank, metadata that is not JSON or not of its type, alpha NaN / inf / negative / zero / not a number,
    a rank that is not the tensors', missing and extra tensors) beyond test_load_adapter_refuses_foreign_files."""
    lay = sorted(good)[0].rsplit(".lora.", 1)[0]
    a, b = good[f"{lay}.lora.A"], good[f"{lay}.lora.B"]
    return {
        "zero_rank": ({**good, f"{lay}.lora.A": a[:, :0], f"{lay}.lora.B": b[:0]}, meta, "rank 0"),
        "all_zero_rank": ({k: v[:, :0] if k.endswith(".A") else v[:0] for k, v in good.items()}, {**meta, "rank": "0"},
                          "rank 0"),
        "targets_not_json": (good, {**meta, "targets": "[not json"}, "metadata 'targets' is not a JSON list"),
        "targets_not_list": (good, {**meta, "targets": "5"}, "metadata 'targets' is not a JSON list"),
        "fingerprint_not_json": (good, {**meta, "base_fingerprint": "{x"}, "metadata 'base_fingerprint'"),
        "fingerprint_words": (good, {**meta, "base_fingerprint": '["a", "b"]'}, "metadata 'base_fingerprint'"),
        "alpha_nan": (good, {**meta, "alpha": "nan"}, "metadata 'alpha' is 'nan'"),
        "alpha_inf": (good, {**meta, "alpha": "-inf"}, "metadata 'alpha' is '-inf'"),
        "alpha_negative": (good, {**meta, "alpha": "-8"}, "finite number > 0"),
        "alpha_zero": (good, {**meta, "alpha": "0.0"}, "finite number > 0"),
        "alpha_word": (good, {**meta, "alpha": "eight"}, "metadata 'alpha' 'eight' is not a number"),
        "rank_other": (good, {**meta, "rank": "4"}, "metadata 'rank' 4 but its tensors have rank 1"),
        "rank_word": (good, {**meta, "rank": "one"}, "metadata 'rank' 'one' is not a positive integer"),
        "missing_layer": ({k: v for k, v in good.items() if not k.startswith(lay + ".")}, meta,
                          "other layers than its metadata lists"),
        "extra_tensor": ({**good, f"{lay}.lora.C": a}, meta, "is not of the form"),
        "extra_norm_layer": ({**good, "out.0.lora.A": a[:4], "out.0.lora.B": b[:, :4]}, meta, "Linear layers only"),
        "integer_tensor": ({**good, f"{lay}.lora.A": a.int()}, meta, "not a floating-point tensor"),
        "no_tensors": ({}, meta, "holds no adapter tensors"),
        "kind_unknown": (good, {**meta, "delta_kind": "os.system"}, "delta kind 'os.system' is not one of"),
    }


def test_bad_adapter_files_are_one_line_naming_the_file(model, base, tmp_path):
    from safetensors.torch import save_file
    adapt(model, rank=1)
    save_adapter(tmp_path / "good.safetensors", model.unet, alpha=8.0)
    good, meta = read_adapter(tmp_path / "good.safetensors")
    fresh = copy.deepcopy(base)  # each refusal leaves it untouched (asserted), so one copy serves every case
    for name, (tensors, m, want) in _bad_adapter_cases(good, meta).items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=m)
        with pytest.raises(UserError) as exc:
            load_adapter(path, fresh.unet)
        text = str(exc.value)
        assert want in text and text.startswith(str(path)) and "\n" not in text, (name, text)
        assert not lora_layers(fresh.unet), name  # refused before anything is injected
    torch.save(good, tmp_path / "release.pth")  # a release lora.pth: the alpha given for it is checked the same way
    for alpha in (float("nan"), -8.0, 0.0):
        with pytest.raises(UserError, match="alpha given for it"):
            load_adapter(tmp_path / "release.pth", fresh.unet, alpha=alpha)
        assert not lora_layers(fresh.unet)


def test_load_adapter_refuses_other_base_and_double_load(model, base, tmp_path):
    adapt(model, rank=1)
    save_adapter(tmp_path / "a.safetensors", model.unet, alpha=8.0)
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.unet.parameters():
            p.mul_(1.1)
    with pytest.raises(UserError, match="another base model"):
        load_adapter(tmp_path / "a.safetensors", other.unet)
    fresh = copy.deepcopy(base)
    load_adapter(tmp_path / "a.safetensors", fresh.unet)
    with pytest.raises(UserError, match="already carries an adapter named"):
        load_adapter(tmp_path / "a.safetensors", fresh.unet)


def test_inject_refuses_non_linear_and_double(base):
    m = copy.deepcopy(base)
    names = select_targets(m.unet, "default")
    inject_lora(m.unet, names[:1])
    with pytest.raises(ValueError, match="already carries"):
        inject_lora(m.unet, names[:1])
    conv = next(n for n, mod in m.unet.named_modules() if isinstance(mod, nn.Conv2d))
    with pytest.raises(ValueError, match="not an nn.Linear"):
        inject_lora(m.unet, [conv])
    with pytest.raises(ValueError, match="rank"):
        inject_lora(m.unet, names[1:2], rank=0)
    assert isinstance(m.unet.get_submodule(names[0]), LoRALinear)


# ---------------------------------------------------------------------------------------------------------------
# several adapters on one model (one per erased concept)

def _two_adapters(base):
    m = copy.deepcopy(base)
    inject_lora(m.unet, select_targets(m.unet, "default"), 1, 8.0, torch.Generator().manual_seed(1))
    inject_lora(m.unet, select_targets(m.unet, "xattn"), 2, 4.0, torch.Generator().manual_seed(2), name="lora1")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(m.unet).values():
            for a in layer.adapters().values():
                a.B.copy_(0.02 * torch.randn(a.B.shape, generator=g))
    return m


def test_two_adapters_guidance_matches_formula_and_removal_restores(base):
    from ldm.erasure.guidance import unguidance_model_fn
    from ldm.erasure.lora import adapter_names, adapter_scale, remove_lora
    from ldm.models.diffusion.ddim import cfg_model_fn

    m = _two_adapters(base)
    assert adapter_names(m.unet) == ["lora", "lora1"]
    c = m.get_learned_conditioning(["a photo of the cat", "a photo of the dog"])
    u = m.get_learned_conditioning(["", ""])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([500, 300])

    def cfg(scales):
        with torch.no_grad(), adapter_scale(m.unet, scales):
            return cfg_model_fn(m.apply_model, c, u, 7.5)(x, t)
    one, zero = torch.ones(4), torch.zeros(4)
    base_eps, eps1, eps2 = cfg({"lora": zero, "lora1": zero}), cfg({"lora": one, "lora1": zero}), \
        cfg({"lora": zero, "lora1": one})
    assert (eps1 - base_eps).abs().max() > 1e-3 and (eps2 - base_eps).abs().max() > 1e-3
    for w in ([1.0, 1.0], [0.0, 1.0], [-1.0, 2.0], [-1.0, -1.0], [torch.tensor([-1.0, 2.0]), torch.tensor([2.0, 1.0])]):
        with torch.no_grad():
            got = unguidance_model_fn(m, c, u, 7.5, w)(x, t)
        w1, w2 = (v.view(-1, 1, 1, 1) if isinstance(v, torch.Tensor) else v for v in w)
        want = base_eps + (1 - w1) * (eps1 - base_eps) + (1 - w2) * (eps2 - base_eps)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), w

    remove_lora(m.unet, "lora1")  # recovery is removal: the model with adapter 1 only
    assert adapter_names(m.unet) == ["lora"]
    with torch.no_grad():
        assert torch.equal(cfg_model_fn(m.apply_model, c, u, 7.5)(x, t), eps1)
    remove_lora(m.unet)
    with torch.no_grad():
        assert torch.equal(cfg_model_fn(m.apply_model, c, u, 7.5)(x, t), base_eps)
    assert not lora_layers(m.unet)


def test_second_adapter_file_loads_beside_the_first(base, tmp_path):
    m = _two_adapters(base)
    save_adapter(tmp_path / "a.safetensors", m.unet, alpha=8.0, name="lora")
    save_adapter(tmp_path / "b.safetensors", m.unet, alpha=4.0, name="lora1")
    fresh = copy.deepcopy(base)
    load_adapter(tmp_path / "a.safetensors", fresh.unet)
    info = load_adapter(tmp_path / "b.safetensors", fresh.unet, name="lora1")
    assert info.name == "lora1" and info.rank == 2 and info.alpha == 4.0
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    ctx = m.get_learned_conditioning(["a photo of the cat"])
    with torch.no_grad():
        assert torch.allclose(fresh.apply_model(x, t, ctx), m.apply_model(x, t, ctx), atol=1e-6)


def test_adapter_files_are_byte_identical_for_the_same_tensors(model, tmp_path):
    """Same tensors and metadata -> same bytes (sorted header), however the dicts were ordered; and it reads back."""
    from ldm.erasure.io import read_adapter, safetensors_bytes
    tensors = {"b.lora.B": torch.ones(1, 3), "a.lora.A": torch.arange(6.0).view(3, 2)}
    one = safetensors_bytes(tensors, {"z": "1", "a": "2"})
    two = safetensors_bytes(dict(reversed(list(tensors.items()))), {"a": "2", "z": "1"})
    assert one == two
    (tmp_path / "x.safetensors").write_bytes(one)
    back, meta = read_adapter(tmp_path / "x.safetensors")
    assert meta == {"z": "1", "a": "2"} and all(torch.equal(back[k], v) for k, v in tensors.items())
    adapt(model)
    for i in range(2):
        save_adapter(tmp_path / f"a{i}.safetensors", model.unet, alpha=8.0)
    assert (tmp_path / "a0.safetensors").read_bytes() == (tmp_path / "a1.safetensors").read_bytes()
