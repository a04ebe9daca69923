"""train_many: learning, the vmap invariant, eval_losses, validation; fine-tuning (Tune, finetune_many)."""

import functools

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


# ----------------------------------------------------------------------------- fine-tuning

LLAMA_CFG = models.LlamaConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32,
                               max_len=T, tie_embeddings=True, qkv_bias=True)
SUBSETS = np.stack([np.arange(0, 24), np.arange(16, 40)])
TUNE_SEEDS = np.array([7, 11])
TUNES = {"full": train.Tune(), "top": train.Tune("top", layers=1), "lora": train.Tune("lora", rank=2)}


def _paths(state):
    return {train._nnx_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}


def _flat(model):
    return {train._nnx_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


def test_tune_validation():
    assert train.Tune.from_dict(train.Tune("lora", layers=1, rank=4).to_dict()) == train.Tune("lora", 1, 4)
    for bad, match in ((dict(mode="adapter"), "mode"), (dict(mode="top"), "needs layers"),
                       (dict(mode="full", layers=1), "mode='top'"), (dict(mode="lora", rank=0), "rank"),
                       (dict(mode="top", layers=0), "positive")):
        with pytest.raises(ValueError, match=match):
            train.Tune(**bad)
    with pytest.raises(ValueError, match="exceeds the model's depth of 2"):
        train.Tune("top", layers=3).start_layer(2)
    with pytest.raises(ValueError, match="needs start"):
        train.train_many(CFG, _random_examples(), SUBSETS, TUNE_SEEDS, FAST, tune=train.Tune(), progress=False)


def test_which_parameters_train():
    """top: blocks[l:] and the head, not the embedding (also when tied to the head); lora: every
    block kernel, not the head; the frozen trunk below the trained blocks in both."""
    x = _random_examples().inputs[:1]
    gpt = _start_and_pool()[0]
    top = train._plan(gpt, train.Tune("top", layers=1), x)
    assert top.layer == 1
    assert {p[:2] for p in _paths(top.trainable)} == {("blocks", 1), ("lm_head", "kernel")}
    assert {p[:2] for p in _paths(top.frozen)} == {("blocks", 0), ("wte", "embedding")}
    tied = models.build(models.GPTConfig(vocab_size=V, seq_len=T, n_layers=2, d_model=32, n_heads=2,
                                         tie_embeddings=True), 0)
    assert {p[:2] for p in _paths(train._plan(tied, train.Tune("top", layers=2), x).trainable)} == {
        ("blocks", 0), ("blocks", 1)}
    llama = _llama()
    lora = train._plan(llama, train.Tune("lora", rank=2), x)
    kernels = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(lora.sites) == {("blocks", b, part, k) for b in range(2) for part, k in
                               [("attn", k) for k in ("q_proj", "k_proj", "v_proj", "o_proj")]
                               + [("mlp", k) for k in ("gate_proj", "up_proj", "down_proj")]}
    assert {p[-1] for p in _paths(lora.trainable)} == {"lora_a", "lora_b"} and lora.layer == 0
    assert {p[3] for p in _paths(lora.trainable)} == kernels
    upper = train._plan(llama, train.Tune("lora", layers=1, rank=2), x)
    assert {s[1] for s in upper.sites} == {1} and upper.layer == 1


def test_lora_with_zero_b_is_the_base_model():
    """B = 0: the adapted Llama computes the base model's logits, and folding W + A B gives back
    the base parameters bit for bit (W + A 0 = W exactly in float32)."""
    llama = _llama()
    x = _random_examples().inputs[:4]
    plan = train._plan(llama, train.Tune("lora", rank=2), x[:1])
    params_M = train._lora_params(plan, np.array([3, 5]))
    a = [np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params_M)[0]
         if train._nnx_path(p)[-1] == "lora_a"]
    assert all(np.abs(a_i[0]).min() > 0 and not np.array_equal(a_i[0], a_i[1]) for a_i in a)  # A random per seed
    adapted = nnx.merge(plan.graphdef, jax.tree.map(lambda v: v[0], params_M), plan.frozen)
    want = np.asarray(llama(x))
    # Not bitwise: XLA may fuse x W and x A into one dot of another blocking; float32 dots of
    # length <= 32 differ by a few ulp of the logits at most.
    np.testing.assert_allclose(np.asarray(adapted(x)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    tuned = train.Tuned(plan.graphdef, params_M, plan.frozen, plan.layer, train.Tune("lora", rank=2), plan.sites)
    folded, base = _flat(tuned.model(1)), _flat(llama)
    assert folded.keys() == base.keys()
    for path in base:
        np.testing.assert_array_equal(folded[path], base[path])


@functools.lru_cache(maxsize=None)
def _start_and_pool():
    return models.build(CFG, 0), _random_examples()


@functools.lru_cache(maxsize=None)
def _tuned_pair(mode: str) -> train.Tuned:
    """M = 2 fine-tunes of one random GPT (shared by the tests below: one compile per mode)."""
    start, ex = _start_and_pool()
    return train.finetune_many(start, ex, SUBSETS, TUNE_SEEDS, FAST, TUNES[mode], progress=False)


@functools.lru_cache(maxsize=None)
def _llama():
    return models.build(LLAMA_CFG, 0)


@pytest.mark.parametrize("mode", ["full", "top", "lora"])
def test_finetuning_learns_and_keeps_frozen_params(mode):
    """Each model's loss on its own subset drops (by far more than float noise, ~1e-6), and the
    parameters outside the tuned part are bitwise those of the start model."""
    start, ex = _start_and_pool()
    digest = models.param_digest(start)
    tuned = _tuned_pair(mode)
    before = train.eval_loss(start, ex)
    losses = tuned.eval_losses(ex)
    base = _flat(start)
    for i in range(2):
        own = SUBSETS[i]
        assert losses[i, own].mean() < before[own].mean() - 1e-3, (mode, losses[i, own].mean(), before[own].mean())
        model = tuned.model(i)
        np.testing.assert_allclose(train.eval_loss(model, ex), losses[i], rtol=1e-5, atol=1e-6)
        after = _flat(model)
        changed = {p for p in base if not np.array_equal(after[p], base[p])}
        if mode == "full":
            assert changed == set(base)
        elif mode == "top":  # block 1 and the head train; embedding and block 0 bitwise as they were
            assert changed == {p for p in base if p[:2] == ("blocks", 1) or p[0] == "lm_head"}
        else:  # LoRA folds into the block kernels only; the embedding and the head are untouched
            assert changed == {p for p in base if p[0] == "blocks"}
    for a, b in zip(jax.tree.leaves(nnx.state(tuned.model(1))), jax.tree.leaves(nnx.state(tuned.model(1)))):
        np.testing.assert_array_equal(a, b)  # model(i) leaves the Tuned as it was (folding copies)
    assert models.param_digest(start) == digest  # and the start model too
    assert tuned.frozen is None if mode == "full" else tuned.frozen is not None
    if mode != "full":  # frozen parameters exist once: no leaf of the shared state has a model axis
        shapes = {p: x.shape for p, x in base.items()}
        for p, x in jax.tree_util.tree_flatten_with_path(tuned.frozen)[0]:
            path = tuple(k for k in train._nnx_path(p) if k != "base_module")  # LoRA wraps the Linear
            assert x.shape == shapes[path]


def test_train_many_with_start_returns_full_models():
    start, ex = _start_and_pool()
    graphdef, state_M = train.train_many(CFG, ex, SUBSETS, TUNE_SEEDS, FAST, start=start, tune=TUNES["top"],
                                         progress=False)
    for i in range(2):
        want = _flat(_tuned_pair("top").model(i))
        got = _flat(train.unstack(graphdef, state_M, i))
        for p in want:
            np.testing.assert_array_equal(got[p], want[p])  # the same program: bitwise
    with pytest.raises(ValueError, match="not of model_cfg"):
        train.train_many(MLP_CFG, ex, SUBSETS, TUNE_SEEDS, FAST, start=start, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["top", "lora"])
def test_finetune_vmapped_equals_separate_runs(mode):
    """The vmap invariant of fine-tuning (tolerance as in test_vmapped_models_equal_separate_runs,
    relative to how far training moved the trained parameters), with a negative control."""
    start, ex = _start_and_pool()
    one_chunk = train.TrainConfig(**{**FAST.to_dict(), "scan_steps": 6})
    trained = lambda tuned, i: jax.tree.leaves(jax.tree.map(lambda x: np.asarray(x[i]), tuned.trainable_M))
    for i in range(2):
        alone = train.finetune_many(start, ex, SUBSETS[i:i + 1], TUNE_SEEDS[i:i + 1], one_chunk, TUNES[mode],
                                    progress=False)
        plan = train._plan(start, TUNES[mode], ex.inputs[:1])
        if mode == "lora":  # A starts at its seeded draw, B at 0
            init = [np.asarray(x[0]) for x in jax.tree.leaves(train._lora_params(plan, TUNE_SEEDS[i:i + 1]))]
        else:
            init = [np.asarray(x) for x in jax.tree.leaves(plan.trainable)]
        gap = _relative_gap(trained(_tuned_pair(mode), i), trained(alone, 0), init)
        assert max(gap) < 1e-3, gap
        wrong = train.finetune_many(start, ex, SUBSETS[1 - i:2 - i], TUNE_SEEDS[i:i + 1], one_chunk, TUNES[mode],
                                    progress=False)
        wrong_gap = _relative_gap(trained(_tuned_pair(mode), i), trained(wrong, 0), init)
        assert min(wrong_gap) > 0.05, wrong_gap


def test_top_all_layers_equals_full_finetuning():
    """An MLP's layer-0 state is its input (no parameters), so Tune("top", layers=n_layers) trains
    every parameter, through the hook-state path, and must match full fine-tuning. Not bitwise
    (another program: rest(h, 0) on cached inputs vs model(x)); tolerance relative to how far
    training moved the parameters, as in the vmap test."""
    ex = _classifier_examples()
    start = models.build(MLP_CFG, 0)
    cfg = train.TrainConfig(batch_size=16, epochs=3, learning_rate=3e-2, scan_steps=4)
    idx, seeds = np.arange(48)[None], np.array([5])
    full = train.finetune_many(start, ex, idx, seeds, cfg, train.Tune(), progress=False)
    top = train.finetune_many(start, ex, idx, seeds, cfg, train.Tune("top", layers=len(MLP_CFG.hidden)),
                              progress=False)
    assert top.frozen is not None and not jax.tree.leaves(top.frozen)  # nothing frozen
    a, b = _flat(full.model(0)), _flat(top.model(0))
    init = _flat(start)
    gap = _relative_gap([a[p] for p in init], [b[p] for p in init], [init[p] for p in init])
    assert max(gap) < 1e-3, gap
    assert train.eval_losses(*train.stack([full.model(0)]), ex).mean() < train.eval_loss(start, ex).mean() - 0.05


@pytest.mark.slow
def test_top_hook_states_equal_running_the_frozen_trunk():
    """Tune("top"): training rest(h, l) on cached trunk states == training the same parameters
    through the whole forward with the trunk frozen (the cache is exact up to float32
    reassociation; tolerance as in the vmap test)."""
    start, ex = _start_and_pool()
    cached = train.finetune_many(start, ex, SUBSETS[:1], TUNE_SEEDS[:1], FAST, TUNES["top"], progress=False)
    plan = train._plan(start, TUNES["top"], ex.inputs[:1])
    order = train._orders(SUBSETS[:1].astype(np.int32), TUNE_SEEDS[:1], FAST.num_steps(24), FAST.batch_size)
    params = jax.tree.map(lambda x: x[None], plan.trainable)
    uncached = train._run(plan.graphdef, params, plan.frozen, train.device_batch(ex), order, TUNE_SEEDS[:1], FAST,
                          layer=0, n_models=1, mesh=None, axis=None, progress=False, desc="", on_chunk=None)
    a, b = jax.tree.leaves(cached.trainable_M), jax.tree.leaves(uncached)
    gap = _relative_gap([np.asarray(x[0]) for x in a], [np.asarray(x[0]) for x in b],
                        [np.asarray(x) for x in jax.tree.leaves(plan.trainable)])
    assert max(gap) < 1e-3, gap


def test_greedy_match_is_greedy_decoding_without_a_loop():
    """`exact` is True exactly for the responses that greedy decoding from the prompt produces
    (checked against an explicit decoding loop); token accuracy counts teacher-forced hits."""
    model = models.build(models.GPTConfig(vocab_size=V, seq_len=12, n_layers=2, d_model=32, n_heads=2), 3)
    rng = np.random.default_rng(0)
    prompt_len, resp_len = 7, 4

    def greedy(prefix, steps=resp_len):
        seq = list(prefix)
        for _ in range(steps):
            logits = np.asarray(model(jnp.asarray([seq + [0] * (12 - len(seq))], jnp.int32)))
            seq.append(int(logits[0, len(seq) - 1].argmax()))
        return seq

    seqs = []
    for i in range(4):
        seq = greedy(rng.integers(0, V, prompt_len).tolist())
        if i == 1:
            seq[-1] = (seq[-1] + 1) % V  # the last response token wrong
        if i == 2:  # the first response token wrong, the rest greedy after it
            seq = greedy(seq[:prompt_len] + [(seq[prompt_len] + 1) % V])[: prompt_len + 1] + \
                greedy(seq[:prompt_len] + [(seq[prompt_len] + 1) % V])[prompt_len + 1: prompt_len + resp_len]
        seqs.append(seq)
    # the prompt itself greedy too (its predictions are hits but not counted), the last response token wrong
    seq = greedy([3], prompt_len + resp_len - 1)
    seqs.append(seq[:-1] + [(seq[-1] + 1) % V])
    arr = np.asarray(seqs, np.int32)
    loss_mask = np.zeros((5, 10), np.float32)
    loss_mask[:, prompt_len - 1:] = 1.0  # targets at positions prompt_len-1 .. are the response
    ex = Examples(inputs=arr[:, :-1], targets=arr[:, 1:], ids=np.arange(5), loss_mask=loss_mask)
    exact, acc = train.greedy_match(model, ex, batch_size=3)
    assert exact.tolist() == [True, False, False, True, False]
    np.testing.assert_allclose(acc, [1.0, 0.75, 0.75, 1.0, 0.75])


def test_tuned_greedy_match_equals_each_model_s():
    """Tuned.greedy_match (all models at once, frozen trunk from hooks) equals greedy_match of
    each fine-tuned model as a plain model."""
    model = models.build(models.GPTConfig(vocab_size=V, seq_len=12, n_layers=3, d_model=32, n_heads=2), 3)
    rng = np.random.default_rng(1)
    arr = rng.integers(0, V, (10, 12)).astype(np.int32)
    arr[:, 6:] = arr[0, 6:]  # one shared response: some models get some of it right
    loss_mask = np.zeros((10, 11), np.float32)
    loss_mask[:, 5:] = 1.0
    ex = Examples(inputs=arr[:, :-1], targets=arr[:, 1:], ids=np.arange(10), loss_mask=loss_mask)
    cfg = train.TrainConfig(learning_rate=3e-2, epochs=20.0, batch_size=4, scan_steps=5)
    tune = train.Tune("top", layers=1)
    tuned = train.finetune_many(model, ex, np.array([[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6]]),
                                np.array([0, 1, 2]), cfg, tune, progress=False)
    hooks = train.hook_states(model, tune, ex)
    exact, acc = tuned.greedy_match(ex, batch_size=5, hooks=hooks)
    exact2, acc2 = tuned.greedy_match(ex)
    assert exact.shape == (3, 10) and 0 < acc.mean()
    for i in range(3):
        e, a = train.greedy_match(tuned.model(i), ex)
        assert exact[i].tolist() == e.tolist() == exact2[i].tolist()
        np.testing.assert_allclose(acc[i], a, atol=1e-6)
        np.testing.assert_allclose(acc2[i], a, atol=1e-6)


def test_counted_only_batches_give_the_same_losses_and_hits():
    """A fine-tune batch keeps targets at counted positions only (the head read there): the
    per-example loss, with hook states or inputs, equals the full-logits loss."""
    model = models.build(models.GPTConfig(vocab_size=V, seq_len=12, n_layers=2, d_model=32, n_heads=2), 0)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, V, (6, 12)).astype(np.int32)
    loss_mask = np.zeros((6, 11), np.float32)
    for i, (a, b) in enumerate([(8, 11), (5, 7), (9, 10), (3, 6), (10, 11), (6, 9)]):
        loss_mask[i, a:b] = 1.0
    loss_mask[1, 6] = 0.5  # a fractional weight is kept
    ex = Examples(inputs=arr[:, :-1], targets=arr[:, 1:], ids=np.arange(6), loss_mask=loss_mask)
    plain = train.device_batch(ex)
    compact = train._counted_only(plain)
    assert len(compact) == 5 and compact[1].shape == (6, 3)
    for layer in (0, 1):
        h = plain if layer == 0 else (model.trunk(plain[0], layer=1),) + plain[1:]
        hc = compact if layer == 0 else (h[0],) + compact[1:]
        np.testing.assert_allclose(np.asarray(train.batch_losses(model, hc, layer)),
                                   np.asarray(train.batch_losses(model, h, layer)), rtol=1e-5, atol=1e-6)
    assert train._counted_only(train.device_batch(Examples(inputs=arr[:, :-1], targets=arr[:, 1:],
                                                           ids=np.arange(6)))) [1].shape == (6, 11)
