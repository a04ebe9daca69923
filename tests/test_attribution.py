"""The Stride facade: it recovers planted influence, is robust to confident models, reports
non-convergence, scores each query independently of the others, and the Attribution round-trips."""

import json
import logging

import jax
import numpy as np
import pytest

from stride_jax import Attribution, Examples, Stride, StrideConfig, models, store, train
from stride_jax.measure import Measurement, MeasureConfig, raw_responses

V, T = 32, 12
PLANTED = [3, 17, 29, 44]
GPT = models.GPTConfig(vocab_size=V, seq_len=T, n_layers=1, d_model=32, n_heads=2)


def planted_task():
    """60 random sequences over tokens 0..27, and 4 that alternate the otherwise unseen 30, 31.

    The query alternates 31, 30: only the 4 planted examples teach the model that pattern, so
    training on them is what lowers the query's loss.
    """
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 28, (64, T + 1))
    for i in PLANTED:
        seqs[i] = np.tile([30, 31], T)[: T + 1]
    qs = np.concatenate([np.tile([31, 30], T)[: T + 1][None], rng.integers(0, 28, (3, T + 1))])
    as_examples = lambda s, ids: Examples(inputs=s[:, :-1].astype(np.int32), targets=s[:, 1:].astype(np.int32), ids=ids)
    return as_examples(seqs, np.arange(64) + 1000), as_examples(qs, np.arange(4))


PLANTED_CFG = StrideConfig().replace(design={"n_subsets": 64, "per_example": 4}, steering={"layer": 1, "rank": 4},
                                     fit={"steps": 100, "subsets_per_step": 16, "positions_per_example": None})


@pytest.fixture(scope="module")
def planted():
    pool, queries = planted_task()
    model = train.pretrain(GPT, pool, train.TrainConfig(epochs=6, batch_size=16, learning_rate=1e-2), seed=0,
                           progress=False)
    stride = Stride(PLANTED_CFG).fit(model, pool, progress=False)
    return model, pool, queries, stride


def test_stride_recovers_planted_influence(planted):
    """The 4 examples that alone teach the query's pattern are STRIDE's top 4 for that query."""
    _, pool, queries, stride = planted
    attr = stride.attribute(queries, progress=False)
    top4 = {i for i, _ in attr.top_k(0, k=4)}
    assert top4 == set(PLANTED), attr.top_k(0, k=8)
    assert attr.scores[PLANTED, 0].min() > 0  # they help (sign convention)
    np.testing.assert_array_equal(attr.train_ids, pool.ids)
    assert attr.n_not_converged == 0


def test_operators_learn_their_own_subsets(planted):
    """Each operator lowers its members' losses more than it lowers other examples' losses."""
    _, pool, _, stride = planted
    m = stride.measure(pool, progress=False)
    drop_NxK = m.base_loss_Q[:, None] - m.steered_loss_QxK
    member_NxK = stride.design.dense().T.astype(bool)
    own = drop_NxK[member_NxK].mean()
    other = drop_NxK[~member_NxK].mean()
    assert own > other + 0.05, (own, other)


def test_scores_do_not_depend_on_the_other_queries(planted):
    _, _, queries, stride = planted
    all4 = stride.attribute(queries, progress=False)
    one = stride.attribute(queries[:1], progress=False)
    np.testing.assert_allclose(one.scores[:, 0], all4.scores[:, 0], rtol=1e-4, atol=1e-6)
    # with measure.reference="queries" (the old behaviour) they do
    by_call = stride.with_config(stride.cfg.replace(measure={"reference": "queries"}))
    a, b = by_call.attribute(queries, progress=False), by_call.attribute(queries[:2], progress=False)
    assert not np.allclose(a.scores[:, 0], b.scores[:, 0], atol=1e-6)


def test_with_config_shares_the_fit_and_refuses_fit_changes(planted):
    _, _, queries, stride = planted
    other = stride.with_config(stride.cfg.replace(recovery={"lambda_frac": 0.5}))
    assert other.bank is stride.bank and stride.cfg.recovery.lambda_frac == 0.05  # nothing mutated
    dense = stride.attribute(queries, progress=False).scores
    sparse = other.attribute(queries, progress=False).scores
    assert (sparse != 0).sum() < (dense != 0).sum()
    with pytest.raises(ValueError, match="only measure and recovery"):
        stride.with_config(stride.cfg.replace(fit={"steps": 5}))


@pytest.mark.parametrize("recovery", [
    {"lasso": {"max_outer": 1, "max_iter": 1}},  # the default working-set solver, one short round
    {"solver": "fista", "fista": {"max_iter": 1}},
])
def test_unconverged_recovery_is_reported(planted, caplog, recovery):
    _, _, queries, stride = planted
    capped = stride.with_config(stride.cfg.replace(recovery={**recovery, "lambda_frac": 0.001}))
    with caplog.at_level(logging.WARNING, logger="stride_jax"):
        attr = capped.attribute(queries, progress=False)
    assert attr.n_not_converged > 0 and "did not converge" in caplog.text
    assert (attr.gap[~attr.converged] > 0).all()
    strict = stride.with_config(capped.cfg.replace(recovery={"strict": True}))
    with pytest.raises(RuntimeError, match="did not converge"):
        strict.attribute(queries, progress=False)


def test_solvers_agree_and_sparse_scores_round_trip(planted, tmp_path):
    """The certified working-set scores equal plain FISTA's (same Lasso); sparse == dense."""
    _, _, queries, stride = planted
    ws = stride.attribute(queries, progress=False)
    assert ws.converged.all() and (ws.gap <= stride.cfg.recovery.lasso.tol).all()
    fista = stride.with_config(stride.cfg.replace(recovery={"solver": "fista", "fista": {"tol": 1e-7,
                                                                                         "max_iter": 20000}}))
    ref = fista.attribute(queries, progress=False)
    scale = np.abs(ref.scores).max(axis=0)
    np.testing.assert_allclose(ws.scores, ref.scores, atol=float(1e-2 * scale.max()))
    assert [i for i, _ in ws.top_k(0, k=4)] == [i for i, _ in ref.top_k(0, k=4)]
    sparse = stride.with_config(stride.cfg.replace(recovery={"sparse": True})).attribute(queries, progress=False)
    assert sparse.sparse and sparse.scores.nnz == int((ws.scores != 0).sum())
    np.testing.assert_array_equal(sparse.dense(), ws.scores)
    assert sparse.top_k(0, k=5) == ws.top_k(0, k=5) and sparse.top_k(1, k=3, harmful=True) == ws.top_k(1, k=3, harmful=True)
    sparse.save(tmp_path / "s")
    back = Attribution.load(tmp_path / "s")
    assert back.sparse and back.scores.nnz == sparse.scores.nnz
    np.testing.assert_array_equal(back.dense(), ws.scores)
    np.testing.assert_array_equal(back.gap, sparse.gap)


def test_fit_workdir_rejects_another_model_and_resumes_the_same(planted, tmp_path):
    model, pool, queries, _ = planted
    cfg = PLANTED_CFG.replace(fit={"steps": 4, "checkpoint_every": 2})
    first = Stride(cfg).fit(model, pool, workdir=tmp_path / "fit", progress=False).attribute(queries, progress=False)
    again = Stride(cfg).fit(model, pool, workdir=tmp_path / "fit", progress=False).attribute(queries, progress=False)
    np.testing.assert_array_equal(first.scores, again.scores)
    other = models.build(GPT, seed=1)  # same architecture, other parameters
    with pytest.raises(store.IdentityError, match="model: stored"):
        Stride(cfg).fit(other, pool, workdir=tmp_path / "fit", progress=False)
    edited = pool.replace(inputs=np.where(pool.inputs == 5, 6, pool.inputs))
    with pytest.raises(store.IdentityError, match="data: stored"):
        Stride(cfg).fit(model, edited, workdir=tmp_path / "fit", progress=False)


def test_diverging_fit_stops_with_an_error(planted):
    model, pool, _, _ = planted
    cfg = PLANTED_CFG.replace(fit={"steps": 30, "learning_rate": 1e8})
    with pytest.raises(FloatingPointError, match="diverged.*learning_rate"):
        Stride(cfg).fit(model, pool, progress=False)


def test_confident_classifier_needs_no_workaround():
    """A classifier trained to (float32) zero loss: log-space measurement floors the losses."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32) * 4
    y = (x[:, 0] > 0).astype(np.int32)
    pool = Examples(inputs=x, targets=y, ids=np.arange(80))
    cfg = models.MLPConfig(in_dim=4, hidden=(32,), n_classes=2)
    model = train.pretrain(cfg, pool, train.TrainConfig(epochs=200, batch_size=16, learning_rate=3e-2), seed=0,
                           progress=False)
    assert (train.eval_loss(model, pool) == 0).any()  # some losses underflow to exactly 0
    scfg = StrideConfig.preset("classifier", design={"n_subsets": 80, "per_example": 4},
                               fit={"steps": 20, "subsets_per_step": 80})
    attr = Stride(scfg).fit(model, pool, progress=False).attribute(pool[:8], progress=False)
    assert np.isfinite(attr.scores).all()
    y_log = raw_responses(Measurement(np.zeros(2), np.array([[0.0, 0.5], [1e-9, 0.0]])), MeasureConfig())
    assert np.isfinite(y_log).all() and y_log[0, 1] < 0  # 0 is floored, and a rising loss is negative


def test_attribution_save_load_and_top_k(tmp_path):
    scores = np.array([[0.5, -1.0], [2.0, 0.0], [-3.0, 1.0]], np.float32)
    attr = Attribution(scores=scores, train_ids=np.array([7, 8, 9]), query_ids=np.array([0, 1]),
                       converged=np.array([True, False]))
    assert attr.top_k(0, k=2) == [(1, 2.0), (0, 0.5)]
    assert attr.top_k(0, k=1, harmful=True) == [(2, -3.0)]
    assert attr.n_not_converged == 1
    attr.save(tmp_path / "a")
    back = Attribution.load(tmp_path / "a")
    np.testing.assert_array_equal(back.scores, scores)
    assert json.loads((tmp_path / "a" / "attribution.json").read_text())["sign"].startswith("positive")
    with pytest.raises(IndexError):
        attr.top_k(2)
    (tmp_path / "a" / "scores.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        Attribution.load(tmp_path / "a")


def test_unfitted_stride():
    with pytest.raises(RuntimeError, match="fit"):
        Stride().attribute(planted_task()[1])


def test_presets_are_named_and_validated():
    assert StrideConfig.preset("lm").design.n_subsets == 2048
    assert StrideConfig.preset("quick", fit={"steps": 3}).fit.steps == 3
    with pytest.raises(ValueError, match="unknown preset"):
        StrideConfig.preset("huge")
    # llm: K = n and 25 updates per operator whatever n (issue 23), first-order measurement
    llm = StrideConfig.preset("llm")
    for n in (256, 968):
        k = llm.resolve_subsets(n).design.n_subsets
        assert k == n and llm.fit.resolve_steps(k) * llm.fit.subsets_per_step >= 25 * k
    assert llm.measure.mode == "first_order" and llm.fit.sparse_updates


# --- issue 22: K from the pool (design.n_subsets="auto"), the knee warning, the prior through with_config


def test_auto_subsets_follow_the_pool_and_the_caps():
    cfg = StrideConfig().replace(design={"n_subsets": "auto", "per_example": 4}, fit={"subsets_per_step": 32})
    assert cfg.resolve_subsets(100).design.n_subsets == 200  # the default auto_ratio 2: K = 2n (the law)
    assert cfg.replace(design={"auto_ratio": 1.0}).resolve_subsets(100).design.n_subsets == 100
    assert cfg.replace(design={"auto_ratio": 10.0}).resolve_subsets(10).design.n_subsets == 40  # <= n d
    assert cfg.replace(design={"max_subsets": 50}).resolve_subsets(100).design.n_subsets == 50
    small = cfg.resolve_subsets(6)
    assert small.design.n_subsets == 12 and small.fit.subsets_per_step == 12  # a step cannot hold more than K
    fixed = StrideConfig().replace(design={"n_subsets": 64})
    assert fixed.resolve_subsets(10**6) is fixed
    for bad in ({"auto_ratio": 0}, {"auto_ratio": float("inf")}, {"n_subsets": "many"}):
        with pytest.raises((TypeError, ValueError), match="design"):
            StrideConfig().replace(design=bad)


def test_auto_subsets_reach_the_fit_and_a_small_k_warns_once(planted, caplog):
    model, pool, queries, _ = planted
    auto = PLANTED_CFG.replace(design={"n_subsets": "auto"}, fit={"steps": 5})
    with caplog.at_level(logging.WARNING, logger="stride_jax"):
        stride = Stride(auto).fit(model, pool, progress=False)
    assert stride.cfg.design.n_subsets == 2 * len(pool) and stride.design.n_subsets == 2 * len(pool)
    assert "below the knee" not in caplog.text
    small = PLANTED_CFG.replace(design={"n_subsets": 16}, fit={"steps": 5})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stride_jax"):
        Stride(small).fit(model, pool, progress=False)
        Stride(small).fit(model, pool, progress=False)
    assert caplog.text.count("below the knee") == 1 and "K=16" in caplog.text and "n=64" in caplog.text


def test_prior_recovery_through_with_config_uses_the_pools_features(planted):
    """A sweep shares one fit between Lasso and prior variants: the prior's features are computed
    on demand from the fitted pool (not refused), once, and recovery converges."""
    _, pool, queries, stride = planted
    assert stride.prior_features is None
    variant = stride.with_config(PLANTED_CFG.replace(recovery={"solver": "ridge", "prior": "features",
                                                               "prior_dim": 8}))
    attr = variant.attribute(queries, progress=False)
    assert variant.prior_features.shape == (len(pool), 8) and attr.n_not_converged == 0
    assert attr.fit_identity == stride.fit_identity is not None
    assert variant.recovery_info["solver"] == "ridge" and len(variant.recovery_info["cv"]) > 1
    # the planted examples still lead the query they alone teach
    assert set(PLANTED) <= {i for i, _ in attr.top_k(0, k=8)}


def test_with_config_measures_the_reference_in_the_new_mode(planted):
    """Fit-time centring subtracts operator means measured like the queries: a variant in another
    measurement mode gets a reference measured in that mode (first order is ~3x too large, so the
    exact means would not centre it)."""
    from stride_jax.measure import measure as measure_fn

    _, pool, _, stride = planted
    first = stride.with_config(PLANTED_CFG.replace(measure={"mode": "first_order"}))
    ref = first.reference.measurement
    rows = np.sort(np.random.default_rng(PLANTED_CFG.design.seed + 7).choice(len(pool), size=len(ref.base_loss_Q),
                                                                            replace=False))
    direct = measure_fn(stride.model, stride.bank, pool[rows], stride.cfg.steering, first.cfg.measure, progress=False)
    np.testing.assert_allclose(ref.steered_loss_QxK, direct.steered_loss_QxK, rtol=1e-5, atol=1e-6)
    exact = stride.reference.measurement.steered_loss_QxK
    assert not np.allclose(ref.steered_loss_QxK, exact, rtol=1e-3)  # it is not the exact reference


def test_with_config_accepts_the_unresolved_config_of_its_own_fit(planted):
    """A sweep hands with_config the variant's config as written (K 'auto', steps from
    updates_per_operator): it is the same fit once resolved, so it is accepted."""
    model, pool, _, _ = planted
    cfg = PLANTED_CFG.replace(design={"n_subsets": "auto"}, fit={"updates_per_operator": 2, "sparse_updates": True})
    stride = Stride(cfg).fit(model, pool, progress=False)
    assert stride.cfg.fit.steps == -(-2 * 2 * len(pool) // PLANTED_CFG.fit.subsets_per_step)  # K = 2n
    ridge = stride.with_config(cfg.replace(recovery={"solver": "ridge"}))
    assert ridge.cfg.design.n_subsets == 2 * len(pool)
    with pytest.raises(ValueError, match="fit differs"):
        stride.with_config(cfg.replace(fit={"updates_per_operator": 3}))


def test_fit_ensemble_averages_the_responses_of_its_member_fits(planted, tmp_path):
    """fit.ensemble = 2: two fits of the same subsets (fit seeds 0 and 1; member 0 in the workdir,
    where the single fit of the same settings resumes it), whose responses are averaged before
    recovery: the ensemble's y is exactly the mean of the members' centred y, and it still finds
    the planted examples."""
    model, pool, queries, _ = planted
    cfg = PLANTED_CFG.replace(fit={"ensemble": 2})
    ens = Stride(cfg)
    assert ens.fit(model, pool, workdir=tmp_path / "fit", progress=False) is ens  # fitted in place, like a single fit
    assert len(ens.members) == 2 and ens.cfg.fit.ensemble == 2
    assert [m.cfg.fit.seed for m in ens.members] == [0, 1]
    single = [Stride(PLANTED_CFG.replace(fit={"seed": s})).fit(model, pool, workdir=tmp_path / d, progress=False)
              for s, d in ((0, "fit"), (1, "fit/member1"))]  # resumed from the ensemble's members
    y_each = [s.responses(s.measure(queries, progress=False)) for s in single]
    assert not np.allclose(y_each[0], y_each[1], atol=1e-3)  # the seeds differ
    y = ens.responses(ens.measure(queries, progress=False))
    np.testing.assert_allclose(y, (y_each[0] + y_each[1]) / 2, rtol=1e-4, atol=1e-5)
    attr = ens.attribute(queries, progress=False)
    assert {i for i, _ in attr.top_k(0, k=4)} == set(PLANTED)
    ridge = ens.with_config(cfg.replace(recovery={"solver": "ridge"}))  # shares both fits
    assert ridge.members and ridge.attribute(queries, progress=False).n_not_converged == 0
    with pytest.raises(ValueError, match="ensemble must be an integer"):
        StrideConfig().replace(fit={"ensemble": 0})


def test_sweep_ensemble_variant_shares_member_fits_with_single_fit_variants(planted, tmp_path):
    """In a sweep, an ensemble variant's member 0 is the single-fit variant's fit (no refit: two
    fit folders for the three variants), and its scores are the facade ensemble's."""
    import types

    from stride_jax.harness.sweep import run_variants

    model, pool, queries, _ = planted
    prepared = types.SimpleNamespace(model=model, train=pool, queries=queries)
    two = PLANTED_CFG.replace(fit={"ensemble": 2})
    out = run_variants(prepared, {"one": PLANTED_CFG, "two": two, "two ridge": two.replace(recovery={"solver": "ridge"})},
                       tmp_path / "sweep")
    assert len([p for p in (tmp_path / "sweep").iterdir() if p.is_dir()]) == 2
    assert all(r.error is None for r in out.values()) and out["two"].cfg.fit.ensemble == 2
    assert out["two"].seconds["fit"] > out["one"].seconds["fit"]  # both members' fits counted
    facade = Stride(two).fit(model, pool, progress=False).attribute(queries, progress=False)
    np.testing.assert_allclose(out["two"].attr.dense(), facade.dense(), rtol=1e-3, atol=1e-5)
    assert not np.allclose(out["two"].attr.dense(), out["one"].attr.dense(), atol=1e-4)


def test_recover_needs_no_fit(planted):
    """`attribution.recover` on a fit's responses gives the fit's own scores, and on synthetic
    responses y = M w of a sparse w (perfect operators) finds w's support."""
    from stride_jax.attribution import recover

    _, pool, queries, stride = planted
    y = stride.responses(stride.measure(queries, progress=False))
    attr, info = recover(y, stride.design, stride.cfg.recovery, train_ids=pool.ids)
    np.testing.assert_allclose(attr.dense(), stride.recover(y).dense(), rtol=1e-5, atol=1e-7)
    assert info["solver"] == "working_set"
    w = np.zeros((len(pool), 2), np.float32)
    w[[5, 40], 0], w[[12], 1] = (1.0, 0.5), -1.0
    y_syn = stride.design.dense().astype(np.float32) @ w  # [K, 2]: each subset's sum of its members' w
    syn, _ = recover(y_syn.T - y_syn.T.mean(axis=1, keepdims=True), stride.design, stride.cfg.recovery,
                     train_ids=pool.ids)
    assert {i for i, _ in syn.top_k(0, k=2)} == {5, 40}
    assert [i for i, _ in syn.top_k(1, k=1, harmful=True)] == [12]
