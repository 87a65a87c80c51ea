"""Image files (ldm/images.py): ours (rounded, JPEG 95) and the release's (truncated to uint8, PIL's default JPEG)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.images import save_images, to_pil


def decoded(seed: int = 0) -> torch.Tensor:
    """A decoded-like batch [2, 3, 16, 16] with values beyond [-1, 1] and on exact level boundaries."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.7
    x[0, 0, 0, :4] = torch.tensor([-1.5, 1.5, 2 * (100 / 255) - 1, 2 * (100.5 / 255) - 1])
    return x


def release_bytes(x: torch.Tensor) -> list[bytes]:
    """A restatement of the release's writer: clamp((x + 1) / 2) * 255 -> uint8 -> PIL .save(path) defaults."""
    out = []
    for a in torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).cpu().numpy():
        img = Image.fromarray((255.0 * a.transpose(1, 2, 0)).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def test_release_format_writes_the_release_bytes(tmp_path):
    x = decoded()
    paths = [tmp_path / f"{i:05d}.jpg" for i in range(2)]
    save_images(x, paths, "release")
    assert [p.read_bytes() for p in paths] == release_bytes(x)
    save_images(x, paths, "ours")  # the default differs: rounding and quality 95
    assert [p.read_bytes() for p in paths] != release_bytes(x)


def test_truncate_and_round_differ_by_at_most_one_level():
    x = decoded(1)
    t = np.stack([np.asarray(i, dtype=np.int16) for i in to_pil(x, "truncate")])
    r = np.stack([np.asarray(i, dtype=np.int16) for i in to_pil(x, "round")])
    assert 0 <= (r - t).min() and (r - t).max() <= 1 and (r - t).sum() > 0
    assert t[0, 0, 0, 0] == 0 and t[0, 0, 1, 0] == 255  # clamped


def test_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding"):
        to_pil(decoded(), "floor")
