"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), version
0.1 of the `lpips` package, from LOCAL weight files; nothing is downloaded, torchvision is not needed.

    network   a feature trunk with torchvision's layer layout and parameter names (`features.<i>.weight/bias`):
              AlexNet (default, lpips' `net='alex'`), tapped after its five ReLUs (features 1, 4, 7, 9, 11), or
              VGG16 (`net='vgg'`), tapped at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (features 3, 8, 15, 22, 29)
    input     RGB in [0, 1] -> 2x - 1 -> lpips' scaling layer (x - shift) / scale, shift (-.030, -.088, -.188),
              scale (.458, .448, .450)
    distance  per tapped layer: unit-normalise each pixel's channel vector (f / (||f||_2 + 1e-10)), square the
              difference of the two images', weight the channels with the learned 1x1 layer lin<k> (no bias),
              average over the pixels; sum over the five layers

Weights: given as one or more files (safetensors, or torch state dicts read with torch.load(weights_only=True):
no unpickling of code), whose tensors together hold
    the trunk      torchvision's `features.*` tensors: its ImageNet file `alexnet-owt-7be5be79.pth` (or
                   `vgg16-397923af.pth` for net 'vgg'); the file's `classifier.*` is ignored
    the lin layers lpips' `lin<k>.model.1.weight` [1, C, 1, 1]: the lpips package ships them as
                   `lpips/weights/v0.1/alex.pth` (or `vgg.pth`)
So the usual form is the two files as they come (lin file and trunk file, in either order), or one file holding
both sets (e.g. the two merged and saved as .safetensors). A saved `lpips.LPIPS(...).state_dict()` is read too
(its trunk is named `net.slice<s>.<i>.*`, the same `<i>` as torchvision's; its scaling buffers are the constants
above and are not read). Every tensor must be there with its shape; a tensor given by two files is refused.

Small images: lpips' AlexNet needs at least 31 px per side (VGG16: 16 px); `distance` upsamples (bilinear) images
whose shorter side is below `min_size` (64, the size of lpips' training patches) to that size, keeping the aspect
ratio, before the network. The module itself (`LPIPS.forward`) never resizes, as the lpips package.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.evaluation.weights import read_tensors

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NETS = {  # per trunk: torchvision's `features` layout (channels, "M" = max pool), the tapped ReLUs' indices
    "alex": {"taps": (1, 4, 7, 9, 11), "channels": (64, 192, 384, 256, 256),
             "files": ("alexnet-owt-7be5be79.pth", "alex.pth")},
    "vgg": {"taps": (3, 8, 15, 22, 29), "channels": (64, 128, 256, 512, 512),
            "files": ("vgg16-397923af.pth", "vgg.pth")},
}
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _trunk(net: str) -> nn.Sequential:
    """torchvision's `features` up to the last tapped ReLU (the same indices, so its state dict keys match)."""
    if net == "alex":
        layers = [nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
                  nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
                  nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                  nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
    elif net == "vgg":
        layers, cin = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
    else:
        raise UserError(f"LPIPS network {net!r}: 'alex' or 'vgg'")
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS v0.1: trunk `features` (torchvision's names) and lin0..lin4 (1x1, no bias)."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net = net
        self.features = _trunk(net)
        self.taps = NETS[net]["taps"]
        for k, c in enumerate(NETS[net]["channels"]):
            setattr(self, f"lin{k}", nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five tapped activations of x: [N, 3, H, W] RGB in [0, 1]."""
        x = ((2 * x - 1) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, per_layer: bool = False):
        """[N] distances between x0[i] and x1[i] (RGB in [0, 1], same shape); per_layer: also the five terms."""
        if x0.shape != x1.shape or x0.dim() != 4 or x0.shape[1] != 3:
            raise ValueError(f"LPIPS compares two [N, 3, H, W] batches of one shape, got {tuple(x0.shape)} and "
                             f"{tuple(x1.shape)}")
        terms = []
        for k, (f0, f1) in enumerate(zip(self.layers(x0), self.layers(x1))):
            f0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            f1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            terms.append(getattr(self, f"lin{k}")((f0 - f1) ** 2).mean(dim=(2, 3)).flatten())
        total = torch.stack(terms).sum(0)
        return (total, terms) if per_layer else total


# ------------------------------------------------------------------------------------------------ weights

def _read(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path, "LPIPS weights")

def _own_name(key: str) -> str | None:
    """A file's tensor name -> ours (None: not used). torchvision: features.<i>.*; lpips' module: net.slice<s>.<i>.*,
    lin<k>.model.<j>.weight and its alias lins.<k>.model.<j>.weight (j: 1 after lpips' dropout, 0 without)."""
    parts = key.split(".")
    if parts[0] in ("classifier", "scaling_layer") or parts[0] in ("shift", "scale"):
        return None
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
        return f"features.{parts[2]}.{parts[3]}"
    if parts[0].startswith("lin") and len(parts) == 4 and parts[1] == "model" and parts[3] == "weight":
        return f"{parts[0]}.weight"
    if parts[0] == "lins" and len(parts) == 5 and parts[2] == "model" and parts[4] == "weight":  # lpips' alias
        return f"lin{parts[1]}.weight"
    return key


def read_state(paths, net: str = "alex") -> dict[str, torch.Tensor]:
    """The tensors of the files `paths` (one path or a list), named as our LPIPS(net)'s and checked against it."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if net not in NETS:
        raise UserError(f"LPIPS network {net!r}: 'alex' or 'vgg'")
    if not paths:
        raise UserError("LPIPS needs its weights: the lin file and the trunk file, or one file holding both")
    where = " + ".join(str(p) for p in paths)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for p in paths:
        for key, value in _read(p).items():
            name = _own_name(key)
            if name is None or name.endswith("num_batches_tracked"):
                continue
            if name in state:  # lpips' module holds lin<k> twice (lin<k>, lins.<k>): the same tensor is fine
                if state[name].shape == value.shape and torch.equal(state[name], value):
                    continue
                raise UserError(f"{p}: tensor {key} is also in {origin[name]}, with other values (give each LPIPS "
                                "tensor once)")
            state[name], origin[name] = value, p
    own = LPIPS(net).state_dict()
    missing = sorted(set(own) - set(state), key=lambda k: (not k.startswith("features"), k))
    extra = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    trunk, lin = NETS[net]["files"]
    if missing:
        hint = (f"torchvision's {trunk} holds the trunk features.*" if missing[0].startswith("features")
                else f"the lpips package's weights/v0.1/{lin} holds lin0..lin4")
        raise UserError(f"{where}: not the LPIPS {net} weights: {len(missing)} tensor(s) missing, e.g. {missing[0]} "
                        f"({hint})")
    if extra or shape:
        what = (f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}" if extra else
                f"{len(shape)} of another shape, e.g. {shape[0]} {tuple(state[shape[0]].shape)} (expected "
                f"{tuple(own[shape[0]].shape)})")
        raise UserError(f"{where}: not the LPIPS {net} weights: {what}")
    return state


@lru_cache(maxsize=2)
def _load(paths: tuple[str, ...], net: str, device: str) -> LPIPS:
    model = LPIPS(net)
    model.load_state_dict(read_state(list(paths), net))
    return model.eval().requires_grad_(False).to(device)


def load_lpips(paths, net: str = "alex", device: str = "cpu") -> LPIPS:
    """LPIPS(net) with the weights of the files `paths` (see the module docstring), in eval mode."""
    paths = (str(paths),) if isinstance(paths, (str, Path)) else tuple(str(p) for p in paths)
    return _load(paths, net, device)


@torch.no_grad()
def distance(model: LPIPS, x0: torch.Tensor, x1: torch.Tensor, min_size: int = 64) -> torch.Tensor:
    """[N] LPIPS distances of two batches of RGB images in [0, 1]; images whose shorter side is below min_size
    are upsampled (bilinear) so that it is min_size."""
    short = min(x0.shape[-2:])
    if short < min_size:
        size = tuple(round(s * min_size / short) for s in x0.shape[-2:])
        x0, x1 = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (x0, x1))
    dev = next(model.parameters()).device
    return model(x0.to(dev, torch.float32), x1.to(dev, torch.float32)).cpu()
