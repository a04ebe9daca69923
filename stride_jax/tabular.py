"""Small classification data sets shipped with the package: digits, breast cancer, wine.

The arrays are scikit-learn's bundled copies of three UCI data sets, exported once into
`assets/<name>.npz` by `experiments/build_tabular_data.py` (provenance and licences in
`assets/SOURCES.md`); nothing here imports scikit-learn.

`load_splits(name)` returns train / val / test `data.Examples` from one seeded, class-stratified
split: inputs float32 [N, F] standardised with train-split statistics only, targets int32 [N],
ids = the row of the example in the original data set (stable across splits and seeds).
Queries for choosing settings come from `val`; reported numbers come from `test`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

from stride_jax.data import ASSETS_DIR, Examples

DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine")
Scaling = Literal["feature", "global"]
# digits: one mean/std over all pixels (they share a scale; per-pixel standardisation blows up
# border pixels that are almost always 0). The others: per-feature standardisation.
DEFAULT_SCALING: dict[str, Scaling] = {"digits": "global", "breast_cancer": "feature", "wine": "feature"}
IMAGE_SHAPE: dict[str, tuple[int, int, int]] = {"digits": (8, 8, 1)}


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Fractions of each class held out for validation and test queries, and the split seed."""

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    scaling: Scaling | None = None  # None: DEFAULT_SCALING[name]

    def __post_init__(self) -> None:
        if not (0 < self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"need 0 < val_fraction, test_fraction and their sum < 1, got {self}")
        if self.scaling not in (None, "feature", "global"):
            raise ValueError(f"scaling must be 'feature', 'global' or None, got {self.scaling!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class TabularSplits:
    """train / val / test Examples of one data set plus what a model config needs."""

    name: str
    train: Examples
    val: Examples
    test: Examples
    n_classes: int
    n_features: int
    mean: np.ndarray  # the train statistics the inputs were standardised with
    std: np.ndarray
    feature_names: tuple[str, ...]
    target_names: tuple[str, ...]


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown tabular data set {name!r}; expected one of {DATASETS}")


@functools.cache
def _raw(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    path = ASSETS_DIR / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with experiments/build_tabular_data.py")
    with np.load(path, allow_pickle=False) as z:
        x, y = z["X"], z["y"]
        feature_names, target_names = tuple(map(str, z["feature_names"])), tuple(map(str, z["target_names"]))
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y, feature_names, target_names


def load_raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The shipped arrays (X [N, F] as stored: uint8 for digits, float64 otherwise; y [N] uint8)."""
    _check_name(name)
    x, y, _, _ = _raw(name)
    return x, y


def split_indices(y: np.ndarray, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted row indices of (train, val, test): per class, a seeded permutation cut by fraction."""
    rng = np.random.default_rng(cfg.seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_val = max(1, int(round(cfg.val_fraction * len(rows))))
        n_test = max(1, int(round(cfg.test_fraction * len(rows))))
        if n_val + n_test >= len(rows):
            raise ValueError(f"class {c} has {len(rows)} rows: too few to split {cfg}")
        parts[1].append(rows[:n_val])
        parts[2].append(rows[n_val:n_val + n_test])
        parts[0].append(rows[n_val + n_test:])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def load_splits(name: str, cfg: SplitConfig = SplitConfig()) -> TabularSplits:
    """Seeded stratified split of data set `name`, standardised with train statistics."""
    _check_name(name)
    x_raw, y_raw, feature_names, target_names = _raw(name)
    train_idx, val_idx, test_idx = split_indices(y_raw, cfg)
    x = x_raw.astype(np.float64)
    scaling = cfg.scaling or DEFAULT_SCALING[name]
    if scaling == "global":
        mean = np.full(x.shape[1], x[train_idx].mean())
        std = np.full(x.shape[1], x[train_idx].std())
    else:
        mean, std = x[train_idx].mean(axis=0), x[train_idx].std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)  # a constant feature stays 0 after centring
    x_NxF = ((x - mean) / std).astype(np.float32)
    y_N = y_raw.astype(np.int32)

    def examples(idx: np.ndarray) -> Examples:
        return Examples(inputs=np.ascontiguousarray(x_NxF[idx]), targets=y_N[idx], ids=idx.astype(np.int64))

    return TabularSplits(
        name=name, train=examples(train_idx), val=examples(val_idx), test=examples(test_idx),
        n_classes=len(target_names), n_features=x.shape[1], mean=mean.astype(np.float32),
        std=std.astype(np.float32), feature_names=feature_names, target_names=target_names,
    )


__all__ = ["DATASETS", "IMAGE_SHAPE", "SplitConfig", "TabularSplits", "load_raw", "load_splits", "split_indices"]
