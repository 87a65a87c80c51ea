"""Adapter export (ldm/erasure/export.py, scripts/tools/export_lora.py): diffusers' own loaders must reproduce our eps.

Our tiny model (random weights moved off their initial values) gets an adapter with random, non-zero B; its base
weights go to diffusers' UNet2DConditionModel through diffusers' own LDM converter, the exported file through
diffusers' own LoRA loader (the functions `StableDiffusionPipeline.load_lora_weights` runs). Same inputs must
give the same eps, and both must differ from the base model's.

    pytest tests/test_export.py -s
"""
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers_model import FULL, REPO, TINY, config_dict, diffusers_unet, rel_err, tiny_model
from ldm.loader import release_state_dict
from ldm.erasure.export import (block_map, diffusers_path, from_kohya, kohya_name, load_unet_config, meta_unet)
from ldm.erasure.io import save_adapter
from ldm.erasure.lora import adapters_disabled, inject_lora, lora_layers, lora_state_dict
from ldm.erasure.targets import select_targets

pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loading runs on PEFT

TOL = 1e-5
# (preset, rank, alpha): alpha 8 is the release's; the nsfw case has rank 2 and a non-power-of-two alpha so that
# an alpha / r mix-up or a lost alpha shows.
CASES = [("default", 1, 8.0), ("nsfw", 2, 3.0)]


def export(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run scripts/tools/export_lora.py in-process, as `ldm.cli.run` runs it: (exit code, stdout, stderr)."""
    from scripts.tools import export_lora
    from ldm.cli import run
    old = sys.argv
    sys.argv = ["export_lora.py", *argv]
    code = 0
    try:
        run(export_lora.main)
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base():
    model = tiny_model(seed=3)
    # the base weights, before any adapter; cloned: diffusers' models are loaded by assignment, fuse_lora writes
    # into their weights, which must not be our model's
    return model, {k: v.clone() for k, v in release_state_dict(model).items()}


def adapted_unet(model, preset: str, rank: int, alpha: float):
    """A deep copy of the tiny UNet with an adapter on `preset`, B random and non-zero.

    B ~ N(0, 0.01^2): eps moves by 10-40% of its size, a clear effect that keeps the network well conditioned
    (B ~ 0.05 doubles the weights of some layers, and fp32 rounding differences then grow to ~1e-5).
    """
    import copy
    unet = copy.deepcopy(model.model.diffusion_model)
    g = torch.Generator().manual_seed(11)
    layers = inject_lora(unet, select_targets(unet, preset), rank=rank, alpha=alpha, generator=g)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora.B.copy_(0.01 * torch.randn(layer.lora.B.shape, generator=g))
    return unet


def inputs(unet, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    width = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([17, 803]), torch.randn(2, 77, width, generator=g))


def diffusers_with_lora(released, path):
    """diffusers' UNet (base weights via its LDM converter) + the LoRA file via the pipeline's own loader."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader  # StableDiffusionPipeline's LoRA half
    ref = diffusers_unet({k: v.clone() for k, v in released.items()}, config_dict(TINY))
    state_dict, network_alphas = Loader.lora_state_dict(str(path))  # kohya files are converted here
    Loader.load_lora_into_unet(state_dict, network_alphas, ref, adapter_name="unguide")  # -> unet.load_lora_adapter
    return ref


# -----------------------------------------------------------------------------
# the key map

@pytest.mark.parametrize("config", [TINY, FULL], ids=["tiny", "sd-v1"])
def test_key_map_matches_diffusers_converter(config):
    """Every parameter of our UNet maps to the key diffusers' LDM converter gives it (meta tensors: no memory)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    uc = load_unet_config(config)
    unet, blocks = meta_unet(uc), block_map(uc.params)
    sd = unet.state_dict()
    released = {"model.diffusion_model." + k: v for k, v in sd.items()}
    converted = convert_ldm_unet_checkpoint(released, create_unet_diffusers_config_from_ldm(config_dict(config), released))
    ours = {}
    for key in sd:
        module, _, leaf = key.rpartition(".")
        ours[f"{diffusers_path(module, blocks)}.{leaf}"] = key
    assert set(ours) == set(converted)
    assert all(converted[d].shape == sd[k].shape for d, k in ours.items())
    linears = [n for n, m in unet.named_modules() if type(m) is torch.nn.Linear]
    assert set(select_targets(unet, "full")) == set(linears)  # "full" is every Linear: all of them mapped above


# -----------------------------------------------------------------------------
# diffusers / PEFT layout

@pytest.mark.parametrize("preset,rank,alpha", CASES)
@torch.no_grad()
def test_diffusers_export_reproduces_eps(base, preset, rank, alpha, tmp_path, capsys):
    model, released = base
    unet = adapted_unet(model, preset, rank, alpha)
    ours_path, out_path = tmp_path / "ours.safetensors", tmp_path / "exp" / "diffusers.safetensors"
    save_adapter(ours_path, unet, alpha)
    code, out, err = export(["--lora", str(ours_path), "--format", "diffusers", "--output", str(out_path),
                             "--config", str(TINY)], capsys)
    assert code == 0, err
    assert "wrote" in out and "gating" in out

    sd = load_file(str(out_path))
    targets = list(lora_layers(unet))
    assert len(sd) == 2 * len(targets)
    blocks = block_map(load_unet_config(TINY).params)
    for name, layer in lora_layers(unet).items():
        d = f"unet.{diffusers_path(name, blocks)}"
        assert sd[f"{d}.lora_A.weight"].shape == (rank, layer.in_features)
        assert sd[f"{d}.lora_B.weight"].shape == (layer.out_features, rank)

    x, t, ctx = inputs(unet)
    ours = unet(x, t, ctx)
    with adapters_disabled(unet):
        ours_base = unet(x, t, ctx)
    ref = diffusers_with_lora(released, out_path)
    theirs = ref(x, t, encoder_hidden_states=ctx).sample
    ref.disable_adapters()
    theirs_base = ref(x, t, encoder_hidden_states=ctx).sample
    ref.enable_adapters()

    err_lora, err_base = rel_err(ours, theirs), rel_err(ours_base, theirs_base)
    effect = rel_err(ours, ours_base)
    print(f"\n[export] diffusers {preset} r={rank} alpha={alpha:g}: eps relative max error {err_lora:.2e} "
          f"(base {err_base:.2e}); adapter effect {effect:.2e}")
    assert err_base < TOL
    assert err_lora < TOL
    assert effect > 1e-3 and rel_err(theirs, theirs_base) > 1e-3  # the adapter matters: the test can fail

    ref.fuse_lora(adapter_names=["unguide"])  # fused into the weights: the same function
    fused = ref(x, t, encoder_hidden_states=ctx).sample
    print(f"[export] diffusers {preset} fused: eps relative max error {rel_err(ours, fused):.2e}")
    assert rel_err(ours, fused) < TOL


# -----------------------------------------------------------------------------
# kohya layout

@pytest.mark.parametrize("preset,rank,alpha", CASES + [("full", 1, 8.0)])
@torch.no_grad()
def test_kohya_export(base, preset, rank, alpha, tmp_path, capsys):
    model, released = base
    unet = adapted_unet(model, preset, rank, alpha)
    ours_path, out_path = tmp_path / "ours.safetensors", tmp_path / "kohya.safetensors"
    save_adapter(ours_path, unet, alpha)
    code, out, err = export(["--lora", str(ours_path), "--format", "kohya", "--output", str(out_path),
                             "--config", str(TINY)], capsys)
    assert code == 0, err

    sd = load_file(str(out_path))
    with safe_open(str(out_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == str(rank) and float(meta["ss_network_alpha"]) == alpha * rank
    assert "gating" in meta["unguide_note"]
    uc = load_unet_config(TINY)
    blocks = block_map(uc.params)
    layers = lora_layers(unet)
    assert len(sd) == 3 * len(layers)
    for name, layer in layers.items():
        k = kohya_name(diffusers_path(name, blocks))
        assert k.startswith("lora_unet_") and "." not in k
        assert sd[f"{k}.lora_down.weight"].shape == (rank, layer.in_features)
        assert sd[f"{k}.lora_up.weight"].shape == (layer.out_features, rank)
        assert sd[f"{k}.alpha"].dim() == 0
        assert sd[f"{k}.alpha"].item() / rank == pytest.approx(alpha, rel=1e-7)  # kohya's scale alpha / r is ours
    if preset == "default":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in {
            k.split(".")[0] for k in sd}

    # our inverse gives back A and B exactly, and the scale
    linears = [n for n, m in meta_unet(uc).named_modules() if type(m) is torch.nn.Linear]
    back, scales = from_kohya(sd, linears, blocks)
    mine = lora_state_dict(unet)
    assert set(back) == set(mine)
    assert all(torch.equal(back[k], mine[k]) for k in mine)
    assert all(s == pytest.approx(alpha, rel=1e-7) for s in scales.values())

    # diffusers' own kohya converter (what load_lora_weights runs on A1111 files) reproduces our eps
    x, t, ctx = inputs(unet)
    ours = unet(x, t, ctx)
    ref = diffusers_with_lora(released, out_path)
    err = rel_err(ours, ref(x, t, encoder_hidden_states=ctx).sample)
    print(f"\n[export] kohya {preset} r={rank} alpha={alpha:g} via diffusers' kohya converter: "
          f"eps relative max error {err:.2e}")
    assert err < TOL


@torch.no_grad()
def test_release_pth_default_alpha(base, tmp_path, capsys):
    """A release lora.pth has no metadata: alpha 8 unless --alpha says otherwise."""
    model, _ = base
    unet = adapted_unet(model, "default", 1, 8.0)
    pth = tmp_path / "lora.pth"
    torch.save({k: v.clone() for k, v in lora_state_dict(unet).items()}, pth)
    for extra, want in (([], 8.0), (["--alpha", "2.5"], 2.5)):
        out = tmp_path / f"k{want}.safetensors"
        code, _, err = export(["--lora", str(pth), "--format", "kohya", "--output", str(out), "--config", str(TINY),
                               *extra], capsys)
        assert code == 0, err
        alphas = {v.item() for k, v in load_file(str(out)).items() if k.endswith(".alpha")}
        assert alphas == {want}


# -----------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written

def _bad_case(tmp_path, kind, capsys):
    good = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora.A": torch.randn(64, 1),
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora.B": torch.randn(1, 32)}
    out = tmp_path / "out.safetensors"
    if kind == "unknown module":
        tensors = {**good, "input_blocks.99.1.proj.lora.A": torch.randn(8, 1), "input_blocks.99.1.proj.lora.B":
                   torch.randn(1, 8)}
    elif kind == "missing B":
        tensors = {k: v for k, v in good.items() if k.endswith(".A")}
    elif kind == "wrong shape":
        tensors = {**good, "input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora.A": torch.randn(768, 1)}
    elif kind == "existing output":
        tensors = good
        out.write_bytes(b"keep me")
    elif kind == "missing input":
        tensors = None
    elif kind == "not safetensors output":
        tensors, out = good, tmp_path / "out.pt"
    else:
        raise AssertionError(kind)
    src = tmp_path / "in.safetensors"
    if tensors is not None:
        save_file(tensors, str(src), metadata={"alpha": "8.0"})
    before = out.read_bytes() if out.exists() else None
    code, stdout, err = export(["--lora", str(src), "--format", "diffusers", "--output", str(out),
                                "--config", str(TINY)], capsys)
    return code, err, out, before


@pytest.mark.parametrize("kind", ["unknown module", "missing B", "wrong shape", "existing output",
                                  "missing input", "not safetensors output"])
def test_bad_input_one_line_exit_2(tmp_path, kind, capsys):
    code, err, out, before = _bad_case(tmp_path, kind, capsys)
    lines = err.strip().splitlines()
    print(f"\n[export] {kind}: {err.strip()}")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert (out.read_bytes() if out.exists() else None) == before  # nothing written or replaced
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_cli_subprocess(tmp_path, base):
    """The script as users run it: a real process, --overwrite replaces, the reminder is printed."""
    model, _ = base
    unet = adapted_unet(model, "default", 1, 8.0)
    src, out = tmp_path / "ours.safetensors", tmp_path / "k.safetensors"
    save_adapter(src, unet, 8.0)
    out.write_bytes(b"old")
    cmd = [sys.executable, "-m", "scripts.tools.export_lora", "--lora", str(src), "--format", "kohya",
           "--output", str(out), "--config", str(TINY), "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "per-prompt gating" in proc.stdout
    assert len(load_file(str(out))) == 3 * len(lora_layers(unet))


def test_export_takes_the_config_the_adapter_was_trained_with(tmp_path, capsys):
    """A toy-model adapter exports without --config: train.py records its config in the adapter's metadata."""
    import train
    root = REPO
    assert train.main(["--config_path", str(root / "configs/toy/digits-inference.yaml"), "--ckpt_path",
                       str(root / "models/toy-digits.safetensors"), "--prompts_json", str(root / "data/digits/three.json"),
                       "--iterations", "1", "--output_dir", str(tmp_path), "--run_name", "r", "--device", "cpu"]) == 0
    code, out, err = export(["--lora", str(tmp_path / "r/models/lora.safetensors"), "--format", "kohya",
                             "--output", str(tmp_path / "k.safetensors")], capsys)
    assert code == 0, err
    assert "recorded in" in out and len(load_file(str(tmp_path / "k.safetensors"))) == 3 * 8
