"""Steering operators: transformation invariants (vmap == loop, jit == eager, zero operator)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax import models, steering
from stride_jax.config import SteeringConfig

CFG = models.GPTConfig(vocab_size=64, seq_len=12, n_layers=3, d_model=32, n_heads=2)


@pytest.fixture(scope="module")
def model():
    return models.build(CFG, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (4, CFG.seq_len)), jnp.int32)


def random_bank(model, k, cfg, seed=1):
    bank = steering.init_bank(model, k, cfg, seed=0)
    coef = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.PRNGKey(seed), x.shape), bank.coef)
    return bank._replace(coef=coef)


def steered(model, bank, k, x, cfg):
    h = model.trunk(x, layer=cfg.layer)
    o = model.rest(h, layer=cfg.layer)
    coef_k = jax.tree.map(lambda c: c[k], bank.coef)
    return steering.apply_operator(bank.graphdef, bank.basis, coef_k, model, h, o, cfg)


@pytest.mark.parametrize("placement", ["logits", "residual"])
def test_vmap_over_subsets_equals_python_loop(model, tokens, placement):
    cfg = SteeringConfig(layer=2, rank=4, placement=placement)
    bank = random_bank(model, 5, cfg)
    h = model.trunk(tokens, layer=cfg.layer)
    o = model.rest(h, layer=cfg.layer)
    vmapped = jax.vmap(
        lambda c: steering.apply_operator(bank.graphdef, bank.basis, c, model, h, o, cfg)
    )(bank.coef)
    looped = jnp.stack([steered(model, bank, k, tokens, cfg) for k in range(5)])
    np.testing.assert_allclose(vmapped, looped, rtol=1e-5, atol=1e-5)
    assert not np.allclose(looped[0], looped[1])  # the operators really differ


@pytest.mark.parametrize("placement", ["logits", "residual"])
def test_jit_equals_eager(model, tokens, placement):
    cfg = SteeringConfig(layer=1, rank=4, placement=placement)
    bank = random_bank(model, 3, cfg)
    eager = steered(model, bank, 2, tokens, cfg)
    jitted = jax.jit(lambda x: steered(model, bank, 2, x, cfg))(tokens)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", ["logits", "residual"])
def test_zero_operator_leaves_outputs_bit_identical(model, tokens, placement):
    cfg = SteeringConfig(layer=2, rank=4, placement=placement)
    bank = steering.init_bank(model, 3, cfg, seed=0)  # coef initialised to zero
    h = model.trunk(tokens, layer=cfg.layer)
    base = model.rest(h, layer=cfg.layer)
    out = steered(model, bank, 1, tokens, cfg)
    assert np.array_equal(np.asarray(out), np.asarray(base))


@pytest.mark.parametrize("placement", ["logits", "residual"])
def test_operators_stay_float32_under_x64(model, tokens, placement):
    """Operators are float32 even with jax_enable_x64 (float64 ones would promote the float32
    model's states, so a zero operator no longer left the outputs bit-identical)."""
    cfg = SteeringConfig(layer=2, rank=4, placement=placement)
    with jax.enable_x64(True):
        bank = steering.init_bank(model, 3, cfg, seed=0)
        assert {x.dtype for x in jax.tree.leaves((bank.basis, bank.coef))} == {jnp.dtype(jnp.float32)}
        h = model.trunk(tokens, layer=cfg.layer)
        base = model.rest(h, layer=cfg.layer)
        out = steered(model, bank, 1, tokens, cfg)
    assert out.dtype == base.dtype == jnp.float32 and np.array_equal(np.asarray(out), np.asarray(base))


def test_steered_model_is_causal(model, tokens):
    """A residual operator edits every position; the steered model still cannot look ahead:
    changing token t leaves the steered logits before t unchanged."""
    cfg = SteeringConfig(layer=2, rank=4, placement="residual")
    bank = random_bank(model, 2, cfg)
    t = 6
    other = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
    a, b = np.asarray(steered(model, bank, 0, tokens, cfg)), np.asarray(steered(model, bank, 0, other, cfg))
    np.testing.assert_allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not np.allclose(a[:, t:], b[:, t:], atol=1e-4)
    assert not np.allclose(a, np.asarray(model(tokens)), atol=1e-4)  # the operator does steer


def test_bank_shapes_and_operator_view(model):
    cfg = SteeringConfig(layer=1, rank=3, placement="logits")
    bank = steering.init_bank(model, 7, cfg, seed=0)
    assert bank.n_subsets == 7
    op = bank.operator(4)
    assert op.basis[...].shape == (CFG.d_model, 3)
    assert op.coef[...].shape == (3, CFG.vocab_size)
    res = steering.init_bank(model, 7, SteeringConfig(layer=1, rank=3, placement="residual"), seed=0)
    assert res.operator(0).coef[...].shape == (3, CFG.d_model)


def test_bad_steering_configs(model):
    with pytest.raises(ValueError, match="rank"):
        SteeringConfig(rank=0)
    with pytest.raises(ValueError, match="placement"):
        SteeringConfig(placement="attention")
    with pytest.raises(ValueError, match="beyond this model's depth"):
        steering.init_bank(model, 4, SteeringConfig(layer=CFG.n_layers + 1), seed=0)
    with pytest.raises(ValueError, match="K"):
        steering.init_bank(model, 0, SteeringConfig(layer=1), seed=0)
