"""Continuations sampled from any causal `HookedModel` LM, and examples that attribute them.

    gen = generate(model, encode_prompts(tokenizer, ["Who was Emma?"]), 16, eos_id=tokenizer.eos_token_id)
    queries = generation_examples(tokenizer, gen.prompts(), gen.continuations())
    attr = stride.attribute(queries)      # only the generated tokens count in each query's loss

`generate` keeps one right-padded buffer [B, P + N] (P = the longest prompt) and, at step s, runs
the whole model on it and reads the logits at each row's own last real token, `len_b + s - 1`.
Causal attention never looks to the right, so the padding after a row's end cannot change its
next token: right padding is exact for the GPT and the Llama family (left padding would shift
Llama's positions), and no padding mask is needed. There is no KV cache: step s costs a full
forward (fine for the small models and short continuations this is for). The N steps run in a
`lax.while_loop` (no host round trip per token; it stops early once every row has emitted
`eos_id`), compiled once per (model, B, P, N, greedy or sampled); temperature and top-p are
traced. Sampling draws from softmax(logits / temperature), restricted by top-p to the nucleus:
the most probable tokens, in order, until their mass reaches top_p (the first always kept).
A row's draws depend on the seed, the step and its row index.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax import data, models


class Generation(NamedTuple):
    """Prompts and their continuations, host numpy arrays.

    tokens_BxT: each row's prompt, then its continuation, then `pad_id` (T = P + N).
    prompt_len_B: prompt tokens per row. n_generated_B: generated tokens kept per row (through the
    first eos, included, when `eos_id` was given). stopped_B: the row emitted `eos_id`.
    """

    tokens_BxT: np.ndarray
    prompt_len_B: np.ndarray
    n_generated_B: np.ndarray
    stopped_B: np.ndarray

    def prompts(self) -> list[list[int]]:
        return [row[:p].tolist() for row, p in zip(self.tokens_BxT, self.prompt_len_B)]

    def continuations(self) -> list[list[int]]:
        return [row[p:p + g].tolist() for row, p, g in zip(self.tokens_BxT, self.prompt_len_B, self.n_generated_B)]


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt as `data.examples_from_pairs` sees it (a user turn plus the
    assistant prefix under the tokenizer's chat template, when it has one and `chat_template`)."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty sequence of strings")
    return [list(t) for t in data._encode(tokenizer, data.templated_prompts(prompts, tokenizer, chat_template))]


def nucleus_logits(logits_BxV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits outside the top-p nucleus set to -inf: a token is kept when the probability mass of
    the tokens ranked before it (by probability, ties by id) is below `top_p`."""
    order_BxV = jnp.argsort(-logits_BxV, axis=-1, stable=True)
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_sorted_BxV = before_BxV < top_p
    keep_sorted_BxV = keep_sorted_BxV.at[:, 0].set(True)
    keep_BxV = jnp.take_along_axis(keep_sorted_BxV, jnp.argsort(order_BxV, axis=-1), axis=-1)
    return jnp.where(keep_BxV, logits_BxV, -jnp.inf)


def _next_logits(model: Any, tokens_BxT: jax.Array, pos_B: jax.Array) -> jax.Array:
    """float32 logits [B, V] of the token after position pos_B[b] of each row (the protocol only:
    the final states, then the head at one position per row)."""
    h_BxTxD = model.trunk(tokens_BxT, layer=model.n_layers)
    h_Bx1xD = jnp.take_along_axis(h_BxTxD, pos_B[:, None, None], axis=1)
    return model.rest(h_Bx1xD, layer=model.n_layers)[:, 0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new", "greedy", "eos_id", "pad_id"))
def _generate(state, tokens_BxT, prompt_len_B, key, temperature, top_p, *, graphdef, n_new: int, greedy: bool,
              eos_id: int | None, pad_id: int):
    model = nnx.merge(graphdef, state)
    B = tokens_BxT.shape[0]
    rows_B = jnp.arange(B)

    def body(carry):
        s, tokens_BxT, done_B = carry
        pos_B = prompt_len_B + s - 1
        logits_BxV = _next_logits(model, tokens_BxT, pos_B)
        if greedy:
            next_B = jnp.argmax(logits_BxV, axis=-1)
        else:
            scaled_BxV = nucleus_logits(logits_BxV / temperature, top_p)
            keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, s), r))(rows_B)
            next_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BxV)
        next_B = jnp.where(done_B, pad_id, next_B).astype(tokens_BxT.dtype)
        tokens_BxT = tokens_BxT.at[rows_B, pos_B + 1].set(next_B)
        if eos_id is not None:
            done_B = done_B | (next_B == eos_id)
        return s + 1, tokens_BxT, done_B

    def cond(carry):
        s, _, done_B = carry
        return (s < n_new) & ~jnp.all(done_B)

    done_B = jnp.zeros((B,), bool)
    _, tokens_BxT, done_B = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens_BxT, done_B))
    return tokens_BxT, done_B


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]] | data.Examples,
    n_new: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> Generation:
    """Continue each prompt (token ids; or an `Examples`, whose real tokens are the prompts) by up
    to `n_new` tokens: greedy (argmax) at temperature 0, else sampled with `seed` from the top-p
    nucleus of softmax(logits / temperature). A row stops after emitting `eos_id` (kept as its
    last generated token; padding follows). Batched and compiled once per shape (module docstring)."""
    if not models.is_sequence_model(model) or not isinstance(model, models.HookedModel):
        raise TypeError(f"{type(model).__name__} is not a causal LM with the HookedModel protocol")
    rows = prompts.token_rows() if isinstance(prompts, data.Examples) else [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts to continue")
    if not isinstance(n_new, (int, np.integer)) or isinstance(n_new, bool) or n_new < 1:
        raise ValueError(f"n_new must be an int >= 1, got {n_new!r}")
    if not 0.0 <= float(temperature) < float("inf"):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    vocab = int(model.out_dim)
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty: generation continues from a prompt's last token")
        if min(r) < 0 or max(r) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab})")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not 0 <= int(value) < vocab:
            raise ValueError(f"{name}={value} is outside the model's vocabulary [0, {vocab})")
    pad = int(pad_id if pad_id is not None else (eos_id if eos_id is not None else 0))
    longest = max(len(r) for r in rows)
    context = models.context_length(model.cfg)
    if context is not None and longest + n_new > context:
        raise ValueError(f"the longest prompt ({longest} tokens) + n_new={n_new} exceeds the model's context of "
                         f"{context}")
    tokens_BxT = np.full((len(rows), longest + n_new), pad, np.int32)
    for i, r in enumerate(rows):
        tokens_BxT[i, :len(r)] = r
    prompt_len_B = np.asarray([len(r) for r in rows], np.int32)
    graphdef, state = nnx.split(model)
    out_BxT, done_B = _generate(state, jnp.asarray(tokens_BxT), jnp.asarray(prompt_len_B),
                                jax.random.key(int(seed)), jnp.float32(max(float(temperature), 1e-6)),
                                jnp.float32(top_p), graphdef=graphdef, n_new=int(n_new),
                                greedy=float(temperature) == 0.0, eos_id=None if eos_id is None else int(eos_id),
                                pad_id=pad)
    out_BxT, done_B = np.asarray(out_BxT), np.asarray(done_B)
    n_generated_B = np.full(len(rows), n_new, np.int32)
    if eos_id is not None:
        for i in np.flatnonzero(done_B):
            gen = out_BxT[i, prompt_len_B[i]:]
            n_generated_B[i] = int(np.argmax(gen == eos_id)) + 1  # later tokens are already pad_id
    return Generation(out_BxT, prompt_len_B, n_generated_B, done_B)


def generation_examples(tokenizer: Any, prompts: Sequence[Sequence[int]], generated: Sequence[Sequence[int]], *,
                        ids: Sequence[int] | None = None) -> data.Examples:
    """One example per prompt + its continuation, built from the token ids (no re-tokenisation);
    only the generated tokens count in the loss (prompt, chat template and padding weigh 0).
    ids default to 0..B-1; texts are decoded from the tokens (`tokenizer`)."""
    if len(prompts) != len(generated) or not len(prompts):
        raise ValueError(f"need as many prompts as continuations (> 0), got {len(prompts)} and {len(generated)}")
    for i, (p, g) in enumerate(zip(prompts, generated)):
        if not len(p) or not len(g):
            raise ValueError(f"generation {i}: empty {'prompt' if not len(p) else 'continuation'}")
    rows = [list(p) + list(g) for p, g in zip(prompts, generated)]
    pad = data._pad_id(tokenizer) if tokenizer is not None else 0
    return data.lm_examples(rows, max(len(r) for r in rows) - 1, mode="pad", pad_id=pad,
                            loss_from=[len(p) for p in prompts], ids=ids, tokenizer=tokenizer)


def decode(tokenizer: Any, token_lists: Sequence[Sequence[int]]) -> list[str]:
    """Each token list as text (special tokens kept)."""
    return list(data._decode(tokenizer, [list(map(int, t)) for t in token_lists]))


__all__ = ["Generation", "decode", "encode_prompts", "generate", "generation_examples", "nucleus_logits"]
