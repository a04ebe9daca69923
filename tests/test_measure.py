"""Measurement: batched, chunked y[q, k] equals the per-operator reference; responses' centring."""

import jax
import numpy as np
import pytest

from stride_jax import Examples, models, steering
from stride_jax.config import MeasureConfig, SteeringConfig
from stride_jax.measure import Measurement, Reference, measure, raw_responses, responses
from stride_jax.measure import _sharded_measure_chunk, _measure_chunk_jit

CFG = models.GPTConfig(vocab_size=40, seq_len=8, n_layers=2, d_model=16, n_heads=2)


@pytest.fixture(scope="module")
def setup():
    model = models.build(CFG, seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (7, CFG.seq_len + 1)).astype(np.int32)
    return model, Examples(inputs=tokens[:, :-1], targets=tokens[:, 1:], ids=np.arange(7))


@pytest.mark.parametrize("placement", ["logits", "residual"])
def test_measure_matches_reference_and_is_chunk_invariant(setup, placement):
    model, q = setup
    x, t = q.inputs, q.targets
    cfg = SteeringConfig(layer=1, rank=3, placement=placement)
    bank = steering.init_bank(model, 6, cfg, seed=0)
    bank = bank._replace(coef=jax.tree.map(lambda c: 0.5 * jax.random.normal(jax.random.PRNGKey(2), c.shape),
                                           bank.coef))
    m = measure(model, bank, q, cfg, MeasureConfig(query_chunk=3, operator_chunk=4), progress=False)
    h = model.trunk(x, layer=1)
    o = model.rest(h, layer=1)
    ref = np.stack([
        np.asarray(models.example_loss(
            steering.apply_operator(bank.graphdef, bank.basis, jax.tree.map(lambda c: c[k], bank.coef),
                                    model, h, o, cfg), t))
        for k in range(6)
    ], axis=1)
    np.testing.assert_allclose(m.steered_loss_QxK, ref, rtol=1e-5)
    np.testing.assert_allclose(m.base_loss_Q, np.asarray(models.example_loss(o, t)), rtol=1e-6)
    whole = measure(model, bank, q, cfg, MeasureConfig(query_chunk=64, operator_chunk=64), progress=False)
    np.testing.assert_allclose(whole.steered_loss_QxK, m.steered_loss_QxK, rtol=1e-5)
    tiny = measure(model, bank, q, cfg, MeasureConfig(query_chunk=64, operator_chunk=64, chunk_bytes=1),
                   progress=False)  # the memory bound shrinks both chunks to 1: same numbers
    np.testing.assert_allclose(tiny.steered_loss_QxK, m.steered_loss_QxK, rtol=1e-5)
    # a second call with the same shapes (7 queries in chunks of 3: the last one padded) reuses the program
    compiled = _measure_chunk_jit._cache_size()
    measure(model, bank, q[:5], cfg, MeasureConfig(query_chunk=3, operator_chunk=4), progress=False)
    assert _measure_chunk_jit._cache_size() == compiled


def test_chunks_shrink_to_the_memory_bound():
    """SmolLM2's vocabulary at 321 tokens: the default 32 operators x 64 queries would be 129 GB of
    logits (the --preset quick failure); the chunks shrink, operators first, to fit 1 GiB."""
    from stride_jax.measure import chunk_sizes

    q = Examples(inputs=np.zeros((64, 321), np.int32), targets=np.zeros((64, 321), np.int32), ids=np.arange(64))
    ops, qs = chunk_sizes(32, 64, q, 49152, 2**30)
    assert ops * qs * 321 * 49152 * 4 <= 2**30 and ops == 1 and qs >= 8
    assert chunk_sizes(32, 64, q, 32, 2**30) == (32, 64)  # a small vocabulary keeps the configured chunks
    assert chunk_sizes(4, 3, q, 49152, 1) == (1, 1)


def test_zero_bank_measures_zero_response(setup):
    """A zero operator adds exact zeros to the logits (bitwise, within one program); measured
    through `measure`, base and steered losses come from differently fused XLA programs, so
    their difference is zero only up to float32 rounding of the loss: a few ulps of its size."""
    model, q = setup
    x, t = q.inputs, q.targets
    cfg = SteeringConfig(layer=2, rank=2)
    bank = steering.init_bank(model, 3, cfg, seed=0)
    h = model.trunk(x, layer=2)
    o = model.rest(h, layer=2)
    coef_0 = jax.tree.map(lambda c: c[0], bank.coef)
    steered = steering.apply_operator(bank.graphdef, bank.basis, coef_0, model, h, o, cfg)
    assert np.array_equal(np.asarray(steered), np.asarray(o))
    m = measure(model, bank, q, cfg, progress=False)
    ulp = np.spacing(np.float32(m.base_loss_Q.max()))
    np.testing.assert_allclose(raw_responses(m, MeasureConfig(space="diff")), 0.0, atol=4 * ulp)


def test_responses_sign_and_centring():
    m = Measurement(base_loss_Q=np.array([2.0, 4.0]), steered_loss_QxK=np.array([[1.0, 2.0, 4.0], [4.0, 2.0, 1.0]]))
    y = raw_responses(m, MeasureConfig(space="diff"))
    assert y[0, 0] == 1.0  # operator 0 lowered query 0's loss: positive
    yl = raw_responses(m, MeasureConfig(space="log"))
    np.testing.assert_allclose(yl[0, 0], np.log(2.0))
    yc = responses(m, MeasureConfig(space="diff", reference="queries"))
    np.testing.assert_allclose(yc.mean(axis=1), 0.0, atol=1e-6)
    # each operator's mean over the reference examples outside its subset is subtracted
    ref = Reference(Measurement(np.array([1.0, 3.0]), np.array([[1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])),
                    member_PxK=np.array([[False, True, False], [True, False, False]]))
    yr = responses(m, MeasureConfig(space="diff", center_queries=False), reference=ref)
    np.testing.assert_allclose(yr, y - np.array([[0.0, 0.0, 1.5]]))
    yq = responses(m, MeasureConfig(space="diff", reference="queries", center_queries=False))
    np.testing.assert_allclose(yq, y - y.mean(axis=0, keepdims=True))
    with pytest.raises(ValueError, match="reference"):
        responses(m, MeasureConfig(space="diff"))


def test_nan_measurements_are_rejected():
    m = Measurement(np.array([1.0, 2.0]), np.array([[1.0, np.nan], [np.inf, 1.0]]))
    with pytest.raises(ValueError, match="2 steered and 0 base losses are NaN or inf"):
        raw_responses(m)


def test_log_space_floors_zero_losses():
    m = Measurement(np.array([0.0, 1.0]), np.array([[0.0, 1e-3], [0.5, 0.0]]))
    y = raw_responses(m, MeasureConfig(loss_floor=1e-6))
    np.testing.assert_allclose(y, [[0.0, np.log(1e-6) - np.log(1e-3)], [np.log(2.0), -np.log(1e-6)]], rtol=1e-6)


def test_measure_rejects_bad_queries(setup):
    model, q = setup
    cfg = SteeringConfig(layer=1, rank=2)
    bank = steering.init_bank(model, 2, cfg, seed=0)
    with pytest.raises(ValueError, match="no queries"):
        measure(model, bank, q[np.arange(0)], cfg, progress=False)
    long_x = np.zeros((2, CFG.seq_len + 4), np.int32)
    with pytest.raises(ValueError, match="context"):
        measure(model, bank, Examples(inputs=long_x, targets=long_x, ids=np.arange(2)), cfg, progress=False)


def test_sharded_measurement_equals_single_device(setup):
    model, q = setup
    devices = np.array(jax.devices()[:4])
    if len(devices) < 2:
        pytest.skip("needs several (host) devices; tests/conftest.py forces 4")
    mesh = jax.sharding.Mesh(devices, ("subsets",))
    cfg = SteeringConfig(layer=1, rank=2)
    bank = steering.init_bank(model, 8, cfg, seed=0)
    bank = bank._replace(coef=jax.tree.map(lambda c: jax.random.normal(jax.random.PRNGKey(3), c.shape), bank.coef))
    single = measure(model, bank, q, cfg, progress=False)
    sharded = measure(model, bank, q, cfg, progress=False, mesh=mesh)
    np.testing.assert_allclose(sharded.steered_loss_QxK, single.steered_loss_QxK, rtol=1e-5)
    np.testing.assert_allclose(sharded.base_loss_Q, single.base_loss_Q, rtol=1e-6)
    fn = _sharded_measure_chunk(mesh, "subsets")
    compiled = fn._cache_size()
    measure(model, bank, q, cfg, progress=False, mesh=mesh)  # an identical second call: no recompile
    assert _sharded_measure_chunk(mesh, "subsets") is fn and fn._cache_size() == compiled
    with pytest.raises(ValueError, match="split evenly"):
        measure(model, steering.init_bank(model, 6, cfg, seed=0), q, cfg, progress=False,
                mesh=jax.sharding.Mesh(np.array(jax.devices()[:4]), ("subsets",)))
