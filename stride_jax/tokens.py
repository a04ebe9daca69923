"""Per-token queries: one query per counted token, so the same fit scores each token on its own.

    tq = per_token_queries(queries)                # one row per counted target token
    attr = stride.attribute(tq.examples)           # scores [N, P], column p = token tq.positions[p]
                                                   # of query tq.owner_ids[p]

A query's loss is the weighted mean of its token losses, L = sum_t w_t l_t / sum_t w_t (w = its
loss mask), and a token query (loss mask one-hot at t) has loss l_t, base and steered alike. So
with `measure.space="diff"` the raw response of the whole query is the same weighted mean of its
tokens' raw responses, y_k = sum_t w_t y_k(t) / sum_t w_t, and the centring (each operator's
fit-time reference mean, each query's mean over operators) is linear and keeps it:
`combine(y_PxK of the tokens) == y_QxK of the queries` to float32 rounding (tests/test_per_token.py).
Scores are another matter: Lasso recovery is nonlinear (soft thresholding, a penalty scaled per
query), so per-token Lasso scores need not average to the whole query's scores; a linear recovery
(ridge) would make them average exactly. In `space="log"` neither the responses nor the scores add
up. Cost: each token query is a full forward of its sequence, so measuring Q queries of C counted
tokens costs about C times measuring the queries.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from stride_jax import data


class TokenQueries(NamedTuple):
    """`examples`: one row per counted token (inputs as its query's, loss mask one-hot at the
    token); `owner_ids` [P] the id of the query each came from; `positions` [P] the target index t
    (the token predicted is `targets[t]`). ids are owner_id * T + t (unique)."""

    examples: data.Examples
    owner_ids: np.ndarray
    positions: np.ndarray


def _weights(examples: data.Examples) -> np.ndarray:
    """Loss weights [Q, T] of token examples (the loss mask, or the padding mask, or all ones)."""
    if not examples.is_tokens:
        raise ValueError("per-token queries need token examples (targets [Q, T]), got classifier examples")
    for name in ("loss_mask", "mask"):
        if getattr(examples, name) is not None:
            return np.asarray(getattr(examples, name), np.float32)
    return np.ones(examples.targets.shape, np.float32)


def per_token_queries(examples: data.Examples) -> TokenQueries:
    """Expand each query into one query per token with a nonzero loss weight (see the module docstring)."""
    w_QxT = _weights(examples)
    q_P, t_P = np.nonzero(w_QxT > 0)
    if q_P.size == 0:
        raise ValueError("the queries have no counted tokens (every loss weight is 0)")
    T = examples.targets.shape[1]
    one_hot_PxT = np.zeros((q_P.size, T), np.float32)
    one_hot_PxT[np.arange(q_P.size), t_P] = 1.0
    owner_P = np.asarray(examples.ids, np.int64)[q_P]
    expanded = examples[q_P].replace(loss_mask=one_hot_PxT, ids=owner_P * T + t_P)
    return TokenQueries(expanded, owner_P, t_P.astype(np.int64))


def combine(values_P: np.ndarray, examples: data.Examples, tq: TokenQueries) -> np.ndarray:
    """Per-query weighted means [Q, ...] of per-token values [P, ...] (rows in `tq` order), with the
    queries' loss weights: what the whole query measures when the values are losses or responses
    in space="diff"."""
    values_P = np.asarray(values_P, np.float64)
    if values_P.shape[0] != len(tq.owner_ids):
        raise ValueError(f"got {values_P.shape[0]} per-token values for {len(tq.owner_ids)} token queries")
    rows = {int(i): r for r, i in enumerate(examples.ids)}
    try:
        q_P = np.asarray([rows[int(i)] for i in tq.owner_ids])
    except KeyError as e:
        raise ValueError(f"token query owner id {e.args[0]} is not an id of `examples`") from None
    w_P = _weights(examples)[q_P, tq.positions].astype(np.float64)
    out = np.zeros((len(examples),) + values_P.shape[1:])
    np.add.at(out, q_P, w_P.reshape((-1,) + (1,) * (values_P.ndim - 1)) * values_P)
    total_Q = np.bincount(q_P, weights=w_P, minlength=len(examples))
    return out / np.maximum(total_Q, 1e-30).reshape((-1,) + (1,) * (values_P.ndim - 1))


def token_texts(tokenizer: Any, tq: TokenQueries) -> list[str]:
    """The text of each token query's predicted token."""
    ids_P = tq.examples.targets[np.arange(len(tq.positions)), tq.positions]
    return list(data._decode(tokenizer, [[int(i)] for i in ids_P]))


__all__ = ["TokenQueries", "combine", "per_token_queries", "token_texts"]
