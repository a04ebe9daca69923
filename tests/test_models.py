"""Hook-point contract, causality, loss and checkpoints of stride_jax.models."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax import models

# the same configs as tests/test_train.py, so one pytest run compiles each init once
GPT_CFG = models.GPTConfig(vocab_size=16, seq_len=12, n_layers=2, d_model=32, n_heads=2)
MLP_CFG = models.MLPConfig(in_dim=5, hidden=(16, 8), n_classes=2)


@pytest.fixture(scope="module")
def gpt():
    return models.build(GPT_CFG, seed=0)


@pytest.fixture(scope="module")
def mlp():
    return models.build(MLP_CFG, seed=0)


def _tokens(b=3, t=GPT_CFG.seq_len, seed=0):
    return np.random.default_rng(seed).integers(0, GPT_CFG.vocab_size, (b, t)).astype(np.int32)


def _features(b=4, seed=0):
    return np.random.default_rng(seed).normal(size=(b, MLP_CFG.in_dim)).astype(np.float32)


# ----------------------------------------------------------------------------- contract


def test_gpt_attributes(gpt):
    assert (gpt.n_layers, gpt.hidden_dim, gpt.out_dim) == (2, 32, 16)
    assert [gpt.hidden_dim_at(l) for l in range(3)] == [32] * 3
    logits = gpt(_tokens())
    assert logits.shape == (3, GPT_CFG.seq_len, 16) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name, x_fn", [("gpt", _tokens), ("mlp", _features)])
def test_rest_of_trunk_is_the_model(name, x_fn, gpt, mlp):
    model = {"gpt": gpt, "mlp": mlp}[name]
    x = x_fn()
    want = model(x)
    for layer in range(model.n_layers + 1):
        h = model.trunk(x, layer=layer)
        assert h.shape[-1] == model.hidden_dim_at(layer)
        np.testing.assert_allclose(model.rest(h, layer=layer), want, atol=1e-5, rtol=1e-5)


def test_jit_equals_eager(gpt):
    x = _tokens()
    graphdef, state = nnx.split(gpt)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    np.testing.assert_allclose(f(state, x), gpt(x), atol=1e-5, rtol=1e-5)


def test_causal(gpt):
    x = _tokens()
    t = 7
    y = x.copy()
    y[:, t] = (y[:, t] + 1) % GPT_CFG.vocab_size
    a, b = gpt(x), gpt(y)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_edit_at_a_position_changes_only_later_positions(gpt, layer):
    """rest() is causal: editing the hook-point state at position t leaves logits before t
    unchanged and changes them from t on."""
    x, t = _tokens(), 5
    h = gpt.trunk(x, layer=layer)
    edit = jnp.zeros_like(h).at[:, t].set(jax.random.normal(jax.random.key(layer), h[:, t].shape))
    base, edited = np.asarray(gpt.rest(h, layer=layer)), np.asarray(gpt.rest(h + edit, layer=layer))
    np.testing.assert_allclose(edited[:, :t], base[:, :t], atol=1e-6)
    assert not np.allclose(edited[:, t], base[:, t], atol=1e-3)


@pytest.mark.parametrize("name, x_fn", [("gpt", _tokens), ("mlp", _features)])
def test_edits_reach_the_output(name, x_fn, gpt, mlp):
    model = {"gpt": gpt, "mlp": mlp}[name]
    x = x_fn()
    base = model(x)
    for layer in range(model.n_layers + 1):
        h = model.trunk(x, layer=layer)
        noise = 0.5 * jax.random.normal(jax.random.key(layer), h.shape)
        assert not np.allclose(model.rest(h + noise, layer=layer), base, atol=1e-4)


@pytest.mark.parametrize("layer", [-1, 3, 1.0, True])
def test_layer_out_of_range(gpt, layer):
    with pytest.raises(ValueError, match="layer"):
        gpt.trunk(_tokens(), layer=layer)
    with pytest.raises(ValueError, match="layer"):
        gpt.rest(jnp.zeros((1, 4, 32)), layer=layer)
    with pytest.raises(ValueError, match="layer"):
        gpt.hidden_dim_at(layer)


def test_mlp_layer_out_of_range(mlp):
    with pytest.raises(ValueError, match="layer"):
        mlp.trunk(_features(), layer=3)
    with pytest.raises(ValueError, match="at layer 1"):
        mlp.rest(jnp.zeros((2, 5)), layer=1)  # width of layer 0 given at layer 1


def test_bad_inputs(gpt):
    with pytest.raises(ValueError, match="context"):
        gpt(_tokens(t=GPT_CFG.seq_len + 1))
    with pytest.raises(ValueError, match="token ids"):
        gpt(np.full((1, 4), GPT_CFG.vocab_size, np.int32))
    with pytest.raises(ValueError, match="token ids"):  # device arrays are checked too
        gpt(jnp.full((1, 4), -1, jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        gpt(np.zeros((4,), np.int32))


def test_short_sequences_match_prefix(gpt):
    x = _tokens()
    np.testing.assert_allclose(gpt(x[:, :5]), gpt(x)[:, :5], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_config_validation():
    cfg = dataclasses.replace(GPT_CFG, tie_embeddings=True)
    model = models.build(cfg, 0)
    assert not hasattr(model, "lm_head")
    x = _tokens()
    np.testing.assert_allclose(model.rest(model.trunk(x, layer=1), layer=1), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        models.GPTConfig(vocab_size=11, seq_len=4, n_layers=1, d_model=9, n_heads=2)
    with pytest.raises(ValueError, match="even"):
        models.GPTConfig(vocab_size=11, seq_len=4, n_layers=1, d_model=6, n_heads=2)


# ----------------------------------------------------------------------------- configs, build


@pytest.mark.parametrize("cfg", [GPT_CFG, MLP_CFG])
def test_config_round_trip(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert models.config_from_dict(d) == cfg
    assert type(cfg).from_dict(d) == cfg
    assert hash(cfg) == hash(models.config_from_dict(d))
    with pytest.raises(ValueError, match="unknown"):
        models.config_from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="model_type"):
        models.config_from_dict({k: v for k, v in d.items() if k != "model_type"})


def test_build_is_deterministic():
    a, b, c = (nnx.state(models.build(GPT_CFG, s)) for s in (0, 0, 1))
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c)):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)
    with pytest.raises(TypeError):
        models.build({"vocab_size": 3}, 0)


# ----------------------------------------------------------------------------- loss


def test_example_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (3, 5))
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1)[..., 0].mean(1)
    got = jax.jit(models.example_loss)(jnp.asarray(logits), jnp.asarray(targets))
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # classifier: one label per example
    np.testing.assert_allclose(
        models.example_loss(jnp.asarray(logits[:, 0]), jnp.asarray(targets[:, 0])),
        -np.take_along_axis(logp[:, 0], targets[:, :1], -1)[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        models.example_loss(jnp.asarray(logits), jnp.asarray(targets[:, :4]))


# ----------------------------------------------------------------------------- checkpoints

META = {"data_hash": "abc123", "tokenizer_hash": "tok9", "train_config": {"lr": 0.003, "b": [1, 2]}}


@pytest.mark.parametrize("name, x_fn", [("gpt", _tokens), ("mlp", _features)])
def test_save_load_round_trip(tmp_path, name, x_fn, gpt, mlp):
    model = {"gpt": gpt, "mlp": mlp}[name]
    models.save_model(model, tmp_path / "ckpt", META)
    loaded, meta = models.load_model(tmp_path / "ckpt", expected=META)
    assert loaded.cfg == model.cfg and meta["data_hash"] == "abc123"
    assert meta["model_type"] == model.cfg.model_type
    x = x_fn()
    np.testing.assert_array_equal(loaded(x), model(x))
    with pytest.raises(FileExistsError):
        models.save_model(model, tmp_path / "ckpt", META)


def test_load_checks_expected_metadata(tmp_path, mlp):
    models.save_model(mlp, tmp_path / "ckpt", META)
    with pytest.raises(ValueError, match='data_hash: stored "abc123", now "zzz"') as e:
        models.load_model(tmp_path / "ckpt", expected={"data_hash": "zzz", "tokenizer_hash": "tok9"})
    assert "tokenizer_hash" not in str(e.value)
    with pytest.raises(ValueError, match="seed"):  # a key absent from the checkpoint
        models.load_model(tmp_path / "ckpt", expected={"seed": 0})
    models.load_model(tmp_path / "ckpt", expected={"train_config": {"lr": 0.003, "b": (1, 2)}})
    with pytest.raises(ValueError, match="reserved"):
        models.save_model(mlp, tmp_path / "other", {"model_type": "x"})


def test_missing_or_corrupted_checkpoint(tmp_path, mlp):
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        models.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a stride_jax model checkpoint"):
        models.load_model(tmp_path / "empty")

    models.save_model(mlp, tmp_path / "bad_meta", META)
    (tmp_path / "bad_meta" / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.load_model(tmp_path / "bad_meta")

    models.save_model(mlp, tmp_path / "bad_params", META)
    params_dir = tmp_path / "bad_params" / "params"
    for entry in os.listdir(params_dir):
        path = params_dir / entry
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(ValueError, match="could not restore"):
        models.load_model(tmp_path / "bad_params")

    models.save_model(mlp, tmp_path / "flipped", META)  # a flipped bit: restores, but the digest differs
    blobs = [p for p in (tmp_path / "flipped" / "params").rglob("*") if p.is_file() and p.stat().st_size > 1000]
    flipped = 0
    for blob in blobs:
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 0x04
        blob.write_bytes(bytes(raw))
        flipped += 1
    assert flipped
    with pytest.raises(ValueError, match="sha256|could not restore"):
        models.load_model(tmp_path / "flipped")
