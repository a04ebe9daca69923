"""Sharded stages on the 4 forced host CPU devices (conftest) equal their single-device runs.

Tolerances: a sharded run is another XLA program (another number of models vmapped per
device, reductions split across devices), so float32 sums reassociate. For trained parameters
the gap is measured relative to how far training moved them, ||a - b|| / ||a - init|| < 1e-3
(reassociation after a few Adam steps is ~1e-6 of that; a model trained on another subset or an
operator matched to another subset is ~1 away, see the negative controls). Within one program
(same sharding twice) results are bitwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from stride_jax import Examples, models, recovery, sharding, train
from stride_jax.config import StrideConfig
from stride_jax.design import left_regular_design
from stride_jax.fit import Fitter

MLP_CFG = models.MLPConfig(in_dim=5, hidden=(16, 8), n_classes=2)
GPT_CFG = models.GPTConfig(vocab_size=48, seq_len=10, n_layers=2, d_model=32, n_heads=2)  # as in test_fit


def _gap(a_leaves, b_leaves, init_leaves):
    return [float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(a) - np.asarray(i)),
                                                                      1e-12))
            for a, b, i in zip(a_leaves, b_leaves, init_leaves)]


def _specs(tree):
    return {leaf.sharding.spec for leaf in jax.tree.leaves(tree)}


def test_device_count():
    assert len(jax.devices()) == 4, "conftest forces 4 host CPU devices"


def test_helpers():
    m = sharding.mesh("models")
    assert m.axis_names == ("models",) and m.shape["models"] == 4
    assert sharding.axis_of(m, "models") == "models" and sharding.axis_of(m, "subsets") == "models"  # 1-D: any name
    two = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2), ("a", "b"))
    with pytest.raises(ValueError, match="no 'queries' axis"):
        sharding.axis_of(two, "queries")
    x = {"w": jnp.arange(8.0).reshape(4, 2), "b": jnp.arange(4.0)}
    split = sharding.shard_leading(x, m, "models")
    assert _specs(split) == {P("models")}
    assert all(len(leaf.addressable_shards) == 4 and leaf.addressable_shards[0].data.shape[0] == 1
               for leaf in jax.tree.leaves(split))
    rep = sharding.replicate(x, m)
    assert _specs(rep) == {P()} and all(s.data.shape == (4, 2) for s in rep["w"].addressable_shards)
    with pytest.raises(ValueError, match="multiple of 4"):
        sharding.shard_leading(jnp.zeros((6, 2)), m, "models")
    np.testing.assert_array_equal(sharding.pad_to_multiple(np.array([1, 2, 3, 4, 5]), 4), [1, 2, 3, 4, 5, 5, 5, 5])
    sharding.check_local(m, "this")  # one process: every device is local


def _classifier_examples():
    x = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    return Examples(inputs=x, targets=(x[:, 0] + x[:, 1] > 0).astype(np.int32), ids=np.arange(64))


def test_train_many_on_a_mesh_equals_one_device():
    """M = 3 models (padded to 4, one per device) == the same 3 vmapped on one device."""
    ex = _classifier_examples()
    cfg = train.TrainConfig(batch_size=8, epochs=2, learning_rate=1e-2, scan_steps=4)
    idx = np.stack([np.arange(i, i + 32) for i in (0, 8, 16)])
    seeds = np.array([3, 4, 5])
    g, single = train.train_many(MLP_CFG, ex, idx, seeds, cfg, progress=False)
    m = sharding.mesh("models")
    g2, sharded = train.train_many(MLP_CFG, ex, idx, seeds, cfg, progress=False, mesh=m)
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(sharded))
    for i, seed in enumerate(seeds):
        init = jax.tree.leaves(nnx.state(models.build(MLP_CFG, int(seed))))
        a = [x[i] for x in jax.tree.leaves(single)]
        gap = _gap(a, [x[i] for x in jax.tree.leaves(sharded)], init)
        assert max(gap) < 1e-3, gap
        other = [x[(i + 1) % 3] for x in jax.tree.leaves(sharded)]  # negative control: another subset and seed
        assert min(_gap(a, other, init)) > 0.05
    np.testing.assert_allclose(train.eval_losses(g2, sharded, ex), train.eval_losses(g, single, ex), rtol=1e-4,
                               atol=1e-5)
    _, again = train.train_many(MLP_CFG, ex, idx, seeds, cfg, progress=False, mesh=m)
    for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(again)):
        np.testing.assert_array_equal(x, y)  # one program twice: bitwise


@pytest.mark.slow
def test_lora_finetune_on_a_mesh_equals_one_device():
    """LoRA fine-tunes of a tiny Llama: 4 models split over 4 devices == vmapped on one; the frozen
    base parameters are replicated, never split."""
    V, T = 16, 12
    cfg_l = models.LlamaConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32,
                               max_len=T, tie_embeddings=True)
    start = models.build(cfg_l, 0)
    tokens = np.random.default_rng(1).integers(0, V, (48, T + 1)).astype(np.int32)
    ex = Examples(inputs=tokens[:, :-1], targets=tokens[:, 1:], ids=np.arange(48))
    cfg = train.TrainConfig(batch_size=8, epochs=2, learning_rate=1e-2, scan_steps=4)
    idx = np.stack([np.arange(i, i + 24) for i in (0, 8, 16, 24)])
    seeds = np.arange(4)
    tune = train.Tune("lora", rank=2)
    single = train.finetune_many(start, ex, idx, seeds, cfg, tune, progress=False)
    m = sharding.mesh("models")
    sharded = train.finetune_many(start, ex, idx, seeds, cfg, tune, progress=False, mesh=m)
    init = train._lora_params(train._plan(start, tune, ex.inputs[:1]), seeds)
    for i in range(4):
        at = lambda t: [x[i] for x in jax.tree.leaves(t)]
        gap = _gap(at(single.trainable_M), at(sharded.trainable_M), at(init))
        assert max(gap) < 1e-3, gap
    np.testing.assert_allclose(sharded.eval_losses(ex), single.eval_losses(ex), rtol=1e-5, atol=1e-6)


def _fit_setup():
    model = models.build(GPT_CFG, seed=0)
    n = 40
    tokens = np.random.default_rng(0).integers(0, GPT_CFG.vocab_size, (n, GPT_CFG.seq_len + 1)).astype(np.int32)
    pool = Examples(inputs=tokens[:, :-1], targets=tokens[:, 1:], ids=np.arange(n))
    fit = {"steps": 8, "subsets_per_step": 4, "fidelity_batch": 3, "stability_batch": 3, "probe_batch": 4,
           "positions_per_example": 4, "checkpoint_every": 4, "linearity_weight": 0.5, "sketch_dim": 2}
    cfg = StrideConfig().replace(design={"n_subsets": 8, "per_example": 2}, steering={"layer": 1, "rank": 4},
                                 fit=fit)
    return model, pool, left_regular_design(n, 8, 2, 0), cfg


@pytest.mark.parametrize("shard_pool", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fit_on_a_mesh_equals_one_device(shard_pool, tmp_path):
    """K = 8 operators, 2 per device, their Adam moments split alike; 4 subsets per step, one per
    device. Equal to the single-device fit; a checkpoint written on the mesh resumes on one
    device to the same result."""
    model, pool, design, cfg = _fit_setup()
    single = Fitter(model, pool, design, cfg).run(progress=False)
    m = sharding.mesh("subsets")
    fitter = Fitter(model, pool, design, cfg, mesh=m, shard_pool=shard_pool, workdir=tmp_path / "fit")
    fitter.run(max_steps=4, progress=False)
    assert _specs(fitter.state.coef) == {P("subsets")} and _specs(fitter.state.basis) == {P()}
    assert _specs((fitter.state.opt_state.mu[1], fitter.state.opt_state.nu[1])) == {P("subsets")}
    assert _specs(fitter.data.h) == ({P("subsets")} if shard_pool else {P()})
    sharded = fitter.run(progress=False)
    init = [np.zeros(x.shape, x.dtype) for x in jax.tree.leaves(single.coef)]  # operators start at 0
    a, b = jax.tree.leaves(single.coef), jax.tree.leaves(sharded.coef)
    assert max(_gap(a, b, init)) < 1e-3, _gap(a, b, init)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(sharded.basis)[0]), np.asarray(jax.tree.leaves(single.basis)[0]),
                               rtol=1e-4, atol=1e-6)
    # negative control: operator k compared with operator k+1 of the same fit is far away
    coef = np.asarray(a[0])
    assert _gap([coef], [np.roll(coef, 1, axis=0)], init[:1])[0] > 0.5
    resumed = Fitter(model, pool, design, cfg, workdir=tmp_path / "fit")  # no mesh: the same checkpoint files
    assert resumed.step == 8
    for x, y in zip(jax.tree.leaves(resumed.bank.coef), b):
        np.testing.assert_array_equal(x, y)


def test_map_queries_runs_fista_per_query_block():
    """Recovery with the query axis split over devices == one fista_lasso call (each query solved
    independently; the tolerance is FISTA's own: both runs stop when the relative change of w
    drops below cfg.tol, so their iterates differ by at most a few tol of ||w||)."""
    design = left_regular_design(30, 12, 2, 0)
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(30, 6)) * (rng.random((30, 6)) < 0.2)
    y_QxK = (design.dense() @ w_true).T.astype(np.float32) + 0.01 * rng.normal(size=(6, 12)).astype(np.float32)
    lam_Q = 0.1 * np.asarray(recovery.lambda_max(y_QxK, design))
    # solved to float32 precision: a per-device block reassociates the [N, Q] products, and the
    # relative-change stopping rule then stops at another iterate; the optimum is the same
    cfg = recovery.FistaConfig(tol=1e-9, max_iter=20000)
    direct = recovery.fista_lasso(y_QxK, design, lam_Q, cfg)

    def solve(y, lam):
        return recovery.fista_lasso(y, design, lam, cfg)

    m = sharding.mesh("queries")
    out = sharding.map_queries(solve, y_QxK, m, args=(lam_Q,), out_axes=recovery.FistaResult(1, 0, 0, 0, 0))
    assert out.coef.shape == (30, 6) and out.n_iter.shape == (6,)  # Q = 6 padded to 8, then trimmed
    # n = 30 > K = 12 with d = 2: some columns of the design coincide, so the Lasso minimiser w is not
    # unique (weight can move between equal columns; seen: 1.6e-4 apart at equal objectives on one
    # CPU); what is unique is the fit M w and ||w||_1 (hence the objective): compare those
    m_KxN = design.dense().astype(np.float64)

    def same_solution(got, want):
        g, w = np.asarray(got.coef, np.float64), np.asarray(want.coef, np.float64)
        fit = m_KxN @ w
        np.testing.assert_allclose(m_KxN @ g, fit, atol=1e-4 * np.abs(fit).max())
        np.testing.assert_allclose(np.abs(g).sum(0), np.abs(w).sum(0), rtol=1e-4)

    same_solution(out, direct)
    again = sharding.map_queries(solve, y_QxK, m, args=(lam_Q,), out_axes=recovery.FistaResult(1, 0, 0, 0, 0))
    np.testing.assert_array_equal(np.asarray(again.coef), np.asarray(out.coef))
    # a dense design passed whole to every device (replicated), not closed over
    dense = sharding.map_queries(lambda y, lam, m_KxN: recovery.fista_lasso(y, m_KxN, lam, cfg), y_QxK, m,
                                 args=(lam_Q,), replicated=(jnp.asarray(design.dense()),),
                                 out_axes=recovery.FistaResult(1, 0, 0, 0, 0))
    same_solution(dense, direct)
    with pytest.raises(ValueError, match="leading query axis"):
        sharding.map_queries(solve, y_QxK, m, args=(lam_Q[:3],))


def test_load_model_replicated_onto_a_mesh(tmp_path):
    model = models.build(GPT_CFG, 3)
    models.save_model(model, tmp_path / "ckpt")
    m = sharding.mesh("subsets")
    loaded, _ = models.load_model(tmp_path / "ckpt", sharding=NamedSharding(m, P()))
    for leaf, want in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(model))):
        assert leaf.sharding.spec == P() and len(leaf.sharding.device_set) == 4
        np.testing.assert_array_equal(leaf, want)
    x = np.random.default_rng(0).integers(0, GPT_CFG.vocab_size, (2, GPT_CFG.seq_len)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_stride_facade_on_a_mesh_equals_one_device():
    """`Stride(cfg, mesh=...)` fits and measures on the mesh; its scores equal the single-device ones
    up to reassociation (a scale-relative tolerance; another query's scores are far off)."""
    from stride_jax import Stride

    model, pool, _, cfg = _fit_setup()
    single = Stride(cfg).fit(model, pool, progress=False).attribute(pool[:3], progress=False)
    sharded = Stride(cfg, mesh=sharding.mesh("subsets")).fit(model, pool, progress=False).attribute(pool[:3],
                                                                                                   progress=False)
    scale = np.abs(single.scores).max()
    np.testing.assert_allclose(sharded.scores, single.scores, atol=1e-3 * scale)
    assert np.abs(single.scores[:, 0] - single.scores[:, 1]).max() > 1e-2 * scale  # the tolerance can fail
