"""Operator fitting: sampling obeys the subsets, losses match hand computation, resume ==
uninterrupted, no recompilation for new hyperparameters, banks survive later runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax import Examples, models, steering
from stride_jax import measure as measure_lib
from stride_jax.config import SteeringConfig, StrideConfig
from stride_jax.design import left_regular_design
from stride_jax.fit import FitData, Fitter, _kl_base_steered, _fit_step, ridge_residual, sample_batch

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
