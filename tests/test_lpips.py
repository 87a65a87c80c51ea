"""ldm/evaluation/lpips.py against the lpips package (v0.1; requirements-reference.txt), built without downloads:
its trunk is torchvision's AlexNet / VGG16 with random weights (pnet_rand), its lin layers the calibrated ones the
package ships (weights/v0.1/*.pth). Our model reads the same tensors from files, in each form the docstring names,
and must give the same distances (float32, relative 1e-5)."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers_reference import block_downloads, reference
from ldm.errors import UserError
from ldm.evaluation import lpips as ours

RTOL = 1e-5


@pytest.fixture(scope="module")
def lp():
    return reference("lpips")[0]


def shipped_lin(lp, net: str):
    from pathlib import Path
    return Path(lp.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def reference_model(lp, monkeypatch, net: str, seed: int):
    """lpips.LPIPS(net) on a torchvision trunk of random weights (returned too, with its state dict in
    torchvision's own names) and the package's calibrated lin layers."""
    tv = reference("torchvision.models")[0]
    block_downloads(monkeypatch)
    torch.manual_seed(seed)
    trunk = (tv.alexnet if net == "alex" else tv.vgg16)(weights=None)
    for p in trunk.features.parameters():  # torchvision's init leaves biases 0: give them values too
        if p.dim() == 1:
            torch.nn.init.uniform_(p, -0.1, 0.1)
    build = tv.alexnet if net == "alex" else tv.vgg16

    def build_trunk(pretrained, **kw):
        assert pretrained is False and not kw  # random trunk: nothing to fetch
        return trunk
    monkeypatch.setattr(lp.pretrained_networks.tv, build.__name__, build_trunk)
    ref = lp.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False).eval()
    assert ref.net.slice1[0] is trunk.features[0]  # the reference runs on exactly this trunk
    return ref, trunk


def image_pairs(seed: int, n: int = 6, size=(64, 64)):
    """Pairs from unrelated to nearly equal: x1 = x0 + noise of growing strength (clamped to [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, *size, generator=g)
    strength = torch.linspace(0.02, 1.0, n).view(n, 1, 1, 1)
    x1 = (x0 + strength * (torch.rand(n, 3, *size, generator=g) - 0.5)).clamp(0, 1)
    return x0, x1


def compare(ref, model, x0, x1):
    with torch.no_grad():
        want, want_layers = ref(x0, x1, retPerLayer=True, normalize=True)  # normalize: inputs in [0, 1]
        got, got_layers = model(x0, x1, per_layer=True)
    want = want.flatten()
    assert got.shape == want.shape
    rel = ((got - want).abs() / want.abs()).max().item()
    for w, g in zip(want_layers, got_layers):
        assert torch.allclose(g, w.flatten(), rtol=RTOL, atol=0)
    return rel, (got - want).abs().max().item(), want


def test_alexnet_from_torchvision_trunk_file_and_shipped_lin_file(lp, tmp_path, monkeypatch):
    ref, trunk = reference_model(lp, monkeypatch, "alex", seed=0)
    torch.save(trunk.state_dict(), tmp_path / "alexnet-trunk.pth")  # features.* and classifier.*, torchvision's names
    lin = shipped_lin(lp, "alex")  # saved from CUDA tensors, in torch's legacy format: read onto the CPU
    model = ours.load_lpips([lin, tmp_path / "alexnet-trunk.pth"])
    assert model.net == "alex" and torch.equal(model.lin2.weight, ref.lin2.model[1].weight)
    x0, x1 = image_pairs(1)
    rel, abs_, want = compare(ref, model, x0, x1)
    print(f"LPIPS alex vs lpips {lp.__name__}: max rel {rel:.2e}, max abs {abs_:.2e}, distances {want.tolist()}")
    assert rel <= RTOL
    assert want.min() > 0 and (want.diff() > 0).all()  # noise of growing strength: growing distances
    # the same in the other file order, and at a size that is neither square nor a multiple of 32
    model = ours.load_lpips([tmp_path / "alexnet-trunk.pth", lin])
    assert compare(ref, model, *image_pairs(2, n=2, size=(48, 80)))[0] <= RTOL
    # identical images: 0
    assert model(x0, x0).abs().max().item() == 0.0


def test_one_combined_file_of_each_form_gives_the_same_model(lp, tmp_path, monkeypatch):
    ref, trunk = reference_model(lp, monkeypatch, "alex", seed=3)
    # the lpips module's own state dict (net.slice<s>.<i>.*, lin<k> and its alias lins.<k>, scaling buffers)
    torch.save(ref.state_dict(), tmp_path / "lpips-module.pth")
    # torchvision's features.* + lpips' lin<k>.model.1.weight merged into one safetensors file
    lin = torch.load(shipped_lin(lp, "alex"), map_location="cpu", weights_only=True)
    save_file({**{k: v.contiguous() for k, v in trunk.state_dict().items()}, **lin}, str(tmp_path / "both.safetensors"))
    x0, x1 = image_pairs(4)
    for f in ("lpips-module.pth", "both.safetensors"):
        assert compare(ref, ours.load_lpips(tmp_path / f), x0, x1)[0] <= RTOL, f


def test_vgg16_variant(lp, tmp_path, monkeypatch):
    ref, trunk = reference_model(lp, monkeypatch, "vgg", seed=5)
    features = {k: v for k, v in trunk.state_dict().items() if k.startswith("features.")}
    save_file(features, str(tmp_path / "vgg16-features.safetensors"))
    model = ours.load_lpips([shipped_lin(lp, "vgg"), tmp_path / "vgg16-features.safetensors"], net="vgg")
    rel, abs_, _ = compare(ref, model, *image_pairs(6, n=3, size=(32, 32)))
    print(f"LPIPS vgg vs lpips: max rel {rel:.2e}, max abs {abs_:.2e}")
    assert rel <= RTOL
    with pytest.raises(UserError, match=r"not the LPIPS alex weights: 6 tensor\(s\) missing, e.g. features.3.bias"):
        ours.read_state([shipped_lin(lp, "alex"), tmp_path / "vgg16-features.safetensors"], "alex")


def test_small_images_are_upsampled_to_64_before_the_network(lp, tmp_path, monkeypatch):
    ref, trunk = reference_model(lp, monkeypatch, "alex", seed=7)
    torch.save(ref.state_dict(), tmp_path / "lpips.pth")
    model = ours.load_lpips(tmp_path / "lpips.pth")
    x0, x1 = image_pairs(8, n=3, size=(16, 16))  # the toy world's size: too small for AlexNet as it is
    with pytest.raises(RuntimeError):
        model(x0, x1)
    up = [F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False) for x in (x0, x1)]
    with torch.no_grad():
        want = ref(*up, normalize=True).flatten()
    assert torch.allclose(ours.distance(model, x0, x1), want, rtol=RTOL, atol=0)
    x0, x1 = image_pairs(9, n=2, size=(16, 32))  # the shorter side to 64, the aspect kept: 64 x 128
    up = [F.interpolate(x, size=(64, 128), mode="bilinear", align_corners=False) for x in (x0, x1)]
    with torch.no_grad():
        assert torch.allclose(ours.distance(model, x0, x1), ref(*up, normalize=True).flatten(), rtol=RTOL, atol=0)


def test_bad_weight_files_are_one_line(lp, tmp_path):
    lin = shipped_lin(lp, "alex")
    cases = [
        ([lin], "10 tensor(s) missing, e.g. features.0.bias (torchvision's alexnet-owt-7be5be79.pth holds the "
                "trunk features.*)"),
        ([tmp_path / "nope.pth"], "nope.pth: LPIPS weights file not found"),
    ]
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    cases.append(([tmp_path / "junk.pth"], "junk.pth: not a weights file torch can read safely"))
    trunk = {k: v for k, v in ours.LPIPS("alex").state_dict().items() if k.startswith("features")}
    save_file(trunk, str(tmp_path / "trunk.safetensors"))
    cases.append(([tmp_path / "trunk.safetensors"], "e.g. lin0.weight (the lpips package's weights/v0.1/alex.pth"))
    other = {k: v + 1 for k, v in trunk.items()}
    save_file(other, str(tmp_path / "trunk2.safetensors"))
    cases.append(([tmp_path / "trunk.safetensors", tmp_path / "trunk2.safetensors"], "with other values"))
    for paths, message in cases:
        with pytest.raises(UserError) as err:
            ours.read_state(paths, "alex")
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(UserError, match="'squeeze': 'alex' or 'vgg'"):
        ours.read_state([lin], "squeeze")
