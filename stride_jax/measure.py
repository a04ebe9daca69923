"""Measurement: every operator's effect on every query's loss, the trunk computed once.

y[q, k] = loss_base(q) - loss_k(q) (or the difference of logs), STRIDE section 3 step 4. For
each chunk of queries the frozen trunk (up to layer l) and the base logits run once; the K
operators are then applied to the shared activations in chunks of `operator_chunk` with
`lax.map`, so memory is bounded by query_chunk x operator_chunk x T x V.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from stride_jax import steering
from stride_jax.config import MeasureConfig, SteeringConfig
from stride_jax.fit import feature_fn
from stride_jax.models import example_loss
from stride_jax.steering import OperatorBank


class Measurement(NamedTuple):
    """Raw losses: the frozen model's [Q] and each operator's [Q, K]."""

    base_loss_Q: np.ndarray
    steered_loss_QxK: np.ndarray


def _measure_chunk(
    model_state: nnx.State,
    basis: nnx.State,
    coef_K: nnx.State,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    model_graphdef: nnx.GraphDef,
    op_graphdef: nnx.GraphDef,
    cfg: SteeringConfig,
    operator_chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """Base losses [Qc] and steered losses [K, Qc] for one chunk of queries."""
    model = nnx.merge(model_graphdef, model_state)
    h, base_logits = feature_fn(model_graphdef, model_state, inputs, cfg=cfg)

    def one(coef_k):
        logits = steering.apply_operator(op_graphdef, basis, coef_k, model, h, base_logits, cfg)
        return example_loss(logits, targets)

    steered = jax.lax.map(one, coef_K, batch_size=operator_chunk)
    return example_loss(base_logits, targets), steered


_STATIC = ("model_graphdef", "op_graphdef", "cfg", "operator_chunk")
_measure_chunk_jit = jax.jit(_measure_chunk, static_argnames=_STATIC)


def _sharded_measure_chunk(mesh: Mesh, axis: str):
    """`_measure_chunk` with the operator axis split over `mesh[axis]` by `shard_map`.

    Operators are independent, so each device measures its slice of the K operators on the
    (replicated) query chunk; no communication beyond gathering the [K, Qc] result.
    """

    def fn(model_state, basis, coef_K, inputs, targets, **static):
        body = functools.partial(_measure_chunk, **static)
        return jax.shard_map(
            body, mesh=mesh, in_specs=(P(), P(), P(axis), P(), P()), out_specs=(P(), P(axis)), check_vma=False
        )(model_state, basis, coef_K, inputs, targets)

    return jax.jit(fn, static_argnames=_STATIC)


def measure(
    model: nnx.Module,
    bank: OperatorBank,
    inputs: np.ndarray,
    targets: np.ndarray,
    steer_cfg: SteeringConfig,
    cfg: MeasureConfig = MeasureConfig(),
    *,
    progress: bool = True,
    mesh: Mesh | None = None,
    axis: str = "subsets",
) -> Measurement:
    """Losses of the frozen model and of all K steered models on every query.

    With a `mesh`, the K operators are split over its `axis` (K must divide evenly) and each
    device measures its share; results equal the single-device measurement.
    """
    if len(inputs) == 0:
        raise ValueError("no queries to measure")
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} query inputs but {len(targets)} targets")
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
    base, steered = [], []
    starts = range(0, len(inputs), cfg.query_chunk)
    for start in tqdm(starts, desc="measure", disable=not progress):
        b, s = chunk_fn(
            model_state, bank.basis, coef,
            jnp.asarray(inputs[start : start + cfg.query_chunk]),
            jnp.asarray(targets[start : start + cfg.query_chunk]),
            model_graphdef=model_graphdef, op_graphdef=bank.graphdef, cfg=steer_cfg,
            operator_chunk=operator_chunk,
        )
        base.append(np.asarray(b))
        steered.append(np.asarray(s).T)
    return Measurement(np.concatenate(base), np.concatenate(steered))


def raw_responses(m: Measurement, cfg: MeasureConfig = MeasureConfig()) -> np.ndarray:
    """Uncentred y[q, k]: loss_base - loss_k (of logs for space='log'). Raises on NaN/inf."""
    base = m.base_loss_Q[:, None]
    steered = m.steered_loss_QxK
    bad = ~np.isfinite(steered) | ~np.isfinite(base)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} measured losses are NaN or inf; the operators diverged")
    if cfg.space == "log":
        if (steered <= 0).any() or (base <= 0).any():
            raise ValueError("log-space measurement needs strictly positive losses; use space='diff'")
        return np.log(base) - np.log(steered)
    return base - steered


def responses(
    m: Measurement, cfg: MeasureConfig = MeasureConfig(), reference: Measurement | None = None
) -> np.ndarray:
    """y[q, k] ready for recovery: raw responses, then the chosen centring.

    Positive y means operator k lowered query q's loss. Each operator's mean effect is estimated
    on `reference` when given (use it when there are few queries), else on the queries.
    """
    y = raw_responses(m, cfg)
    if cfg.center_operators:
        if reference is not None:
            y = y - raw_responses(reference, cfg).mean(axis=0, keepdims=True)
        elif y.shape[0] > 1:
            y = y - y.mean(axis=0, keepdims=True)
    if cfg.center_queries:
        y = y - y.mean(axis=1, keepdims=True)
    return y.astype(np.float32)
