"""scikit-learn's breast cancer data (569 tumours, 30 features, 2 classes): the applications' second data
set, standardized with the training split's statistics."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def load_all() -> tuple[np.ndarray, np.ndarray]:
    """The 569 examples in their file's order: features (float64, raw) and labels (int32, 1 = benign).
    Cached; do not modify the arrays."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return d.data, d.target.astype(np.int32)


def load_split(n_train: int = 300, n_val: int = 100, seed: int = 0) -> dict:
    """Shuffle with ``seed``, split train/val/test (test: the rest), standardize every split with the training
    features' mean and deviation. Returns float32 ``x_train, x_val, x_test`` and int32 ``y_*``."""
    x, y = load_all()
    if n_train < 2 or n_val < 1 or n_train + n_val >= len(y):
        raise ValueError(f"n_train={n_train} and n_val={n_val} must be >= 2 and >= 1 and leave test examples of "
                         f"the {len(y)}")
    perm = np.random.default_rng(seed).permutation(len(y))
    parts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:]}
    mean, std = x[parts["train"]].mean(0), x[parts["train"]].std(0) + 1e-8
    out = {}
    for name, rows in parts.items():
        out[f"x_{name}"] = ((x[rows] - mean) / std).astype(np.float32)
        out[f"y_{name}"] = y[rows]
    return out
