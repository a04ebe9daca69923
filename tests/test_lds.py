"""Tests for stride_jax.lds: Spearman with ties against scipy, LDS, noise ceiling, bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from stride_jax.design import alpha_subsets, indices_to_mask
from stride_jax.lds import (
    LDSResult,
    _PairedResampler,
    lds,
    noise_ceiling,
    rankdata,
    spearman,
    spearman_brown,
)

N, M, Q = 120, 48, 12
IDX = alpha_subsets(N, M, 0.5, seed=0)
MASK = indices_to_mask(IDX, N).astype(np.float64)


def test_rankdata_matches_scipy_with_ties():
    x = np.random.default_rng(0).integers(0, 4, size=(30, 6)).astype(float)
    for axis in (0, 1):
        np.testing.assert_array_equal(rankdata(x, axis=axis), scipy.stats.rankdata(x, axis=axis))


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(50, 8)).astype(float)
    b = a + rng.integers(0, 3, size=(50, 8))
    ref = [scipy.stats.spearmanr(a[:, j], b[:, j]).statistic for j in range(8)]
    np.testing.assert_allclose(spearman(a, b), ref, atol=1e-10, rtol=0)
    one = spearman(a[:, 0], b[:, 0])
    assert isinstance(one, float) and one == pytest.approx(ref[0], abs=1e-10)


def test_constant_column_is_nan_and_counted():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    b[:, 1] = 7.0
    rho = spearman(a, b)
    assert np.isnan(rho[1]) and np.isfinite(rho[[0, 2]]).all()

    tau = rng.normal(size=(N, Q))
    losses = -MASK @ tau + 0.1 * rng.normal(size=(M, Q))
    losses[:, 3] = 1.0  # a query whose loss never moves
    result = lds(tau, IDX, losses, n_boot=200)
    assert result.n_nan == 1 and np.isnan(result.per_query[3])
    assert result.mean == pytest.approx(np.nanmean(result.per_query))


def test_resampled_ranks_equal_explicit_resamples():
    rng = np.random.default_rng(3)
    for a, b in [
        (rng.normal(size=(25, 4)), rng.normal(size=(25, 4))),  # no ties
        (rng.integers(0, 4, (25, 4)).astype(float), rng.integers(0, 3, (25, 4)).astype(float)),
    ]:
        rows = rng.integers(0, 25, size=(6, 25))
        counts = np.stack([np.bincount(r, minlength=25) for r in rows])
        rho = _PairedResampler(a, b).spearman(counts)
        for i, r in enumerate(rows):
            ref = [scipy.stats.spearmanr(a[r, j], b[r, j]).statistic for j in range(4)]
            np.testing.assert_allclose(rho[i], ref, atol=1e-6, rtol=0)


def test_perfect_scores_give_lds_near_one():
    rng = np.random.default_rng(4)
    tau = rng.normal(size=(N, Q))
    losses = -MASK @ tau + 0.05 * rng.normal(size=(M, Q))  # planted linear datamodel
    result = lds(tau, IDX, losses, n_boot=300, seed=1)
    assert isinstance(result, LDSResult)
    assert result.mean > 0.98 and result.n_nan == 0 and result.per_query.shape == (Q,)
    assert result.ci95[0] <= result.mean <= result.ci95[1]
    assert result.to_dict() == {"mean": result.mean, "ci95": list(result.ci95), "n_nan": 0}


def test_random_scores_give_lds_near_zero():
    rng = np.random.default_rng(5)
    tau = rng.normal(size=(N, Q))
    losses = -MASK @ rng.normal(size=(N, Q)) + rng.normal(size=(M, Q))
    result = lds(tau, IDX, losses, n_boot=500, seed=2)
    assert abs(result.mean) < 0.1
    assert result.ci95[0] < 0 < result.ci95[1]
    assert result.ci95[0] <= result.mean <= result.ci95[1]


def test_joint_bootstrap_is_wider_than_query_only():
    # every query shares the same subset noise: query-only resampling cannot see it
    rng = np.random.default_rng(6)
    shared = rng.normal(size=(M, 1))
    tau = rng.normal(size=(N, 40))
    losses = -(MASK @ tau) - 8 * shared + 0.5 * rng.normal(size=(M, 40))
    result = lds(tau, IDX, losses, n_boot=400, seed=3)
    per_query = result.per_query
    query_only = [rng.choice(per_query, per_query.size).mean() for _ in range(400)]
    q_lo, q_hi = np.percentile(query_only, [2.5, 97.5])
    assert result.ci95[1] - result.ci95[0] > 2 * (q_hi - q_lo)


def test_noise_ceiling_and_spearman_brown():
    rng = np.random.default_rng(7)
    losses = rng.normal(size=(M, Q))
    same = noise_ceiling(losses, losses, n_boot=100)
    assert same.mean == pytest.approx(1.0) and same.ci95 == pytest.approx((1.0, 1.0))
    other = noise_ceiling(losses, losses + 0.8 * rng.normal(size=(M, Q)), n_boot=300)
    assert 0.5 < other.mean < 0.95
    assert other.ci95[0] <= other.mean <= other.ci95[1]
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert spearman_brown(0.3, 1) == pytest.approx(0.3)
    np.testing.assert_allclose(spearman_brown(np.array([0.0, 1.0]), 4), [0.0, 1.0])


def test_shape_and_value_errors():
    rng = np.random.default_rng(8)
    tau, losses = rng.normal(size=(N, Q)), rng.normal(size=(M, Q))
    with pytest.raises(ValueError, match="N=100 rows"):
        lds(tau[:100], IDX, losses)
    with pytest.raises(ValueError, match="M=48 subsets"):
        lds(tau, IDX, losses[:40])
    with pytest.raises(ValueError, match="queries"):
        lds(tau, IDX, losses[:, :5])
    bad = losses.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        lds(tau, IDX, bad)
    with pytest.raises(ValueError, match="one shape"):
        noise_ceiling(losses, losses[:, :3])
    with pytest.raises(ValueError, match="one shape"):
        spearman(losses, losses[:10])


# --- sparse scores (stride_jax.recovery.SparseScores): same numbers, never densified ---------

import tracemalloc  # noqa: E402

from stride_jax.lds import predict_subset_sums  # noqa: E402
from stride_jax.recovery import SparseScores  # noqa: E402


def test_lds_on_sparse_scores_equals_dense():
    rng = np.random.default_rng(9)
    tau = (rng.normal(size=(N, Q)) * (rng.random((N, Q)) < 0.15)).astype(np.float32)
    tau[:, 4] = 0.0  # a query with no nonzeros: predictions constant, Spearman NaN
    losses = -MASK @ tau + 0.3 * rng.normal(size=(M, Q))
    sparse = SparseScores.from_dense(tau)
    np.testing.assert_allclose(predict_subset_sums(sparse, IDX), predict_subset_sums(tau, IDX),
                               rtol=1e-12, atol=1e-12)
    shuffled = np.random.default_rng(0).permuted(IDX, axis=1)  # subsets need not be sorted
    np.testing.assert_allclose(predict_subset_sums(sparse, shuffled), MASK @ tau, atol=1e-9)
    dense_result, sparse_result = lds(tau, IDX, losses, n_boot=200), lds(sparse, IDX, losses, n_boot=200)
    np.testing.assert_array_equal(sparse_result.per_query, dense_result.per_query)
    assert sparse_result.mean == dense_result.mean and sparse_result.ci95 == dense_result.ci95
    assert sparse_result.n_nan == 1
    with pytest.raises(ValueError, match="N=100 rows"):
        lds(SparseScores.from_dense(tau[:100]), IDX, losses)
    bad = SparseScores(sparse.indptr, sparse.rows, np.where(np.arange(sparse.nnz) == 3, np.nan,
                                                            sparse.values), N)
    with pytest.raises(ValueError, match="NaN/inf"):
        lds(bad, IDX, losses)


def test_lds_on_sparse_scores_does_not_densify():
    """N = 10^7 examples, 4 queries, 60 nonzeros each: dense float64 scores would be 320 MB."""
    n, q, m = 10_000_000, 4, 8
    rng = np.random.default_rng(10)
    rows = [np.sort(rng.choice(n, 60, replace=False)) for _ in range(q)]
    scores = SparseScores(np.arange(0, 60 * q + 1, 60), np.concatenate(rows),
                          rng.normal(size=60 * q), n)
    # subsets of 2000 examples each that hold some of the nonzero rows
    idx = np.sort(np.stack([np.concatenate([rng.choice(np.concatenate(rows), 30, replace=False),
                                            rng.choice(n, 1970, replace=False)])
                            for _ in range(m)]), axis=1)
    losses = rng.normal(size=(m, q))
    tracemalloc.start()
    result = lds(scores, idx, losses, n_boot=50)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.0f} MB: scores were densified"
    expected = np.array([[scores.column(j)[idx[i]].sum() for j in range(q)] for i in range(m)])
    np.testing.assert_allclose(predict_subset_sums(scores, idx), expected, rtol=1e-6)
    assert result.per_query.shape == (q,)
