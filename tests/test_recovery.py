"""Tests for stride_jax.recovery: FISTA Lasso against sklearn, KKT, batching, planted recovery."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

from stride_jax.design import left_regular_design
from stride_jax.recovery import (
    FistaConfig,
    _fista_batch,
    fista_lasso,
    fista_solve,
    lambda_max,
    lipschitz,
    prox_l1,
    prox_nonneg_l1,
    select_lambda,
)

N, K, S, Q = 200, 60, 5, 3
TIGHT = FistaConfig(max_iter=20000, tol=1e-7)
DESIGN = left_regular_design(N, K, S, seed=0)
DENSE = DESIGN.dense()


def _responses(seed: int, n_queries: int = Q) -> np.ndarray:
    """[Q, K] y = M w + noise for sparse w, in float32."""
    rng = np.random.default_rng(seed)
    w_NxQ = np.zeros((N, n_queries))
    for q in range(n_queries):
        w_NxQ[rng.choice(N, 8, replace=False), q] = rng.normal(size=8)
    return (DENSE @ w_NxQ + 0.3 * rng.normal(size=(K, n_queries))).T.astype(np.float32)


Y_QxK = _responses(0)
LAMBDA_Q = 0.1 * np.asarray(lambda_max(Y_QxK, DESIGN))


def _sklearn(y_K, l1reg, positive=False) -> np.ndarray:
    # sklearn minimises 1/(2 K) ||y - M w||^2 + alpha ||w||_1, so alpha = l1reg / K
    model = Lasso(alpha=l1reg / K, fit_intercept=False, tol=1e-12, max_iter=200_000, positive=positive)
    return model.fit(DENSE.astype(np.float64), np.asarray(y_K, np.float64)).coef_


def _assert_kkt(coef_N, y_K, l1reg, nonneg=False, tol=2e-3):
    """Optimality: c = M^T (y - M w) has |c| <= lambda, with c = lambda sign(w) on the support."""
    coef_N = np.asarray(coef_N, np.float64)
    corr = DENSE.T.astype(np.float64) @ (y_K - DENSE @ coef_N)
    support = coef_N != 0
    scale = tol * l1reg
    if nonneg:
        assert (coef_N >= 0).all()
        assert (corr <= l1reg + scale).all()
        np.testing.assert_allclose(corr[support], l1reg, atol=scale)
    else:
        assert (np.abs(corr) <= l1reg + scale).all()
        np.testing.assert_allclose(corr[support], l1reg * np.sign(coef_N[support]), atol=scale)
    assert support.any()


@pytest.mark.parametrize("operand", ["design", "dense"])
def test_matches_sklearn_lasso(operand):
    m = DESIGN if operand == "design" else DENSE
    result = fista_lasso(Y_QxK, m, LAMBDA_Q, TIGHT)
    assert result.coef.shape == (N, Q) and result.n_iter.shape == (Q,)
    assert bool(result.converged.all())
    for q in range(Q):
        ref = _sklearn(Y_QxK[q], LAMBDA_Q[q])
        # float32 solve: agreement to ~1e-4 of the largest coefficient (float64 below: 1e-5)
        np.testing.assert_allclose(result.coef[:, q], ref, atol=3e-4 * np.abs(ref).max())
        _assert_kkt(result.coef[:, q], Y_QxK[q], LAMBDA_Q[q])


def test_matches_sklearn_in_float64():
    with jax.enable_x64(True):
        y_K = Y_QxK[0].astype(np.float64)
        result = fista_lasso(y_K, DESIGN, float(LAMBDA_Q[0]), FistaConfig(max_iter=20000, tol=1e-9))
        assert result.coef.dtype == jnp.float64
        ref = _sklearn(y_K, LAMBDA_Q[0])
        np.testing.assert_allclose(result.coef, ref, atol=1e-5 * np.abs(ref).max())


def test_nonneg_matches_sklearn_positive():
    cfg = FistaConfig(max_iter=20000, tol=1e-7, nonneg=True)
    result = fista_lasso(Y_QxK, DESIGN, LAMBDA_Q, cfg)
    for q in range(Q):
        ref = _sklearn(Y_QxK[q], LAMBDA_Q[q], positive=True)
        np.testing.assert_allclose(result.coef[:, q], ref, atol=3e-4 * np.abs(ref).max())
        _assert_kkt(result.coef[:, q], Y_QxK[q], LAMBDA_Q[q], nonneg=True)


def test_design_and_dense_agree_and_batch_equals_loop():
    batched = fista_lasso(Y_QxK, DESIGN, LAMBDA_Q, TIGHT)
    dense = fista_lasso(Y_QxK, DENSE, LAMBDA_Q, TIGHT)
    np.testing.assert_allclose(batched.coef, dense.coef, atol=1e-4)
    for q in range(Q):
        single = fista_lasso(Y_QxK[q], DESIGN, LAMBDA_Q[q], TIGHT)
        assert single.coef.shape == (N,) and single.n_iter.shape == ()
        np.testing.assert_allclose(single.coef, batched.coef[:, q], atol=1e-5)
        assert int(single.n_iter) == int(batched.n_iter[q])
    chunked = fista_lasso(Y_QxK, DESIGN, LAMBDA_Q, TIGHT, query_chunk=2)  # 2 + 1 padded
    np.testing.assert_allclose(chunked.coef, batched.coef, atol=1e-5)
    np.testing.assert_array_equal(chunked.n_iter, batched.n_iter)


def test_shared_scalar_lambda_and_warm_start():
    lam = float(LAMBDA_Q.min())
    cold = fista_lasso(Y_QxK, DESIGN, lam, TIGHT)
    warm = fista_lasso(Y_QxK, DESIGN, lam, TIGHT, init=cold.coef)
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-4)
    assert int(warm.n_iter.max()) < int(cold.n_iter.max())


def test_jit_of_pure_solver_and_no_recompile():
    lipschitz_const = float(jnp.linalg.norm(DENSE, 2) ** 2) * 1.01
    solve = jax.jit(fista_solve, static_argnames=("cfg", "n_subsets"))
    ids = jnp.asarray(DESIGN.ids_NxS)
    jitted = solve(Y_QxK[0], ids, LAMBDA_Q[0], lipschitz_const, cfg=TIGHT, n_subsets=K)
    eager = fista_lasso(Y_QxK[0], DESIGN, LAMBDA_Q[0], TIGHT, lipschitz_const=lipschitz_const)
    np.testing.assert_allclose(jitted.coef, eager.coef, atol=1e-6)
    # the dense path can be jitted whole (validation is skipped for traced inputs)
    whole = jax.jit(lambda y, m: fista_lasso(y, m, 0.5, TIGHT).coef)(Y_QxK, DENSE)
    np.testing.assert_allclose(whole, fista_lasso(Y_QxK, DENSE, 0.5, TIGHT).coef, atol=1e-5)
    size = _fista_batch._cache_size()
    fista_lasso(Y_QxK + 1.0, DESIGN, LAMBDA_Q * 2, TIGHT)
    fista_lasso(Y_QxK + 2.0, DESIGN, LAMBDA_Q * 3, TIGHT)
    assert _fista_batch._cache_size() <= size + 1


def test_lambda_at_or_above_lambda_max_gives_zeros():
    lmax_Q = np.asarray(lambda_max(Y_QxK, DESIGN))
    np.testing.assert_allclose(lmax_Q, np.abs(DENSE.T @ Y_QxK.T).max(axis=0), rtol=1e-5)
    for scale in (1.0 + 1e-6, 2.0):
        result = fista_lasso(Y_QxK, DESIGN, lmax_Q * scale, TIGHT)
        assert (np.asarray(result.coef) == 0).all()
        assert (np.asarray(result.n_iter) == 1).all() and bool(result.converged.all())
    below = fista_lasso(Y_QxK, DESIGN, lmax_Q * 0.99, TIGHT)
    assert (np.abs(np.asarray(below.coef)).max(axis=0) > 0).all()


def test_lipschitz_matches_top_eigenvalue():
    top = np.linalg.eigvalsh(DENSE.T.astype(np.float64) @ DENSE).max()
    m = jnp.asarray(DENSE)
    est = lipschitz(lambda w: m @ w, lambda r: m.T @ r, (K, N), 50, jax.random.key(1))
    assert top <= float(est) <= 1.02 * top


def test_prox_operators():
    x = jnp.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_allclose(prox_l1(x, 1.0, 0.5), [-2.5, 0.0, 0.0, 0.0, 2.5])
    np.testing.assert_allclose(prox_nonneg_l1(x, 1.0, 0.5), [0.0, 0.0, 0.0, 0.0, 2.5])


def test_validation_errors():
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        fista_lasso(Y_QxK, DESIGN, -1.0)
    y_bad = Y_QxK.copy()
    y_bad[0, :2] = np.nan
    y_bad[1, 0] = np.inf
    with pytest.raises(ValueError, match="2 NaN and 1 inf"):
        fista_lasso(y_bad, DESIGN, 0.1)
    with pytest.raises(ValueError, match="K=60"):
        fista_lasso(Y_QxK[:, :50], DESIGN, 0.1)
    with pytest.raises(ValueError, match=r"\[Q=3\]"):
        fista_lasso(Y_QxK, DESIGN, np.ones(2))
    with pytest.raises(ValueError, match="max_iter"):
        FistaConfig(max_iter=0)


def test_planted_sparse_recovery():
    """Noiseless y = M w with k = 10 nonzeros among n = 2000, K ~ 4 k log(n / k) subsets."""
    n, k_sparse, d = 2000, 10, 8
    n_subsets = int(np.ceil(4 * k_sparse * np.log(n / k_sparse)))
    design = left_regular_design(n, n_subsets, d, seed=1)
    rng = np.random.default_rng(1)
    w_true = np.zeros(n, np.float32)
    support = rng.choice(n, k_sparse, replace=False)
    w_true[support] = rng.choice([-1.0, 1.0], k_sparse) * rng.uniform(1.0, 2.0, k_sparse)
    y_K = np.asarray(design.matvec(w_true))
    l1reg = 1e-3 * float(lambda_max(y_K, design))
    result = fista_lasso(y_K, design, l1reg, FistaConfig(max_iter=20000, tol=1e-7))
    coef = np.asarray(result.coef)
    assert bool(result.converged)
    np.testing.assert_array_equal(np.flatnonzero(np.abs(coef) > 1e-2), np.sort(support))
    np.testing.assert_allclose(coef, w_true, atol=1e-2)


def test_select_lambda_prefers_a_sparse_fit_over_zero():
    y_QxK = _responses(5, n_queries=4)
    fractions = (1.0, 0.3, 0.1, 0.03)
    best, table = select_lambda(y_QxK, DESIGN, fractions=fractions, holdout_frac=0.25, seed=0,
                                cfg=FistaConfig(max_iter=3000, tol=1e-6))
    assert set(table) == set(fractions) and best in fractions
    assert table[best] == min(table.values())
    assert best < 1.0 and table[best] < table[1.0]  # fraction 1 predicts 0 for every held-out y
    # the dense path agrees
    best_dense, table_dense = select_lambda(y_QxK, DENSE, fractions=fractions, holdout_frac=0.25,
                                            seed=0, cfg=FistaConfig(max_iter=3000, tol=1e-6))
    assert best_dense == best
    np.testing.assert_allclose(list(table_dense.values()), list(table.values()), rtol=1e-3)
