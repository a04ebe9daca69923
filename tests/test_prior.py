"""Ridge recovery with the features prior: the matrix-free solver against its dense closed form,
the prior's gain on planted data (and its loss when features are misaligned), cross-validation
without ground truth, the facade's features against an independent per-example computation."""

import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax import Examples, Stride, StrideConfig, models, prior, store
from stride_jax.config import RecoveryConfig
from stride_jax.design import left_regular_design


def dense_posterior_mean(m_KxN, phi_NxP, a, g, y_QxK):
    """w = C M^T (M C M^T + gamma I)^-1 y in float64 numpy, gamma = g * mean diag(M C M^T)."""
    m = m_KxN.astype(np.float64)
    c = np.eye(m.shape[1]) + (0.0 if phi_NxP is None else a * phi_NxP.astype(np.float64) @ phi_NxP.T)
    gram = m @ c @ m.T
    gamma = g * np.mean(np.diag(gram))
    return c @ m.T @ np.linalg.solve(gram + gamma * np.eye(m.shape[0]), y_QxK.T.astype(np.float64)), gamma


def planted(n=1000, k=250, p=8, q=3, seed=1):
    """w_true = Phi theta + small noise, y = M w_true + noise: influence that Phi explains."""
    design = left_regular_design(n, k, 8, seed)
    rng = np.random.default_rng(seed)
    phi = prior.reduce_features(rng.standard_normal((n, p)), p)
    w_NxQ = phi @ rng.standard_normal((p, q)) + 0.3 * rng.standard_normal((n, q))
    y_QxK = (design.dense() @ w_NxQ).T
    noise_std = 0.3 * y_QxK.std()
    y_QxK = y_QxK + noise_std * rng.standard_normal(y_QxK.shape)
    return design, phi, w_NxQ, y_QxK.astype(np.float32), rng, noise_std ** 2


def mean_corr(coef_NxQ, w_NxQ):
    return float(np.mean([np.corrcoef(coef_NxQ[:, j], w_NxQ[:, j])[0, 1] for j in range(w_NxQ.shape[1])]))


@pytest.mark.parametrize("n,k,a,g", [(400, 150, 0.0, 0.1), (400, 150, 10.0, 0.1), (400, 150, 100.0, 0.01),
                                     (200, 200, 3.0, 0.3)])
@pytest.mark.parametrize("with_features", [True, False])
def test_solver_matches_dense_closed_form(n, k, a, g, with_features):
    """Matrix-free CG with float64 refinement equals the dense posterior mean to 1e-4 relative,
    plain ridge (no features) and with the prior, including K = N (where M and M^T have one shape)."""
    design = left_regular_design(n, k, 5, 0)
    rng = np.random.default_rng(0)
    phi = prior.reduce_features(rng.standard_normal((n, 8)), 8) if with_features else None
    y_QxK = rng.standard_normal((3, k)).astype(np.float32)
    want, gamma = dense_posterior_mean(design.dense(), phi, a, g, y_QxK)
    res = prior.ridge_prior_solve(y_QxK, design, phi, a, g)
    assert res.coef.shape == (n, 3) and res.coef.dtype == np.float32
    rel = np.linalg.norm(res.coef - want, axis=0) / np.linalg.norm(want, axis=0)
    assert rel.max() < 1e-4, rel
    assert res.converged.all() and (res.gap <= 1e-5).all(), res.gap
    assert res.gamma == pytest.approx(gamma, rel=1e-6)


def test_k_equals_n_at_scale_is_matrix_free():
    """K = N = 20,000 (a dense K x K float32 matrix would be 1.6 GB): converges, and neither the
    compiled CG program nor the host holds anything near K x K."""
    n = k = 20_000
    design = left_regular_design(n, k, 10, 0)
    rng = np.random.default_rng(0)
    phi = prior.reduce_features(rng.standard_normal((n, 32)), 16)
    y_QxK = rng.standard_normal((2, k)).astype(np.float32)
    tracemalloc.start()
    res = prior.ridge_prior_solve(y_QxK, design, phi, 10.0, 0.1)
    _, host_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.converged.all(), res.gap
    assert host_peak < 100e6, host_peak
    precond = prior._preconditioner(design, prior._design_features(design, phi), 10.0, 1.0, np.ones(k))
    compiled = prior._pcg.lower(jnp.asarray(design.ids_NxS), jnp.asarray(phi), jnp.zeros((k, 2)), jnp.ones(k),
                                jnp.float32(10.0), jnp.float32(1.0), precond, jnp.float32(1e-3), n_subsets=k,
                                max_iter=10).compile()
    stats = compiled.memory_analysis()
    if stats is not None:
        assert stats.temp_size_in_bytes < 100e6, stats.temp_size_in_bytes


def test_planted_prior_beats_ridge_unless_features_are_shuffled():
    """With Phi explaining the influence, the prior recovers it far better than ridge; with the
    rows of Phi shuffled across examples the advantage is gone (a misaligned Phi fails here)."""
    design, phi, w_NxQ, y_QxK, rng, _ = planted()
    ridge = mean_corr(prior.ridge_prior_solve(y_QxK, design, None, 0.0, 0.1).coef, w_NxQ)
    with_prior = mean_corr(prior.ridge_prior_solve(y_QxK, design, phi, 10.0, 0.1).coef, w_NxQ)
    shuffled = mean_corr(prior.ridge_prior_solve(y_QxK, design, phi[rng.permutation(len(phi))], 10.0, 0.1).coef,
                         w_NxQ)
    assert with_prior > ridge + 0.25, (with_prior, ridge)
    assert shuffled < ridge + 0.02, (shuffled, ridge)


def test_cross_validation_picks_the_prior_only_when_features_carry_signal():
    """No ground truth: held-out operators' responses choose a > 0 for informative features, with
    a large drop of the held-out error; for pure-noise features a = 0 or small, and no real gain.
    The errors are held-out ones: none falls below the responses' own noise variance. The table
    covers the grid."""
    design, phi, _, y_QxK, rng, noise_var = planted()

    def best_mse(table, with_prior):
        return min(row["mse"] for row in table if (row["a"] > 0) == with_prior)

    a, g, table = prior.select_prior(y_QxK, design, phi, (0.0, 1.0, 10.0), (0.1, 1.0))
    assert a > 0 and best_mse(table, True) < 0.8 * best_mse(table, False), table
    assert min(row["mse"] for row in table) > noise_var, (noise_var, table)
    assert len(table) == 6 and {(row["a"], row["g"]) for row in table} == {(s, t) for s in (0, 1, 10) for t in (.1, 1)}
    noise = prior.reduce_features(rng.standard_normal(phi.shape), phi.shape[1])
    a_noise, _, table_noise = prior.select_prior(y_QxK, design, noise, (0.0, 1.0, 10.0), (0.1, 1.0))
    assert a_noise <= 1.0 and best_mse(table_noise, True) > 0.97 * best_mse(table_noise, False), table_noise


V, T = 32, 10
GPT = models.GPTConfig(vocab_size=V, seq_len=T, n_layers=2, d_model=16, n_heads=2)


def padded_pool(n=48, seed=0):
    """Token examples of lengths 3..T (right padding) whose loss counts only the second half."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, n)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    loss_mask = mask * (np.arange(T)[None, :] >= lengths[:, None] // 2)
    tokens = rng.integers(0, V, (n, T + 1)) * np.concatenate([mask, mask[:, -1:]], axis=1).astype(int)
    return Examples(inputs=tokens[:, :-1].astype(np.int32), targets=tokens[:, 1:].astype(np.int32),
                    ids=np.arange(n) + 500, mask=mask, loss_mask=loss_mask)


def independent_features(model, pool, dim):
    """Loss-weighted means of the hook-layer (1) and final states and log token counts, pooled
    here row by row from one batched forward per layer, then reduced like `pool_features`."""
    graphdef, state = nnx.split(model)
    trunk = jax.jit(lambda st, x, m, layer: nnx.merge(graphdef, st).trunk(x, layer=layer, mask=m), static_argnums=3)
    states = [np.asarray(trunk(state, jnp.asarray(pool.inputs), jnp.asarray(pool.mask), layer), np.float64)
              for layer in (1, GPT.n_layers)]
    rows = []
    for i in range(len(pool)):
        w = np.asarray(pool.loss_mask[i], np.float64)
        rows.append(np.concatenate([h[i].T @ w / w.sum() for h in states] + [np.log([w.sum()])]))
    return prior.reduce_features(np.stack(rows), dim)


def test_pool_features_align_with_each_pool_example():
    """Row i of Phi is pool[i]'s own features (pooled over its loss-weighted positions), across
    chunks of the pool: a shuffle, an off-by-one chunk or unweighted pooling fails here."""
    pool, model = padded_pool(), models.build(GPT, 0)
    phi = prior.pool_features(model, pool, 1, dim=6, chunk=20, batch_size=8)
    assert phi.shape == (len(pool), 6) and phi.dtype == np.float32
    np.testing.assert_allclose(phi, independent_features(model, pool, 6), rtol=1e-3, atol=1e-3)
    assert np.mean(np.sum(phi.astype(np.float64) ** 2, axis=1)) == pytest.approx(1.0, rel=1e-5)


def test_facade_ridge_with_features_prior(tmp_path):
    """Stride.fit computes Phi once (cached in the workdir), aligned with the pool; attribute runs
    the cross-validated prior recovery, converges and records the CV table."""
    pool, model = padded_pool(), models.build(GPT, 0)
    cfg = StrideConfig().replace(design={"n_subsets": 32, "per_example": 4}, steering={"layer": 1, "rank": 2},
                                 fit={"steps": 2, "subsets_per_step": 8, "positions_per_example": None},
                                 measure={"n_reference": 8},
                                 recovery={"solver": "ridge", "prior": "features", "prior_dim": 6,
                                           "prior_strengths": [0.0, 10.0], "ridge_gammas": [0.1, 1.0],
                                           "ridge": {"folds": 2}})
    stride = Stride(cfg).fit(model, pool, workdir=tmp_path / "fit", progress=False)
    np.testing.assert_allclose(stride.prior_features, independent_features(model, pool, 6), rtol=1e-3, atol=1e-3)
    cached = store.load_npz(tmp_path / "fit" / "prior_features_p6.npz")["phi"]
    np.testing.assert_array_equal(cached, stride.prior_features)

    attr = stride.attribute(pool[:3], progress=False)
    assert attr.scores.shape == (len(pool), 3) and np.isfinite(attr.scores).all()
    assert attr.converged.all() and attr.n_not_converged == 0
    info = stride.recovery_info
    assert len(info["cv"]) == 4 and info["a"] in (0.0, 10.0) and info["prior_dim"] == 6
    np.testing.assert_allclose(attr.lambdas, info["gamma"], rtol=1e-6)
    plain = stride.with_config(cfg.replace(recovery={"prior": "none"}))  # plain ridge on the same fit
    assert plain.recover(np.ones((1, 32), np.float32)).converged.all() and plain.recovery_info["a"] == 0.0
    plain.cfg = cfg  # a features prior on a fit that computed no features yet
    plain.prior_features = None
    # the features are computed on demand from the fitted pool (a sweep shares one fit between
    # Lasso and prior variants), not refused
    plain.recover(np.ones((1, 32), np.float32))
    assert plain.prior_features is not None and plain.prior_features.shape[0] == len(pool)


def test_cached_features_recompute_for_another_model(tmp_path, monkeypatch):
    """The cache is keyed by what the features depend on: same inputs read the file, another
    model recomputes."""
    pool = padded_pool(8)
    path = tmp_path / "phi.npz"
    first = prior.cached_pool_features(models.build(GPT, 0), pool, 1, dim=4, cache=path)
    calls = []
    real = prior.pool_features
    monkeypatch.setattr(prior, "pool_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_array_equal(prior.cached_pool_features(models.build(GPT, 0), pool, 1, dim=4, cache=path), first)
    assert not calls
    prior.cached_pool_features(models.build(GPT, 1), pool, 1, dim=4, cache=path)
    assert calls


@pytest.mark.parametrize("fields,match", [
    ({"prior": "features"}, r"recovery.prior='features' needs recovery.solver='ridge'"),
    ({"solver": "ridge", "prior_dim": 0}, r"recovery.prior_dim must be an integer >= 1"),
    ({"solver": "ridge", "prior_strengths": ()}, r"recovery.prior_strengths must be a non-empty list"),
    ({"solver": "ridge", "prior_strengths": (-1.0, 1.0)}, r"recovery.prior_strengths must be"),
    ({"solver": "ridge", "ridge_gammas": (0.0, 1.0)}, r"recovery.ridge_gammas must be .* > 0"),
    ({"solver": "ridge", "ridge_gamma": float("inf")}, r"recovery.ridge_gamma must be a finite number > 0"),
    ({"solver": "ridge", "prior": "pca"}, r"recovery.prior must be 'none' or 'features'"),
    ({"solver": "ridge", "nonneg": True}, r"recovery.nonneg needs a Lasso solver"),
    ({"solver": "ridge", "ridge": prior.RidgeConfig(folds=5)}, None),
])
def test_config_validation(fields, match):
    if match is None:
        RecoveryConfig(**fields)
        return
    with pytest.raises(ValueError, match=match):
        RecoveryConfig(**fields)


def test_bad_inputs_raise_before_any_solve():
    design = left_regular_design(40, 10, 3, 0)
    y = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match=r"prior features \(phi\) must be \[N=40, P\]"):
        prior.ridge_prior_solve(y, design, np.zeros((39, 4)), 1.0, 0.1)
    with pytest.raises(ValueError, match=r"K=10"):
        prior.ridge_prior_solve(np.zeros((2, 9)), design, None, 0.0, 0.1)
    with pytest.raises(ValueError, match=r"recovery.ridge.folds \(20\) must be <= the number of subsets K=10"):
        prior.select_prior(y, design, None, (0.0,), (0.1, 1.0), prior.RidgeConfig(folds=20))
    with pytest.raises(ValueError, match=r"recovery.ridge.folds must be an integer >= 2"):
        prior.RidgeConfig(folds=1)
