"""SepCE / SRS-ME (ldm/erasure/sepce.py) on the tiny model: the null space, the objective against a two-copy
restatement, the momentum stop, composition by summation, file I/O, the weight residual, bad input. CPU."""
import copy
import math
from pathlib import Path

import pytest
import torch

from helpers_model import tiny_model
from ldm.erasure.delta import adapters_disabled, delta_layers, inject_delta, remove_delta
from ldm.erasure.io import load_adapter, read_adapter, save_adapter
from ldm.erasure.sepce import (BasisDelta, MomentumStop, SepCESettings, build_sepce_method, encode_with_ids,
                               momentum_stop_at, null_space, preserve_basis, relative_residual, token_rows,
                               weight_residual)
from ldm.erasure.targets import select_targets
from ldm.erasure.training import Trainer
from ldm.errors import UserError
from test_lora import eps, inputs

TARGET = "a photo of the cat"
PRESERVE = ["a photo of the forest"]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_model(0).requires_grad_(False)


def settings(**kw):
    kw = {"preserve": PRESERVE, "tokens": "content", "images": 2, "image_steps": 2, "ddim_steps": 4,
          "lr": 1e-1, "iterations": 50, **kw}
    return SepCESettings(**kw)


def build(model, seed=0, **kw):
    return build_sepce_method(model, TARGET, settings(**kw), torch.Generator().manual_seed(seed),
                              latent_shape=model.latent_shape(16))


def randomise(model, name="lora", seed=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in delta_layers(model.unet, name).values():
            v = getattr(m, name).V
            v.copy_(torch.randn(v.shape, generator=g) * scale)


def test_null_space_is_orthonormal_and_annihilates_the_rows():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 64, generator=g, dtype=torch.float64)
    rows = torch.cat([rows, rows[:3] * 2.0])                        # dependent rows do not add dimensions
    basis, residual = null_space(rows, rtol=1e-6)
    assert basis.shape == (54, 64)
    torch.testing.assert_close(basis @ basis.T, torch.eye(54, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (rows @ basis.T).abs().max() < 1e-12 and residual < 1e-14
    full = torch.randn(70, 64, generator=g)                          # 70 generic rows fill 64 dimensions
    assert null_space(full, 1e-6)[0].shape[0] == 0
    # an approximate null space: directions with singular value <= rtol * s_max join it, residual bounded by it
    u, _, vh = torch.linalg.svd(torch.randn(64, 64, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -6, 64, dtype=torch.float64)
    almost = u @ torch.diag(s) @ vh
    basis, residual = null_space(almost, rtol=1e-3)
    assert basis.shape[0] == int((s <= 1e-3).sum()) and 0 < residual <= 1e-3 * float(almost.norm(dim=1).min()) ** -1


def test_weights_are_separable_on_the_preserved_tokens(base):
    model = copy.deepcopy(base)
    method, info = build(model)
    assert info["dims"] > 40 and info["residual_content"] < 1e-12
    randomise(model)
    kept = weight_residual(model, "lora", PRESERVE)
    moved = weight_residual(model, "lora", [TARGET])
    assert kept["content"] < 1e-5, kept
    assert moved["content"] > 1e-2, moved
    # the same through the layers themselves: to_k / to_v outputs of the preserved content tokens do not change
    emb, ids = encode_with_ids(model, ["", *PRESERVE])
    content, _ = token_rows(emb, ids)                                # [Nc, 64]
    for layer in delta_layers(model.unet).values():
        with torch.no_grad():
            y = layer(content)
            with adapters_disabled(model.unet):
                y0 = layer(content)
        assert ((y - y0).norm(dim=-1) / y0.norm(dim=-1)).max() < 1e-5


def test_weight_residual_is_the_plain_ratio(base):
    model = copy.deepcopy(base)
    build(model)
    randomise(model, scale=0.3)
    emb = model.get_learned_conditioning([""] + PRESERVE).double().reshape(-1, 64)        # [154, 64]
    want = 0.0
    for m in delta_layers(model.unet).values():
        d = m.lora.alpha * (m.lora.V.detach().double() @ m.lora.B.double())                      # [out, 64]
        want = max(want, float(((emb @ d.T).norm(dim=1) / (emb @ m.weight.double().T).norm(dim=1)).max()))
    assert weight_residual(model, "lora", PRESERVE)["all"] == pytest.approx(want, rel=1e-6)  # dW formed in fp32 there


def test_loss_equals_a_two_copy_restatement(base):
    model = copy.deepcopy(base)
    method, _ = build(model, reg_beta=1e-3)
    randomise(model, scale=0.5)
    obj = method.objective
    loss, plan = obj.loss(torch.Generator().manual_seed(7))
    # plain: the draws again, the base model as its own copy, the edited model on each prompt separately
    g = torch.Generator().manual_seed(7)
    index = int(torch.randint(obj.latents.shape[0], (1,), generator=g))
    t_enc = int(torch.randint(4, (1,), generator=g))
    t = int(torch.randint(round(t_enc / 4 * 1000), round((t_enc + 1) / 4 * 1000), (1,), generator=g))
    noise = torch.randn((1, *obj.latents.shape[1:]), generator=g)
    assert (index, t_enc, t) == (plan.index, plan.t_enc, plan.t)
    ab = base.alphas_cumprod[t]
    z = ab.sqrt() * obj.latents[index:index + 1] + (1 - ab).sqrt() * noise
    tt = torch.tensor([t])
    c_k, c_u = (base.get_learned_conditioning([p]) for p in (TARGET, ""))
    s_k, s_u = eps(base, z, tt, c_k), eps(base, z, tt, c_u)
    e_k, e_u = eps(model, z, tt, c_k), eps(model, z, tt, c_u)
    corr = ((e_k - e_u) * (s_k - s_u)).mean()
    reg = sum((m.lora.alpha * m.lora.V @ m.lora.B).abs().sum() for m in delta_layers(model.unet).values())
    reg = reg / len(delta_layers(model.unet))
    torch.testing.assert_close(loss.detach(), corr + 1e-3 * reg, atol=1e-6, rtol=1e-5)
    assert obj.history == [pytest.approx(float(corr), rel=1e-4, abs=1e-8)]


def test_momentum_stop_on_a_constructed_sequence():
    # ema = 0.9^k after a 1 and k zeros: below 0.5 at k = 7 (iteration 8), but not before iteration 12
    assert momentum_stop_at([1.0] + [0.0] * 30, threshold=0.5) == 12
    assert momentum_stop_at([1.0] + [0.0] * 30, threshold=0.2) == 17      # 0.9^16 = 0.185 < 0.2 < 0.9^15
    assert momentum_stop_at([1.0] * 40, threshold=0.5) is None
    assert momentum_stop_at([1.0] * 40, threshold=0.5, cap=25) == 25
    capped = MomentumStop(0.5, cap=3)
    assert [capped.update(1.0) for _ in range(3)] == [False, False, True] and capped.reason == "cap"
    rule = MomentumStop(0.0)
    for v in [0.3, 0.1, -0.2]:
        rule.update(v)
    assert rule.ema == pytest.approx(0.9 * (0.9 * 0.3 + 0.1 * 0.1) + 0.1 * -0.2)


def test_training_updates_v_only_and_stops_by_momentum(base):
    model = copy.deepcopy(base)
    method, _ = build(model, threshold=1e9)                          # the EMA is below at once: stop at 12
    before = {k: v.detach().clone() for k, v in method.tensors.items()}
    trainer = Trainer(method, 1e-1, torch.Generator().manual_seed(0))
    while not method.objective.stop_requested:
        trainer.step()
    assert trainer.done == 12 and method.objective.rule.reason == "momentum"
    for k, v in method.tensors.items():
        assert torch.equal(v, before[k]) == k.endswith(".basis.B"), k
    assert weight_residual(model, "lora", PRESERVE)["content"] < 1e-5


def test_two_deltas_sum_and_removing_one_leaves_exactly_the_other(base, tmp_path):
    both = copy.deepcopy(base)
    build(both)
    randomise(both, seed=1)
    save_adapter(tmp_path / "a.safetensors", both.unet, alpha=1e-2)
    remove_delta(both.unet)
    build_sepce_method(both, "a photo of the dog", settings(), torch.Generator().manual_seed(2),
                       latent_shape=both.latent_shape(16), name="b")
    randomise(both, "b", seed=2)
    load_adapter(tmp_path / "a.safetensors", both.unet, name="a")
    x, t, c = inputs(b=2)
    out_both = eps(both, x, t, c)
    summed = copy.deepcopy(base)
    with torch.no_grad():
        for path, m in delta_layers(both.unet).items():
            summed.unet.get_submodule(path).weight += m.a.delta_weight() + m.b.delta_weight()
    torch.testing.assert_close(out_both, eps(summed, x, t, c), atol=1e-5, rtol=1e-5)
    remove_delta(both.unet, "b")
    only_a = copy.deepcopy(base)
    load_adapter(tmp_path / "a.safetensors", only_a.unet, name="a")
    assert torch.equal(eps(both, x, t, c), eps(only_a, x, t, c))
    remove_delta(both.unet, "a")
    assert torch.equal(eps(both, x, t, c), eps(base, x, t, c))


def test_save_and_load_round_trip_through_io(base, tmp_path):
    model = copy.deepcopy(base)
    method, info = build(model)
    randomise(model)
    method.save(tmp_path / "sepce.safetensors", {"status": "complete"})
    tensors, meta = read_adapter(tmp_path / "sepce.safetensors")
    assert meta["delta_kind"] == "basis" and meta["method"] == "sepce" and float(meta["alpha"]) == 1e-2
    assert meta["null_dims"] == str(info["dims"]) and meta["status"] == "complete"
    assert len(tensors) == 2 * len(select_targets(base.unet, "default")) == 2 * len(delta_layers(model.unet))
    fresh = copy.deepcopy(base)
    loaded = load_adapter(tmp_path / "sepce.safetensors", fresh.unet)
    assert loaded.kind == "basis" and loaded.rank == info["dims"]
    for path, m in delta_layers(fresh.unet).items():
        want = model.unet.get_submodule(path).lora
        assert isinstance(m.lora, BasisDelta) and torch.equal(m.lora.B, want.B) and torch.equal(m.lora.V, want.V)
    x, t, c = inputs(b=2)
    assert torch.equal(eps(fresh, x, t, c), eps(model, x, t, c))


def test_bad_input_is_one_line(base):
    model = copy.deepcopy(base)
    emb, ids = encode_with_ids(model, ["", *PRESERVE])
    with pytest.raises(UserError, match="leave 0 of 64 dimensions"):
        preserve_basis(emb, ids, "all", 1e-6, None)                   # 154 generic tokens fill 64 dimensions
    for bad in ({"threshold": math.nan}, {"reg_beta": math.inf}, {"scale_factor": -math.inf}):
        name, value = next(iter(bad.items()))
        with pytest.raises(UserError, match=f"{name} must be a finite number, got {value}"):
            build(copy.deepcopy(base), **bad)
    with pytest.raises(UserError, match="among the preserved prompts"):
        build_sepce_method(model, PRESERVE[0], settings(), torch.Generator(), latent_shape=(4, 8, 8))
    assert not delta_layers(model.unet)
    assert relative_residual(torch.zeros(0, 64), emb[0]) == 0.0


def test_train_py_method_sepce_writes_a_separable_basis_delta(tmp_path, capsys):
    """train.py --method sepce on the toy model: the file is a "basis" delta that every reader loads, whose shift
    leaves the preserved prompts' content tokens alone; LoRA-only flags are refused in one line."""
    import json
    import train
    from ldm.cli import run
    from ldm.erasure.io import load_adapter
    from ldm.erasure.sepce import weight_residual
    from ldm.loader import load_model_from_config
    root = Path(__file__).resolve().parents[1]
    toy = [str(root / "configs/toy/digits-inference.yaml"), str(root / "models/toy-digits.safetensors")]
    preserve = ["a photo of the digit seven", "a photo of the digit five"]
    argv = ["--method", "sepce", "--config_path", toy[0], "--ckpt_path", toy[1], "--device", "cpu",
            "--prompts_json", str(root / "data/digits/three.json"), "--preserve", *preserve, "--sepce_tokens",
            "content", "--sepce_pad_rtol", "0.1", "--sepce_images", "2", "--iterations", "3", "--lr", "1.0",
            "--output_dir", str(tmp_path), "--run_name", "sep", "--ddim_steps", "10"]
    assert train.main(argv) == 0
    assert "SepCE separability: max ||dW e|| / ||W e||" in capsys.readouterr().out
    config = json.loads((tmp_path / "sep" / "train_config.json").read_text())
    assert config["status"] == "complete"
    model = load_model_from_config(toy[0], toy[1], verbose=False)
    info = load_adapter(tmp_path / "sep" / "models" / "lora.safetensors", model.unet)
    assert info.metadata["delta_kind"] == "basis"
    assert weight_residual(model, "lora", preserve)["content"] < 1e-5
    with pytest.raises(SystemExit) as e:
        run(lambda: train.main(argv[:-2] + ["--lora_rank", "2"]))
    assert e.value.code == 2 and "not options of --method sepce" in capsys.readouterr().err
