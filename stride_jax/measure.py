"""Measurement: every operator's effect on every query's loss, the trunk computed once.

y[q, k] = loss_base(q) - loss_k(q) (or the difference of logs), STRIDE section 3 step 4. For
each chunk of queries the frozen trunk (up to layer l) and the base logits run once; the K
operators are then applied to the shared activations in chunks of `operator_chunk` with
`lax.map`, so memory is bounded by query_chunk x operator_chunk x T x V. Query chunks have
bucketed shapes (the smallest power of two >= Q, capped at query_chunk; the last chunk is
padded), so at most log2(query_chunk) + 1 programs serve every Q; with a mesh the operator axis
is split over devices by `shard_map`, compiled once per mesh.

Cheaper modes (`MeasureConfig.mode`) use that an operator is linear in its matrix a_k:
delta_k(h) = B(h) a_k, B(h) = `SteeringOperator.features(h)` [T, R] (f_t its row at position t).
With c_t the normalised loss weight of position t (`example_loss`: a weighted mean), o_t the
steered quantity (the logits, or the residual stream at layer l) and g_t = d loss / d o_t,

    first_order:   loss_k ~= loss_base + <G, a_k>,   G = sum_t B(h_t)^T g_t  [R, O],

one gradient per query (logits: g_t = c_t (softmax(o_t) - onehot(y_t)); residual: one VJP
through the rest of the frozen network) and one [K, R*O] x [R*O, Qc] product, no per-operator
forward. second_order (logits placement) adds the softmax-Hessian quadratic form

    1/2 sum_t c_t (sum_v p_tv d_tv^2 - (sum_v p_tv d_tv)^2),   d_t = B(h_t) a_k, p_t = softmax(o_t),

products with the base softmax, no exponential per operator: per query chunk H = sum_t c_t
f_t f_t^T (x) p_t [R, R, V] and U_t = f_t p_t^T [R, V] are formed once, then each operator costs
two matmuls (<a_k a_k^T, H> and <a_k, U_t>), in chunks of operators. Memory for the expansions
is bounded by `expansion_chunks`. Approximated losses can fall below zero; they are floored at
`cfg.loss_floor`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from stride_jax import models, steering
from stride_jax.config import MeasureConfig, SteeringConfig
from stride_jax.models import example_loss
from stride_jax.steering import OperatorBank


class Measurement(NamedTuple):
    """Raw losses: the frozen model's [Q] and each operator's [Q, K]."""

    base_loss_Q: np.ndarray
    steered_loss_QxK: np.ndarray


def _measure_chunk(model_state, basis, coef_K, batch, *, model_graphdef, op_graphdef, cfg: SteeringConfig,
                   operator_chunk: int, mode: str = "exact"):
    """Base losses [Qc] and steered losses [K, Qc] for one chunk of queries (`mode`: module docstring)."""
    inputs, targets, mask, weights = batch
    model = nnx.merge(model_graphdef, model_state)
    h = model.trunk(inputs, layer=cfg.layer, mask=mask)
    if mode != "exact":
        return _expanded_chunk(model, op_graphdef, basis, coef_K, h, batch, cfg=cfg, operator_chunk=operator_chunk,
                               second_order=mode == "second_order")
    base_logits = model.rest(h, layer=cfg.layer, mask=mask)

    def one(coef_k):
        logits = steering.apply_operator(op_graphdef, basis, coef_k, model, h, base_logits, cfg, mask)
        return example_loss(logits, targets, weights)

    steered = jax.lax.map(one, coef_K, batch_size=operator_chunk)
    return example_loss(base_logits, targets, weights), steered


def _expanded_chunk(model, op_graphdef, basis, coef_K, h, batch, *, cfg: SteeringConfig, operator_chunk: int,
                    second_order: bool):
    """Base losses [Qc] and the first- (or second-) order expansion of the steered losses [K, Qc]."""
    _, targets, mask, weights = batch
    n_queries = h.shape[0]
    a_KxRxO = jax.vmap(lambda c: nnx.merge(op_graphdef, basis, c).coef[...])(coef_K)
    op = nnx.merge(op_graphdef, basis, jax.tree.map(lambda c: c[0], coef_K))  # only its basis is read
    feat_QxTxR = op.features(h).reshape(n_queries, -1, a_KxRxO.shape[1])
    if cfg.placement == "logits":
        logits = model.rest(h, layer=cfg.layer, mask=mask).astype(jnp.float32)
        base_Q = example_loss(logits, targets, weights)
        logits_QxTxV = logits.reshape(n_queries, -1, logits.shape[-1])
        p_QxTxV = jax.nn.softmax(logits_QxTxV, axis=-1)
        c_QxT = _position_weights(targets.reshape(n_queries, -1), weights)
        onehot_QxTxV = jax.nn.one_hot(targets.reshape(n_queries, -1), logits.shape[-1], dtype=jnp.float32)
        g_QxTxO = (p_QxTxV - onehot_QxTxV) * c_QxT[..., None]
    else:
        base_Q, vjp = jax.vjp(lambda h: example_loss(model.rest(h, layer=cfg.layer, mask=mask), targets, weights), h)
        (g,) = vjp(jnp.ones_like(base_Q))
        g_QxTxO = g.reshape(n_queries, -1, g.shape[-1]).astype(jnp.float32)
    g_QxRxO = jnp.einsum("qtr,qto->qro", feat_QxTxR, g_QxTxO)
    steered_KxQ = base_Q[None, :] + jnp.einsum("kro,qro->kq", a_KxRxO, g_QxRxO)
    if second_order:
        # sum_t c_t sum_v p_tv d_tv^2 = <a_k a_k^T, H> with H_rsv = sum_t c_t f_tr f_ts p_tv, and
        # sum_v p_tv d_tv = <a_k, U_t> with U_t = f_t p_t^T: two contractions per chunk of operators,
        # no [operators, Qc, T, V] array (1.2-2.4x faster than exact on a CPU at Qc = 8-32)
        n_subsets, rank, n_out = a_KxRxO.shape
        h_QxRxRxV = jnp.einsum("qtr,qts,qtv->qrsv", feat_QxTxR * c_QxT[..., None], feat_QxTxR, p_QxTxV)
        u_QTxRV = (feat_QxTxR[..., :, None] * p_QxTxV[..., None, :]).reshape(-1, rank * n_out)

        def quadratic(a_CxRxV):
            second_moment_CxQ = jnp.einsum("crv,csv,qrsv->cq", a_CxRxV, a_CxRxV, h_QxRxRxV)
            mean_CxQxT = (a_CxRxV.reshape(a_CxRxV.shape[0], -1) @ u_QTxRV.T).reshape(-1, n_queries, c_QxT.shape[1])
            return 0.5 * (second_moment_CxQ - (c_QxT[None] * jnp.square(mean_CxQxT)).sum(-1))

        n_chunks = -(-n_subsets // operator_chunk)
        pad_KxRxO = jnp.zeros((n_chunks * operator_chunk - n_subsets, rank, n_out), a_KxRxO.dtype)
        chunks = jnp.concatenate([a_KxRxO, pad_KxRxO]).reshape(n_chunks, operator_chunk, rank, n_out)
        steered_KxQ = steered_KxQ + jax.lax.map(quadratic, chunks).reshape(-1, n_queries)[:n_subsets]
    return base_Q, steered_KxQ


def _position_weights(targets_QxT: jax.Array, weights: jax.Array | None) -> jax.Array:
    """[Q, T] each counted position's share of its example's loss (`example_loss`'s weighted mean)."""
    if weights is None:
        return jnp.full(targets_QxT.shape, 1.0 / targets_QxT.shape[1], jnp.float32)
    w_QxT = weights.reshape(targets_QxT.shape).astype(jnp.float32)
    return w_QxT / jnp.maximum(w_QxT.sum(axis=1, keepdims=True), 1e-9)


_STATIC = ("model_graphdef", "op_graphdef", "cfg", "operator_chunk", "mode")
_measure_chunk_jit = jax.jit(_measure_chunk, static_argnames=_STATIC)


@functools.lru_cache(maxsize=16)
def _sharded_measure_chunk(mesh: Mesh, axis: str):
    """`_measure_chunk` with the operator axis split over `mesh[axis]` by `shard_map` (cached
    per mesh, so a second call with the same shapes does not recompile).

    Operators are independent, so each device measures its slice of the K operators on the
    (replicated) query chunk; no communication beyond gathering the [K, Qc] result.
    """

    def fn(model_state, basis, coef_K, batch, **static):
        body = functools.partial(_measure_chunk, **static)
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(axis), P()), out_specs=(P(), P(axis)),
                             check_vma=False)(model_state, basis, coef_K, batch)

    return jax.jit(fn, static_argnames=_STATIC)


def measure(
    model: nnx.Module,
    bank: OperatorBank,
    queries,
    steer_cfg: SteeringConfig,
    cfg: MeasureConfig = MeasureConfig(),
    *,
    progress: bool = True,
    mesh: Mesh | None = None,
    axis: str = "subsets",
    desc: str = "measure",
) -> Measurement:
    """Losses of the frozen model and of all K steered models on every query (an `Examples`).

    With a `mesh`, the K operators are split over its `axis` (K must divide evenly) and each
    device measures its share; results equal the single-device measurement. With
    `cfg.mode` "first_order" / "second_order" the steered losses are the expansion of the
    module docstring, floored at `cfg.loss_floor`.
    """
    if len(queries) == 0:
        raise ValueError("no queries to measure")
    if cfg.mode == "second_order" and steer_cfg.placement != "logits":
        raise ValueError(f"measure.mode='second_order' needs steering.placement='logits' (got "
                         f"{steer_cfg.placement!r}); use measure.mode='first_order' or 'exact'")
    models.check_examples(model.cfg, queries)
    steering.steered_dim(model, steer_cfg)
    model_graphdef, model_state = nnx.split(model)
    coef = bank.coef
    chunk_fn = _measure_chunk_jit
    operator_chunk = min(cfg.operator_chunk, bank.n_subsets)
    if mesh is not None:
        n_dev = mesh.shape[axis]
        if bank.n_subsets % n_dev:
            raise ValueError(f"K={bank.n_subsets} operators do not split evenly over {n_dev} devices of axis {axis!r}")
        operator_chunk = min(operator_chunk, bank.n_subsets // n_dev)
        coef = jax.device_put(coef, NamedSharding(mesh, P(axis)))
        chunk_fn = _sharded_measure_chunk(mesh, axis)
    n = len(queries)
    if cfg.mode == "exact":
        operator_chunk, size = chunk_sizes(operator_chunk, _query_bucket(cfg.query_chunk, n), queries, model.out_dim,
                                           cfg.chunk_bytes)
    else:
        operator_chunk, size = expansion_chunks(operator_chunk, _query_bucket(cfg.query_chunk, n), queries,
                                                model.out_dim, steer_cfg, cfg)
    base, steered = [], []
    for start in tqdm(range(0, n, size), desc=desc, disable=not progress, leave=False):
        idx = np.minimum(np.arange(start, start + size), n - 1)  # last chunk padded
        b, s = chunk_fn(model_state, bank.basis, coef, queries[idx].device_batch(), model_graphdef=model_graphdef,
                        op_graphdef=bank.graphdef, cfg=steer_cfg, operator_chunk=operator_chunk, mode=cfg.mode)
        keep = min(size, n - start)
        base.append(np.asarray(b)[:keep])
        steered.append(np.asarray(s).T[:keep])
    steered_QxK = np.concatenate(steered)
    if cfg.mode != "exact":  # an expansion can undershoot zero; a cross-entropy cannot
        steered_QxK = np.maximum(steered_QxK, np.float32(cfg.loss_floor))
    return Measurement(np.concatenate(base), steered_QxK)


def _query_bucket(query_chunk: int, n_queries: int) -> int:
    """Queries per compiled call for `n_queries`: the smallest power of two >= n_queries, capped at
    `query_chunk`, so any Q compiles one of at most log2(query_chunk) + 1 shapes, wasting < 2x."""
    return min(int(query_chunk), 1 << max(int(n_queries) - 1, 0).bit_length())


def chunk_sizes(operator_chunk: int, query_chunk: int, queries: Any, out_dim: int, budget: int) -> tuple[int, int]:
    """(operator_chunk, query_chunk) shrunk, operators first, until one step's float32 logits
    (operators x queries x positions x out_dim x 4 bytes) fit in `budget` bytes (or both are 1)."""
    per = 4 * int(out_dim) * (int(queries.targets.shape[1]) if queries.targets.ndim == 2 else 1)
    while operator_chunk > 1 and operator_chunk * query_chunk * per > budget:
        operator_chunk = max(1, operator_chunk // 2)
    while query_chunk > 1 and operator_chunk * query_chunk * per > budget:
        query_chunk = max(1, query_chunk // 2)
    return operator_chunk, query_chunk


def expansion_chunks(operator_chunk: int, query_chunk: int, queries: Any, out_dim: int, steer_cfg: SteeringConfig,
                     cfg: MeasureConfig) -> tuple[int, int]:
    """(operator_chunk, query_chunk) of the expansion modes, shrunk (operators first) until the
    float32 arrays of one step fit in `cfg.chunk_bytes`: per query the base logits and their
    softmax / gradient (4 T x V) and, for second order, H (R^2 V) and U (T R V); per operator the
    outer product a_k a_k^T (R^2 V) and its [Qc, T] means. First order holds no per-operator
    array beyond its [K, Qc] result (operator_chunk is returned as 1)."""
    positions = int(queries.targets.shape[1]) if queries.targets.ndim == 2 else 1
    rank, out = int(steer_cfg.rank), int(out_dim)
    second = cfg.mode == "second_order"
    per_query = 4 * positions * out + (rank * out * (rank + positions) if second else 0)
    if not second:
        operator_chunk = 1
    nbytes = lambda ops, qs: 4 * (qs * per_query + (ops * (rank * rank * out + qs * positions) if second else 0))
    while operator_chunk > 1 and nbytes(operator_chunk, query_chunk) > cfg.chunk_bytes:
        operator_chunk = max(1, operator_chunk // 2)
    while query_chunk > 1 and nbytes(operator_chunk, query_chunk) > cfg.chunk_bytes:
        query_chunk = max(1, query_chunk // 2)
    return operator_chunk, query_chunk


def raw_responses(m: Measurement, cfg: MeasureConfig = MeasureConfig()) -> np.ndarray:
    """Uncentred y[q, k]: loss_base - loss_k, or of logs (losses floored at `cfg.loss_floor`)."""
    base = np.asarray(m.base_loss_Q, np.float64)[:, None]
    steered = np.asarray(m.steered_loss_QxK, np.float64)
    bad_base, bad = ~np.isfinite(base), ~np.isfinite(steered)
    if bad_base.any() or bad.any():
        raise ValueError(f"{int(bad.sum())} steered and {int(bad_base.sum())} base losses are NaN or inf: "
                         "the operator fit diverged (check the fit's metrics.jsonl), or the model itself "
                         "produces non-finite losses on these queries")
    if cfg.space == "log":
        floor = float(cfg.loss_floor)
        return np.log(np.maximum(base, floor)) - np.log(np.maximum(steered, floor))
    return base - steered


def average(ms: Sequence[Measurement], cfg: MeasureConfig = MeasureConfig()) -> Measurement:
    """One measurement whose raw responses are the mean of `ms`'s (fits of the same subsets, the
    same queries): steered losses averaged in `cfg.space` (geometric mean of the floored losses
    for "log", arithmetic for "diff"), so `raw_responses` and every centring, being linear in
    them, give the mean of the members' responses."""
    base = np.asarray(ms[0].base_loss_Q)
    for m in ms[1:]:
        if m.steered_loss_QxK.shape != ms[0].steered_loss_QxK.shape or not np.allclose(m.base_loss_Q, base,
                                                                                       rtol=1e-4, atol=1e-6):
            raise ValueError("measurements to average must come from the same model and queries")
    steered = np.stack([np.asarray(m.steered_loss_QxK, np.float64) for m in ms])
    if cfg.space == "log":
        steered = np.exp(np.log(np.maximum(steered, float(cfg.loss_floor))).mean(axis=0))
    else:
        steered = steered.mean(axis=0)
    return Measurement(base, steered)


class Reference(NamedTuple):
    """Each operator's effect on a fixed sample of pool examples, and which of them it holds."""

    measurement: Measurement  # on P reference examples
    member_PxK: np.ndarray  # reference example p belongs to subset k


def operator_means(ref: Reference, cfg: MeasureConfig) -> np.ndarray:
    """[K] each operator's mean raw response over the reference examples outside its subset."""
    y_PxK = raw_responses(ref.measurement, cfg)
    outside = ~ref.member_PxK
    count_K = outside.sum(axis=0)
    if (count_K == 0).any():
        raise ValueError("some operator holds every reference example: use a larger reference")
    return (y_PxK * outside).sum(axis=0) / count_K


def responses(m: Measurement, cfg: MeasureConfig = MeasureConfig(), reference: Reference | None = None) -> np.ndarray:
    """y[q, k] ready for recovery: raw responses, then the chosen centring.

    Positive y means operator k lowered query q's loss. With cfg.reference == "fit" each
    operator's mean effect comes from `reference` (measured at fit time), so a query's row
    depends on that query alone; with "queries" it is the mean over this call's queries.
    """
    y = raw_responses(m, cfg)
    if cfg.center_operators:
        if cfg.reference == "fit":
            if reference is None:
                raise ValueError("measure.reference='fit' needs the reference measured at fit time")
            y = y - operator_means(reference, cfg)[None, :]
        elif y.shape[0] > 1:
            y = y - y.mean(axis=0, keepdims=True)
    if cfg.center_queries:
        y = y - y.mean(axis=1, keepdims=True)
    return y.astype(np.float32)
