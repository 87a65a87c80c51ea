"""Seeded draws of the stability test: start codes x_T and DDPM timesteps t, from CPU generators, so that a seed
gives the same draws on CPU and CUDA and whatever the batching.

The release drew its start codes on its device (on CUDA its numbers differ from these).
"""
import torch

from ldm.erasure.stability import StabilitySettings
from ldm.models.diffusion.ddim import ddpm_t_range

SEED_MODULUS = 2 ** 64  # torch.Generator.manual_seed takes [0, 2^64): larger seeds are reduced mod 2^64


def reduce_seed(seed: int) -> int:
    """A seed torch accepts: seed mod 2^64 (I2P's seeds are all below 2^32, so unchanged there)."""
    return int(seed) % SEED_MODULUS


def t_range(settings: StabilitySettings, num_timesteps: int = 1000) -> tuple[int, int]:
    """[lo, hi): the DDPM timesteps of the test's t (the DDIM step after the partial trajectory)."""
    return ddpm_t_range(settings.ddim_steps, settings.t_enc, num_timesteps)


class DrawStream:
    """Draw i of a seed: (x_T^i [C, h, w], t^i). x_T from one CPU generator seeded with `seed` (one randn of
    [1, C, h, w] per draw, as the release's repeats), t from a second one seeded with `seed` (draw 0's t is the
    release's fixed t). Draws are made on demand and kept, so draw i never depends on how draws are batched."""

    def __init__(self, seed: int, shape: tuple[int, int, int], t_lo: int, t_hi: int):
        seed = reduce_seed(seed)
        self.shape, self.lo, self.hi = tuple(shape), t_lo, t_hi
        self._gx, self._gt = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        self._x: list[torch.Tensor] = []
        self._t: list[int] = []

    def take(self, i0: int, i1: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._x) < i1:
            self._x.append(torch.randn((1, *self.shape), generator=self._gx)[0])
            self._t.append(int(torch.randint(self.lo, self.hi, (1,), generator=self._gt)))
        return torch.stack(self._x[i0:i1]), torch.tensor(self._t[i0:i1], dtype=torch.long)


def release_row_draws(seed: int, repeats: int, shape: tuple[int, int, int], t_lo: int, t_hi: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's per-row draws (generate_images_nsfw.py): `repeats` start codes randn(1, C, h, w) of a generator
    seeded with `seed`, and ONE t = randint(lo, hi, (1,)) of a fresh generator with the same seed -> (x [r, C, h, w],
    t [1])."""
    gen = torch.Generator().manual_seed(reduce_seed(seed))
    codes = torch.cat([torch.randn((1, *shape), generator=gen) for _ in range(repeats)])
    t = torch.randint(t_lo, t_hi, (1,), generator=torch.Generator().manual_seed(reduce_seed(seed)))
    return codes, t
