"""Bringing your own trained weights into the model classes (docs/models.md "Your own weights")."""

import numpy as np
import pytest

from stride_jax import models


def test_a_scikit_learn_mlp_becomes_a_stride_jax_mlp():
    """The docs' recipe: sklearn's MLPClassifier (ReLU, x @ W + b) into models.MLP gives its
    predict_proba to float32 precision."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=60, random_state=0).fit(x[:600], y[:600])
    model = models.build(models.MLPConfig(in_dim=64, hidden=(32,), n_classes=10), seed=0)
    assert models.param_shapes(model) == {"head": {"bias": (10,), "kernel": (32, 10)},
                                          "layers": {0: {"bias": (32,), "kernel": (64, 32)}}}
    models.set_params(model, {"layers": {0: {"kernel": clf.coefs_[0], "bias": clf.intercepts_[0]}},
                              "head": {"kernel": clf.coefs_[1], "bias": clf.intercepts_[1]}})
    logits = np.asarray(model(x[600:700]))
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(1, keepdims=True), clf.predict_proba(x[600:700]), atol=1e-5)


def test_gpt_weights_round_trip_and_bad_weights_are_named():
    cfg = models.GPTConfig(vocab_size=32, seq_len=8, n_layers=1, d_model=16, n_heads=2)
    trained, fresh = models.build(cfg, seed=1), models.build(cfg, seed=2)
    from flax import nnx

    weights = nnx.to_pure_dict(nnx.state(trained, nnx.Param))  # e.g. arrays saved elsewhere
    x = np.arange(16, dtype=np.int32).reshape(2, 8) % 32
    assert not np.allclose(fresh(x), trained(x))
    models.set_params(fresh, weights)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(trained(x)))
    wrong = nnx.to_pure_dict(nnx.state(trained, nnx.Param))
    wrong["lm_head"]["kernel"] = np.zeros((32, 16))  # a PyTorch-style [out, in] head
    del wrong["wte"]
    with pytest.raises(ValueError, match=r"missing \['wte'\]\['embedding'\].*lm_head'\]\['kernel'\]: shape \(32, 16\)"):
        models.set_params(fresh, wrong)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(trained(x)))  # nothing changed
    bad = nnx.to_pure_dict(nnx.state(trained, nnx.Param))
    bad["lm_head"]["kernel"] = np.full((16, 32), np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        models.set_params(fresh, bad)
