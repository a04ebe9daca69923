"""Counterfactual removal: ordering, shapes, determinism, an oracle beats random, plot, save/load."""

import numpy as np
import pytest

from stride_jax.harness import counterfactual as cf
from stride_jax import models, train
from stride_jax.data import Examples

CFG = models.MLPConfig(in_dim=2, hidden=(8,), n_classes=2)
TCFG = train.TrainConfig(learning_rate=3e-2, epochs=6, batch_size=8)


def _data(n=48, seed=0):
    """Two Gaussian blobs; the queries sit on class 1's blob."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int32)
    x = (rng.normal(size=(n, 2)) * 0.7 + np.where(y[:, None] == 1, 1.0, -1.0)).astype(np.float32)
    train_ex = Examples(inputs=x, targets=y, ids=np.arange(n))
    queries = Examples(inputs=np.array([[1.0, 1.0], [0.8, 1.2]], np.float32), targets=np.array([1, 1], np.int32),
                       ids=np.array([100, 101]))
    return train_ex, queries


@pytest.fixture(scope="module")
def result():
    train_ex, queries = _data()
    # oracle: class-1 examples help class-1 queries; "anti": the opposite ranking
    oracle = np.where(train_ex.targets == 1, 1.0, -1.0)[:, None].repeat(2, axis=1)
    return cf.counterfactual_removal(CFG, TCFG, train_ex, queries, {"oracle": oracle, "anti": -oracle},
                                     ks=(4, 20), n_seeds=2, seed=0)


def test_removal_order_descending_with_seeded_ties():
    s = np.array([0.0, 3.0, 0.0, 1.0, 0.0, 0.0])
    a = cf.removal_order(s, seed=0)
    assert list(a[:2]) == [1, 3] and set(a[2:]) == {0, 2, 4, 5}
    np.testing.assert_array_equal(a, cf.removal_order(s, seed=0))
    orders = {tuple(cf.removal_order(s, seed=k)[2:]) for k in range(20)}
    assert len(orders) > 1  # ties are shuffled, not taken in index order


def test_shapes_and_ranges(result):
    assert result.methods == ("oracle", "anti", "random")
    assert result.ks.tolist() == [4, 20]
    assert result.prob_full_QxR.shape == (2, 2)
    assert result.prob_AxQxGxR.shape == (3, 2, 2, 2)
    assert np.isfinite(result.prob_AxQxGxR).all()
    assert ((result.prob_AxQxGxR >= 0) & (result.prob_AxQxGxR <= 1)).all()
    np.testing.assert_array_equal(result.query_ids, [100, 101])
    s = result.summary()
    assert set(s) == {"oracle", "anti", "random"} and len(s["oracle"]["mean_drop"]) == 2


def test_oracle_drops_more_than_random_and_anti(result):
    drop = result.drop_AxQxG  # [method, query, k]
    at_20 = drop[:, :, 1].mean(axis=1)
    assert at_20[0] > at_20[2] > at_20[1] - 1e-3
    assert at_20[0] > 0.05


def test_full_models_match_pretrain(result):
    train_ex, queries = _data()
    seeds = cf._training_seeds(0, 2)
    model = train.pretrain(CFG, train_ex, TCFG, seed=int(seeds[1]), progress=False)
    np.testing.assert_allclose(np.exp(-train.eval_loss(model, queries)), result.prob_full_QxR[:, 1], rtol=1e-4)


def test_deterministic():
    train_ex, queries = _data()
    scores = np.random.default_rng(0).normal(size=(48, 2))
    a = cf.counterfactual_removal(CFG, TCFG, train_ex, queries, {"s": scores}, ks=(3,), n_seeds=1, seed=5,
                                  models_per_chunk=2)
    b = cf.counterfactual_removal(CFG, TCFG, train_ex, queries, {"s": scores}, ks=(3,), n_seeds=1, seed=5)
    np.testing.assert_allclose(a.prob_AxQxGxR, b.prob_AxQxGxR, rtol=1e-5)


def test_input_validation():
    train_ex, queries = _data()
    good = np.zeros((48, 2))
    with pytest.raises(ValueError, match="ks must lie"):
        cf.counterfactual_removal(CFG, TCFG, train_ex, queries, {"s": good}, ks=(0,))
    with pytest.raises(ValueError, match="ks must lie"):
        cf.counterfactual_removal(CFG, TCFG, train_ex, queries, {"s": good}, ks=(45,))
    with pytest.raises(ValueError, match="shape"):
        cf.counterfactual_removal(CFG, TCFG, train_ex, queries, {"s": np.zeros((47, 2))}, ks=(2,))
    with pytest.raises(ValueError, match="NaN"):
        cf.counterfactual_removal(CFG, TCFG, train_ex, queries, {"s": good * np.nan}, ks=(2,))
    with pytest.raises(ValueError, match="reserved"):
        cf.counterfactual_removal(CFG, TCFG, train_ex, queries, {"random": good}, ks=(2,))


def test_plot_and_save_load(result, tmp_path):
    png = cf.plot_counterfactual(result, tmp_path / "plots" / "cf.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result.save(tmp_path / "cf.npz")
    back = cf.CounterfactualResult.load(tmp_path / "cf.npz")
    assert back.methods == result.methods
    np.testing.assert_array_equal(back.prob_AxQxGxR, result.prob_AxQxGxR)
    assert back.to_dict()["summary"] == result.to_dict()["summary"]
