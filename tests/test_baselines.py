"""Gradient baselines (GradDot, TracIn, TRAK, LoGra) against explicit per-example references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from stride_jax import models, train
from stride_jax.baselines import EKFAC, TRAK, Attributor, GradDot, LoGra, TracIn
from stride_jax.baselines import gradients as grad_lib
from stride_jax.baselines import logra as logra_lib
from stride_jax.baselines import trak as trak_lib
from stride_jax.data import Examples

GPT_CFG = models.GPTConfig(vocab_size=32, seq_len=8, n_layers=1, d_model=8, n_heads=2)  # P = 1280
MLP_CFG = models.MLPConfig(in_dim=6, hidden=(8,), n_classes=3)  # P = 83
N_TRAIN, N_QUERY = 10, 4
CHUNK = 4  # every gradient call sees 4 examples: 10 = 4 + 4 + 2 (padded), queries 4; one compile


def _lm_examples(n, seed):
    chunks = np.random.default_rng(seed).integers(0, GPT_CFG.vocab_size, (n, GPT_CFG.seq_len + 1))
    chunks = chunks.astype(np.int32)
    return Examples(inputs=chunks[:, :-1], targets=chunks[:, 1:], ids=np.arange(n) + 100 * seed)


def _clf_examples(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, MLP_CFG.in_dim)).astype(np.float32)
    return Examples(inputs=x, targets=rng.integers(0, MLP_CFG.n_classes, n).astype(np.int32),
                    ids=np.arange(n) + 100 * seed)


@pytest.fixture(scope="module", params=["gpt", "mlp"])
def setup(request):
    """(model, train, queries); the queries' first row duplicates training example 2."""
    if request.param == "gpt":
        model, tr, q = models.build(GPT_CFG, 0), _lm_examples(N_TRAIN, 1), _lm_examples(N_QUERY, 2)
    else:
        model, tr, q = models.build(MLP_CFG, 0), _clf_examples(N_TRAIN, 1), _clf_examples(N_QUERY, 2)
    q = Examples(inputs=np.concatenate([tr.inputs[2:3], q.inputs[1:]]),
                 targets=np.concatenate([tr.targets[2:3], q.targets[1:]]), ids=q.ids)
    ref = {"train": _loop_grads(model, tr), "query": _loop_grads(model, q)}
    return model, tr, q, ref


def _loop_grads(model, ex, fn=None):
    """Reference: one jitted jax.grad call per example -> (flat [N, P], {path: [N, ...]})."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x[None])
        return models.example_loss(logits, y[None])[0] if fn is None else fn(logits[0], y)

    g = jax.jit(jax.grad(loss))
    flat, by_path = [], {}
    for i in range(len(ex.ids)):
        grads = g(params, ex.inputs[i], ex.targets[i])
        flat.append(np.asarray(ravel_pytree(grads)[0], np.float64))
        for path, v in nnx.to_flat_state(grads):
            by_path.setdefault("/".join(map(str, path)), []).append(np.asarray(v[...], np.float64))
    return np.stack(flat), {k: np.stack(v) for k, v in by_path.items()}


# ----------------------------------------------------------------------------- GradDot, TracIn


def test_graddot_equals_python_loop(setup):
    model, tr, q, ref = setup
    want = ref["train"][0] @ ref["query"][0].T
    cached = GradDot(chunk_size=CHUNK).fit(model, tr)
    attr = cached.attribute(q)
    np.testing.assert_allclose(attr.scores, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    streamed = GradDot(chunk_size=CHUNK, max_cache_bytes=0).fit(model, tr)  # recomputed per block
    assert streamed._index.cached_NxP is None
    np.testing.assert_allclose(streamed.attribute(q).scores, attr.scores, rtol=1e-6, atol=1e-9)
    assert attr.method == "graddot" and attr.scores.shape == (N_TRAIN, N_QUERY)
    np.testing.assert_array_equal(attr.train_ids, tr.ids)
    np.testing.assert_array_equal(attr.query_ids, q.ids)
    assert set(cached.timings) >= {"fit", "score"}
    assert isinstance(cached, Attributor)


def test_graddot_sign_convention(setup):
    """A duplicate of the query scores positive; a small SGD step on example i moves the query
    loss by about -lr * score_iq (positive = including i lowers the query loss)."""
    model, tr, q, ref = setup
    scores = GradDot(chunk_size=CHUNK).fit(model, tr).attribute(q).scores
    assert scores[2, 0] > 0
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = jax.jit(lambda p, x, y: models.example_loss(nnx.merge(graphdef, p, rest)(x), y).mean())
    flat, unravel = ravel_pytree(params)
    lr = 1e-3 / max(np.abs(scores[:, 1]).max(), 1e-6)
    base = float(loss(params, q.inputs[1:2], q.targets[1:2]))
    for i in (0, 5):
        stepped = unravel(flat - lr * ref["train"][0][i].astype(np.float32))
        change = float(loss(stepped, q.inputs[1:2], q.targets[1:2])) - base
        np.testing.assert_allclose(change, -lr * scores[i, 1], rtol=0.05, atol=1e-7)


def test_tracin_one_checkpoint_equals_graddot(setup):
    model, tr, q, _ = setup
    gd = GradDot(chunk_size=CHUNK).fit(model, tr).attribute(q).scores
    tracin = TracIn([(model, 1.0)], chunk_size=CHUNK).fit(model, tr).attribute(q)
    np.testing.assert_allclose(tracin.scores, gd, rtol=1e-6)
    assert tracin.method == "tracin"
    other = models.build(model.cfg, 1)
    two = TracIn([(model, 0.5), (other, 2.0)], CHUNK, max_cache_bytes=0).fit(model, tr).attribute(q)
    want = 0.5 * gd + 2.0 * GradDot(chunk_size=CHUNK).fit(other, tr).attribute(q).scores
    np.testing.assert_allclose(two.scores, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_pretrain_with_checkpoints():
    tr = _clf_examples(20, 3)
    # 8 steps; scan_steps = 3 is what pretrain_with_checkpoints picks: one compiled chunk for both
    cfg = train.TrainConfig(batch_size=8, epochs=3.0, learning_rate=1e-2, scan_steps=3)
    ckpts = train.pretrain_with_checkpoints(MLP_CFG, tr, cfg, seed=0, n_checkpoints=3, progress=False)
    assert [c.step for c in ckpts] == [3, 6, 8]
    assert all(c.learning_rate > 0 for c in ckpts)
    leaves = [np.asarray(ravel_pytree(nnx.state(c.model, nnx.Param))[0]) for c in ckpts]
    assert not np.allclose(leaves[0], leaves[1]) and not np.allclose(leaves[1], leaves[2])
    final = train.pretrain(MLP_CFG, tr, cfg, seed=0, progress=False)
    np.testing.assert_allclose(leaves[-1], ravel_pytree(nnx.state(final, nnx.Param))[0], atol=1e-5)
    attr = TracIn(ckpts).fit(final, tr).attribute(tr[np.arange(2)])
    assert np.isfinite(attr.scores).all() and attr.scores[0, 0] > 0


# ----------------------------------------------------------------------------- TRAK


def _margin(logits, y):
    return logits[y] - jax.nn.logsumexp(logits.at[y].set(-jnp.inf))


def _trak_reference(model, tr, q, ref, damping):
    """Closed form on explicit per-example gradients (numpy, float64)."""
    clf = tr.targets.ndim == 1
    if clf:
        phi, phi_q = _loop_grads(model, tr, _margin)[0], _loop_grads(model, q, _margin)[0]
    else:
        phi, phi_q = ref["train"][0], ref["query"][0]
    if clf:
        p = jax.nn.softmax(model(tr.inputs), axis=-1)
        reweight = 1.0 - np.asarray(p)[np.arange(len(tr.ids)), tr.targets]
    else:
        reweight = np.ones(len(tr.ids))
    gram = phi.T @ phi
    lam = damping * np.trace(gram) / min(phi.shape)
    return (phi @ np.linalg.inv(gram + lam * np.eye(len(gram))) @ phi_q.T) * reweight[:, None]


def test_trak_identity_projection_equals_closed_form(setup):
    model, tr, q, ref = setup
    attr = TRAK(proj_dim=None, damping=1e-2, chunk_size=CHUNK).fit(model, tr).attribute(q)
    want = _trak_reference(model, tr, q, ref, 1e-2)
    np.testing.assert_allclose(attr.scores, want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
    assert attr.scores[2, 0] > 0  # the query's duplicate helps it


def test_trak_ensemble_averages_models():
    tr, q = _clf_examples(N_TRAIN, 1), _clf_examples(N_QUERY, 2)
    m0, m1 = models.build(MLP_CFG, 0), models.build(MLP_CFG, 1)
    attr = TRAK(proj_dim=None, damping=1e-2, ensemble=[m1]).fit(m0, tr).attribute(q)
    parts = []
    for m in (m0, m1):
        a = TRAK(proj_dim=None, damping=1e-2).fit(m, tr)
        parts.append((a._kernels_NxK[0] @ trak_lib.trak_features(m, q, None)[0].T, a._q_N))
    want = np.mean([s for s, _ in parts], axis=0) * np.mean([r for _, r in parts], axis=0)[:, None]
    np.testing.assert_allclose(attr.scores, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    with pytest.raises(ValueError, match="train_config"):
        TRAK(n_retrain=2)


def test_trak_reweighting_survives_a_zero_loss_classifier():
    """On a classifier trained to (float32) zero loss, 1 - p(y|x) rounds to exactly 0 and would zero
    every TRAK score; TRAK's reweighting must stay sigmoid(-margin) > 0 (checked in float64)."""
    model = models.build(MLP_CFG, 0)
    x = _clf_examples(N_TRAIN, 1).inputs

    def margins(inputs):  # float64, from float32 logits; targets = the argmax
        logits = np.asarray(model(inputs), np.float64)
        y = logits.argmax(-1)
        others = np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits)
        top = others.max(-1)
        return logits[np.arange(len(y)), y] - (top + np.log(np.exp(others - top[:, None]).sum(-1))), y

    # scale each input until its margin first exceeds 25: confident (1 - p == 0 in float32) while
    # sigmoid(-margin) ~ 1e-11 is still a normal float32
    grid = np.geomspace(1.0, 1e4, 400).astype(np.float32)
    m_GxN = np.stack([margins(x * g)[0] for g in grid])
    scale = grid[np.argmax(m_GxN > 25.0, axis=0)]
    tr_x = (x * scale[:, None]).astype(np.float32)
    margin, y = margins(tr_x)
    assert 25.0 < margin.min() and margin.max() < 40.0
    tr = Examples(inputs=tr_x, targets=y.astype(np.int32), ids=np.arange(N_TRAIN))
    p32 = np.asarray(jax.nn.softmax(model(tr.inputs), axis=-1))[np.arange(N_TRAIN), y]
    assert np.all(1.0 - p32 == 0.0)  # the regime: the naive reweighting is exactly zero
    attr = TRAK(proj_dim=None, damping=1e-2).fit(model, tr)
    np.testing.assert_allclose(attr._q_N, 1.0 / (1.0 + np.exp(margin)), rtol=1e-3)
    scores = attr.attribute(_clf_examples(N_QUERY, 2)).scores
    assert np.all(np.isfinite(scores)) and np.abs(scores).max() > 0


def test_trak_projection_approximates_identity():
    model, tr, q = models.build(MLP_CFG, 0), _clf_examples(N_TRAIN, 1), _clf_examples(N_QUERY, 2)
    exact = TRAK(proj_dim=None, damping=1e-2).fit(model, tr).attribute(q).scores
    proj = TRAK(proj_dim=512, damping=1e-2).fit(model, tr).attribute(q).scores
    assert np.corrcoef(exact.ravel(), proj.ravel())[0, 1] > 0.9


def test_trak_dense_and_streamed_projection_agree():
    model, tr = models.build(MLP_CFG, 0), _clf_examples(N_TRAIN, 1)
    dense, _ = trak_lib.trak_features(model, tr, 64, seed=3)
    streamed, _ = trak_lib.trak_features(model, tr, 64, seed=3, max_projection_bytes=0)
    np.testing.assert_allclose(dense, streamed, rtol=1e-5, atol=1e-6)
    # JL: inner products are preserved in expectation (here roughly, k = 64)
    r = trak_lib.rademacher_block(jax.random.key(0), 4, 40)
    assert r.shape == (4, 40) and np.allclose(np.abs(np.asarray(r)), 1 / np.sqrt(40))


# ----------------------------------------------------------------------------- LoGra


def _kernel_grads(by_path, names):
    """Reference per-layer kernel gradients [N, d_in * d_out]."""
    return [by_path[name + "/kernel"].reshape(len(by_path[name + "/kernel"]), -1) for name in names]


def test_logra_full_rank_equals_exact_layer_gradients(setup):
    model, tr, q, ref = setup
    grads, names = logra_lib.logra_grads(model, tr, chunk_size=CHUNK)
    assert names == logra_lib.layer_paths(model) and len(names) == (7 if model.cfg.model_type == "gpt" else 2)
    want = _kernel_grads(ref["train"][1], names)
    for g, w, name in zip(grads, want, names):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=name)
    attr = LoGra(None, None, curvature="identity", chunk_size=CHUNK).fit(model, tr).attribute(q)
    want_q = _kernel_grads(ref["query"][1], names)
    want_scores = sum(a @ b.T for a, b in zip(want, want_q))
    np.testing.assert_allclose(attr.scores, want_scores, rtol=1e-4, atol=1e-5 * np.abs(want_scores).max())


def test_logra_projection_and_curvature(setup):
    """Low rank: projected activations x output gradients == P_in^T (dL/dW) P_out; scores ==
    block-diagonal damped inverse of the training second moment, in numpy."""
    model, tr, q, _ = setup
    grads, names = logra_lib.logra_grads(model, tr, rank_in=3, rank_out=4, seed=5, chunk_size=CHUNK)
    exact = logra_lib.logra_grads(model, tr, chunk_size=CHUNK)[0]
    tapped, _ = logra_lib.tap_linears(model)
    projs = logra_lib._projections(tapped, names, 3, 4, 5)
    kernels = {"/".join(map(str, path)): n.kernel.shape for path, n in nnx.iter_graph(model)
               if isinstance(n, nnx.Linear)}
    for g, e, (p_in, p_out), name in zip(grads, exact, projs, names):
        d_in, d_out = kernels[name]
        p_in = np.eye(d_in) if p_in is None else p_in  # rank >= width: no projection on that side
        p_out = np.eye(d_out) if p_out is None else p_out
        want = np.einsum("ik,nio,ol->nkl", p_in, e.reshape(-1, d_in, d_out), p_out).reshape(len(e), -1)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    damping = 0.1
    attr = LoGra(3, 4, damping, seed=5, chunk_size=CHUNK).fit(model, tr).attribute(q)
    g_q, _ = logra_lib.logra_grads(model, q, rank_in=3, rank_out=4, seed=5, chunk_size=CHUNK)
    want = 0.0
    for g, gq in zip(grads, g_q):
        h = g.T.astype(np.float64) @ g / len(g)
        lam = damping * np.trace(h) / len(h)
        want = want + g @ np.linalg.inv(h + lam * np.eye(len(h))) @ gq.T
    np.testing.assert_allclose(attr.scores, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    assert attr.scores[2, 0] > 0


def test_logra_tap_is_transparent():
    model = models.build(GPT_CFG, 0)
    tapped, names = logra_lib.tap_linears(model, ["lm_head", "blocks/0/mlp/c_fc"])
    x = _lm_examples(2, 0).inputs
    np.testing.assert_array_equal(np.asarray(tapped(x)), np.asarray(model(x)))
    assert names == ["lm_head", "blocks/0/mlp/c_fc"]
    with pytest.raises(ValueError, match="unknown linear"):
        logra_lib.tap_linears(model, ["nope"])


# ----------------------------------------------------------------------------- EK-FAC


def test_ekfac_matches_numpy_on_exact_gradients(setup):
    """Corrected eigenvalues and scores from explicit per-example kernel gradients, in the
    fitted Kronecker eigenbases (numpy, float64)."""
    model, tr, q, ref = setup
    method = EKFAC(damping=0.1, chunk_size=CHUNK).fit(model, tr)
    attr = method.attribute(q)
    want = 0.0
    for name, (q_a, q_s), lam in zip(method.layer_names, method.bases, method.eigenvalues):
        q_a, q_s = np.asarray(q_a, np.float64), np.asarray(q_s, np.float64)
        np.testing.assert_allclose(q_a.T @ q_a, np.eye(len(q_a)), atol=1e-5)
        g_tr, g_q = ref["train"][1][name + "/kernel"], ref["query"][1][name + "/kernel"]
        r_tr = np.einsum("ia,nio,oc->nac", q_a, g_tr, q_s).reshape(len(g_tr), -1)
        r_q = np.einsum("ia,nio,oc->nac", q_a, g_q, q_s).reshape(len(g_q), -1)
        lam_ref = (r_tr**2).mean(axis=0)
        np.testing.assert_allclose(lam, lam_ref, rtol=1e-3, atol=1e-6 * lam_ref.max(), err_msg=name)
        want = want + (r_tr / (lam_ref + 0.1 * lam_ref.mean())) @ r_q.T
    np.testing.assert_allclose(attr.scores, want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
    assert attr.scores[2, 0] > 0 and attr.method == "ekfac"
    streamed = EKFAC(damping=0.1, chunk_size=CHUNK, max_cache_bytes=0).fit(model, tr).attribute(q)
    np.testing.assert_allclose(streamed.scores, attr.scores, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_ekfac_activation_basis_diagonalises_input_covariance():
    """The MLP's first layer reads the raw features: its Q_A must diagonalise X^T X."""
    model, tr = models.build(MLP_CFG, 0), _clf_examples(N_TRAIN, 1)
    method = EKFAC(layers=["layers/0"], chunk_size=CHUNK).fit(model, tr)
    q_a = np.asarray(method.bases[0][0], np.float64)
    x = tr.inputs.astype(np.float64)
    rotated = q_a.T @ (x.T @ x) @ q_a
    off = rotated - np.diag(np.diag(rotated))
    assert np.abs(off).max() < 1e-4 * np.abs(rotated).max()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make", [GradDot, lambda: TracIn([(models.build(MLP_CFG, 0), 1.0)]),
             lambda: TRAK(proj_dim=8), lambda: LoGra(2, 2), EKFAC],
    ids=["graddot", "tracin", "trak", "logra", "ekfac"],
)
def test_errors(make):
    model, tr = models.build(MLP_CFG, 0), _clf_examples(N_TRAIN, 1)
    method = make()
    with pytest.raises(RuntimeError, match="fit"):
        method.attribute(tr)
    method.fit(model, tr)
    bad = Examples(inputs=np.zeros((2, MLP_CFG.in_dim + 1), np.float32), targets=np.zeros(2, np.int32),
                   ids=np.arange(2))
    with pytest.raises(ValueError, match="shape"):
        method.attribute(bad)
    assert "fit" in method.timings
    method.attribute(tr[np.arange(2)])
    assert set(method.timings) >= {"fit", "score"}


def test_constructor_validation():
    with pytest.raises(ValueError):
        GradDot(chunk_size=0)
    with pytest.raises(ValueError):
        TracIn([])
    with pytest.raises(ValueError, match="one model config"):
        TracIn([(models.build(MLP_CFG, 0), 1.0), (models.build(GPT_CFG, 0), 1.0)])
    with pytest.raises(ValueError):
        TRAK(proj_dim=0)
    with pytest.raises(ValueError):
        LoGra(curvature="kfac")
    with pytest.raises(ValueError, match="n_checkpoints"):
        train.pretrain_with_checkpoints(MLP_CFG, _clf_examples(8, 0), train.TrainConfig(batch_size=4), 0, 0)


def test_gradient_methods_on_a_subset_of_parameters(setup):
    """`params` (glob patterns of parameter paths) restricts GradDot, TracIn and TRAK to those
    parameters' gradients (the reference: the same rows of the full per-example gradient), and
    LoGra / EK-FAC `layers` take the same patterns; a pattern that matches nothing is an error."""
    model, tr, q, ref = setup
    paths = grad_lib.param_paths(model)
    sub = [p for p in paths if p.startswith(paths[-1].split("/")[0])]  # the last top-level module
    pattern = [paths[-1].split("/")[0] + "/*"]
    assert grad_lib.select_params(model, pattern) == set(sub) and len(sub) < len(paths)
    cols = np.concatenate([np.full(ref["train"][1][p][0].size, p in sub) for p in paths])  # flat order = paths
    want = ref["train"][0][:, cols] @ ref["query"][0][:, cols].T
    got = GradDot(chunk_size=CHUNK, params=pattern).fit(model, tr).attribute(q).scores
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    full = GradDot(chunk_size=CHUNK).fit(model, tr).attribute(q).scores
    assert not np.allclose(got, full, rtol=1e-3)
    tracin = TracIn([(model, 1.0)], CHUNK, max_cache_bytes=0, params=pattern).fit(model, tr).attribute(q)
    np.testing.assert_allclose(tracin.scores, got, rtol=1e-5, atol=1e-7 * np.abs(got).max())
    phi, _ = trak_lib.trak_features(model, tr, None, chunk_size=CHUNK, params=pattern)
    assert phi.shape == (N_TRAIN, int(cols.sum()))
    with pytest.raises(ValueError, match="matches no parameter"):
        GradDot(params=["nope/*"]).fit(model, tr)
    with pytest.raises(ValueError, match="glob patterns"):
        grad_lib.select_params(model, "blocks/*")
    names = logra_lib.layer_paths(model)
    glob = [names[-1].rsplit("/", 1)[0] + "/*"] if "/" in names[-1] else [names[-1]]
    _, chosen = logra_lib.tap_linears(model, glob)
    assert chosen == [n for n in names if n.startswith(glob[0].rstrip("*"))] and chosen
    with pytest.raises(ValueError, match="unknown linear layers"):
        logra_lib.tap_linears(model, ["nope/*"])
