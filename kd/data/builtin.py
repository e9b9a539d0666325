"""Built-in data sets: ``digits`` (scikit-learn's real 8x8 digits) and ``synthetic``.

Both return ``(x, y)`` arrays; x is float32 ``[N, 1, 8, 8]`` style images.
"""

from __future__ import annotations

import numpy as np

from kd.data.registry import DATASETS


@DATASETS.register("digits")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """1,797 real 8x8 handwritten digits, 10 classes; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    return x, d.target.astype(np.int64)


@DATASETS.register("synthetic")
def synthetic(
    n: int = 512, num_classes: int = 4, shape: tuple[int, ...] | list[int] = (1, 8, 8),
    noise: float = 1.0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters: x = mean[y] + noise * N(0, 1), one random mean per class."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    means = rng.normal(0.0, 1.0, size=(num_classes, *shape)).astype(np.float32)
    y = rng.integers(0, num_classes, size=n).astype(np.int64)
    x = means[y] + noise * rng.normal(0.0, 1.0, size=(n, *shape)).astype(np.float32)
    return x.astype(np.float32), y
