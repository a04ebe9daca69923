"""Generation: greedy equals an argmax loop over full forwards (GPT, and the tiny GGUF Llama against
the float64 numpy reference), ragged prompts continue from their own last token, top-p and seeds
behave, eos stops a row, and only generated tokens count in the loss of the examples built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_convert import HP, make_weights, reference_logits, write_gguf

from stride_jax import data, generate as gen_lib, models
from stride_jax.models import convert

GPT_CFG = models.GPTConfig(vocab_size=40, seq_len=24, n_layers=2, d_model=16, n_heads=2)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9]]
N_NEW = 5


@pytest.fixture(scope="module")
def gpt():
    return models.build(GPT_CFG, 0)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    hp = HP(ctx=32)
    w = make_weights(hp)
    pre = convert.load_gguf(write_gguf(tmp_path_factory.mktemp("gen") / "tiny.gguf", hp, w))
    return pre, hp, w


def argmax_loop(logits_fn, prompt, n_new):
    """The reference: append argmax of the last position's logits, one full forward per token."""
    seq = list(prompt)
    for _ in range(n_new):
        seq.append(int(np.argmax(np.asarray(logits_fn(np.asarray([seq], np.int32)))[0, -1])))
    return seq[len(prompt):]


def test_greedy_equals_an_argmax_loop_on_gpt(gpt):
    got = gen_lib.generate(gpt, PROMPTS, N_NEW)
    forward = nnx.jit(lambda m, x: m(x))  # compiled per length: cheaper than eager op-by-op compiles
    want = [argmax_loop(lambda x: forward(gpt, jnp.asarray(x)), p, N_NEW) for p in PROMPTS]
    assert got.continuations() == want
    assert got.prompts() == PROMPTS
    np.testing.assert_array_equal(got.n_generated_B, [N_NEW] * 3)
    assert got.tokens_BxT.shape == (3, 5 + N_NEW) and not got.stopped_B.any()
    # deterministic, and one compiled program serves other prompts of the same shape, any temperature
    size = gen_lib._generate._cache_size()
    again = gen_lib.generate(gpt, [[3, 3, 3, 3, 3], [1], [2, 2]], N_NEW)
    assert gen_lib.generate(gpt, PROMPTS, N_NEW).continuations() == want and again.prompts()[1] == [1]
    gen_lib.generate(gpt, PROMPTS, N_NEW, temperature=0.7, seed=1)
    gen_lib.generate(gpt, PROMPTS, N_NEW, temperature=1.3, top_p=0.5, seed=2)
    assert gen_lib._generate._cache_size() == size + 1  # + the sampled variant, once


def test_greedy_on_the_tiny_gguf_llama_matches_the_numpy_reference(tiny_llama):
    pre, hp, w = tiny_llama
    prompts = [list(p) for p in gen_lib.encode_prompts(pre.tokenizer, ["the cat", "in"], chat_template=False)]
    got = gen_lib.generate(pre.model, prompts, 6).continuations()
    assert got == [argmax_loop(lambda x: reference_logits(w, hp, x), p, 6) for p in prompts]


def test_ragged_prompts_continue_from_their_own_last_token(gpt, tiny_llama):
    for model, prompts in ((gpt, PROMPTS), (tiny_llama[0].model, [[40, 41, 42, 43, 44, 45, 46], [100, 7, 200]])):
        batched = gen_lib.generate(model, prompts, N_NEW).continuations()
        alone = [gen_lib.generate(model, [p], N_NEW).continuations()[0] for p in prompts]
        assert batched == alone
    # an Examples of prompts: its real tokens are the prompts
    ex = data.lm_examples(PROMPTS[:2], 4, mode="pad")
    assert gen_lib.generate(gpt, ex, N_NEW).continuations() == gen_lib.generate(gpt, PROMPTS[:2], N_NEW).continuations()


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(gpt):
    a = gen_lib.generate(gpt, PROMPTS, 8, temperature=1.0, seed=1).continuations()
    assert a == gen_lib.generate(gpt, PROMPTS, 8, temperature=1.0, seed=1).continuations()
    assert a != gen_lib.generate(gpt, PROMPTS, 8, temperature=1.0, seed=2).continuations()
    greedy = gen_lib.generate(gpt, PROMPTS, 8).continuations()
    assert a != greedy  # a random model at temperature 1 does not pick the argmax 24 times
    for seed in (0, 1, 2):
        assert gen_lib.generate(gpt, PROMPTS, 8, temperature=1.0, top_p=1e-6, seed=seed).continuations() == greedy


def test_nucleus_keeps_the_smallest_prefix_reaching_top_p():
    logits = jnp.log(jnp.asarray([[0.2, 0.5, 0.05, 0.25]]))
    kept = lambda p: np.flatnonzero(np.isfinite(np.asarray(gen_lib.nucleus_logits(logits, jnp.float32(p)))[0]))
    assert kept(0.4).tolist() == [1]
    assert kept(0.6).tolist() == [1, 3]  # 0.5 < 0.6, so the second most probable joins
    assert kept(0.9).tolist() == [0, 1, 3]
    assert kept(1.0).tolist() == [0, 1, 2, 3]
    # sampled tokens always lie in the nucleus
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = np.asarray(jax.vmap(lambda k: jax.random.categorical(k, gen_lib.nucleus_logits(logits, 0.6)[0]))(keys))
    assert set(draws.tolist()) == {1, 3}


def test_eos_stops_a_row_and_only_generated_tokens_count(gpt, tiny_llama):
    free = gen_lib.generate(gpt, PROMPTS, N_NEW).continuations()
    eos = free[1][2]  # row 1 emits it as its third token
    gen = gen_lib.generate(gpt, PROMPTS, N_NEW, eos_id=eos, pad_id=0)
    for row, full, n, stopped in zip(gen.continuations(), free, gen.n_generated_B, gen.stopped_B):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:cut] and n == cut and stopped == (eos in full)
    assert gen.n_generated_B[1] == 3 and (gen.tokens_BxT[1, 2 + 3:] == 0).all()

    pre = tiny_llama[0]
    prompts = gen_lib.encode_prompts(pre.tokenizer, ["the cat", "a"])  # chat template: ~20 tokens each
    assert prompts[0][0] == pre.tokenizer.convert_tokens_to_ids("<|im_start|>")
    gen = gen_lib.generate(pre.model, prompts, 4, eos_id=pre.tokenizer.eos_token_id)
    ex = gen_lib.generation_examples(pre.tokenizer, gen.prompts(), gen.continuations(), ids=[10, 11])
    np.testing.assert_array_equal(ex.loss_mask.sum(axis=1), gen.n_generated_B)
    for i, (p, g) in enumerate(zip(gen.prompts(), gen.continuations())):
        counted = np.flatnonzero(ex.loss_mask[i])
        assert counted.tolist() == list(range(len(p) - 1, len(p) - 1 + len(g)))
        assert ex.targets[i, counted].tolist() == g  # exactly the generated tokens, by id
        assert ex.texts[i] == pre.tokenizer.decode(p + g)
    assert ex.ids.tolist() == [10, 11]
    texts = gen_lib.decode(pre.tokenizer, gen.continuations())
    assert [t for t in texts] == [pre.tokenizer.decode(g) for g in gen.continuations()]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[1, 2]], n_new=30), "exceeds the model's context of 24"),
    (dict(prompts=[[1], []], n_new=2), "prompt 1 is empty"),
    (dict(prompts=[[1, 99]], n_new=2), "outside the model's vocabulary"),
    (dict(prompts=[[1]], n_new=0), "n_new must be an int >= 1"),
    (dict(prompts=[[1]], n_new=2, top_p=0.0), "top_p must lie in"),
    (dict(prompts=[[1]], n_new=2, temperature=-1.0), "temperature must be >= 0"),
    (dict(prompts=[[1]], n_new=2, eos_id=40), "eos_id=40 is outside"),
])
def test_bad_generation_inputs(gpt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gen_lib.generate(gpt, **kwargs)


# ----------------------------------------------------------------------------- the command line

WORDS = ["the cat sat", "a hat in the sea", "then the heat", "at tea in a nest", "the net", "a cat in a hat"]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_cli")
    hp = HP(ctx=64)
    gguf = write_gguf(root / "tiny.gguf", hp, make_weights(hp))
    data.write_jsonl(root / "train.jsonl", [{"text": f"{WORDS[i % 6]} {i}"} for i in range(12)])
    data.write_jsonl(root / "prompts.jsonl", [{"prompt": "the cat"}, {"prompt": "in a hat, then"}])
    return root, gguf


def test_cli_attributes_generations_per_token(cli_files, capsys):
    import json

    from stride_jax import cli, store

    root, gguf = cli_files
    out = root / "out"
    args = ["attribute", "--model", str(gguf), "--train", str(root / "train.jsonl"), "--prompts",
            str(root / "prompts.jsonl"), "--generate", "4", "--per-token", "--preset", "quick", "--out", str(out),
            "--no-progress", "--confidence", "6"]
    assert cli.main(args) == 0
    assert "stability" in capsys.readouterr().out  # the printed top-3 carry their stability
    read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]
    gens, per_token, top = read("generations.jsonl"), read("per_token.jsonl"), read("top_k.jsonl")
    pre = convert.load_gguf(gguf)
    prompt_ids = gen_lib.encode_prompts(pre.tokenizer, ["the cat", "in a hat, then"])
    want = gen_lib.generate(pre.model, prompt_ids, 4, eos_id=pre.tokenizer.eos_token_id)
    assert [g["prompt_ids"] for g in gens] == prompt_ids
    assert [g["generated_ids"] for g in gens] == want.continuations()
    assert [g["generated"] for g in gens] == gen_lib.decode(pre.tokenizer, want.continuations())
    assert [t["record"] for t in top] == [{"prompt": g["prompt"], "response": g["generated"]} for g in gens]
    # one per-token row per generated token, in order, each with its token and top-3 lists
    n_tokens = sum(len(g["generated_ids"]) for g in gens)
    assert len(per_token) == n_tokens
    assert [r["token_id"] for r in per_token] == [t for g in gens for t in g["generated_ids"]]
    assert [r["query_id"] for r in per_token] == [g["query_id"] for g in gens for _ in g["generated_ids"]]
    assert per_token[0]["token"] == pre.tokenizer.decode([per_token[0]["token_id"]])
    assert len(per_token[0]["helpful"]) == 3 and len(per_token[0]["harmful"]) == 3
    z = store.load_npz(out / "per_token_scores.npz")
    assert z["scores"].shape == (12, n_tokens) and np.isfinite(z["scores"]).all()
    np.testing.assert_array_equal(z["token_ids"], [r["token_id"] for r in per_token])
    best = int(np.argmax(z["scores"][:, 0]))
    assert per_token[0]["helpful"][0]["train_id"] == int(z["train_ids"][best])
    assert store.load_npz(out / "scores.npz")["scores"].shape == (12, 2)
    # --confidence: every top-k entry has a stability in [0, 1] and an interval around its score
    from stride_jax import Attribution

    attr = Attribution.load(out)
    assert attr.stability is not None and attr.confidence_info["n_boot"] == 6
    for entry in top:
        for h in entry["helpful"] + entry["harmful"]:
            assert 0.0 <= h["stability"] <= 1.0 and h["interval"][0] <= h["interval"][1]


@pytest.mark.parametrize("extra, match", [
    (["--generate", "4"], "--generate needs --prompts"),
    (["--prompts", "PROMPTS"], "--prompts needs --generate N"),
    (["--prompts", "PROMPTS", "--generate", "4", "--queries", "PROMPTS"], "give --queries or --prompts, not both"),
    (["--prompts", "PROMPTS", "--generate", "4", "--top-p", "0"], "--top-p must lie in"),
    (["--prompts", "PROMPTS", "--generate", "60"], "exceeds the model's context of 64"),
    ([], "give --queries"),
])
def test_cli_generation_flags_fail_in_one_line(cli_files, capsys, extra, match):
    from stride_jax import cli

    root, gguf = cli_files
    extra = [str(root / "prompts.jsonl") if a == "PROMPTS" else a for a in extra]
    args = ["attribute", "--model", str(gguf), "--train", str(root / "train.jsonl"), "--out", str(root / "bad"),
            "--preset", "quick", "--no-progress", *extra]  # --no-progress: no info lines on stderr
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
