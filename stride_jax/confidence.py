"""Confidence of STRIDE scores: how stable each query's top-k is when the operators are resampled.

    attr = stride.attribute(queries)
    attr = confidence.attach(stride, attr, stride.responses(stride.measure(queries)), n_boot=50)
    attr.stability[q, 0]     # [k] how often each of query q's top-k helpful rows stays top-k
    attr.interval[q, 0]      # [k, 2] their scores' percentile intervals

For a query with responses y in R^K and penalty lambda of the full solve (`Attribution.lambdas`),
each of B draws keeps a random m = round(fraction K) of the K operators, without replacement, and
re-solves the Lasso on those rows of y and of M alone (no refit, no new measurement):

    w_b = argmin_w  1/2 ||y_{R_b} - M_{R_b} w||_2^2 + (m / K) lambda ||w||_1,

with the solver and settings of `stride.cfg.recovery`. The data term sums over m rows instead of
K, so lambda is scaled by m / K: the penalty per row (scikit-learn's `alpha` = lambda / K) is
the full solve's. For each of the full solve's top-k helpful rows i (and top-k harmful ones):

    stability_i = fraction of the draws that saw i in which w_b[i] > 0 and w_b[i] is among w_b's
                  k largest (harmful: w_b[i] < 0 and among the k smallest);
    interval_i  = the (1 - level) / 2 and (1 + level) / 2 percentiles of w_b[i] over those draws.

A draw "saw" i when at least one kept operator's subset holds i (probability 1 - (1 - fraction)^d);
one that did not has no data on i, which says nothing of its stability (at d = 5 and fraction
1/2, 3% of the draws miss a given example). A row no draw saw gets NaN in both.

Why half of the operators without replacement (`fraction=0.5`) and not the bootstrap's K draws
with replacement: (1) for a mean over the K operators, a half-sample without replacement has
variance (s^2 / m)(1 - m / K) = s^2 / K, the bootstrap's own, so the spread is on the same scale
(half-sampling, Efron & Tibshirani 1993, ch. 6); (2) it is the recipe of stability selection for
the Lasso (Meinshausen & Buehlmann, JRSS-B 2010), whose selection frequencies `stability` is;
(3) no row is repeated, so a draw is a plain row selection of M with no weights. A larger
`fraction` makes draws more alike (fraction -> 1 gives stability 1 for everything); a smaller one
makes them noisier than the full solve.

A draw's M is dense ([m + 1, N + 1] float32, rows selected from `Design.dense()`, which refuses
K x N above 5e7 entries). The columns of examples no kept operator saw join one extra row with
response 0 and a ghost column (the solvers refuse an empty column): a block apart from the rest,
whose Lasso solution is exactly 0. All draws have one shape: one compiled solver for all of them.
Cost: B solves of all Q queries; `Confidence.seconds` reports it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any

import numpy as np

from stride_jax import recovery
from stride_jax.scores import Attribution
from stride_jax.config import RecoveryConfig
from stride_jax.design import Design

log = logging.getLogger("stride_jax")

HELPFUL, HARMFUL = 0, 1  # the kind axis of `Confidence` arrays
SOLVERS = ("working_set", "fista")  # the recovery.solver values a draw can re-run


@dataclasses.dataclass(frozen=True)
class Confidence:
    """Stability and intervals of each query's top-k rows (kind axis: 0 helpful, 1 harmful).

    rows [Q, 2, k]: the full solve's top-k row indices into the pool (helpful by descending score,
    harmful by ascending), k = min(k, N). stability [Q, 2, k] in [0, 1]. interval [Q, 2, k, 2]:
    (low, high) percentiles of the row's score over the draws. seconds: wall time of the draws.
    """

    rows: np.ndarray
    stability: np.ndarray
    interval: np.ndarray
    n_boot: int
    fraction: float
    level: float
    seed: int
    seconds: float

    def info(self) -> dict[str, Any]:
        """The settings and cost, JSON-able (`Attribution.confidence_info`)."""
        return {"n_boot": self.n_boot, "fraction": self.fraction, "level": self.level, "seed": self.seed,
                "k": int(self.rows.shape[-1]), "seconds": round(self.seconds, 3),
                "method": "operator subsampling without replacement (stride_jax.confidence)"}


def _check(y_QxK: np.ndarray, design: Design, attr: Attribution, rc: RecoveryConfig, n_boot: int, k: int,
           fraction: float, level: float) -> None:
    """Every input check, before any solve; each message names the argument."""
    if rc.solver not in SOLVERS:
        raise ValueError(f"confidence re-solves with the Lasso: recovery.solver must be one of {SOLVERS}, "
                         f"got {rc.solver!r}")
    for name, value in (("n_boot", n_boot), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n_boot < 2:
        raise ValueError(f"n_boot (draws) must be >= 2, got {n_boot}")
    if k < 1:
        raise ValueError(f"k (top entries per query and kind) must be >= 1, got {k}")
    n_subsets = design.n_subsets
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction (of the K operators kept per draw) must lie in (0, 1), got {fraction}")
    if not 1 <= round(fraction * n_subsets) <= n_subsets - 1:
        raise ValueError(f"fraction={fraction} of K={n_subsets} operators keeps {round(fraction * n_subsets)}; "
                         f"need 1..K-1")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level (of the percentile interval) must lie in (0, 1), got {level}")
    if y_QxK.ndim != 2 or y_QxK.shape != (attr.n_query, n_subsets):
        raise ValueError(f"y_QxK must be [Q={attr.n_query}, K={n_subsets}] (the responses the attribution was "
                         f"recovered from), got shape {y_QxK.shape}")
    if not np.isfinite(y_QxK).all():
        raise ValueError("y_QxK holds NaN or inf entries; recovery needs finite responses")
    if attr.n_train != design.n_examples:
        raise ValueError(f"the attribution has {attr.n_train} training rows, the design {design.n_examples}")
    if attr.lambdas is None:
        raise ValueError("attr.lambdas is None: the bootstrap needs the full solve's l1 penalty per query "
                         "(an Attribution from Stride.recover / Stride.attribute)")


def _top_rows(attr: Attribution, k: int) -> np.ndarray:
    """[Q, 2, k] the full solve's top-k helpful and harmful rows per query."""
    return np.array([[[i for i, _ in attr.top_k(q, k, harmful=harmful)] for harmful in (False, True)]
                     for q in range(attr.n_query)], np.int64).reshape(attr.n_query, 2, k)


def _solve(y_QxK: np.ndarray, m_KxN: np.ndarray, lambdas_Q: np.ndarray, rc: RecoveryConfig) -> np.ndarray:
    """Dense coef [N, Q] of the Lasso with `rc`'s solver and settings (as `Stride.recover`)."""
    if rc.solver == "working_set":
        res = recovery.solve_lasso(y_QxK, m_KxN, lambdas_Q, dataclasses.replace(rc.lasso, nonneg=rc.nonneg))
    else:  # "fista" (`_check` refused the others)
        res = recovery.fista_lasso(y_QxK, m_KxN, lambdas_Q, dataclasses.replace(rc.fista, nonneg=rc.nonneg))
    return np.asarray(res.coef, np.float32)


def resample(y_QxK: np.ndarray, design: Design, attr: Attribution, rc: RecoveryConfig = RecoveryConfig(), *,
             n_boot: int = 50, k: int = 10, fraction: float = 0.5, level: float = 0.95,
             seed: int = 0) -> Confidence:
    """Stability and percentile intervals of `attr`'s top-k rows per query from `n_boot` Lasso
    solves on random `fraction`s of the operators (module docstring); `rc` as in the full solve."""
    y_QxK = np.asarray(y_QxK, np.float32)
    _check(y_QxK, design, attr, rc, n_boot, k, fraction, level)
    t0 = time.perf_counter()
    n_query, n_subsets = y_QxK.shape
    n = design.n_examples
    k = min(k, n)
    m = int(round(fraction * n_subsets))
    try:
        m_KxN = design.dense()
    except ValueError as e:
        raise ValueError(f"confidence draws need the design dense: {e}") from e
    rows_Qx2xk = _top_rows(attr, k)
    lambdas_Q = np.asarray(attr.lambdas, np.float32) * (m / n_subsets)
    rng = np.random.default_rng(seed)
    q_idx = np.arange(n_query)[:, None, None]
    values_BxQx2xk = np.full((n_boot, n_query, 2, k), np.nan, np.float32)  # NaN: the draw did not see the row
    kept_BxQx2xk = np.zeros((n_boot, n_query, 2, k), bool)
    for b in range(n_boot):
        kept_M = np.sort(rng.choice(n_subsets, size=m, replace=False))
        draw_MxN = np.zeros((m + 1, n + 1), np.float32)
        draw_QxM = np.zeros((n_query, m + 1), np.float32)  # the last column: the extra row's response 0
        draw_MxN[:m, :n] = m_KxN[kept_M]
        draw_MxN[m, :n] = ~draw_MxN[:m, :n].any(axis=0)  # examples no kept operator saw
        draw_MxN[m, n] = 1.0  # the ghost column keeps the extra row non-empty
        draw_QxM[:, :m] = y_QxK[:, kept_M]
        coef_NxQ = _solve(draw_QxM, draw_MxN, lambdas_Q, rc)[:n]
        top_Q = -np.partition(-coef_NxQ, k - 1, axis=0)[k - 1]  # each query's k-th largest
        bottom_Q = np.partition(coef_NxQ, k - 1, axis=0)[k - 1]  # and k-th smallest
        v_Qx2xk = coef_NxQ[rows_Qx2xk, q_idx]
        values_BxQx2xk[b] = np.where(draw_MxN[m, rows_Qx2xk] == 0, v_Qx2xk, np.nan)
        kept_BxQx2xk[b, :, HELPFUL] = (v_Qx2xk[:, HELPFUL] > 0) & (v_Qx2xk[:, HELPFUL] >= top_Q[:, None])
        kept_BxQx2xk[b, :, HARMFUL] = (v_Qx2xk[:, HARMFUL] < 0) & (v_Qx2xk[:, HARMFUL] <= bottom_Q[:, None])
    seen_Qx2xk = np.isfinite(values_BxQx2xk).sum(axis=0)
    stability_Qx2xk = np.where(seen_Qx2xk > 0, kept_BxQx2xk.sum(axis=0) / np.maximum(seen_Qx2xk, 1), np.nan)
    tail = 50.0 * (1.0 - level)
    with warnings.catch_warnings():  # a row no draw saw: NaN (module docstring)
        warnings.simplefilter("ignore", RuntimeWarning)
        interval_Qx2xkx2 = np.moveaxis(np.nanpercentile(values_BxQx2xk, [tail, 100.0 - tail], axis=0), 0, -1)
    seconds = time.perf_counter() - t0
    log.info("confidence: %d draws of %d of %d operators, %d queries: %.1f s", n_boot, m, n_subsets, n_query,
             seconds)
    return Confidence(rows=rows_Qx2xk, stability=stability_Qx2xk.astype(np.float32),
                      interval=interval_Qx2xkx2.astype(np.float32), n_boot=int(n_boot), fraction=float(fraction),
                      level=float(level), seed=int(seed), seconds=seconds)


def bootstrap(stride: Any, y_QxK: np.ndarray, *, attr: Attribution | None = None, n_boot: int = 50, k: int = 10,
              fraction: float = 0.5, level: float = 0.95, seed: int = 0) -> Confidence:
    """`resample` with a fitted `Stride`'s design and recovery settings; `attr` is the full solve of
    `y_QxK` (recovered here when not given)."""
    if getattr(stride, "design", None) is None:
        raise RuntimeError("call Stride.fit(model, train) before computing confidence")
    if attr is None:
        attr = stride.recover(y_QxK)
    return resample(y_QxK, stride.design, attr, stride.cfg.recovery, n_boot=n_boot, k=k, fraction=fraction,
                    level=level, seed=seed)


def attach(stride: Any, attr: Attribution, y_QxK: np.ndarray, **kwargs: Any) -> Attribution:
    """A copy of `attr` carrying its confidence (`bootstrap`'s keyword arguments pass through)."""
    c = bootstrap(stride, y_QxK, attr=attr, **kwargs)
    return dataclasses.replace(attr, confidence_rows=c.rows, stability=c.stability, interval=c.interval,
                               confidence_info=c.info())


__all__ = ["Confidence", "attach", "bootstrap", "resample"]
