"""Confidence by operator subsampling: a planted example is stable, noise is not; the empty-column
block is exact; Attribution carries and round-trips the confidence and the fit identity."""

import dataclasses
import json
import types

import numpy as np
import pytest

from stride_jax import Attribution, StrideConfig, confidence, recovery
from stride_jax.config import RecoveryConfig
from stride_jax.design import left_regular_design

N, K, S = 300, 120, 5
PLANTED = (7, 42)  # the example that drives query 0, and the one that drives query 1


def planted_problem(noise: float = 0.3):
    """y = M w + noise for 3 queries: query q < 2 has one big entry at PLANTED[q], query 2 none."""
    design = left_regular_design(N, K, S, seed=0)
    w_NxQ = np.zeros((N, 3), np.float32)
    w_NxQ[PLANTED[0], 0] = 4.0
    w_NxQ[PLANTED[1], 1] = 4.0
    rng = np.random.default_rng(1)
    y_QxK = (design.dense() @ w_NxQ).T + noise * rng.standard_normal((3, K)).astype(np.float32)
    return design, y_QxK


def full_solve(design, y_QxK, rc=RecoveryConfig()):
    lambdas_Q = rc.lambda_frac * np.asarray(recovery.lambda_max(y_QxK, design))
    res = recovery.solve_lasso(y_QxK, design, lambdas_Q, rc.lasso)
    return Attribution(scores=np.asarray(res.coef), train_ids=np.arange(N) + 100, query_ids=np.arange(3),
                       lambdas=lambdas_Q, converged=res.converged, gap=res.gap)


@pytest.fixture(scope="module")
def planted():
    design, y_QxK = planted_problem()
    attr = full_solve(design, y_QxK)
    conf = confidence.resample(y_QxK, design, attr, n_boot=30, k=5, seed=0)
    return design, y_QxK, attr, conf


def test_planted_example_is_stable_and_noise_is_not(planted):
    """The planted example tops its query in >= 90% of the draws; the other top-k rows (noise the
    full solve happened to fit) stay top-k in few of them."""
    _, _, attr, conf = planted
    assert conf.rows.shape == (3, 2, 5) and conf.stability.shape == (3, 2, 5) and conf.interval.shape == (3, 2, 5, 2)
    for q, row in enumerate(PLANTED):
        assert conf.rows[q, confidence.HELPFUL, 0] == row
        assert conf.stability[q, confidence.HELPFUL, 0] >= 0.9
        others = conf.stability[q, :, 1:] if q < 2 else conf.stability[q]
        assert others.mean() < 0.4, conf.stability[q]
        lo, hi = conf.interval[q, confidence.HELPFUL, 0]
        assert 0 < lo <= attr.scores[row, q] <= hi  # the full solve's score lies in its interval
    assert conf.stability[2].mean() < 0.4  # a query with nothing planted: nothing is stable
    assert conf.seconds > 0 and conf.n_boot == 30


def test_interval_levels_nest(planted):
    design, y_QxK, attr, conf = planted
    narrow = confidence.resample(y_QxK, design, attr, n_boot=30, k=5, seed=0, level=0.5)
    np.testing.assert_array_equal(narrow.stability, conf.stability)  # the same draws
    assert (narrow.interval[..., 0] >= conf.interval[..., 0]).all()
    assert (narrow.interval[..., 1] <= conf.interval[..., 1]).all()


def test_examples_no_kept_operator_saw_score_zero_and_leave_the_rest_unchanged():
    """The extra row + ghost column that carries empty columns is a separate block: the solve on
    the draw equals the solve without those columns, and they score exactly 0."""
    design = left_regular_design(80, 40, 1, seed=3)  # d = 1: a half draw leaves ~half the columns empty
    rng = np.random.default_rng(0)
    kept = np.sort(rng.choice(40, size=20, replace=False))
    m_KxN = design.dense()[kept]
    seen = m_KxN.any(axis=0)
    y_QxK = rng.standard_normal((2, 20)).astype(np.float32)
    lambdas_Q = 0.05 * np.abs(m_KxN.T @ y_QxK.T).max(axis=0)
    draw_MxN = np.zeros((21, 81), np.float32)
    draw_MxN[:20, :80] = m_KxN
    draw_MxN[20, :80] = ~seen
    draw_MxN[20, 80] = 1
    coef = confidence._solve(np.concatenate([y_QxK, np.zeros((2, 1), np.float32)], axis=1), draw_MxN, lambdas_Q,
                             RecoveryConfig())
    ref = confidence._solve(y_QxK, m_KxN[:, seen], lambdas_Q, RecoveryConfig())
    np.testing.assert_array_equal(coef[:80][~seen], 0.0)
    np.testing.assert_allclose(coef[:80][seen], ref, atol=1e-4)
    y_full = rng.standard_normal((2, 40)).astype(np.float32)
    attr = Attribution(scores=np.zeros((80, 2)), train_ids=np.arange(80), query_ids=np.arange(2),
                       lambdas=0.05 * np.asarray(recovery.lambda_max(y_full, design)))
    out = confidence.resample(y_full, design, attr, n_boot=2, k=3)  # runs despite the empty columns
    unseen = np.isnan(out.stability)  # a row no draw saw: NaN stability and interval, nothing else
    assert unseen.any() and not unseen.all()
    np.testing.assert_array_equal(np.isnan(out.interval).any(axis=-1), unseen)
    assert ((out.stability[~unseen] >= 0) & (out.stability[~unseen] <= 1)).all()


def test_attach_round_trips_through_save_and_load(planted, tmp_path):
    design, y_QxK, attr, conf = planted
    stride = types.SimpleNamespace(design=design, cfg=StrideConfig())
    with_conf = confidence.attach(stride, attr, y_QxK, n_boot=30, k=5, seed=0)
    np.testing.assert_array_equal(with_conf.stability, conf.stability)  # attach = bootstrap = resample
    np.testing.assert_array_equal(with_conf.confidence_rows, conf.rows)
    with_conf = dataclasses.replace(with_conf, fit_identity="ab12" * 16)
    with_conf.save(tmp_path / "run")
    back = Attribution.load(tmp_path / "run")
    for name in ("scores", "confidence_rows", "stability", "interval", "lambdas"):
        np.testing.assert_array_equal(getattr(back, name), getattr(with_conf, name))
    assert back.confidence_info == with_conf.confidence_info and back.confidence_info["n_boot"] == 30
    assert back.fit_identity == "ab12" * 16
    meta = json.loads((tmp_path / "run" / "attribution.json").read_text())
    assert meta["fit_identity"] == "ab12" * 16 and meta["confidence_info"]["seconds"] >= 0
    stab, lo, hi = back.confidence_of(0, PLANTED[0])
    assert stab >= 0.9 and lo <= hi
    assert back.confidence_of(0, PLANTED[0], harmful=True) is None
    assert attr.confidence_of(0, PLANTED[0]) is None  # no confidence computed


def test_fista_solver_and_nonneg_settings_are_used(planted):
    design, y_QxK, attr, _ = planted
    rc = RecoveryConfig(solver="fista", nonneg=True)
    conf = confidence.resample(y_QxK, design, attr, rc, n_boot=3, k=5)
    assert (conf.interval[:, confidence.HARMFUL] >= 0).all()  # nonneg: no draw scores below 0
    assert (conf.stability[:, confidence.HARMFUL] == 0).all()  # so no row stays harmful
    assert conf.stability[0, confidence.HELPFUL, 0] == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_boot=0), "n_boot"), (dict(n_boot=1), "n_boot"), (dict(n_boot=2.5), "n_boot"),
    (dict(k=0), "k "), (dict(fraction=1.0), "fraction"), (dict(fraction=0.001), "fraction"),
    (dict(level=1.0), "level"), (dict(y=np.zeros((3, K - 1))), "y_QxK"), (dict(y=np.full((3, K), np.nan)), "y_QxK"),
    (dict(no_lambdas=True), "lambdas"), (dict(rc=types.SimpleNamespace(solver="ridge")), "recovery.solver"),
])
def test_bad_input_is_one_clear_error_before_any_solve(planted, kwargs, match):
    design, y_QxK, attr, _ = planted
    y = kwargs.pop("y", y_QxK)
    if kwargs.pop("no_lambdas", False):
        attr = dataclasses.replace(attr, lambdas=None)
    with pytest.raises((ValueError, TypeError), match=match):
        confidence.resample(y, design, attr, **kwargs)


def test_attribution_checks_its_confidence_fields():
    scores = np.zeros((4, 2), np.float32)
    base = dict(scores=scores, train_ids=np.arange(4), query_ids=np.arange(2))
    with pytest.raises(ValueError, match="together"):
        Attribution(**base, stability=np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="confidence_rows"):
        Attribution(**base, confidence_rows=np.zeros((3, 2, 1)), stability=np.zeros((3, 2, 1)),
                    interval=np.zeros((3, 2, 1, 2)))
    with pytest.raises(ValueError, match="index"):
        Attribution(**base, confidence_rows=np.full((2, 2, 1), 4), stability=np.zeros((2, 2, 1)),
                    interval=np.zeros((2, 2, 1, 2)))
    with pytest.raises(TypeError, match="fit_identity"):
        Attribution(**base, fit_identity=3)


def test_penalty_is_scaled_to_the_subsample():
    """lambda x m / K keeps the shrinkage of the full solve: the draws' median score of a planted
    example matches its full-solve score (an unscaled lambda would shrink it twice as much)."""
    design, y_QxK = planted_problem()
    rc = RecoveryConfig(lambda_frac=0.2)  # a strong penalty: shrinkage ~ 0.8 of the planted 4.0
    attr = full_solve(design, y_QxK, rc)
    conf = confidence.resample(y_QxK, design, attr, rc, n_boot=20, k=2, level=0.02)  # interval ~ the median
    for q, row in enumerate(PLANTED):
        median = conf.interval[q, confidence.HELPFUL, 0].mean()
        assert abs(median - attr.scores[row, q]) < 0.25, (median, attr.scores[row, q])
