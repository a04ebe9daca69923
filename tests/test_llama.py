"""The Llama-family model: hook contract, causality, padding mask, GQA, RoPE layouts, bf16, registry.

Parity with external checkpoints (GGUF, HF safetensors) and against a numpy reference forward
lives in tests/test_convert.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax import models
from stride_jax.models import llama

CFG = models.LlamaConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_len=16,
                         rope_theta=500.0, init_std=0.2)


def random_model(cfg, seed=0):
    """A model with N(0, init_std) matrices and 1 + N(0, 0.1) norm scales, without jitting an init
    (`models.build` compiles one per config: seconds each on 2 cores)."""
    rng = np.random.default_rng(seed)
    m = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(m)):
        shape = var.get_value().shape
        a = 1 + 0.1 * rng.normal(size=shape) if path[-1] == "scale" else cfg.init_std * rng.normal(size=shape)
        var.set_value(jnp.asarray(a, jnp.float32))
    return m


@pytest.fixture(scope="module")
def model():
    return random_model(CFG)


@nnx.jit
def fwd(m, x, mask=None):
    return m(x, mask)


@functools.partial(nnx.jit, static_argnames="layer")
def trunk(m, x, layer, mask=None):
    return m.trunk(x, layer=layer, mask=mask)


@functools.partial(nnx.jit, static_argnames="layer")
def rest(m, h, layer, mask=None):
    return m.rest(h, layer=layer, mask=mask)


def _tokens(b=3, t=CFG.max_len, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)).astype(np.int32)


def test_attributes_and_protocol(model):
    assert isinstance(model, models.HookedModel) and models.is_sequence_model(model)
    assert (model.n_layers, model.out_dim, model.max_len) == (2, 37, 16)
    assert [model.hidden_dim_at(l) for l in range(3)] == [32] * 3
    logits = fwd(model, _tokens())
    assert logits.shape == (3, 16, 37) and logits.dtype == jnp.float32


def test_rest_of_trunk_is_the_model(model):
    x = _tokens()
    want = fwd(model, x)
    split = nnx.jit(lambda m, x, layer: (lambda h: (h, m.rest(h, layer=layer)))(m.trunk(x, layer=layer)),
                    static_argnames="layer")
    for layer in range(CFG.n_layers + 1):
        h, logits = split(model, x, layer)
        assert h.dtype == jnp.float32 and h.shape == (3, 16, 32)
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_final_rest_is_per_position(model):
    """rest(h, layer=n_layers) is final norm + head only: a row of h affects only its own logits."""
    h = trunk(model, _tokens(), layer=CFG.n_layers)
    full = rest(model, h, layer=CFG.n_layers)
    for t in (0, 5, 15):
        one = rest(model, h[:, t : t + 1], layer=CFG.n_layers)
        np.testing.assert_allclose(one[:, 0], full[:, t], atol=1e-6, rtol=1e-6)
    perm = np.random.default_rng(1).permutation(16)
    np.testing.assert_allclose(rest(model, h[:, perm], layer=CFG.n_layers), full[:, perm], atol=1e-6, rtol=1e-6)


def test_jit_equals_eager(model):
    x = _tokens()
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    np.testing.assert_allclose(f(state, x), model(x), atol=1e-5, rtol=1e-5)


def test_causal_and_edit_at_layer(model):
    x = _tokens()
    y = x.copy()
    y[:, 7] = (y[:, 7] + 1) % CFG.vocab_size
    a, b = fwd(model, x), fwd(model, y)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert not np.allclose(a[:, 7:], b[:, 7:])
    h = trunk(model, x, layer=1)
    np.testing.assert_array_equal(trunk(model, x, layer=1), h)  # deterministic
    assert not np.allclose(rest(model, h + 0.5, layer=1), rest(model, h, layer=1))


def test_padding_mask_hides_padded_keys(model):
    """Right padding: real positions equal the unpadded forward; a padded key mask changes nothing
    there. Left padding with the mask hides the pads but shifts positions (documented)."""
    x = _tokens(b=2, t=10)
    pad = np.zeros((2, 16), np.int32)
    pad[:, :10] = x
    mask = np.zeros((2, 16), np.int32)
    mask[:, :10] = 1
    np.testing.assert_allclose(fwd(model, pad, mask)[:, :10], fwd(model, x), atol=1e-5, rtol=1e-5)
    # a mask that hides a real key changes the later logits: the mask reaches attention
    holes = mask.copy()
    holes[:, 3] = 0
    assert not np.allclose(fwd(model, pad, holes)[:, 4:10], fwd(model, x)[:, 4:])


def test_gqa_equals_repeated_kv_heads(model):
    """Query head n reads kv head n // (n_heads / n_kv_heads) (HF repeat_kv): the GQA model equals
    a multi-head model whose k/v projections repeat each kv head's rows."""
    mha_cfg = dataclasses.replace(CFG, n_kv_heads=CFG.n_heads)
    mha = nnx.eval_shape(lambda: llama.Llama(mha_cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(mha)
    state = nnx.state(nnx.clone(model))  # a copy: set_value below must not touch the fixture
    H, G = CFG.resolved_head_dim, CFG.n_heads // CFG.n_kv_heads
    for i in range(CFG.n_layers):
        for name in ("k_proj", "v_proj"):
            kernel = state["blocks"][i]["attn"][name]["kernel"]
            w_DxKxH = np.asarray(kernel[...]).reshape(CFG.d_model, CFG.n_kv_heads, H)
            kernel.set_value(jnp.asarray(np.repeat(w_DxKxH, G, axis=1).reshape(CFG.d_model, -1)))
    mha = nnx.merge(graphdef, state)
    x = _tokens()
    np.testing.assert_allclose(fwd(mha, x), fwd(model, x), atol=1e-5, rtol=1e-5)


def test_rope_layouts_are_row_permutations():
    """interleaved RoPE on rows permuted by llama.cpp's converter == half-split RoPE."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 3, 8)).astype(np.float32)
    half = np.asarray(llama.apply_rope(jnp.asarray(x), 100.0, "half"))
    perm = np.arange(8).reshape(2, 4).T.reshape(-1)  # interleaved slot 2j+s holds half-split row s*4+j
    inter = np.asarray(llama.apply_rope(jnp.asarray(x[..., perm]), 100.0, "interleaved"))
    np.testing.assert_allclose(inter, half[..., perm], atol=1e-6)
    np.testing.assert_allclose(half[:, 0], x[:, 0], atol=1e-7)  # position 0 is not rotated
    assert not np.allclose(np.asarray(llama.apply_rope(jnp.asarray(x), 100.0, "interleaved")), half, atol=1e-3)


def test_bfloat16_compute_close_to_float32(model):
    x = _tokens()
    bf = llama.with_dtype(model, "bfloat16")
    assert bf.cfg.dtype == "bfloat16" and bf.blocks[0].attn.q_proj.kernel[...].dtype == jnp.float32
    h = trunk(bf, x, layer=1)
    assert h.dtype == jnp.float32
    want, got = fwd(model, x), fwd(bf, x)
    assert got.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert 0 < err < 5e-2, err  # bf16 really runs (err > 0) and stays close


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        model(np.zeros((1, 17), np.int32))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.rest(np.zeros((1, 17, 32), np.float32), layer=0)
    with pytest.raises(ValueError, match=r"hook points are 0\.\.2"):
        model.trunk(_tokens(), layer=3)
    with pytest.raises(ValueError, match=r"hook points are 0\.\.2"):
        model.rest(np.zeros((1, 4, 32), np.float32), layer=-1)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 37\)"):
        model(np.full((1, 4), 37, np.int32))
    with pytest.raises(ValueError, match="expected h of shape"):
        model.rest(np.zeros((1, 4, 31), np.float32), layer=1)


@pytest.mark.parametrize("change, match", [
    (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(d_model=30), "not divisible by n_heads"),
    (dict(rope_layout="neox"), "rope_layout"),
    (dict(dtype="float16"), "dtype"),
    (dict(ffn_dim=0), "ffn_dim must be a positive int"),
])
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CFG, **change)


def test_config_round_trip_and_registry(tmp_path, model):
    cfg = dataclasses.replace(CFG, qkv_bias=True, tie_embeddings=True, head_dim=6, dtype="bfloat16")
    assert models.config_from_dict(cfg.to_dict()) == cfg
    assert models.config_from_dict(CFG.to_dict()) == CFG
    models.save_model(model, tmp_path / "ckpt", {"note": "llama"})
    loaded, meta = models.load_model(tmp_path / "ckpt", expected={"note": "llama"})
    assert isinstance(loaded, llama.Llama) and loaded.cfg == CFG and meta["model_type"] == "llama"
    assert models.param_digest(loaded) == models.param_digest(model)
    np.testing.assert_array_equal(fwd(loaded, _tokens()), fwd(model, _tokens()))


def test_build_variants():
    """Tied head, q/k/v biases and an explicit head_dim build and run."""
    cfg = dataclasses.replace(CFG, tie_embeddings=True, qkv_bias=True, head_dim=6)
    m = random_model(cfg, seed=1)
    assert not hasattr(m, "lm_head") and m.blocks[0].attn.q_proj.bias is not None
    assert m.blocks[0].attn.q_proj.kernel[...].shape == (32, 4 * 6)
    assert fwd(m, _tokens(b=1, t=5)).shape == (1, 5, 37)


def test_build_through_the_registry():
    """`models.build` (one jitted init per config) gives a deterministic, runnable Llama."""
    a, b = models.build(CFG, seed=3), models.build(CFG, seed=3)
    assert isinstance(a, llama.Llama) and models.param_digest(a) == models.param_digest(b)
    assert models.param_digest(a) != models.param_digest(models.build(CFG, seed=4))
    std = float(np.std(np.asarray(a.blocks[0].mlp.up_proj.kernel[...])))
    assert abs(std - CFG.init_std) < 0.05 * CFG.init_std
    np.testing.assert_array_equal(np.asarray(a.final_norm.scale[...]), np.ones(CFG.d_model, np.float32))
    assert np.isfinite(np.asarray(fwd(a, _tokens()))).all()
