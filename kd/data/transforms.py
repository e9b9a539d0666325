"""Training-time augmentations, applied per batch in the loop to float image inputs
``[B, C, H, W]`` before the student (and an online teacher) see them.

They are random, so the teacher must run online with them (the config refuses them
with ``teacher.cache``); validation, holdout and the cache see the raw inputs.
Each transform is ``fn(x, generator) -> x`` and is named in ``data.transforms``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kd.errors import InputError
from kd.plugins import Registry

TRANSFORMS = Registry("transform")
# A transform returns a new tensor and never writes into ``x``: a batch can be a
# read-only view of Ray's shared object store, read again by the next epoch.
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@TRANSFORMS.register("random_flip")
def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    out = x.clone()
    out[flip] = x[flip].flip(-1)
    return out


@TRANSFORMS.register("random_crop")
def random_crop(x: torch.Tensor, gen: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Zero-pad by ``pad`` pixels and crop back to the original size at a random
    offset per image (a shift of up to ``pad`` pixels in each direction)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (len(x),), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (len(x),), generator=gen)
    out = torch.empty_like(x)
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            m = (dy == oy) & (dx == ox)
            if m.any():
                out[m] = padded[m, ..., oy:oy + h, ox:ox + w]
    return out


@TRANSFORMS.register("gaussian_noise")
def gaussian_noise(x: torch.Tensor, gen: torch.Generator, std: float = 0.05) -> torch.Tensor:
    """Add ``N(0, std²)`` noise to every pixel."""
    return x + std * torch.randn(x.shape, generator=gen).to(x.dtype)


def build_transforms(names: list[str], input_shape: tuple[int, ...], integer_inputs: bool) -> list[Transform]:
    """The transforms named in ``data.transforms``, checked against the data: they
    need float image inputs ``[C, H, W]``."""
    fns = [TRANSFORMS.get(n) for n in names]
    if fns and (integer_inputs or len(input_shape) != 3):
        raise InputError(f"data.transforms {names}: augmentations need float image inputs "
                         f"[C, H, W], the data has {'integer ' if integer_inputs else ''}"
                         f"inputs of shape {list(input_shape)}")
    return fns


def apply(fns: list[Transform], x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Apply the transforms in order (on the CPU generator's stream), keep the device."""
    if not fns:
        return x
    device = x.device
    x = x.cpu()
    for fn in fns:
        x = fn(x, gen)
    return x.to(device)
