"""Operator fitting: sampling obeys the subsets, losses match hand computation, resume ==
uninterrupted, no recompilation for new hyperparameters, banks survive later runs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from stride_jax import Examples, Stride, models, sharding, steering, store
from stride_jax import measure as measure_lib
from stride_jax.config import FitConfig, SteeringConfig, StrideConfig
from stride_jax.design import left_regular_design
from stride_jax.fit import (FitData, Fitter, SparseAdamState, _kl_base_steered, _fit_step, fit_identity, fit_loss,
                            ridge_residual, sample_batch)

CFG = models.GPTConfig(vocab_size=48, seq_len=10, n_layers=2, d_model=32, n_heads=2)
N = 40


@pytest.fixture(scope="module")
def model():
    return models.build(CFG, seed=0)


@pytest.fixture(scope="module")
def pool():
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (N, CFG.seq_len + 1)).astype(np.int32)
    return Examples(inputs=tokens[:, :-1], targets=tokens[:, 1:], ids=np.arange(N))


def small_cfg(**fit):
    base = {"steps": 8, "subsets_per_step": 4, "fidelity_batch": 3, "stability_batch": 3, "probe_batch": 4,
            "positions_per_example": 4, "checkpoint_every": 4, "linearity_weight": 0.5, "sketch_dim": 2}
    base.update(fit)
    return StrideConfig().replace(design={"n_subsets": 8, "per_example": 2}, steering={"layer": 1, "rank": 4},
                                  fit=base)


def leaves(bank):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves((bank.basis, bank.coef))]


def test_sampling_respects_the_subsets(model, pool):
    """Fidelity examples are members of their subset; stability weights are 0 exactly on members."""
    design = left_regular_design(N, 8, 2, 0)
    fitter = Fitter(model, pool, design, small_cfg(fidelity_batch=16, stability_batch=16))
    member = design.dense().astype(bool)  # [K, N]
    shape = fitter.cfg.fit.shape
    stab_member, stab_other = [], []
    for step in range(20):
        ks, fid, stab, stab_w, _ = map(np.asarray, sample_batch(jax.random.PRNGKey(step), fitter.data, 8, shape))
        assert len(set(ks.tolist())) == len(ks)
        assert all(member[k, fid[j]].all() for j, k in enumerate(ks))
        is_member = np.stack([member[k, stab[j]] for j, k in enumerate(ks)])
        stab_member.append(stab_w[is_member])
        stab_other.append(stab_w[~is_member])
    assert np.concatenate(stab_member).size > 0 and (np.concatenate(stab_member) == 0).all()
    assert (np.concatenate(stab_other) == 1).all()


def test_losses_match_a_hand_computation():
    """apply_operator, the fidelity CE, the stability KL and the ridge residual on a 2 x 3 example."""
    h = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], np.float32)  # 2 examples, D = 3
    basis = np.array([[0.5, -1.0], [1.0, 0.0], [0.2, 0.3]], np.float32)  # D x R, R = 2
    coef = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], np.float32)  # R x V, V = 3
    base = np.array([[0.1, 0.2, 0.3], [1.0, -1.0, 0.0]], np.float32)
    targets = np.array([2, 0])
    op = steering.SteeringOperator(3, 3, SteeringConfig(rank=2), rngs=__import__("flax").nnx.Rngs(0))
    op.basis.set_value(jnp.asarray(basis))
    op.coef.set_value(jnp.asarray(coef))
    graphdef, b, c = __import__("flax").nnx.split(op, steering.Basis, steering.Coef)
    got = np.asarray(steering.apply_operator(graphdef, b, c, None, jnp.asarray(h), jnp.asarray(base),
                                             SteeringConfig(rank=2)))
    h_norm = h / np.sqrt((h**2).mean(axis=1, keepdims=True) + 1e-6)
    want = base + h_norm @ basis @ coef
    np.testing.assert_allclose(got, want, rtol=1e-5)
    logp = want - np.log(np.exp(want).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(np.asarray(models.example_loss(jnp.asarray(got), jnp.asarray(targets))),
                               -logp[[0, 1], targets], rtol=1e-5)
    p_base = np.exp(base) / np.exp(base).sum(axis=1, keepdims=True)
    kl = (p_base * (np.log(p_base) - logp)).sum(axis=1)
    np.testing.assert_allclose(np.asarray(_kl_base_steered(jnp.asarray(base), jnp.asarray(got), None)), kl, rtol=1e-5)
    sketch = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    y = np.array([[1.0], [2.0], [4.0]])
    coef_r = np.linalg.solve(sketch.T @ sketch + 0.5 * np.eye(2), sketch.T @ y)
    np.testing.assert_allclose(float(ridge_residual(jnp.asarray(sketch), jnp.asarray(y), 0.5)),
                               np.mean((y - sketch @ coef_r) ** 2), rtol=1e-5)


def test_fit_lowers_members_losses(model, pool):
    cfg = small_cfg(steps=60, learning_rate=0.05, linearity_weight=0.0, stability_weight=0.1)
    design = left_regular_design(N, 8, 2, 0)
    fitter = Fitter(model, pool, design, cfg)
    first = fitter.run(max_steps=1, progress=False)
    assert fitter.step == 1
    m0 = measure_lib.measure(model, first, pool, cfg.steering, progress=False)
    bank = fitter.run(progress=False)
    m1 = measure_lib.measure(model, bank, pool, cfg.steering, progress=False)
    members = design.dense().astype(bool)  # [K, N]
    own = lambda m: np.mean([m.steered_loss_QxK[members[k], k].mean() for k in range(8)])
    assert own(m1) < own(m0) - 0.05  # operators learned their subsets
    # the first bank is still readable after later runs donated the state it came from
    assert all(np.isfinite(x).all() for x in leaves(first))


def test_resume_equals_uninterrupted(model, pool, tmp_path):
    cfg = small_cfg()
    design = left_regular_design(N, 8, 2, 0)
    straight = Fitter(model, pool, design, cfg).run(progress=False)
    part = Fitter(model, pool, design, cfg, workdir=tmp_path / "fit")
    part.run(max_steps=5, progress=False)  # "killed" after step 5; last checkpoint at step 5
    del part
    resumed_fitter = Fitter(model, pool, design, cfg, workdir=tmp_path / "fit")
    assert resumed_fitter.step == 5
    resumed = resumed_fitter.run(progress=False)
    for a, b in zip(leaves(straight), leaves(resumed)):
        np.testing.assert_array_equal(a, b)  # bitwise: same program, same machine
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated lines after the resume


def test_corrupted_checkpoint_is_an_error(model, pool, tmp_path):
    design = left_regular_design(N, 8, 2, 0)
    Fitter(model, pool, design, small_cfg(), workdir=tmp_path / "fit").run(max_steps=4, progress=False)
    npz = next((tmp_path / "fit" / "checkpoints").glob("step_*/state.npz"))
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    npz.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256|unreadable"):
        Fitter(model, pool, design, small_cfg(), workdir=tmp_path / "fit")


def test_new_learning_rate_or_steps_do_not_recompile(model, pool):
    design = left_regular_design(N, 8, 2, 0)
    Fitter(model, pool, design, small_cfg()).run(max_steps=2, progress=False)
    compiled = _fit_step._cache_size()
    Fitter(model, pool, design, small_cfg(learning_rate=0.001, steps=5, stability_weight=2.0)).run(max_steps=3,
                                                                                                    progress=False)
    assert _fit_step._cache_size() == compiled


def test_no_logits_cache(model, pool):
    """The fit caches hook-layer and final states [N, T, D], never [N, T, V] logits."""
    fitter = Fitter(model, pool, left_regular_design(N, 8, 2, 0), small_cfg())
    arrays = [x for x in jax.tree_util.tree_leaves(fitter.data) if hasattr(x, "shape")]
    assert max(x.size for x in arrays) <= N * CFG.seq_len * CFG.d_model
    assert fitter.data.h.shape == fitter.data.h_out.shape == (N, CFG.seq_len, CFG.d_model)


def test_design_and_pool_mismatch(model, pool):
    with pytest.raises(ValueError, match="design covers"):
        Fitter(model, pool, left_regular_design(N + 1, 8, 2, 0), small_cfg())


def test_ridge_residual_zero_for_linear_responses():
    rng = np.random.default_rng(0)
    sketch = rng.standard_normal((16, 3))
    y = sketch @ rng.standard_normal((3, 5))
    assert float(ridge_residual(sketch, y, 1e-8)) < 1e-10
    assert float(ridge_residual(sketch, rng.standard_normal((16, 5)), 1e-8)) > 0.1


# -- sparse (lazy Adam) updates, steps per operator, the stability exclusion, lock, torn logs -----


def _moments(fitter):
    """(coef, mu, nu) of the operator matrices as numpy [K, R, O], dense or sparse optimiser state."""
    adam = fitter.state.opt_state
    mu, nu = (adam.coef.mu, adam.coef.nu) if isinstance(adam, SparseAdamState) else (adam.mu[1], adam.nu[1])
    return [np.asarray(jax.tree_util.tree_leaves(t)[0]) for t in (fitter.state.coef, mu, nu)]


def test_sparse_step_equals_dense_when_every_operator_steps(model, pool):
    """subsets_per_step == K: every operator is in every step, so lazy Adam is Adam."""
    design = left_regular_design(N, 8, 2, 0)
    dense = Fitter(model, pool, design, small_cfg(subsets_per_step=8))
    sparse = Fitter(model, pool, design, small_cfg(subsets_per_step=8, sparse_updates=True))
    assert isinstance(sparse.state.opt_state, SparseAdamState)
    dense.run(max_steps=3, progress=False)
    sparse.run(max_steps=3, progress=False)
    for a, b in zip(_moments(dense), _moments(sparse)):
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(leaves(sparse.bank)[0], leaves(dense.bank)[0], rtol=1e-5, atol=1e-7)  # basis
    np.testing.assert_array_equal(np.asarray(sparse.state.opt_state.coef.count), 3)


@pytest.mark.parametrize("sparse_updates", [True, False])
def test_sparse_step_leaves_other_operators_untouched(model, pool, sparse_updates):
    """Sparse: an operator outside the step's batch keeps its matrix, Adam moments and count bit for
    bit. Dense (the control): Adam momentum moves every operator every step."""
    design = left_regular_design(N, 8, 2, 0)
    fitter = Fitter(model, pool, design, small_cfg(sparse_updates=sparse_updates))
    fitter.run(max_steps=3, progress=False)  # every operator has moved by now
    before = _moments(fitter)
    count = np.asarray(fitter.state.opt_state.coef.count) if sparse_updates else None
    key = jax.random.fold_in(fitter.base_key, fitter.step)
    ks = np.asarray(sample_batch(key, fitter.data, 8, fitter.cfg.fit.shape)[0])
    out = np.setdiff1d(np.arange(8), ks)
    fitter.run(max_steps=1, progress=False)
    after = _moments(fitter)
    assert len(out) == 4 and all(np.abs(b[out]).max() > 0 for b in before)
    if sparse_updates:
        for b, a in zip(before, after):
            np.testing.assert_array_equal(a[out], b[out])
            assert (a[ks] != b[ks]).any()
        new_count = np.asarray(fitter.state.opt_state.coef.count)
        np.testing.assert_array_equal(new_count[out], count[out])
        np.testing.assert_array_equal(new_count[ks], count[ks] + 1)
    else:
        assert all((a[out] != b[out]).any() for b, a in zip(before, after))


def test_sparse_fit_resumes_exactly_and_is_its_own_identity(model, pool, tmp_path):
    cfg = small_cfg(sparse_updates=True)
    design = left_regular_design(N, 8, 2, 0)
    straight = Fitter(model, pool, design, cfg).run(progress=False)
    Fitter(model, pool, design, cfg, workdir=tmp_path / "fit").run(max_steps=5, progress=False)
    resumed = Fitter(model, pool, design, cfg, workdir=tmp_path / "fit")
    assert resumed.step == 5 and isinstance(resumed.state.opt_state, SparseAdamState)
    for a, b in zip(leaves(straight), leaves(resumed.run(progress=False))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(store.IdentityError, match="sparse_updates"):  # a dense fit never resumes a sparse one
        Fitter(model, pool, design, small_cfg(), workdir=tmp_path / "fit")
    # fields added later stay out of a default fit's identity, so older workdirs keep theirs
    ident = fit_identity(model, pool, design, StrideConfig())
    assert "sparse_updates" not in ident["config"]["fit"] and "updates_per_operator" not in ident["config"]["fit"]


def test_auto_k_settings_enter_a_fit_identity_only_when_k_is_auto(model, pool):
    """design.auto_ratio / max_subsets choose K only for n_subsets="auto": with K given, changing
    their defaults must not orphan a fit (the fit key and identity stay), with "auto" it must."""
    from stride_jax.harness.sweep import fit_key
    design = left_regular_design(N, 8, 2, 0)
    given = StrideConfig().replace(design={"n_subsets": 8}, fit={"subsets_per_step": 4})
    other = given.replace(design={"auto_ratio": 3.0, "max_subsets": 99})
    assert fit_key(given) == fit_key(other)
    assert fit_identity(model, pool, design, given) == fit_identity(model, pool, design, other)
    auto = StrideConfig().replace(design={"n_subsets": "auto"})
    assert fit_key(auto) != fit_key(auto.replace(design={"auto_ratio": 3.0}))
    assert fit_key(given) != fit_key(given.replace(design={"per_example": 3}))  # control: a real change


def test_fields_with_default_values_keep_existing_fit_keys():
    """A field added to the design / steering / fit sections must stay out of a fit's key at its
    default, or every store made before it is refitted (fit.ensemble once did this): the key of a
    fixed config is pinned. Change the pin only with a format change that means to orphan fits."""
    from stride_jax.harness.sweep import fit_key
    given = StrideConfig().replace(design={"n_subsets": 8}, fit={"subsets_per_step": 4})
    assert fit_key(given) == "0c7d2b42f018"
    assert fit_key(given.replace(fit={"ensemble": 2})) != fit_key(given)  # an ensemble is another fit


def test_step_flops_follow_the_batch_not_k_with_sparse_updates(model, pool):
    """XLA's count of one step: about proportional to subsets per step, flat in K when sparse."""
    flops = lambda k, **fit: Fitter(model, pool, left_regular_design(N, k, 2, 0),
                                    small_cfg(**fit).replace(design={"n_subsets": k})).step_flops()
    base = flops(8, sparse_updates=True)
    # the frozen head's forward on every sampled position (subsets x (fidelity + stability) examples
    # x positions, 2 D V each) is the floor; forward + backward stay within a few times it
    head = 2 * CFG.d_model * CFG.vocab_size * 4 * (3 + 3) * 4
    assert base is not None and head <= base <= 6 * head
    assert 1.6 < flops(8, sparse_updates=True, subsets_per_step=8) / base < 2.4
    assert flops(16, sparse_updates=True) / base < 1.1


def test_sparse_fit_on_a_mesh_equals_one_device(model, pool):
    """K = 8 operators over the 4 forced host devices: per-operator moments and counts split like
    the operators; the result equals the single-device sparse fit up to float32 reassociation."""
    design = left_regular_design(N, 8, 2, 0)
    cfg = small_cfg(sparse_updates=True)
    single = Fitter(model, pool, design, cfg).run(progress=False)
    fitter = Fitter(model, pool, design, cfg, mesh=sharding.mesh("subsets"))
    sharded = fitter.run(progress=False)
    adam = fitter.state.opt_state.coef
    assert {x.sharding.spec for x in jax.tree.leaves((fitter.state.coef, adam))} == {P("subsets")}
    a, b = leaves(single)[1], leaves(sharded)[1]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-3
    assert np.linalg.norm(a - np.roll(a, 1, axis=0)) / np.linalg.norm(a) > 0.5  # control: another operator is far


def test_updates_per_operator_sets_the_steps(model, pool, caplog):
    design = left_regular_design(N, 8, 2, 0)  # K = 8, 4 subsets per step
    assert FitConfig(updates_per_operator=3, subsets_per_step=4).resolve_steps(8) == 6
    assert FitConfig(updates_per_operator=3, subsets_per_step=5).resolve_steps(8) == 5  # ceil(24 / 5)
    assert FitConfig(steps=7).resolve_steps(10**6) == 7
    with caplog.at_level("INFO", logger="stride_jax"):
        fitter = Fitter(model, pool, design, small_cfg(updates_per_operator=3))
    assert fitter.cfg.fit.steps == 6 and "6 steps" in caplog.text
    fitter.run(progress=False)
    assert fitter.step == 6
    caplog.clear()
    with caplog.at_level("WARNING", logger="stride_jax"):
        Fitter(model, pool, design, small_cfg(updates_per_operator=3, steps=50))  # small_cfg sets steps=8 too
    assert "fit.steps=50 is ignored" in caplog.text
    for bad in (0, 2.5, True, -1):
        with pytest.raises(ValueError, match="fit.updates_per_operator"):
            FitConfig(updates_per_operator=bad)
    with pytest.raises(ValueError, match="fit.sparse_updates"):
        FitConfig(sparse_updates="yes")


def test_stability_term_excludes_the_subsets_own_members(model, pool):
    """K = 1: every example is a member of the only subset, so every stability draw is excluded and
    the stability term and its gradient for that operator are exactly zero. Control: with K = 2
    the same nonzero operator matrices give a positive term and gradient."""
    def stability_and_grad(k):
        design = left_regular_design(N, k, 1, 0)
        fitter = Fitter(model, pool, design, small_cfg(subsets_per_step=1, stability_batch=8).replace(
            design={"n_subsets": k, "per_example": 1}))
        coef = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), fitter.state.coef)
        static = dict(model_graphdef=fitter.model_graphdef, op_graphdef=fitter.op_graphdef,
                      steer_cfg=fitter.cfg.steering, shape=fitter.cfg.fit.shape, log_space=True, loss_floor=1e-6)
        hyper = {k: jnp.float32(v) for k, v in fitter.cfg.fit.hyper.items()}
        key = jax.random.PRNGKey(3)
        stab_w = np.asarray(sample_batch(key, fitter.data, k, fitter.cfg.fit.shape)[3])
        stability = lambda c: fit_loss((fitter.state.basis, c), fitter.model_state, fitter.data, key, hyper,
                                       **static)[1]["stability"]
        value, grad = jax.jit(jax.value_and_grad(stability))(coef)
        return stab_w, float(value), np.asarray(jax.tree_util.tree_leaves(grad)[0])

    stab_w, value, grad = stability_and_grad(1)
    assert value == 0.0 and (grad == 0).all()
    assert (stab_w == 0).all()
    stab_w, value, grad = stability_and_grad(2)
    assert (stab_w == 1).any() and value > 0 and np.abs(grad).max() > 0


def test_library_fit_takes_the_workdir_lock(model, pool, tmp_path):
    """A second process fitting into the same workdir is refused at once, naming the directory."""
    workdir = tmp_path / "fit"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
         str(workdir / store.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(store.LockedError, match="in use by another process"):
            Stride(small_cfg()).fit(model, pool, workdir=workdir, progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (workdir / "checkpoints").exists()


def test_torn_last_metrics_line_is_dropped_on_resume(model, pool, tmp_path):
    design = left_regular_design(N, 8, 2, 0)
    Fitter(model, pool, design, small_cfg(), workdir=tmp_path / "fit").run(max_steps=4, progress=False)
    log_path = tmp_path / "fit" / "metrics.jsonl"
    good = log_path.read_text()
    log_path.write_text(good + '{"step": 5, "seconds": 0.1, "lo')  # killed while writing step 5's line
    fitter = Fitter(model, pool, design, small_cfg(), workdir=tmp_path / "fit")
    assert fitter.step == 4 and log_path.read_text() == good
    fitter.run(progress=False)
    steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    # a bad line that is not the last one is not a torn write: an error naming the file
    log_path.write_text('{"step": 1, "lo\n' + good)
    with pytest.raises(ValueError, match="metrics.jsonl line 1"):
        Fitter(model, pool, design, small_cfg(), workdir=tmp_path / "fit")
