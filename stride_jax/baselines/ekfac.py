"""EK-FAC influence (Grosse et al. 2023, "Studying Large Language Model Generalization with
Influence Functions"; George et al. 2018 for EK-FAC).

For every linear layer (kernel W [d_in, d_out], the same layers as LoGra) the Gauss-Newton /
Fisher block of W is approximated in the Kronecker eigenbasis of

    A = E[x x^T] (input activations, over tokens),   S = E[delta delta^T] (output gradients),

A = Q_A diag Q_A^T, S = Q_S diag Q_S^T, with the eigenvalues replaced by the exact diagonal of
the (empirical) Fisher in that basis ("eigenvalue correction"):

    Lambda_ab = mean_i [(Q_A^T G_i Q_S)_ab^2],   G_i = dL_i/dW = sum_t x_t delta_t^T.

Influence of training example i on query q (positive = helps, as everywhere here):

    tau_iq = sum_layers < Q_A^T G_q Q_S / (Lambda + lambda),  Q_A^T G_i Q_S >,
    lambda = damping * mean(Lambda) per layer (Kronfluence's heuristic damping).

Choices: the Fisher uses the training labels (empirical Fisher; Kronfluence's default samples
labels from the model: the "true" Fisher); per-example gradients are of the mean token loss;
biases and the embedding are not covered (as in LoGra). Activations and output gradients are
recorded with LoGra's taps (`logra.tap_linears`). Memory: the rotated training gradients
[N, sum d_in d_out] are cached when they fit in `max_cache_bytes`, else recomputed in chunks
at `attribute`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.scores import Attribution
from stride_jax.baselines.base import batches, check_queries, check_train, make_attribution
from stride_jax.baselines.gradients import dot_t
from stride_jax.data import Examples
from stride_jax.baselines.logra import _forward, tap_linears

__all__ = ["EKFAC"]


def _layer_io(params, rest, batch, graphdef):
    """Per layer: inputs [B, S, d_in] and output gradients [B, S, d_out] of a batched forward.

    Inputs at padded positions (padding mask 0) are zeroed: they are not data.
    """
    _, (_, outs) = jax.eval_shape(lambda: _forward(None, params, rest, batch, graphdef))
    zeros = [jnp.zeros(o.shape, o.dtype) for o in outs]
    deltas, (inputs, _) = jax.grad(_forward, has_aux=True)(zeros, params, rest, batch, graphdef)
    B, mask = batch[0].shape[0], batch[2]
    out = []
    for x, d in zip(inputs, deltas):
        x = x.reshape(B, -1, x.shape[-1])
        if mask is not None and x.shape[1] == mask.shape[1]:
            x = x * mask[:, :, None]
        out.append((x, d.reshape(B, -1, d.shape[-1])))
    return out


def _covariances_fn(params, rest, batch, w_B, *, graphdef):
    """Per layer (sum_b w_b sum_t x x^T, sum_b w_b sum_t delta delta^T)."""
    out = []
    for x, d in _layer_io(params, rest, batch, graphdef):
        xw = x * w_B[:, None, None]
        dw = d * w_B[:, None, None]
        hi = jax.lax.Precision.HIGHEST
        out.append((jnp.einsum("bsi,bsj->ij", xw, x, precision=hi), jnp.einsum("bso,bsp->op", dw, d, precision=hi)))
    return out


def _rotated_grads_fn(params, rest, batch, bases, *, graphdef):
    """Per layer Q_A^T G_b Q_S [B, d_in * d_out] (G_b the per-example kernel gradient)."""
    out = []
    hi = jax.lax.Precision.HIGHEST
    for (x, d), (q_a, q_s) in zip(_layer_io(params, rest, batch, graphdef), bases, strict=True):
        xr = jnp.einsum("bsi,ia->bsa", x, q_a, precision=hi)  # rotate first: never form G_b
        dr = jnp.einsum("bso,oc->bsc", d, q_s, precision=hi)
        out.append(jnp.einsum("bsa,bsc->bac", xr, dr, precision=hi).reshape(x.shape[0], -1))
    return out


_covariances = jax.jit(_covariances_fn, static_argnames=("graphdef",))
_rotated_grads = jax.jit(_rotated_grads_fn, static_argnames=("graphdef",))


class EKFAC:
    """EK-FAC influence functions over the model's linear layers (see the module docstring).

    Args:
      damping: lambda relative to each layer's mean corrected eigenvalue.
      layers: '/'-joined nnx.Linear paths (default all; see `logra.layer_paths`).
      chunk_size: examples per batched forward / backward.
      max_cache_bytes: cache the rotated training gradients when they fit.
    """

    name = "ekfac"

    def __init__(self, damping: float = 0.1, *, layers: Sequence[str] | None = None,
                 chunk_size: int = 32, max_cache_bytes: int = 1 << 30):
        if damping < 0 or chunk_size < 1:
            raise ValueError("damping must be >= 0 and chunk_size >= 1")
        self.damping, self.layers, self.chunk_size = float(damping), layers, chunk_size
        self.max_cache_bytes = int(max_cache_bytes)
        self.layer_names: list[str] = []
        self.bases: list[tuple[jax.Array, jax.Array]] = []  # (Q_A, Q_S) per layer
        self.eigenvalues: list[jax.Array] = []  # corrected Lambda [d_in * d_out] per layer
        self._split = None
        self._train: Examples | None = None
        self._cache_NxD: jax.Array | None = None  # rotated training gradients / (Lambda + lambda)
        self._inv_D: jax.Array | None = None  # 1 / (Lambda + lambda), all layers concatenated
        self.timings: dict[str, float] = {}

    def _chunks(self, examples: Examples):
        yield from batches(examples, self.chunk_size)

    def _rotated(self, examples: Examples):
        """Yield (start, stop, [B, D] rotated gradients of all layers, concatenated)."""
        graphdef, params, rest = self._split
        for start, stop, batch in self._chunks(examples):
            gs = _rotated_grads(params, rest, batch, self.bases, graphdef=graphdef)
            yield start, stop, jnp.concatenate(gs, axis=1)[: stop - start]

    def fit(self, model: nnx.Module, train: Examples) -> "EKFAC":
        check_train(train)
        t0 = time.perf_counter()
        tapped, self.layer_names = tap_linears(model, self.layers)
        self._split = graphdef, params, rest = nnx.split(tapped, nnx.Param, ...)
        n = len(train.inputs)
        # pass 1: Kronecker factors and their eigenbases
        sums = None
        chunk = min(self.chunk_size, n)
        for start, stop, batch in self._chunks(train):
            w = jnp.asarray((np.arange(chunk) < stop - start).astype(np.float32))
            cov = _covariances(params, rest, batch, w, graphdef=graphdef)
            sums = cov if sums is None else jax.tree.map(jnp.add, sums, cov)
        self.bases = [(jnp.linalg.eigh(a)[1], jnp.linalg.eigh(s)[1]) for a, s in sums]
        # pass 2: eigenvalue correction (and the rotated training gradients, when they fit)
        widths = [q_a.shape[0] * q_s.shape[0] for q_a, q_s in self.bases]
        keep = n * sum(widths) * 4 <= self.max_cache_bytes
        sq, kept = jnp.zeros(sum(widths), jnp.float32), []
        for _, _, g in self._rotated(train):
            sq = sq + jnp.sum(g * g, axis=0)
            if keep:
                kept.append(g)
        lam_D = sq / n
        bounds = np.cumsum([0] + widths)
        self.eigenvalues = [lam_D[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self._inv_D = jnp.concatenate(
            [1.0 / (lam + self.damping * lam.mean()) for lam in self.eigenvalues])
        if not bool(jnp.isfinite(self._inv_D).all()):
            raise FloatingPointError("EK-FAC curvature is singular: use damping > 0")
        self._cache_NxD = jnp.concatenate(kept) * self._inv_D[None, :] if keep else None
        self._train = train
        self.timings["fit"] = time.perf_counter() - t0
        return self

    def attribute(self, queries: Examples) -> Attribution:
        if self._train is None:
            raise RuntimeError("call EKFAC.fit(model, train) before attribute")
        check_queries(self._train, queries)
        t0 = time.perf_counter()
        g_QxD = jnp.concatenate([g for _, _, g in self._rotated(queries)])
        if self._cache_NxD is not None:
            scores = np.asarray(dot_t(self._cache_NxD, g_QxD))
        else:
            pre_QxD = g_QxD * self._inv_D[None, :]
            scores = np.zeros((len(self._train.inputs), len(g_QxD)), np.float32)
            for s, e, g in self._rotated(self._train):
                scores[s:e] = np.asarray(dot_t(g, pre_QxD))
        self.timings["score"] = time.perf_counter() - t0
        return make_attribution(scores, self._train, queries, self.name)
