"""Per-example gradients and the gradient-similarity baselines GradDot and TracIn.

A step of gradient descent on training example i with learning rate eta changes the loss of
query q by about  -eta * g_q . g_i  (g = gradient of the per-example loss w.r.t. every
`nnx.Param`). So under the project's sign convention (positive = including the example lowers
the query's loss)

    GradDot:  tau_iq = g_i . g_q                         at the final model
    TracIn:   tau_iq = sum_c eta_c * g_i(c) . g_q(c)     over checkpoints c of training

(Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent", the
TracInCP form). With Adam the learning rate is not the step size along the gradient, so TracIn
here is the usual first-order heuristic, not an exact trace of training.

Per-example gradients come from `jax.vmap(jax.grad(loss of one example))` over chunks of
examples, flattened with `ravel_pytree` into [B, P]. Memory: when N x P floats fit in
`max_cache_bytes` the training gradients are cached at `fit`; otherwise they are recomputed
chunk by chunk at `attribute`, once per block of queries whose gradients fit in that budget,
so the [N, P] matrix is never materialised.

Linear algebra runs in JAX (XLA's thread pool), not numpy: on a loaded 2-core machine numpy's
multi-threaded OpenBLAS was up to 100x slower (set OPENBLAS_NUM_THREADS=1 when using numpy).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from stride_jax.scores import Attribution
from stride_jax.baselines.base import batches, check_queries, check_train, make_attribution, one_loss
from stride_jax.data import Examples

__all__ = [
    "GradDot",
    "TracIn",
    "split_params",
    "select_params",
    "param_paths",
    "num_params",
    "per_example_grads",
    "iter_grad_chunks",
    "dot_t",
]

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB of cached float32 gradients


# ----------------------------------------------------------------------------- helpers


def param_paths(model: nnx.Module) -> list[str]:
    """'/'-joined paths of every nnx.Param of `model` ("blocks/29/mlp/up_proj/kernel", ...)."""
    return ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def select_params(model: nnx.Module, params: Sequence[str] | None) -> set[str] | None:
    """The paths matched by the glob patterns `params` (fnmatch; None: every parameter).

    Raises ValueError for a pattern that matches no parameter (a typo must not silently score
    nothing, or everything)."""
    if params is None:
        return None
    if isinstance(params, str) or not params:
        raise ValueError(f"params must be a non-empty list of glob patterns, got {params!r}")
    paths = param_paths(model)
    chosen = set()
    for pattern in params:
        hit = [q for q in paths if fnmatch.fnmatchcase(q, pattern)]
        if not hit:
            raise ValueError(f"params pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                             f"its parameters look like {paths[:3]} ... {paths[-2:]}")
        chosen.update(hit)
    return chosen


def split_params(model: nnx.Module, params: Sequence[str] | None = None) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): the model's nnx.Param state (only those matching the glob
    patterns `params`, when given) and everything else (constants of the gradient)."""
    chosen = select_params(model, params)
    if chosen is None:
        return nnx.split(model, nnx.Param, ...)
    keep = lambda path, x: isinstance(x, nnx.Param) and "/".join(map(str, path)) in chosen
    return nnx.split(model, keep, ...)


def num_params(model: nnx.Module, params: Sequence[str] | None = None) -> int:
    """P, the number of scalar parameters (nnx.Param leaves; those matching `params`) of `model`."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(split_params(model, params)[1])))


def _one_loss(params: nnx.State, rest: nnx.State, example: tuple, graphdef: nnx.GraphDef):
    """Loss of one example (no batch axis)."""
    return one_loss(nnx.merge(graphdef, params, rest), example)


def _flat_grads_fn(params, rest, batch, *, graphdef) -> jax.Array:
    """Per-example loss gradients, flattened: [B, P]."""

    def one(example):
        return ravel_pytree(jax.grad(_one_loss)(params, rest, example, graphdef))[0]

    return jax.vmap(one)(batch)


_flat_grads = jax.jit(_flat_grads_fn, static_argnames=("graphdef",))


def _chunk_size(n: int, chunk: int) -> int:
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    return min(chunk, n)


def iter_grad_chunks(
    model: nnx.Module, examples: Examples, chunk_size: int = 32, params: Sequence[str] | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (start, stop, grads [stop - start, P] float32) over `examples` in chunks (w.r.t.
    the parameters matching the glob patterns `params`, default all)."""
    graphdef, params, rest = split_params(model, params)
    for start, stop, batch in batches(examples, _chunk_size(len(examples), chunk_size)):
        g = _flat_grads(params, rest, batch, graphdef=graphdef)
        yield start, stop, np.asarray(g[: stop - start], dtype=np.float32)


def per_example_grads(model: nnx.Module, examples: Examples, chunk_size: int = 32,
                      params: Sequence[str] | None = None) -> np.ndarray:
    """All per-example loss gradients [N, P] (float32; only for small N x P)."""
    out = [g for _, _, g in iter_grad_chunks(model, examples, chunk_size, params)]
    return np.concatenate(out)


@jax.jit
def dot_t(a_NxD: jax.Array, b_QxD: jax.Array) -> jax.Array:
    """a @ b^T [N, Q] at full float32 precision (no TF32 / bf16 passes on accelerators)."""
    return jnp.matmul(a_NxD, b_QxD.T, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------- scoring core


class _GradientIndex:
    """Training gradients of one model, cached or recomputed in chunks, scored against queries."""

    def __init__(self, model: nnx.Module, train: Examples, chunk_size: int, max_cache_bytes: int,
                 params: Sequence[str] | None = None):
        self.model, self.train, self.chunk_size, self.params = model, train, chunk_size, params
        self.n_params = num_params(model, params)
        self.max_cache_bytes = max_cache_bytes
        n = len(train.inputs)
        self.cached_NxP: jax.Array | None = None
        if n * self.n_params * 4 <= max_cache_bytes:
            self.cached_NxP = jnp.asarray(per_example_grads(model, train, chunk_size, params))

    def scores(self, queries: Examples) -> np.ndarray:
        """[N, Q] = G_train @ G_query^T, chunked so neither [N, P] nor [Q, P] need fit in memory."""
        n, q = len(self.train.inputs), len(queries.inputs)
        out_NxQ = np.zeros((n, q), np.float32)
        # query blocks whose gradients fit in the budget (at least one chunk)
        q_block = max(self.chunk_size, self.max_cache_bytes // (4 * self.n_params))
        for q0 in range(0, q, q_block):
            block = _slice(queries, q0, min(q0 + q_block, q))
            g_qxP = jnp.asarray(per_example_grads(self.model, block, self.chunk_size, self.params))
            if self.cached_NxP is not None:
                out_NxQ[:, q0 : q0 + len(g_qxP)] = np.asarray(dot_t(self.cached_NxP, g_qxP))
            else:
                for s, e, g_bxP in iter_grad_chunks(self.model, self.train, self.chunk_size, self.params):
                    out_NxQ[s:e, q0 : q0 + len(g_qxP)] = np.asarray(dot_t(jnp.asarray(g_bxP), g_qxP))
        return out_NxQ


def _slice(ex: Examples, start: int, stop: int) -> Examples:
    return ex if (start == 0 and stop == len(ex)) else ex[start:stop]


# ----------------------------------------------------------------------------- baselines


class GradDot:
    """tau_iq = g_i . g_q at the final model (loss gradients w.r.t. all nnx.Param).

    Args:
      chunk_size: examples per vmapped gradient call (memory ~ chunk_size x P floats).
      max_cache_bytes: cache the [N, P] training gradients at fit when they fit in this many
        bytes; otherwise recompute them chunk by chunk at attribute.
      params: glob patterns of the '/'-joined parameter paths to differentiate (`param_paths`;
        e.g. ["blocks/2[6-9]/*", "final_norm/*"], the parameters a top-4 fine-tune trains);
        default all.
    """

    name = "graddot"

    def __init__(self, chunk_size: int = 32, max_cache_bytes: int = DEFAULT_CACHE_BYTES,
                 params: Sequence[str] | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.params = None if params is None else list(params)
        self.chunk_size = chunk_size
        self.max_cache_bytes = int(max_cache_bytes)
        self._index: _GradientIndex | None = None
        self._train: Examples | None = None
        self.timings: dict[str, float] = {}

    def fit(self, model: nnx.Module, train: Examples) -> "GradDot":
        check_train(train)
        t0 = time.perf_counter()
        self._index = _GradientIndex(model, train, self.chunk_size, self.max_cache_bytes, self.params)
        self._train = train
        self.timings["fit"] = time.perf_counter() - t0
        return self

    def attribute(self, queries: Examples) -> Attribution:
        if self._index is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(model, train) before attribute")
        check_queries(self._train, queries)
        t0 = time.perf_counter()
        scores = self._index.scores(queries)
        self.timings["score"] = time.perf_counter() - t0
        return make_attribution(scores, self._train, queries, self.name)


class TracIn:
    """TracInCP: tau_iq = sum_c eta_c * g_i(c) . g_q(c) over training checkpoints.

    Args:
      checkpoints: (model, learning_rate) pairs, e.g. from
        `stride_jax.train.pretrain_with_checkpoints` (whose `Checkpoint` tuples also work). The
        `model` passed to `fit` is only checked to have the checkpoints' config.
      chunk_size, max_cache_bytes, params: as for GradDot; the cache budget is shared by the
        checkpoints.
    """

    name = "tracin"

    def __init__(
        self,
        checkpoints: Sequence[tuple[nnx.Module, float]],
        chunk_size: int = 32,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        params: Sequence[str] | None = None,
    ):
        self.params = None if params is None else list(params)
        checkpoints = [(c[0], float(c[1])) for c in checkpoints]
        if not checkpoints:
            raise ValueError("TracIn needs at least one (model, learning_rate) checkpoint")
        cfgs = {getattr(m, "cfg", None) for m, _ in checkpoints}
        if len(cfgs) != 1:
            raise ValueError("all TracIn checkpoints must share one model config")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.checkpoints = checkpoints
        self.chunk_size = chunk_size
        self.max_cache_bytes = int(max_cache_bytes)
        self._indices: list[_GradientIndex] | None = None
        self._train: Examples | None = None
        self.timings: dict[str, float] = {}

    def fit(self, model: nnx.Module | None, train: Examples) -> "TracIn":
        check_train(train)
        ckpt_cfg = getattr(self.checkpoints[0][0], "cfg", None)
        if model is not None and getattr(model, "cfg", None) != ckpt_cfg:
            raise ValueError(f"model config {getattr(model, 'cfg', None)} differs from the "
                             f"checkpoints' {ckpt_cfg}")
        t0 = time.perf_counter()
        budget = self.max_cache_bytes // len(self.checkpoints)
        self._indices = [_GradientIndex(m, train, self.chunk_size, budget, self.params) for m, _ in self.checkpoints]
        self._train = train
        self.timings["fit"] = time.perf_counter() - t0
        return self

    def attribute(self, queries: Examples) -> Attribution:
        if self._indices is None:
            raise RuntimeError("call TracIn.fit(model, train) before attribute")
        check_queries(self._train, queries)
        t0 = time.perf_counter()
        scores = sum(lr * idx.scores(queries) for (_, lr), idx in zip(self.checkpoints, self._indices))
        self.timings["score"] = time.perf_counter() - t0
        return make_attribution(scores, self._train, queries, self.name)
