"""Measurement: every operator's effect on every query's loss, the trunk computed once.

y[q, k] = loss_base(q) - loss_k(q) (or the difference of logs), STRIDE section 3 step 4. For
each chunk of queries the frozen trunk (up to layer l) and the base logits run once; the K
operators are then applied to the shared activations in chunks of `operator_chunk` with
`lax.map`, so memory is bounded by query_chunk x operator_chunk x T x V. Query chunks have
one fixed shape (the last is padded), so one compiled program serves every call; with a mesh
the operator axis is split over devices by `shard_map`, compiled once per mesh.
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
from stride_jax.train import device_batch, take


class Measurement(NamedTuple):
    """Raw losses: the frozen model's [Q] and each operator's [Q, K]."""

    base_loss_Q: np.ndarray
    steered_loss_QxK: np.ndarray


def _measure_chunk(model_state, basis, coef_K, batch, *, model_graphdef, op_graphdef, cfg: SteeringConfig,
                   operator_chunk: int):
    """Base losses [Qc] and steered losses [K, Qc] for one chunk of queries."""
    inputs, targets, mask, weights = batch
    model = nnx.merge(model_graphdef, model_state)
    h = model.trunk(inputs, layer=cfg.layer, mask=mask)
    base_logits = model.rest(h, layer=cfg.layer, mask=mask)

    def one(coef_k):
        logits = steering.apply_operator(op_graphdef, basis, coef_k, model, h, base_logits, cfg, mask)
        return example_loss(logits, targets, weights)

    steered = jax.lax.map(one, coef_K, batch_size=operator_chunk)
    return example_loss(base_logits, targets, weights), steered


_STATIC = ("model_graphdef", "op_graphdef", "cfg", "operator_chunk")
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
    device measures its share; results equal the single-device measurement.
    """
    if len(queries) == 0:
        raise ValueError("no queries to measure")
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
    data = device_batch(queries)
    n = len(queries)
    operator_chunk, size = chunk_sizes(operator_chunk, min(cfg.query_chunk, n), queries, model.out_dim,
                                       cfg.chunk_bytes)
    base, steered = [], []
    for start in tqdm(range(0, n, size), desc=desc, disable=not progress, leave=False):
        idx = jnp.asarray(np.minimum(np.arange(start, start + size), n - 1))  # last chunk padded
        b, s = chunk_fn(model_state, bank.basis, coef, take(data, idx), model_graphdef=model_graphdef,
                        op_graphdef=bank.graphdef, cfg=steer_cfg, operator_chunk=operator_chunk)
        keep = min(size, n - start)
        base.append(np.asarray(b)[:keep])
        steered.append(np.asarray(s).T[:keep])
    return Measurement(np.concatenate(base), np.concatenate(steered))


def chunk_sizes(operator_chunk: int, query_chunk: int, queries: Any, out_dim: int, budget: int) -> tuple[int, int]:
    """(operator_chunk, query_chunk) shrunk, operators first, until one step's float32 logits
    (operators x queries x positions x out_dim x 4 bytes) fit in `budget` bytes (or both are 1)."""
    per = 4 * int(out_dim) * (int(queries.targets.shape[1]) if queries.targets.ndim == 2 else 1)
    while operator_chunk > 1 and operator_chunk * query_chunk * per > budget:
        operator_chunk = max(1, operator_chunk // 2)
    while query_chunk > 1 and operator_chunk * query_chunk * per > budget:
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
