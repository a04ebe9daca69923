"""Tests for stride_jax.recovery: FISTA Lasso against sklearn, KKT, batching, planted recovery."""

from __future__ import annotations

import dataclasses

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


# ---------------------------------------------------------------------------------------------
# solve_lasso: the working-set solver with a duality-gap certificate

from stride_jax.design import Design  # noqa: E402
from stride_jax.recovery import (  # noqa: E402
    LassoConfig,
    SparseScores,
    _duality_gap,
    _ws_chunk,
    solve_lasso,
)

# Working sets of 64 of the 200 columns (fits have 28-40 nonzeros). Tests share this config so
# that they share its compile (about 4 s on 2 cores for each config, width and query block).
WS = LassoConfig(tol=1e-5, ws_size=64, max_ws_size=64)  # float32 resolves ~1e-6

_TRACES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _TRACES.append(event) if event.startswith("/jax/core/compile")
    else None)


def _objective(m_KxN, y_K, coef_N, l1reg) -> float:
    coef_N = np.asarray(coef_N, np.float64)
    r = np.asarray(y_K, np.float64) - m_KxN.astype(np.float64) @ coef_N
    return 0.5 * r @ r + l1reg * np.abs(coef_N).sum()


@pytest.mark.parametrize("operand", ["design", "dense"])
def test_solve_lasso_matches_sklearn_and_is_certified(operand):
    m = DESIGN if operand == "design" else DENSE
    result = solve_lasso(Y_QxK, m, LAMBDA_Q, WS)
    assert result.coef.shape == (N, Q) and result.gap.shape == (Q,)
    assert result.converged.all() and (result.gap <= WS.tol).all()
    assert (result.n_outer >= 2).all()  # the working set really was updated and re-solved
    for q in range(Q):
        ref = _sklearn(Y_QxK[q], LAMBDA_Q[q])
        # same tolerance as plain FISTA above: float32 agrees with float64 CD to ~1e-4 of max|w|
        np.testing.assert_allclose(result.coef[:, q], ref, atol=3e-4 * np.abs(ref).max())
        _assert_kkt(result.coef[:, q], Y_QxK[q], LAMBDA_Q[q])
        # the certificate bounds the suboptimality: P(w) - P(w*) <= gap P(w) (+ float32 slack)
        p_w, p_ref = (_objective(DENSE, Y_QxK[q], c, LAMBDA_Q[q]) for c in (result.coef[:, q], ref))
        assert p_w - p_ref <= result.gap[q] * p_w + 1e-6 * p_ref
        np.testing.assert_allclose(result.objective[q], p_w, rtol=1e-5)


def test_working_set_grows_when_the_support_fills_it():
    # 32 slots, 3/4 of which the 28-40 nonzeros fill: 32 -> 64 (64 shares WS's compile)
    result = solve_lasso(Y_QxK, DESIGN, LAMBDA_Q, dataclasses.replace(WS, ws_size=32))
    assert result.converged.all() and (result.n_nonzero > 24).all()
    np.testing.assert_allclose(result.coef, solve_lasso(Y_QxK, DESIGN, LAMBDA_Q, WS).coef,
                               atol=1e-5)


def test_solve_lasso_nonneg_matches_sklearn_positive():
    # a FistaConfig is accepted (LassoConfig.from_fista): its nonneg carries over
    result = solve_lasso(Y_QxK, DESIGN, LAMBDA_Q, FistaConfig(nonneg=True, max_iter=2000))
    assert result.converged.all() and (result.gap <= 1e-4).all()
    for q in range(Q):
        ref = _sklearn(Y_QxK[q], LAMBDA_Q[q], positive=True)
        np.testing.assert_allclose(result.coef[:, q], ref, atol=3e-3 * np.abs(ref).max())
        _assert_kkt(result.coef[:, q], Y_QxK[q], LAMBDA_Q[q], nonneg=True, tol=2e-2)


@pytest.mark.slow  # ~12 s: two compiles for a new design shape, and scikit-learn
def test_solve_lasso_n_much_larger_than_k_planted():
    """n = 20000 >> K = 200 (the paper's regime): 10-sparse truths, 1% noise, 0.05 lambda_max."""
    n, k, d, k_sparse = 20_000, 200, 10, 10  # (20k: the sklearn reference takes ~1 s)
    design = left_regular_design(n, k, d, seed=2)
    rng = np.random.default_rng(2)
    w_true_NxQ = np.zeros((n, 2), np.float32)
    for q in range(2):
        w_true_NxQ[rng.choice(n, k_sparse, replace=False), q] = (
            rng.choice([-1.0, 1.0], k_sparse) * rng.uniform(1.0, 2.0, k_sparse))
    y_QxK = np.asarray(design.matvec(w_true_NxQ)).T
    y_QxK = (y_QxK + 0.01 * y_QxK.std() * rng.normal(size=y_QxK.shape)).astype(np.float32)
    lam_Q = 0.05 * np.asarray(lambda_max(y_QxK, design))
    result = solve_lasso(y_QxK, design, lam_Q, LassoConfig(ws_size=64), sparse=True)
    assert result.converged.all() and (result.gap <= 1e-4).all()
    for q in range(2):
        rows, _ = result.coef.entries(q)
        assert np.isin(np.flatnonzero(w_true_NxQ[:, q]), rows).all()  # recall 1
    # the certificate agrees with scikit-learn's coordinate descent on the CSR matrix
    import scipy.sparse

    ids = design.ids_NxS
    csr = scipy.sparse.csr_matrix((np.ones(ids.size), (ids.reshape(-1), np.repeat(np.arange(n), d))),
                                  shape=(k, n))
    ref = Lasso(alpha=lam_Q[0] / k, fit_intercept=False, tol=1e-10, max_iter=100_000).fit(
        csr, y_QxK[0].astype(np.float64)).coef_
    r_ref = y_QxK[0] - csr @ ref
    p_ref = 0.5 * r_ref @ r_ref + lam_Q[0] * np.abs(ref).sum()
    assert abs(result.objective[0] - p_ref) <= 1e-4 * p_ref


def test_sparse_and_dense_output_agree():
    dense = solve_lasso(Y_QxK, DESIGN, LAMBDA_Q, WS)
    sparse = solve_lasso(Y_QxK, DESIGN, LAMBDA_Q, WS, sparse=True)
    assert isinstance(sparse.coef, SparseScores) and sparse.coef.shape == (N, Q)
    np.testing.assert_array_equal(sparse.coef.to_dense(), dense.coef)
    np.testing.assert_array_equal(sparse.n_nonzero, (dense.coef != 0).sum(axis=0))
    assert sparse.coef.nnz == int(sparse.n_nonzero.sum())
    one = solve_lasso(Y_QxK[1], DESIGN, LAMBDA_Q[1], WS)
    assert one.coef.shape == (N,) and one.gap.shape == ()
    np.testing.assert_allclose(one.coef, dense.coef[:, 1], atol=1e-6)


def test_unconverged_queries_are_reported():
    # one round of two FISTA steps: far from optimal, and the certificate says so
    capped = solve_lasso(Y_QxK, DESIGN, LAMBDA_Q, dataclasses.replace(
        WS, max_outer=1, max_iter=2, check_every=1))
    assert not capped.converged.any() and (capped.gap > 1e-2).all()
    fista = fista_lasso(Y_QxK, DESIGN, LAMBDA_Q, FistaConfig(max_iter=1))
    assert (np.asarray(fista.gap) > 1e-2).all() and not bool(fista.converged.any())
    tight = fista_lasso(Y_QxK, DESIGN, LAMBDA_Q, TIGHT)
    assert (np.asarray(tight.gap) <= 1e-5).all()


def test_gap_bounds_suboptimality_of_any_iterate():
    """For any w (here FISTA stopped early), gap >= (P(w) - P(w*)) / P(w), and 0 at w*."""
    y_K, lam = Y_QxK[0], float(LAMBDA_Q[0])
    p_star = _objective(DENSE, y_K, _sklearn(y_K, lam), lam)
    coef = np.zeros(N, np.float32)
    for _ in range(30):  # proximal-gradient iterates (one FISTA step from each warm start)
        result = fista_lasso(y_K, DESIGN, lam, FistaConfig(max_iter=1), init=coef)
        coef = np.asarray(result.coef)
        p_w = _objective(DENSE, y_K, coef, lam)
        assert float(result.gap) * p_w >= p_w - p_star - 1e-6 * p_star
        assert float(result.gap) > 0
    # the formula itself, in float64, against P(w) - D(theta) computed the long way
    rng = np.random.default_rng(3)
    w = rng.normal(size=N) * (rng.random(N) < 0.1)
    r = y_K - DENSE.astype(np.float64) @ w
    c = DENSE.T.astype(np.float64) @ r
    theta = r * min(1.0, lam / np.abs(c).max())
    long_way = _objective(DENSE, y_K, w, lam) - (theta @ y_K - 0.5 * theta @ theta)
    with jax.enable_x64(True):
        gap, primal = _duality_gap(jnp.asarray(r), jnp.asarray(c @ w), jnp.asarray(np.abs(w).sum()),
                                   jnp.asarray(np.abs(c).max()), lam)
    np.testing.assert_allclose(float(gap), long_way, rtol=1e-9)
    np.testing.assert_allclose(float(primal), _objective(DENSE, y_K, w, lam), rtol=1e-12)


def test_solve_lasso_batch_equals_single_queries_and_compiles_once():
    batched = solve_lasso(Y_QxK, DESIGN, LAMBDA_Q, WS)
    solve_lasso(Y_QxK[:1], DESIGN, LAMBDA_Q[:1], WS, query_chunk=1)  # compiles a 1-query block
    size = _ws_chunk._cache_size()
    for q in range(Q):
        single = solve_lasso(Y_QxK[q:q + 1], DESIGN, LAMBDA_Q[q:q + 1], WS, query_chunk=1)
        np.testing.assert_allclose(single.coef[:, 0], batched.coef[:, q], atol=1e-6)
        assert single.n_iter[0] == batched.n_iter[q]
    solve_lasso(Y_QxK + 1.0, DESIGN, LAMBDA_Q * 2, WS)
    solve_lasso(Y_QxK, DESIGN, LAMBDA_Q, dataclasses.replace(WS, block=1024))
    assert _ws_chunk._cache_size() == size  # new values and unread config fields: no compile


def test_solve_lasso_lambda_at_lambda_max_gives_zeros():
    lmax_Q = np.asarray(lambda_max(Y_QxK, DESIGN))
    at_max = solve_lasso(Y_QxK, DESIGN, lmax_Q * (1 + 1e-6), WS)
    assert (at_max.coef == 0).all() and at_max.converged.all() and (at_max.n_outer == 0).all()
    np.testing.assert_array_equal(at_max.gap, 0.0)


def test_cached_lipschitz_bounds_the_spectral_norm():
    design = left_regular_design(300, 40, 6, seed=4)
    top = np.linalg.svd(design.dense().astype(np.float64), compute_uv=False)[0] ** 2
    assert top <= design.lipschitz() <= top * (1 + 1e-3)
    assert design.lipschitz() is design.lipschitz()  # memoised on the frozen design
    # used by fista_lasso: same result as passing it explicitly
    a = fista_lasso(Y_QxK, DESIGN, LAMBDA_Q, TIGHT)
    b = fista_lasso(Y_QxK, DESIGN, LAMBDA_Q, TIGHT, lipschitz_const=DESIGN.lipschitz())
    np.testing.assert_array_equal(a.coef, b.coef)


def _bad_inputs():
    y_nan, y_inf = Y_QxK.copy(), Y_QxK.copy()
    y_nan[1, 3] = np.nan
    y_inf[2, 0] = -np.inf
    m_nan, m_inf, m_col, m_row = (DENSE.copy() for _ in range(4))
    m_nan[0, 0] = np.nan
    m_inf[5, 7] = np.inf
    m_col[:, 11] = 0.0
    m_row[4] = 0.0
    empty_subset = Design(DESIGN.ids_NxS, K + 1)  # subset K has no member
    y_k1 = np.concatenate([Y_QxK, np.zeros((Q, 1), np.float32)], axis=1)
    no_subsets = Design(np.zeros((N, 0), np.int32), K)
    lam = LAMBDA_Q
    return {
        "max_iter 0 (FISTA)": (lambda: FistaConfig(max_iter=0), "max_iter"),
        "max_iter -1 (Lasso)": (lambda: LassoConfig(max_iter=-1), "max_iter"),
        "max_outer 0": (lambda: LassoConfig(max_outer=0), "max_outer"),
        "tol < 0 (FISTA)": (lambda: FistaConfig(tol=-1e-3), "tol"),
        "tol < 0 (Lasso)": (lambda: LassoConfig(tol=-1e-3), "tol"),
        "lipschitz 0": (lambda: fista_lasso(Y_QxK, DESIGN, lam, lipschitz_const=0.0),
                        "lipschitz_const"),
        "lipschitz < 0": (lambda: fista_lasso(Y_QxK, DESIGN, lam, lipschitz_const=-5.0),
                          "lipschitz_const"),
        "lipschitz inf": (lambda: fista_lasso(Y_QxK, DESIGN, lam, lipschitz_const=np.inf),
                          "lipschitz_const"),
        "lipschitz nan": (lambda: fista_lasso(Y_QxK, DESIGN, lam, lipschitz_const=np.nan),
                          "lipschitz_const"),
        "NaN in y": (lambda: solve_lasso(y_nan, DESIGN, lam), "y holds 1 NaN and 0 inf"),
        "inf in y": (lambda: fista_lasso(y_inf, DESIGN, lam), "y holds 0 NaN and 1 inf"),
        "NaN in dense design": (lambda: solve_lasso(Y_QxK, m_nan, lam),
                                r"design matrix \(design_or_matrix\) holds 1 NaN/inf"),
        "inf in dense design": (lambda: fista_lasso(Y_QxK, m_inf, lam),
                                r"design matrix \(design_or_matrix\) holds 1 NaN/inf"),
        "empty column (dense)": (lambda: solve_lasso(Y_QxK, m_col, lam),
                                 "1 empty columns .*first: column 11"),
        "empty row (dense)": (lambda: fista_lasso(Y_QxK, m_row, lam),
                              "1 empty rows .*first: row 4"),
        "empty subset (design)": (lambda: solve_lasso(y_k1, empty_subset, lam),
                                  "1 empty subsets .*first: subset 60"),
        "example in no subset (design)": (lambda: fista_lasso(Y_QxK, no_subsets, lam),
                                          "in no subset"),
        "lambda < 0": (lambda: solve_lasso(Y_QxK, DESIGN, -lam), r"lambda must be >= 0 \(argument l1reg\)"),
        "lambda nan": (lambda: fista_lasso(Y_QxK, DESIGN, np.nan), "lambda must be finite"),
        "lambda inf": (lambda: solve_lasso(Y_QxK, DESIGN, np.array([1.0, np.inf, 1.0])),
                       "lambda must be finite"),
        "lambda shape": (lambda: solve_lasso(Y_QxK, DESIGN, np.ones(2)), r"\[Q=3\]"),
        "y shape": (lambda: solve_lasso(Y_QxK[:, :50], DESIGN, lam), "K=60"),
        "query_chunk 0": (lambda: solve_lasso(Y_QxK, DESIGN, lam, query_chunk=0), "query_chunk"),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_any_compile(case):
    call, match = BAD[case]
    before = len(_TRACES)
    with pytest.raises(ValueError, match=match):
        call()
    assert len(_TRACES) == before, f"{case}: traced or compiled before raising"


def test_sparse_scores_methods_and_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    dense = (rng.normal(size=(50, 4)) * (rng.random((50, 4)) < 0.2)).astype(np.float32)
    dense[:, 3] = 0.0  # a query with no nonzeros
    dense[:3, 2] = [0.5, -0.5, 0.5]  # ties
    scores = SparseScores.from_dense(dense)
    assert scores.shape == (50, 4) and scores.nnz == int((dense != 0).sum())
    np.testing.assert_array_equal(scores.to_dense(), dense)
    for q in range(4):
        np.testing.assert_array_equal(scores.column(q), dense[:, q])
        for harmful in (False, True):
            for k in (1, 5, 49, 60):
                col = dense[:, q]
                order = np.argsort(col if harmful else -col, kind="stable")[:k]
                assert scores.top_k(q, k, harmful=harmful) == [(int(i), float(col[i])) for i in order]
    loaded = SparseScores.load(scores.save(tmp_path / "scores"))
    np.testing.assert_array_equal(loaded.to_dense(), dense)
    assert loaded.rows.dtype == np.int32 and loaded.values.dtype == np.float32
    np.savez(tmp_path / "other.npz", x=np.ones(3))
    with pytest.raises(ValueError, match="not a SparseScores"):
        SparseScores.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="sorted and distinct"):
        SparseScores(np.array([0, 2]), np.array([3, 1]), np.ones(2), 5)
    with pytest.raises(ValueError, match="must lie in"):
        SparseScores(np.array([0, 1]), np.array([5]), np.ones(1), 5)
    with pytest.raises(IndexError):
        scores.column(4)


def test_merge_keeps_the_support_then_the_best_candidates():
    from stride_jax.recovery import _merge

    n = 100
    idx = jnp.array([[5, 9, 40, n]])  # slot 3 empty (sentinel N)
    w = jnp.array([[0.5, 0.0, -1.0, 0.0]])
    prio = jnp.array([[0.1, 0.3, 0.2, 0.0]])  # |c_j| on the working set
    cand_idx = jnp.array([[9, 77, 12, 60]])  # 9 is already in the set
    cand_prio = jnp.array([[0.3, 2.0, 1.5, 0.05]])
    new_idx, new_w = _merge(idx, w, prio, cand_idx, cand_prio, n)
    # the support {5, 40} first whatever its |c|, then the largest priorities: 77, 12
    assert sorted(zip(np.asarray(new_idx[0]).tolist(), np.asarray(new_w[0]).tolist())) == [
        (5, 0.5), (12, 0.0), (40, -1.0), (77, 0.0)]
