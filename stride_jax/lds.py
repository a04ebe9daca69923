"""Linear Datamodeling Score (LDS) and its noise ceiling, with a joint bootstrap.

For m random training subsets S_1..S_m (retrained models give query losses f_q(S_j)) and
attribution scores tau [N, Q] (positive = helps the query), the datamodel prediction is
g_q(S_j) = sum_{i in S_j} tau_iq and LDS_q = Spearman_j(g_q(S_j), -f_q(S_j)) (STRIDE,
arXiv 2606.05165, section 3 of docs/STRIDE.md). Scores are a dense [N, Q] array or a
`scores.SparseScores` (never densified: memory follows the nonzeros). Numpy only: no scipy
at runtime.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from stride_jax.scores import SparseScores

_CHUNK_ELEMENTS = 1 << 20  # bound on [B, Q, M] temporaries in the bootstrap
_MASK_ELEMENTS = 1 << 22  # bound on the [B, N] membership mask when summing scores
_LOOKUP_ELEMENTS = 1 << 22  # bound on [B, nnz] membership lookups for sparse scores


def rankdata(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Ranks 1..n along `axis`, ties getting their average rank (scipy.stats.rankdata 'average')."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    order = np.argsort(x, axis=-1, kind="stable")
    starts, ends = _tie_bounds(np.take_along_axis(x, order, axis=-1))
    ranks_sorted = 0.5 * (starts + ends) + 1.0
    ranks = np.empty(x.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, ranks_sorted, axis=-1)
    return np.moveaxis(ranks, -1, axis)


def _tie_bounds(sorted_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For values sorted along the last axis: first and last position of each one's tie run."""
    n = sorted_x.shape[-1]
    pos = np.broadcast_to(np.arange(n), sorted_x.shape)
    differs = sorted_x[..., 1:] != sorted_x[..., :-1]
    true_col = np.ones(sorted_x.shape[:-1] + (1,), dtype=bool)
    run_start = np.concatenate([true_col, differs], axis=-1)
    run_end = np.concatenate([differs, true_col], axis=-1)
    starts = np.maximum.accumulate(np.where(run_start, pos, 0), axis=-1)
    ends = np.flip(np.minimum.accumulate(np.flip(np.where(run_end, pos, n - 1), -1), axis=-1), -1)
    return starts, ends


def _pearson_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column (axis 0); NaN where a column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=0) / denom, np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Spearman correlation along axis 0 of [M] or [M, Q] inputs (per column), average ranks.

    Matches scipy.stats.spearmanr column by column; a constant column gives NaN.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(
            f"spearman needs two [M] or [M, Q] arrays of one shape, got {a.shape}, {b.shape}"
        )
    rho = _pearson_cols(rankdata(a, axis=0), rankdata(b, axis=0))
    return float(rho) if a.ndim == 1 else rho


class LDSResult(NamedTuple):
    """Mean over non-NaN queries, 95% joint-bootstrap interval, NaN count, per-query values [Q]."""

    mean: float
    ci95: tuple[float, float]
    n_nan: int
    per_query: np.ndarray

    def to_dict(self) -> dict:
        """JSON-ready; NaN (no finite query) becomes None (JSON null)."""
        num = lambda x: float(x) if np.isfinite(x) else None  # noqa: E731
        return {"mean": num(self.mean), "ci95": [num(self.ci95[0]), num(self.ci95[1])], "n_nan": int(self.n_nan)}


class _PairedResampler:
    """Per-column Spearman(a, b) of [M, Q] arrays under row resampling, without re-sorting.

    A resample with replacement is a count vector c [M] (row j appears c_j times). In it, row j's
    value has average rank (copies of smaller values) + (copies in its tie run + 1) / 2, which a
    cumulative sum of counts along the original sort order gives. Spearman of the resample is
    the count-weighted Pearson correlation of those ranks, whose weighted mean is always
    (M + 1) / 2. Ranks are kept doubled and centred, 2 r - (M + 1), so they are integers.
    Work is done in a's sort order; b's ranks are brought there by one precomputed permutation.
    """

    def __init__(self, a_MxQ: np.ndarray, b_MxQ: np.ndarray):
        self.m, self.q = a_MxQ.shape
        self.order_a_QxM = np.argsort(a_MxQ.T, axis=-1, kind="stable")
        self.order_b_QxM = np.argsort(b_MxQ.T, axis=-1, kind="stable")
        self.bounds_a = _tie_bounds(np.take_along_axis(a_MxQ.T, self.order_a_QxM, axis=-1))
        self.bounds_b = _tie_bounds(np.take_along_axis(b_MxQ.T, self.order_b_QxM, axis=-1))
        inverse_b_QxM = np.argsort(self.order_b_QxM, axis=-1)
        # b-sorted position of the row found at each a-sorted position
        self.b_pos_QxM = np.take_along_axis(inverse_b_QxM, self.order_a_QxM, axis=-1)
        self._flat_index: dict[tuple[str, int], np.ndarray] = {}

    def _take_last(self, x_BxQxM: np.ndarray, name: str, idx_QxM: np.ndarray) -> np.ndarray:
        """x[b, q, idx[q, m]] via one flat take with cached offsets."""
        b, q, m = x_BxQxM.shape
        if (name, b) not in self._flat_index:
            offsets = np.arange(b)[:, None, None] * (q * m) + np.arange(q)[:, None] * m
            self._flat_index[(name, b)] = offsets + idx_QxM[None]
        return np.take(x_BxQxM, self._flat_index[(name, b)])

    def _ranks(self, counts_BxQxM: np.ndarray, name: str) -> np.ndarray:
        """Doubled centred ranks 2 r - (M + 1), listed in the sort order `counts` follows."""
        starts_QxM, ends_QxM = getattr(self, f"bounds_{name}")
        cum = np.cumsum(counts_BxQxM, axis=-1, dtype=counts_BxQxM.dtype)
        if np.array_equal(starts_QxM, ends_QxM):  # no ties: each run is one row
            return 2 * cum - counts_BxQxM - counts_BxQxM.dtype.type(self.m)
        below = self._take_last(cum - counts_BxQxM, f"starts_{name}", starts_QxM)
        through = self._take_last(cum, f"ends_{name}", ends_QxM)
        return below + through - counts_BxQxM.dtype.type(self.m)

    def _sum_sq(self, counts_BxM, weights_BxQxM, ranks_BxQxM, name: str) -> np.ndarray:
        """[B, Q] sum of weight * doubled-centred-rank^2, i.e. 4 x the resample's rank scatter."""
        starts_QxM, ends_QxM = getattr(self, f"bounds_{name}")
        if np.array_equal(starts_QxM, ends_QxM):
            # the resample's tie groups are the copies of each row, so with sum_j c_j = M:
            # 4 sum_j c_j (r_j - mean)^2 = (M^3 - M - sum_j (c_j^3 - c_j)) / 3 = (M^3 - sum_j c_j^3) / 3
            scatter_B = (float(self.m) ** 3 - (counts_BxM.astype(np.float64) ** 3).sum(axis=1)) / 3.0
            return np.broadcast_to(scatter_B[:, None], ranks_BxQxM.shape[:2])
        weighted = weights_BxQxM.astype(np.float64) * ranks_BxQxM
        return np.vecdot(weighted, ranks_BxQxM.astype(np.float64))

    def spearman(self, counts_BxM: np.ndarray) -> np.ndarray:
        """[B, Q] Spearman of each column in each resample; NaN where a resample is constant."""
        # doubled ranks lie in [-M, M]: int16 halves the memory traffic when it can hold them
        counts_BxM = counts_BxM.astype(np.int16 if 2 * self.m < np.iinfo(np.int16).max else np.int32)
        weights_a = counts_BxM[:, self.order_a_QxM]
        ranks_a = self._ranks(weights_a, "a")
        weights_b = counts_BxM[:, self.order_b_QxM]
        ranks_b = self._ranks(weights_b, "b")
        var = (self._sum_sq(counts_BxM, weights_a, ranks_a, "a")
               * self._sum_sq(counts_BxM, weights_b, ranks_b, "b"))
        ranks_b = self._take_last(ranks_b, "b_pos", self.b_pos_QxM)
        # float32 is exact for these integer products while 2 M^2 < 2^24; sums carry ~1e-7 error
        dtype = np.float32 if 2 * self.m**2 < 2**24 else np.float64
        cov = np.vecdot(weights_a.astype(dtype) * ranks_a, ranks_b.astype(dtype)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(var > 0, cov / np.sqrt(var), np.nan)


def _joint_bootstrap(a_MxQ: np.ndarray, b_MxQ: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot] mean per-query Spearman(a, b), resampling rows and columns together."""
    m, q = a_MxQ.shape
    rng = np.random.default_rng(seed)
    rows_BxM = rng.integers(0, m, size=(n_boot, m))
    cols_BxQ = rng.integers(0, q, size=(n_boot, q))
    resampler = _PairedResampler(a_MxQ, b_MxQ)
    chunk = max(1, _CHUNK_ELEMENTS // (m * q))
    means = np.empty(n_boot)
    for lo in range(0, n_boot, chunk):
        hi = min(n_boot, lo + chunk)
        counts_BxM = np.stack([np.bincount(r, minlength=m) for r in rows_BxM[lo:hi]])
        rho_BxQ = np.take_along_axis(resampler.spearman(counts_BxM), cols_BxQ[lo:hi], axis=1)
        defined_BxQ = np.isfinite(rho_BxQ)
        n_defined_B = defined_BxQ.sum(axis=1)
        total_B = np.where(defined_BxQ, rho_BxQ, 0.0).sum(axis=1)
        means[lo:hi] = np.where(n_defined_B > 0, total_B / np.maximum(n_defined_B, 1), np.nan)
    return means


def _summarise(per_query: np.ndarray, boot: np.ndarray) -> LDSResult:
    n_nan = int(np.isnan(per_query).sum())
    mean = float(np.nanmean(per_query)) if n_nan < per_query.size else float("nan")
    finite = boot[np.isfinite(boot)]
    if finite.size:
        lo, hi = np.percentile(finite, [2.5, 97.5])
        ci95 = (float(lo), float(hi))
    else:
        ci95 = (float("nan"), float("nan"))
    return LDSResult(mean=mean, ci95=ci95, n_nan=n_nan, per_query=per_query)


def _check_n_boot(n_boot: int) -> None:
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot (bootstrap resamples) must be an integer >= 1, got {n_boot!r}")


def _check_finite(name: str, x: np.ndarray) -> None:
    n_bad = int(x.size - np.isfinite(x).sum())
    if n_bad:
        raise ValueError(
            f"{name} holds {n_bad} NaN/inf entries (of {x.size}); LDS needs finite values"
        )


def _as_2d(name: str, x, n_rows_name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be [{n_rows_name}, Q] (or [{n_rows_name}]), got shape {x.shape}")
    return x


def _predict_sparse(scores: SparseScores, subset_idx_MxNs: np.ndarray) -> np.ndarray:
    """g[m, q] for sparse scores: look each stored row up in each (sorted) subset.

    The M subsets, offset by m N, form one sorted array; one searchsorted per block of subsets
    finds which stored entries they hold. Memory O(block x nnz), never [N, Q].
    """
    n, q = scores.shape
    idx_MxNs = np.asarray(subset_idx_MxNs, dtype=np.int64)
    if idx_MxNs.shape[1] > 1 and (np.diff(idx_MxNs, axis=1) < 0).any():
        idx_MxNs = np.sort(idx_MxNs, axis=1)
    m = idx_MxNs.shape[0]
    rows = scores.rows.astype(np.int64)
    query_of = scores.query_of_entries()
    values = scores.values.astype(np.float64)
    g_MxQ = np.zeros((m, q))
    if rows.size == 0 or idx_MxNs.shape[1] == 0:
        return g_MxQ
    block = max(1, _LOOKUP_ELEMENTS // max(rows.size, idx_MxNs.shape[1], 1))
    for lo in range(0, m, block):
        hi = min(m, lo + block)
        offsets_B = np.arange(lo, hi, dtype=np.int64) * n
        members = (idx_MxNs[lo:hi] + offsets_B[:, None]).reshape(-1)
        keys_BxE = rows[None, :] + offsets_B[:, None]
        pos = np.minimum(np.searchsorted(members, keys_BxE), members.size - 1)
        held_BxE = members[pos] == keys_BxE
        weights = np.where(held_BxE, values[None, :], 0.0)
        flat_q = (np.arange(hi - lo)[:, None] * q + query_of[None, :]).reshape(-1)
        g_MxQ[lo:hi] = np.bincount(flat_q, weights=weights.reshape(-1),
                                   minlength=(hi - lo) * q).reshape(hi - lo, q)
    return g_MxQ


def predict_subset_sums(scores_NxQ: np.ndarray | SparseScores,
                        subset_idx_MxNs: np.ndarray) -> np.ndarray:
    """g[m, q] = sum over i in S_m of scores[i, q]: [M, Q].

    Dense scores: mask @ scores in row blocks. `SparseScores`: lookups of the stored rows in
    the subsets, without densifying.
    """
    if isinstance(scores_NxQ, SparseScores):
        return _predict_sparse(scores_NxQ, subset_idx_MxNs)
    n = scores_NxQ.shape[0]
    m = subset_idx_MxNs.shape[0]
    block = max(1, _MASK_ELEMENTS // n)
    g_MxQ = np.empty((m, scores_NxQ.shape[1]))
    for lo in range(0, m, block):
        idx = subset_idx_MxNs[lo:lo + block]
        mask_BxN = np.zeros((idx.shape[0], n))
        mask_BxN[np.arange(idx.shape[0])[:, None], idx] = 1.0
        g_MxQ[lo:lo + block] = mask_BxN @ scores_NxQ
    return g_MxQ


def lds(
    scores_NxQ: np.ndarray | SparseScores,
    subset_idx_MxNs: np.ndarray,
    losses_MxQ: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> LDSResult:
    """LDS: per query q, Spearman over subsets m of g_mq = sum_{i in S_m} tau_iq and -f_q(S_m).

    Returns the mean over queries whose Spearman is defined (a query whose losses or predictions
    do not vary across subsets gives NaN; `n_nan` counts them) and a 95% percentile interval from
    a bootstrap that resamples subsets (rows) and queries (columns) jointly. Resampling queries
    alone treats the m subsets as fixed, but every query is scored on the same m subsets, so
    their subset-sampling errors are correlated and do not average out over queries; a
    query-only interval is then far too narrow. Resampling rows captures that shared error.
    `scores_NxQ` may be a `SparseScores` (never densified).
    """
    sparse = isinstance(scores_NxQ, SparseScores)
    if not sparse:
        scores_NxQ = _as_2d("scores_NxQ", scores_NxQ, "N")
    losses_MxQ = _as_2d("losses_MxQ", losses_MxQ, "M")
    subset_idx_MxNs = np.asarray(subset_idx_MxNs)
    if subset_idx_MxNs.ndim != 2 or not np.issubdtype(subset_idx_MxNs.dtype, np.integer):
        raise ValueError(
            f"subset_idx_MxNs must be integer [M, Ns], got {subset_idx_MxNs.dtype} "
            f"{subset_idx_MxNs.shape}"
        )
    n, q = scores_NxQ.shape
    m = subset_idx_MxNs.shape[0]
    if subset_idx_MxNs.size and (subset_idx_MxNs.min() < 0 or subset_idx_MxNs.max() >= n):
        raise ValueError(
            f"subset indices range over [{subset_idx_MxNs.min()}, {subset_idx_MxNs.max()}] but "
            f"scores_NxQ has N={n} rows: scores must cover every training example the subsets index"
        )
    if losses_MxQ.shape[0] != m:
        raise ValueError(f"losses_MxQ has {losses_MxQ.shape[0]} rows but there are M={m} subsets")
    if losses_MxQ.shape[1] != q:
        raise ValueError(f"losses_MxQ has {losses_MxQ.shape[1]} queries (columns), scores_NxQ has {q}")
    if m < 3:
        raise ValueError(f"LDS needs at least 3 subsets, got M={m}")
    if subset_idx_MxNs.shape[1] > 1:
        sorted_MxNs = np.sort(subset_idx_MxNs, axis=1)
        dup_M = (np.diff(sorted_MxNs, axis=1) == 0).any(axis=1)
        if dup_M.any():
            j = int(np.flatnonzero(dup_M)[0])
            twice = int(sorted_MxNs[j][1:][np.diff(sorted_MxNs[j]) == 0][0])
            raise ValueError(f"subset_idx_MxNs: subset {j} lists example {twice} twice ({int(dup_M.sum())} subsets "
                             "hold duplicate indices); a subset is a set of distinct training examples")
    _check_n_boot(n_boot)
    _check_finite("losses_MxQ", losses_MxQ)
    _check_finite("scores_NxQ", scores_NxQ.values if sparse else scores_NxQ)
    g_MxQ = predict_subset_sums(scores_NxQ, subset_idx_MxNs)
    per_query = spearman(g_MxQ, -losses_MxQ)
    return _summarise(per_query, _joint_bootstrap(g_MxQ, -losses_MxQ, n_boot, seed))


def noise_ceiling(
    losses_a_MxQ: np.ndarray,
    losses_b_MxQ: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> LDSResult:
    """Seed-vs-seed agreement: per query, Spearman over subsets between two retraining seeds' losses.

    Both arrays hold the losses of models trained on the same m subsets with independent seeds.
    The mean over queries is the LDS that the losses of one seed reach when used as the
    "prediction" for another seed: an estimate of how much of the ground truth is signal rather
    than training noise. Same joint (rows and queries) bootstrap as `lds`. For ground truth
    averaged over k seeds, `spearman_brown(mean, k)` gives the expected reliability of the average.
    """
    a = _as_2d("losses_a_MxQ", losses_a_MxQ, "M")
    b = _as_2d("losses_b_MxQ", losses_b_MxQ, "M")
    if a.shape != b.shape:
        raise ValueError(f"losses_a_MxQ {a.shape} and losses_b_MxQ {b.shape} must have one shape")
    if a.shape[0] < 3:
        raise ValueError(f"the noise ceiling needs at least 3 subsets, got M={a.shape[0]}")
    _check_n_boot(n_boot)
    _check_finite("losses_a_MxQ", a)
    _check_finite("losses_b_MxQ", b)
    return _summarise(spearman(a, b), _joint_bootstrap(a, b, n_boot, seed))


def spearman_brown(r: float | np.ndarray, k: float) -> float | np.ndarray:
    """Reliability of the average of k seeds from the single-seed correlation r: k r / (1 + (k-1) r).

    Applied to `noise_ceiling(...).mean`, this is the expected seed-vs-seed agreement of a
    k-seed average, the ceiling relevant when the LDS ground truth averages k seeds.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = np.asarray(r, dtype=np.float64)
    out = k * r / (1.0 + (k - 1.0) * r)
    return float(out) if out.ndim == 0 else out
