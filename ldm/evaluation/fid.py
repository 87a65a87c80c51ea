"""FID (Fréchet Inception Distance) from a LOCAL Inception file; nothing is downloaded.

No maintained FID package fits this project's rules: pytorch-fid, clean-fid and torchmetrics (through
torch-fidelity) fetch their Inception weights from the network at run time and need torchvision, which the project
does not install. So this module holds our own restatement of the standard FID pipeline (pytorch-fid's, the one the
erasure papers report):
    network   the TensorFlow FID Inception v3 (2015-12-05) in PyTorch: torchvision's Inception v3 layout with the
              FID patches (average pools that leave the padding out; max pool in the last block's pool branch),
              up to the 2048-wide global average pool
    weights   a file the user provides: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a state dict, read
              with torch.load(weights_only=True): no unpickling of code) or the same tensors as .safetensors;
              its 1008-way `fc` layer is not used
    input     RGB in [0, 1], resized bilinearly to 299 x 299, scaled to [-1, 1]
    distance  ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over the two sets' feature means and covariances
              (scipy's sqrtm; eps * I added to both covariances when the product is singular)
Numbers are comparable with pytorch-fid's on the same files up to JPEG decoding and resize details.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.evaluation.common import UserError, decode_image, list_images
from ldm.evaluation.weights import read_tensors


class Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU: torchvision's BasicConv2d, same parameter names."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):  # TensorFlow's average pool: padded zeros do not count
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = Conv(cin, pool, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class BlockB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = Conv(c7, c7, **h)
        self.branch7x7_3 = Conv(c7, 192, **v)
        self.branch7x7dbl_1 = Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = Conv(c7, c7, **v)
        self.branch7x7dbl_3 = Conv(c7, c7, **h)
        self.branch7x7dbl_4 = Conv(c7, c7, **v)
        self.branch7x7dbl_5 = Conv(c7, 192, **h)
        self.branch_pool = Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{k}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class BlockD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b = x
        for k in range(1, 5):
            b = getattr(self, f"branch7x7x3_{k}")(b)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the FID network's last block pools with max (its first with TF's average)
        self.branch1x1 = Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The FID Inception v3 up to its 2048-wide pool features; parameter names as in pytorch-fid's weights file."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = Conv(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, H, W] RGB in [0, 1] -> [N, 2048]."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file: safetensors, or a torch state dict read with weights_only=True."""
    return read_tensors(path, "Inception weights")


@lru_cache(maxsize=1)
def load_inception(path: str, device: str = "cpu") -> FIDInception:
    """The FID network with the file's weights; every parameter and buffer must be there with its shape (the
    file's classifier `fc.*` is ignored)."""
    net = FIDInception()
    state = {k: v for k, v in read_weights(path).items() if not k.startswith("fc.")}
    own = net.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))  # older files lack it
    extra = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or extra or shape:
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
                f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else f"{len(shape)} misshapen (e.g. {shape[0]})")
        raise UserError(f"{path}: not the FID Inception weights: {what} tensors")
    net.load_state_dict(state, strict=False)  # every tensor checked above
    return net.eval().to(device)


@torch.no_grad()
def features(net: FIDInception, paths: list[Path], batch: int = 32, device: str = "cpu") -> np.ndarray:
    """[N, 2048] pool features of the image files (unreadable ones are skipped)."""
    out = []
    for i in range(0, len(paths), batch):
        arrays = [a for a in (decode_image(p)[0] for p in paths[i:i + batch]) if a is not None]
        if not arrays:
            continue
        size = max(max(a.shape[:2]) for a in arrays)
        x = torch.stack([F.interpolate(torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255.0,
                                       size=(size, size), mode="bilinear", align_corners=False)[0] for a in arrays])
        out.append(net(x.to(device)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048))


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) of two Gaussians."""
    from scipy import linalg
    mu1, mu2, s1, s2 = (np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(s1), np.atleast_2d(s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError("the two sets' statistics differ in shape")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # a singular product: regularise both covariances
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm: imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(feats) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_of_folders(images: list[Path], reference: list[Path], weights: str | Path, device: str = "cpu") -> float:
    """FID between the images under the `images` folders and those under the `reference` folders."""
    dev = "cpu" if device in ("auto", None) and not torch.cuda.is_available() else (
        "cuda" if device == "auto" else device)
    net = load_inception(str(weights), dev)
    a = features(net, [p for f in images for p in list_images(f)], device=dev)
    b = features(net, [p for f in reference for p in list_images(f)], device=dev)
    return frechet_distance(*statistics(a), *statistics(b))
