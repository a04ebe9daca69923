"""Data selection (the paper's tab:selection_results): pick k pool records per target by each
method's scores on the target's validation queries, fine-tune a fresh copy on them, score the
target's held-out test records.

    picks = select_top_k(scores_NxQ, val_cols, k)          # a method's k, highest summed score
    exact_SxT = ...                                        # one row per seed of greedy exact match
    summary = bootstrap_means({"stride": exact_SxT, ...})  # mean, interval, difference vs random

The harness (`experiment._data_selection`) builds the selections of every method and reference
per target, fine-tunes them in one `finetune_many` call per target (the pool's frozen trunk
computed once) and caches the per-seed, per-record hits in the run directory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["select_top_k", "draw", "bootstrap_means"]


def select_top_k(scores_NxQ: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """The k pool rows with the highest score summed over query columns `cols` (ties: lower row
    first; NaN scores rank last)."""
    total = np.asarray(scores_NxQ, np.float64)[:, np.asarray(cols)].sum(axis=1)
    if k > len(total):
        raise ValueError(f"k = {k} exceeds the pool's {len(total)} records")
    total = np.where(np.isnan(total), -np.inf, total)
    return np.argsort(-total, kind="stable")[:k]


def draw(candidates: np.ndarray, k: int, seed: Any) -> np.ndarray:
    """k of `candidates` without replacement, from `np.random.default_rng(seed)`."""
    candidates = np.asarray(candidates)
    if k > len(candidates):
        raise ValueError(f"cannot draw {k} of {len(candidates)} candidates")
    return np.sort(np.random.default_rng(seed).choice(candidates, size=k, replace=False))


def bootstrap_means(hits: dict[str, np.ndarray], *, baseline: str | None = "random", n_boot: int = 1000,
                    seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per method: the mean of its [seeds, test records] hits, a 95% interval from resampling
    seeds and records (the same draws for every method: records and seed s are shared), the
    per-seed means, and (when `baseline` is one of them) the difference from the baseline with
    its interval and the share of draws in which the method is not above it."""
    names = list(hits)
    arr = np.stack([np.asarray(hits[m], np.float64) for m in names])  # [methods, S, T]
    if arr.ndim != 3:
        raise ValueError(f"hits must be [seeds, records] per method, got shape {arr.shape[1:]}")
    _, s, t = arr.shape
    rng = np.random.default_rng(seed)
    si, ti = rng.integers(0, s, (n_boot, s)), rng.integers(0, t, (n_boot, t))
    boot = np.stack([arr[:, a][:, :, b].mean(axis=(1, 2)) for a, b in zip(si, ti)])  # [B, methods]
    out = {}
    for j, m in enumerate(names):
        lo, hi = np.percentile(boot[:, j], [2.5, 97.5])
        row = {"mean": float(arr[j].mean()), "ci95": [float(lo), float(hi)],
               "per_seed": [float(x) for x in arr[j].mean(axis=1)], "n_test": int(t), "seeds": int(s)}
        if baseline in hits and m != baseline:
            b = names.index(baseline)
            diff = boot[:, j] - boot[:, b]
            dlo, dhi = np.percentile(diff, [2.5, 97.5])
            row["vs_" + baseline] = {"diff": float(arr[j].mean() - arr[b].mean()), "ci95": [float(dlo), float(dhi)],
                                     "p_not_above": float((diff <= 0).mean())}
        out[m] = row
    return out
