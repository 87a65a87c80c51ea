"""ldm/evaluation/fid.py against pytorch-fid (requirements-reference.txt) on random weights, without downloads.

pytorch-fid builds its network with `fid_inception_v3()`: torchvision's Inception v3 (1008 classes, no aux head)
with the FID blocks FIDInceptionA / C / E_1 / E_2, then fetches the TF weights from the network. Here that fetch
(`pytorch_fid.inception.load_state_dict_from_url`) returns a file written by the test instead: torchvision's
Inception v3 with random weights whose BatchNorm statistics are not the identity (measured on random images in
train mode, then perturbed), so every layer's arithmetic shows. Our loader reads the same file. Compared: the
2048-d pool features of the same PNG files through each pipeline (pytorch-fid's get_activations: PIL, ToTensor,
bilinear 299, 2x - 1; ours: fid.features), and the Fréchet distance (ours vs calculate_frechet_distance)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_reference import block_downloads, reference
from ldm.evaluation import fid

N_IMAGES = 8
FID_DIMS = 256  # scipy's sqrtm of a 2048 x 2048 product takes ~30 s on one thread: the distance on the first 256


def random_inception(tv, seed: int = 0) -> torch.nn.Module:
    """torchvision's Inception v3 as pytorch-fid builds it, random: convolutions He-normal, BatchNorm affine random,
    running statistics measured on random images (train mode, cumulative) then perturbed."""
    torch.manual_seed(seed)
    net = tv.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, (2.0 / m.weight[0].numel()) ** 0.5)
    for m in bns:
        torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        torch.nn.init.normal_(m.bias, 0.0, 0.2)
        m.momentum = None  # cumulative average over the calibration batch
        m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299) * 2 - 1)
    for m in bns:
        m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.3))
        m.running_mean.add_(0.2 * torch.randn_like(m.running_mean) * m.running_var.sqrt())
    assert all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    return net.eval()


def write_images(folder: Path, kind: str, seed: int) -> list[Path]:
    """N_IMAGES 64 x 64 PNGs: uniform noise, or colour ramps with noise (two distributions)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(N_IMAGES):
        if kind == "noise":
            a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        else:
            ramp = np.linspace(0, 255, 64)[None, :, None] * rng.uniform(0.2, 1.0, 3)
            a = (ramp + rng.normal(0, 20, (64, 64, 3))).clip(0, 255).astype(np.uint8)
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tv, inception, fid_score = reference("torchvision.models", "pytorch_fid.inception", "pytorch_fid.fid_score")
    tmp = tmp_path_factory.mktemp("fidref")
    net = random_inception(tv)
    weights = tmp / "pt_inception-random.pth"
    torch.save(net.state_dict(), weights)
    urls = []

    def fetch(url, *args, **kwargs):  # pytorch-fid's one download: our file instead
        urls.append(url)
        return torch.load(weights, map_location="cpu", weights_only=True)
    with pytest.MonkeyPatch.context() as mp:
        block_downloads(mp)
        mp.setattr(inception, "load_state_dict_from_url", fetch)
        ref = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    assert urls == [inception.FID_WEIGHTS_URL]
    assert isinstance(ref.blocks[3][2], inception.FIDInceptionE_2)  # the FID network, not torchvision's
    files = {"a": write_images(tmp / "a", "noise", 1), "b": write_images(tmp / "b", "ramps", 2)}
    want = {k: fid_score.get_activations([str(p) for p in v], ref, batch_size=N_IMAGES, dims=2048, device="cpu",
                                         num_workers=0) for k, v in files.items()}
    ours = fid.load_inception(str(weights))
    got = {k: fid.features(ours, v) for k, v in files.items()}
    return {"tv_net": net, "fid_score": fid_score, "want": want, "got": got, "files": files, "weights": weights}


def test_pool_features_match_pytorch_fid(setup):
    for k in ("a", "b"):
        want, got = setup["want"][k], setup["got"][k]
        assert want.shape == got.shape == (N_IMAGES, 2048)
        diff = np.abs(got - want)
        rel = diff.max() / np.abs(want).max()
        print(f"FID features set {k} vs pytorch-fid: max abs {diff.max():.3g}, max rel {rel:.3g} (features: mean "
              f"{want.mean():.3g}, std {want.std():.3g})")
        assert rel <= 1e-5
        assert want.std() > 0 and (want > 0).mean() > 0.5  # real signal, not a network of zeros
    # torchvision's own Inception v3 (no FID patches) on the same weights differs: the comparison can tell
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in setup["files"]["a"]]))
    x = x.permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        tv_net = setup["tv_net"]
        tv_net.fc = torch.nn.Identity()
        plain = tv_net(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear",
                                                       align_corners=False) * 2 - 1).double().numpy()
    assert np.abs(plain - setup["want"]["a"]).max() / np.abs(setup["want"]["a"]).max() > 1e-3


def test_frechet_distance_matches_pytorch_fid(setup):
    fs = setup["fid_score"]

    def stats(f):  # pytorch-fid's calculate_activation_statistics on FID_DIMS dimensions
        f = f[:, :FID_DIMS]
        return np.mean(f, axis=0), np.cov(f, rowvar=False)
    want = fs.calculate_frechet_distance(*stats(setup["want"]["a"]), *stats(setup["want"]["b"]))
    same = fid.frechet_distance(*stats(setup["want"]["a"]), *stats(setup["want"]["b"]))
    mine = fid.frechet_distance(*fid.statistics(setup["got"]["a"][:, :FID_DIMS]),
                                *fid.statistics(setup["got"]["b"][:, :FID_DIMS]))
    print(f"FID ({FID_DIMS} of 2048 dims, {N_IMAGES} + {N_IMAGES} images): pytorch-fid {want:.10g}, ours on its "
          f"features {same:.10g}, ours end to end {mine:.10g}")
    assert want > 0
    assert same == pytest.approx(want, rel=1e-9)
    assert mine == pytest.approx(want, rel=1e-6)
    # and a set against itself: 0
    assert fid.frechet_distance(*stats(setup["got"]["a"]), *stats(setup["got"]["a"])) == pytest.approx(0, abs=1e-3)


def test_fid_of_folders_hands_the_distance_pytorch_fids_statistics(setup):
    """fid_of_folders end to end (folders -> files -> features -> mean and covariance -> distance): the statistics
    it hands the distance are pytorch-fid's (calculate_activation_statistics: np.mean, np.cov of its features)."""
    seen = []
    with pytest.MonkeyPatch.context() as mp:  # the distance itself is checked above (2048-d sqrtm: ~30 s)
        mp.setattr(fid, "frechet_distance", lambda *stats: seen.append(stats) or 1.0)
        assert fid.fid_of_folders([setup["files"]["a"][0].parent], [setup["files"]["b"][0].parent],
                                  setup["weights"], device="cpu") == 1.0
    (mu1, s1, mu2, s2), = seen
    for mu, s, k in ((mu1, s1, "a"), (mu2, s2, "b")):
        want = setup["want"][k]
        scale = np.abs(want).max()
        assert np.abs(mu - np.mean(want, axis=0)).max() <= 1e-5 * scale
        assert np.abs(s - np.cov(want, rowvar=False)).max() <= 1e-5 * scale ** 2
