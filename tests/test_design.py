"""Tests for stride_jax.design: left-regular designs, sparse matvecs, LDS subsets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax.design import (
    Design,
    alpha_subsets,
    design_matvec,
    design_rmatvec,
    indices_to_mask,
    left_regular_design,
)

SMALL = dict(n=300, n_subsets=40, per_example=6, seed=3)


@pytest.fixture(scope="module")
def small() -> Design:
    return left_regular_design(**SMALL)


def test_rows_have_exact_degree_and_distinct_ids(small):
    ids = small.ids_NxS
    assert ids.shape == (300, 6) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < 40
    assert all(len(set(row)) == 6 for row in ids.tolist())
    assert (small.dense().sum(axis=0) == 6).all()
    assert small.subset_sizes().sum() == 300 * 6


def test_same_seed_same_design_other_seed_differs(small):
    again = left_regular_design(**SMALL)
    other = left_regular_design(**{**SMALL, "seed": 4})
    assert again.fingerprint() == small.fingerprint()
    assert other.fingerprint() != small.fingerprint()


def test_memberships_are_uniform():
    # each subset is chosen with probability d / K per example: sizes ~ Binomial(n, d/K)
    d = left_regular_design(20000, 50, 5, seed=0)
    sizes = d.subset_sizes()
    expected = 20000 * 5 / 50
    assert np.abs(sizes - expected).max() < 6 * np.sqrt(expected)
    # pairs of subsets co-occur uniformly too: each of the 1225 pairs ~ n * C(d,2) / C(K,2)
    dense = d.dense()
    co = dense @ dense.T
    off = co[~np.eye(50, dtype=bool)]
    expected_pair = 20000 * 10 / 1225
    assert np.abs(off - expected_pair).max() < 6 * np.sqrt(expected_pair)


def test_inverse_members_and_dense_agree(small):
    dense = small.dense()
    indptr, indices = small.inverse()
    assert indptr.shape == (41,) and indptr[-1] == 300 * 6
    for k in range(small.n_subsets):
        members = indices[indptr[k]:indptr[k + 1]]
        np.testing.assert_array_equal(np.sort(members), np.flatnonzero(dense[k]))
        np.testing.assert_array_equal(small.members(k), np.flatnonzero(dense[k]))
    np.testing.assert_array_equal(small.subset_sizes(), dense.sum(axis=1))


def test_matvec_rmatvec_match_dense_products(small):
    rng = np.random.default_rng(0)
    dense = small.dense().astype(np.float64)
    w_N, w_NxQ = rng.normal(size=300), rng.normal(size=(300, 3))
    r_K, r_KxQ = rng.normal(size=40), rng.normal(size=(40, 3))
    np.testing.assert_allclose(small.matvec(w_N), dense @ w_N, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small.matvec(w_NxQ), dense @ w_NxQ, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small.rmatvec(r_K), dense.T @ r_K, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(small.rmatvec(r_KxQ), dense.T @ r_KxQ, rtol=1e-5, atol=1e-5)


def test_matvecs_jit_and_vmap(small):
    rng = np.random.default_rng(1)
    ids = jnp.asarray(small.ids_NxS)
    w_QxN = jnp.asarray(rng.normal(size=(4, 300)), jnp.float32)
    r_QxK = jnp.asarray(rng.normal(size=(4, 40)), jnp.float32)
    mv = jax.jit(design_matvec, static_argnums=1)
    vmapped = jax.vmap(lambda w: design_matvec(ids, 40, w))(w_QxN)
    np.testing.assert_allclose(vmapped, mv(ids, 40, w_QxN.T).T, rtol=1e-6, atol=1e-5)
    rvmapped = jax.vmap(lambda r: design_rmatvec(ids, r))(r_QxK)
    np.testing.assert_allclose(rvmapped, jax.jit(design_rmatvec)(ids, r_QxK.T).T, rtol=1e-6, atol=1e-5)


def test_adjoint_identity(small):
    rng = np.random.default_rng(2)
    w, r = rng.normal(size=300).astype(np.float32), rng.normal(size=40).astype(np.float32)
    lhs = float(jnp.vdot(small.matvec(w), r))
    rhs = float(jnp.vdot(w, small.rmatvec(r)))
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_large_design_matvec_never_densifies():
    d = left_regular_design(200_000, 1000, 10, seed=0)
    assert d.subset_sizes().min() > 0
    with pytest.raises(ValueError, match="refusing to densify"):
        d.dense()
    ids = jnp.asarray(d.ids_NxS)
    jaxpr = jax.make_jaxpr(lambda w: design_matvec(ids, 1000, w))(jnp.ones(200_000))
    rjaxpr = jax.make_jaxpr(lambda r: design_rmatvec(ids, r))(jnp.ones(1000))
    biggest = max(
        int(np.prod(v.aval.shape))
        for jp in (jaxpr, rjaxpr)
        for eqn in jp.jaxpr.eqns
        for v in eqn.outvars
    )
    assert biggest <= 200_000 * 10  # at most the ids' own size, never K x N = 2e8
    w = np.ones(200_000, np.float32)
    np.testing.assert_allclose(d.matvec(w), d.subset_sizes(), rtol=1e-6)
    np.testing.assert_allclose(d.rmatvec(np.ones(1000, np.float32)), np.full(200_000, 10.0))


def test_validation_errors():
    with pytest.raises(ValueError, match=r"per_example \(d=12\) must be .*<= n_subsets \(K=8\)"):
        left_regular_design(100, 8, 12, seed=0)
    with pytest.raises(ValueError, match=r"n_subsets \(K=0\) must be >= 1"):
        left_regular_design(100, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"n \(number of examples\) must be >= 1"):
        left_regular_design(0, 8, 2, seed=0)
    with pytest.raises(ValueError, match="per_example"):
        left_regular_design(10, 8, 0, seed=0)
    with pytest.raises(ValueError, match="cannot fill"):
        left_regular_design(3, 20, 2, seed=0)
    with pytest.raises(ValueError, match="must lie in"):
        Design(np.array([[0, 5]]), 5)
    with pytest.raises(ValueError, match="distinct"):
        Design(np.array([[1, 1]]), 5)


def test_empty_subsets_are_filled():
    # n d = 40 memberships over K = 30 subsets: many would be empty by chance alone
    d = left_regular_design(20, 30, 2, seed=0)
    sizes = d.subset_sizes()
    assert sizes.min() >= 1 and sizes.sum() == 40
    assert all(len(set(row)) == 2 for row in d.ids_NxS.tolist())
    summary = d.summary()
    assert summary["n_empty_subsets"] == 0 and summary["min_subset_size"] >= 1
    assert summary["mean_subset_size"] == pytest.approx(40 / 30)


def test_save_load_round_trip(tmp_path, small):
    path = small.save(tmp_path / "design")
    loaded = Design.load(path)
    np.testing.assert_array_equal(loaded.ids_NxS, small.ids_NxS)
    assert loaded.n_subsets == small.n_subsets and loaded.seed == SMALL["seed"]
    assert loaded.fingerprint() == small.fingerprint()
    other = left_regular_design(**{**SMALL, "seed": 9})
    np.savez(path, ids_NxS=other.ids_NxS, n_subsets=np.int64(40))  # npz no longer matches json
    with pytest.raises(ValueError, match="does not match its metadata"):
        Design.load(path)


def test_alpha_subsets_and_mask():
    idx = alpha_subsets(n=101, m=16, alpha=0.3, seed=0)
    assert idx.shape == (16, round(0.3 * 101))
    assert all((np.diff(row) > 0).all() for row in idx)  # sorted and distinct
    assert idx.min() >= 0 and idx.max() < 101
    np.testing.assert_array_equal(idx, alpha_subsets(n=101, m=16, alpha=0.3, seed=0))
    mask = indices_to_mask(idx, 101)
    assert mask.shape == (16, 101) and (mask.sum(axis=1) == idx.shape[1]).all()
    assert mask[np.arange(16)[:, None], idx].all()
    with pytest.raises(ValueError, match="alpha"):
        alpha_subsets(n=10, m=2, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="empty"):
        alpha_subsets(n=3, m=2, alpha=0.1, seed=0)
    with pytest.raises(ValueError, match="must lie in"):
        indices_to_mask(np.array([[0, 10]]), 10)


def test_lipschitz_is_an_upper_bound_and_cached():
    for n, k, d, seed in [(300, 40, 6, 3), (20, 30, 2, 0), (2000, 50, 5, 1)]:
        design = left_regular_design(n, k, d, seed=seed)
        top = np.linalg.svd(design.dense().astype(np.float64), compute_uv=False)[0] ** 2
        # Collatz-Wielandt: an upper bound, tight to the 1e-4 stopping rule
        assert top <= design.lipschitz() <= top * (1 + 2e-4)
    assert design.lipschitz() is design.lipschitz()
    again = Design(design.ids_NxS, design.n_subsets)  # a new instance computes its own
    assert again.lipschitz() == design.lipschitz()


def test_check_nonempty():
    left_regular_design(**SMALL).check_nonempty()
    with pytest.raises(ValueError, match=r"1 empty subsets .*first: subset 5"):
        Design(np.array([[0, 1], [2, 3], [4, 1]]), 6).check_nonempty()
    with pytest.raises(ValueError, match="in no subset"):
        Design(np.zeros((4, 0), np.int32), 3).check_nonempty()


def test_blocked_ids_pad_with_no_subset_and_are_cached(small):
    blocks = small.blocked_ids(64)
    assert blocks.shape == (5, 64, 6)  # 300 rows + at least one padding row, in blocks of 64
    flat = np.asarray(blocks).reshape(-1, 6)
    np.testing.assert_array_equal(flat[:300], small.ids_NxS)
    assert (flat[300:] == small.n_subsets).all()
    assert small.blocked_ids(64) is blocks
    assert small.blocked_ids(150).shape == (3, 150, 6)  # N divisible: still a padding row
