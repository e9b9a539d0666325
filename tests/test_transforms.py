"""Training-time augmentations: what each does, that only training sees them, and
that bad names or non-image data are refused before training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd.data.transforms import apply, build_transforms, gaussian_noise, random_crop, random_flip
from kd.errors import InputError


def images(n: int = 64) -> torch.Tensor:
    return torch.arange(n * 2 * 4 * 4, dtype=torch.float32).reshape(n, 2, 4, 4)


def test_random_flip_mirrors_about_half() -> None:
    x = images()
    out = random_flip(x, torch.Generator().manual_seed(0))
    same = [(o == i).all().item() for o, i in zip(out, x)]
    flipped = [(o == i.flip(-1)).all().item() for o, i in zip(out, x)]
    assert all(s or f for s, f in zip(same, flipped))
    assert 16 < sum(flipped) < 48


def test_random_crop_is_a_zero_filled_shift() -> None:
    x = images(32) + 1  # no zeros inside, so the fill is visible
    out = random_crop(x, torch.Generator().manual_seed(1), pad=1)
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    shifts = set()
    for k in range(len(x)):
        match = [(oy, ox) for oy in range(3) for ox in range(3)
                 if torch.equal(out[k], padded[k, :, oy:oy + 4, ox:ox + 4])]
        assert match, k
        shifts.add(match[0])
    assert len(shifts) > 3  # offsets vary per image


def test_gaussian_noise_has_the_stated_std() -> None:
    x = torch.zeros(256, 1, 8, 8)
    noise = gaussian_noise(x, torch.Generator().manual_seed(2), std=0.05)
    assert abs(noise.mean().item()) < 0.005 and abs(noise.std().item() - 0.05) < 0.005


def test_same_seed_same_views() -> None:
    fns = build_transforms(["random_flip", "random_crop"], (2, 4, 4), False)
    a = apply(fns, images(), torch.Generator().manual_seed(3))
    b = apply(fns, images(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, images())


def test_bad_names_and_inputs() -> None:
    with pytest.raises(InputError, match="unknown transform 'random_rotate'"):
        build_transforms(["random_rotate"], (1, 8, 8), False)
    with pytest.raises(InputError, match="need float image inputs"):
        build_transforms(["random_flip"], (16,), True)
    assert build_transforms([], (16,), True) == []


def test_the_loop_augments_training_batches_only() -> None:
    """The student (and an online teacher) see the augmented view in training; eval
    sees the raw input."""
    from kd.losses import LossContext, build_composite
    from kd.train.step import Step

    seen: list[torch.Tensor] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return self.fc(x.flatten(1))

    teacher = Probe().eval()
    loss = build_composite([{"name": "kd", "weight": 1.0}], 1.0, LossContext(4.0, 3))
    asm = type("Asm", (), {"teachers": [teacher], "loss": loss, "student_paths": [],
                           "teacher_paths": []})()
    student = Probe()
    step = Step(asm, student, torch.device("cpu"), torch.float32,
                build_transforms(["gaussian_noise"], (2, 4, 4), False), seed=0)
    batch = {"x": images(8), "y": torch.zeros(8, dtype=torch.long)}
    step(batch)
    assert not torch.equal(seen[0], batch["x"])  # the student saw an augmented view
    assert torch.equal(seen[0], seen[1])  # ...and the teacher saw the same view
    student.eval()
    seen.clear()
    step(batch)
    assert torch.equal(seen[0], batch["x"])
