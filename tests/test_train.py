"""train_many: learning, the vmap invariant, eval_losses, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax import models, train
from stride_jax.data import Examples

V, T = 16, 12
CFG = models.GPTConfig(vocab_size=V, seq_len=T, n_layers=2, d_model=32, n_heads=2)  # as in test_models
MLP_CFG = models.MLPConfig(in_dim=5, hidden=(16, 8), n_classes=2)  # as in test_models
FAST = train.TrainConfig(batch_size=8, epochs=2.0, learning_rate=1e-2, scan_steps=4)


def _pattern_examples(n=48, seed=0):
    """Windows of a periodic token stream (period 5): next tokens are predictable."""
    stream = np.tile(np.array([3, 1, 4, 1, 5]), 40)
    starts = np.random.default_rng(seed).integers(0, 5, n)
    chunks = np.stack([stream[s : s + T + 1] for s in starts]).astype(np.int32)
    return Examples(inputs=chunks[:, :-1], targets=chunks[:, 1:], ids=np.arange(n))


def _random_examples(n=48, seed=1):  # same N as _pattern_examples: shared compiled step
    chunks = np.random.default_rng(seed).integers(0, V, (n, T + 1)).astype(np.int32)
    return Examples(inputs=chunks[:, :-1], targets=chunks[:, 1:], ids=np.arange(n))


def _leaves(graphdef, state_M, i):
    return jax.tree.leaves(nnx.state(train.unstack(graphdef, state_M, i)))


def test_pretrain_learns_a_pattern():
    ex = _pattern_examples()
    before = train.eval_loss(models.build(CFG, 0), ex).mean()
    cfg = train.TrainConfig(**{**FAST.to_dict(), "epochs": 12.0, "scan_steps": 6})  # compiled once
    model = train.pretrain(CFG, ex, cfg, seed=0, progress=False)
    after = train.eval_loss(model, ex).mean()
    assert before > 2.0 and after < 0.2 * before, (before, after)


def test_init_matches_build():
    state_M = train._init_many(CFG, np.array([3, 5]))
    for i, seed in enumerate((3, 5)):
        want = jax.tree.leaves(nnx.state(models.build(CFG, seed)))
        for a, b in zip(jax.tree.leaves(state_M), want):
            np.testing.assert_array_equal(a[i], b)


def _relative_gap(a_leaves, b_leaves, init_leaves):
    """Per leaf: ||a - b|| / ||a - init||, the disagreement as a fraction of what training moved."""
    return [float(np.linalg.norm(a - b) / max(np.linalg.norm(a - i), 1e-12))
            for a, b, i in zip(a_leaves, b_leaves, init_leaves)]


def test_vmapped_models_equal_separate_runs():
    """M = 2 vmapped (chunks of 4 steps, last padded) == two M = 1 runs (one chunk of 6).

    Not bitwise: vmapping and chunking change how XLA fuses and reassociates float32 sums, and
    that differs between CPUs and XLA builds (one parameter of 4096 differed by 1.6e-5 on an AMD
    EPYC). The tolerance is relative to how far training moved each parameter tensor: a
    reassociation error after 6 Adam steps is ~1e-4 of that distance at most, while a model
    trained on another subset (the negative control below) is ~1 of it away.
    """
    ex = _random_examples()
    idx = np.stack([np.arange(0, 24), np.arange(16, 40)])
    seeds = np.array([7, 11])
    graphdef, state_2 = train.train_many(CFG, ex, idx, seeds, FAST, progress=False)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(state_2))
    one_chunk = train.TrainConfig(**{**FAST.to_dict(), "scan_steps": 6})
    for i in range(2):
        init = jax.tree.leaves(nnx.state(models.build(CFG, int(seeds[i]))))
        g1, state_1 = train.train_many(CFG, ex, idx[i : i + 1], seeds[i : i + 1], one_chunk,
                                       progress=False)
        gap = _relative_gap(_leaves(graphdef, state_2, i), _leaves(g1, state_1, 0), init)
        assert max(gap) < 1e-3, gap
        np.testing.assert_allclose(train.eval_losses(g1, state_1, ex)[0],
                                   train.eval_losses(graphdef, state_2, ex)[i], rtol=1e-4)
        # negative control: the same seed trained on the other model's subset is far away
        _, wrong = train.train_many(CFG, ex, idx[1 - i : 2 - i], seeds[i : i + 1], one_chunk,
                                    progress=False)
        wrong_gap = _relative_gap(_leaves(graphdef, state_2, i), _leaves(g1, wrong, 0), init)
        assert min(wrong_gap) > 0.05, wrong_gap


def test_same_seed_different_subsets_differ():
    ex = _random_examples()
    idx = np.stack([np.arange(0, 24), np.arange(16, 40)])
    g, s = train.train_many(CFG, ex, idx, np.array([0, 0]), FAST, progress=False)
    assert not np.allclose(_leaves(g, s, 0)[-1], _leaves(g, s, 1)[-1])


def test_learning_rate_schedule():
    opt = train._Optim.of(train.TrainConfig(warmup_frac=0.1, final_lr_frac=0.1))
    lr = [float(train._learning_rate(jnp.float32(i), 1.0, jnp.float32(100), opt))
          for i in (0, 9, 10, 55, 100)]
    np.testing.assert_allclose(lr, [0.1, 1.0, 1.0, 0.55, 0.1], atol=1e-6)


def test_eval_losses_shape_and_agreement():
    ex = _random_examples()
    graphdef, state_M = train.stack([models.build(CFG, s) for s in range(3)])
    losses = train.eval_losses(graphdef, state_M, ex, batch_size=30)  # 10 per step, 48 = 4*10+8
    assert losses.shape == (3, 48) and losses.dtype == np.float32
    for i in range(3):
        model = train.unstack(graphdef, state_M, i)
        np.testing.assert_allclose(losses[i], train.eval_loss(model, ex), rtol=1e-5, atol=1e-5)
        want = models.example_loss(model(ex.inputs[:3]), ex.targets[:3])  # plain eager forward
        np.testing.assert_allclose(losses[i, :3], want, rtol=1e-5, atol=1e-5)


def test_stack_unstack_round_trip():
    mods = [models.build(CFG, s) for s in (1, 2)]
    graphdef, state_M = train.stack(mods)
    x = _random_examples().inputs[:2]
    for i, m in enumerate(mods):
        np.testing.assert_array_equal(train.unstack(graphdef, state_M, i)(x), m(x))
    with pytest.raises(IndexError):
        train.unstack(graphdef, state_M, 2)
    with pytest.raises(ValueError, match="identical structure"):
        train.stack([mods[0], models.build(MLP_CFG, 0)])


def _classifier_examples():
    x = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    return Examples(inputs=x, targets=(x[:, 0] + x[:, 1] > 0).astype(np.int32), ids=np.arange(64))


def test_mlp_classifier_trains():
    ex = _classifier_examples()
    cfg = train.TrainConfig(batch_size=16, epochs=30, learning_rate=3e-2)
    g, s = train.train_many(MLP_CFG, ex, np.arange(64)[None], np.array([0]), cfg, progress=False)
    assert train.eval_losses(g, s, ex).mean() < 0.25


def test_divergence_is_reported():
    ex = _classifier_examples()
    cfg = train.TrainConfig(batch_size=16, epochs=8, learning_rate=1e30)  # same compiled step
    with pytest.raises(FloatingPointError, match=r"models \[0\] \(seeds \[4\]\)"):
        train.train_many(MLP_CFG, ex, np.arange(64)[None], np.array([4]), cfg, progress=False)


def test_bad_inputs_raise():
    ex = _random_examples()
    idx = np.arange(16)[None]
    with pytest.raises(ValueError, match="outside"):
        train.train_many(CFG, ex, np.array([[0, len(ex)] * 8]), np.array([0]), FAST,
                         progress=False)
    with pytest.raises(ValueError, match="seeds"):
        train.train_many(CFG, ex, idx, np.array([0, 1]), FAST, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train.train_many(CFG, ex, idx[:, :4], np.array([0]), FAST, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train.train_many(CFG, ex[np.arange(0)], idx, np.array([0]), FAST, progress=False)
    with pytest.raises(ValueError, match="token ids"):
        bad = Examples(inputs=ex.inputs + V, targets=ex.targets, ids=ex.ids)
        train.train_many(CFG, bad, idx, np.array([0]), FAST, progress=False)
    with pytest.raises(ValueError, match="context"):
        long = models.GPTConfig(vocab_size=V, seq_len=T - 1, n_layers=1, d_model=8, n_heads=2)
        train.train_many(long, ex, idx, np.array([0]), FAST, progress=False)
    with pytest.raises(ValueError, match="integer"):
        train.train_many(CFG, ex, idx.astype(float), np.array([0]), FAST, progress=False)
    with pytest.raises(ValueError):
        train.TrainConfig(epochs=0)
