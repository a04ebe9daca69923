"""ConvNet (models.ConvConfig): hook-point contract, conv numerics, config, checkpoints, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax import models, train
from stride_jax.data import Examples

CFG = models.ConvConfig(image_shape=(4, 4, 2), n_classes=3, channels=(4, 6), pool=(True, False), dense=(8,))


@pytest.fixture(scope="module")
def net():
    return models.build(CFG, seed=0)


def _images(b=5, seed=0):
    return np.random.default_rng(seed).normal(size=(b, CFG.in_dim)).astype(np.float32)


def test_shapes_and_hook_points(net):
    assert (net.n_layers, net.out_dim) == (3, 3)
    # input 4x4x2, conv(4)+pool -> 2x2x4, conv(6) -> 2x2x6, dense 8
    assert [net.hidden_dim_at(l) for l in range(4)] == [32, 16, 24, 8]
    assert CFG.stage_shapes() == ((4, 4, 2), (2, 2, 4), (2, 2, 6), (8,))
    logits = net(_images())
    assert logits.shape == (5, 3) and logits.dtype == jnp.float32


def test_rest_of_trunk_is_the_model(net):
    x = _images()
    want = net(x)
    for layer in range(net.n_layers + 1):
        h = net.trunk(x, layer=layer)
        assert h.shape == (5, net.hidden_dim_at(layer))
        np.testing.assert_allclose(net.rest(h, layer=layer), want, atol=1e-5, rtol=1e-5)


def test_edit_at_layer_leaves_earlier_layers(net):
    x = _images()
    h1 = net.trunk(x, layer=1)
    h2 = net.trunk(x, layer=2)
    # a zero edit at layer 2 is bit-identical; a nonzero one changes the logits only through rest
    np.testing.assert_array_equal(net.rest(h2 + 0.0, layer=2), net.rest(h2, layer=2))
    assert not np.allclose(net.rest(h2 + 1.0, layer=2), net.rest(h2, layer=2))
    del h1


def test_conv2d_matches_lax_convolution():
    conv = models.Conv2D(3, 5, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, 7, 3))
    want = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...].reshape(1, 1, 1, -1)
    np.testing.assert_allclose(conv(x), want, atol=1e-5, rtol=1e-5)
    conv2 = models.Conv2D(3, 2, 2, rngs=nnx.Rngs(0))  # even kernel: SAME pads (0, 1) like lax
    want2 = jax.lax.conv_general_dilated(x, conv2.kernel[...], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv2.bias[...].reshape(1, 1, 1, -1)
    np.testing.assert_allclose(conv2(x), want2, atol=1e-5, rtol=1e-5)


def test_channels_last_flattening(net):
    """trunk(layer=0) is the input, read as an image [H, W, C] in row-major (channels last) order."""
    x = _images()
    np.testing.assert_array_equal(net.trunk(x, layer=0), x)
    img = x.reshape(5, 4, 4, 2)
    h = jax.nn.relu(net.convs[0](img))
    pooled = h.reshape(5, 2, 2, 2, 2, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(net.trunk(x, layer=1), pooled.reshape(5, -1), atol=1e-6)


def test_bad_inputs_and_layers(net):
    with pytest.raises(ValueError, match="flat images"):
        net.trunk(np.zeros((2, 4, 4, 2), np.float32), layer=0)
    with pytest.raises(ValueError, match="out of range"):
        net.trunk(_images(), layer=4)
    with pytest.raises(ValueError, match="expected h of shape"):
        net.rest(np.zeros((2, 5), np.float32), layer=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(4, 4)), "image_shape"),
    (dict(image_shape=(4, 4, 1), channels=(4,), pool=(True, False)), "one flag per conv stage"),
    (dict(image_shape=(3, 4, 1), channels=(4,), pool=(True,)), "even sides"),
    (dict(image_shape=(4, 4, 1), channels=(0,), pool=(False,)), "positive"),
    (dict(image_shape=(4, 4, 1), channels=(), pool=(), dense=()), "at least one"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.ConvConfig(n_classes=2, **kwargs)


def test_config_round_trip_and_build():
    d = CFG.to_dict()
    assert d["model_type"] == "conv"
    assert models.config_from_dict(d) == CFG
    a, b = models.build(CFG, seed=3), models.build(CFG, seed=3)
    x = _images()
    np.testing.assert_array_equal(a(x), b(x))
    assert not np.allclose(a(x), models.build(CFG, seed=4)(x))


def test_save_load_round_trip(tmp_path, net):
    models.save_model(net, tmp_path / "m", {"note": "conv"})
    loaded, meta = models.load_model(tmp_path / "m", expected={"note": "conv"})
    assert meta["model_type"] == "conv"
    np.testing.assert_array_equal(loaded(_images()), net(_images()))


def test_train_many_learns_and_matches_single_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96).astype(np.int32)
    x = rng.normal(size=(96, CFG.in_dim)).astype(np.float32) + 1.5 * y[:, None]
    ex = Examples(inputs=x, targets=y, ids=np.arange(96))
    cfg = train.TrainConfig(learning_rate=1e-2, epochs=8, batch_size=16)
    idx = np.stack([np.arange(96), np.arange(96)])
    graphdef, state = train.train_many(CFG, ex, idx, np.array([0, 1]), cfg, progress=False)
    losses = train.eval_losses(graphdef, state, ex)
    assert losses.mean() < 0.5 * np.log(3)
    alone = train.pretrain(CFG, ex, cfg, seed=1, progress=False)
    np.testing.assert_allclose(train.eval_loss(alone, ex), losses[1], atol=1e-4, rtol=1e-4)
