"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale").

For each model m of an ensemble, every example gets a feature vector phi = R^T grad f (the
gradient of the model output function f, projected by a random Johnson-Lindenstrauss matrix
R [P, k]), and

    tau_iq = mean_m[ phi_q,m^T (Phi_m^T Phi_m + lambda_m I)^-1 phi_i,m ] * mean_m[ 1 - p_i,m ]

with Phi_m [N, k] the training features and lambda_m = damping * trace(Phi_m^T Phi_m) / k (the
damping is relative to the mean eigenvalue, so it does not depend on the gradients' scale).

Output function and reweighting:
- classifier (targets [N]): f = log p(y|x) - log(1 - p(y|x)), the margin of TRAK, and the
  train-side reweighting Q_i = 1 - p(y_i|x_i) (TRAK's "one minus prob").
- language model (targets [N, T]): f = the example's mean next-token loss and no reweighting
  (Q = 1). TRAK's per-token margin would need one gradient per token; the mean loss is what
  dattri and LoGra use for LMs.
Scores are invariant to the sign of f (phi enters twice), and positive = helps the query.
TRAK's final soft-thresholding (sparsification) step is not applied.

Projection: R has i.i.d. Rademacher entries / sqrt(k), generated per block of `BLOCK_ROWS`
parameter rows from `jax.random.fold_in(key, block)`, 32 signs per random uint32. When P x k
floats fit in `max_projection_bytes` the whole R is built once; otherwise each block is
regenerated for every chunk of examples, so R is never stored. Both give identical features.
`proj_dim=None` skips the projection (phi = grad f; only for small models).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from stride_jax import models
from stride_jax.attribution import Attribution, ExampleSet
from stride_jax.baselines.base import make_attribution
from stride_jax.baselines.gradients import _padded_chunks, check_queries, check_train, split_params

__all__ = ["TRAK", "trak_features", "rademacher_block", "BLOCK_ROWS"]

BLOCK_ROWS = 8192


def rademacher_block(key: jax.Array, rows: int, k: int) -> jax.Array:
    """[rows, k] i.i.d. +-1/sqrt(k), 32 signs per random uint32."""
    words = -(-k // 32)
    bits_RxW = jax.random.bits(key, (rows, words), jnp.uint32)
    signs = (bits_RxW[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    signs_RxK = signs.reshape(rows, words * 32)[:, :k].astype(jnp.float32)
    return (2.0 * signs_RxK - 1.0) / math.sqrt(k)


def _dense_projection(key: jax.Array, n_blocks: int, k: int) -> jax.Array:
    """All blocks of R stacked: [n_blocks * BLOCK_ROWS, k]."""
    return jnp.concatenate(
        [rademacher_block(jax.random.fold_in(key, b), BLOCK_ROWS, k) for b in range(n_blocks)]
    )


_dense_projection_jit = jax.jit(_dense_projection, static_argnames=("n_blocks", "k"))


def _output_fn(params, rest, x, y, graphdef, classification: bool) -> jax.Array:
    """f for one example: the margin (classifier) or the mean token loss (LM)."""
    logits = nnx.merge(graphdef, params, rest)(x[None])[0]
    if classification:
        others = logits.at[y].set(-jnp.inf)
        return logits[y] - jax.nn.logsumexp(others)
    return models.example_loss(logits[None], y[None])[0]


def _features_fn(params, rest, x_B, y_B, key, proj_PxK, *, graphdef, classification, k, n_blocks):
    """phi [B, k] (or grad f [B, P] when k is None) and Q [B]."""

    def one(x, y):
        g = jax.grad(_output_fn)(params, rest, x, y, graphdef, classification)
        return ravel_pytree(g)[0]

    g_BxP = jax.vmap(one)(x_B, y_B)
    logits = nnx.merge(graphdef, params, rest)(x_B)
    if classification:
        p_B = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), y_B[:, None], axis=1)[:, 0]
        q_B = 1.0 - p_B
    else:
        q_B = jnp.ones(x_B.shape[0], jnp.float32)
    if k is None:
        return g_BxP, q_B
    B, P = g_BxP.shape
    g_BxP = jnp.pad(g_BxP, ((0, 0), (0, n_blocks * BLOCK_ROWS - P)))
    if proj_PxK is not None:
        return g_BxP @ proj_PxK, q_B

    def body(b, acc_BxK):
        g_b = jax.lax.dynamic_slice_in_dim(g_BxP, b * BLOCK_ROWS, BLOCK_ROWS, axis=1)
        return acc_BxK + g_b @ rademacher_block(jax.random.fold_in(key, b), BLOCK_ROWS, k)

    return jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((B, k), jnp.float32)), q_B


_features = jax.jit(_features_fn, static_argnames=("graphdef", "classification", "k", "n_blocks"))


def trak_features(
    model: nnx.Module,
    examples: ExampleSet,
    proj_dim: int | None,
    seed: int = 0,
    *,
    chunk_size: int = 32,
    max_projection_bytes: int = 1 << 29,
) -> tuple[np.ndarray, np.ndarray]:
    """(phi [N, k] float32, Q [N]) of `examples` under `model` (k = P when proj_dim is None)."""
    graphdef, params, rest = split_params(model)
    x, y = np.asarray(examples.inputs), np.asarray(examples.targets)
    classification = y.ndim == 1
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    n_blocks = -(-n_params // BLOCK_ROWS)
    key = jax.random.key(seed)
    proj = None
    if proj_dim is not None:
        if proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive int or None, got {proj_dim}")
        if n_blocks * BLOCK_ROWS * proj_dim * 4 <= max_projection_bytes:
            proj = _dense_projection_jit(key, n_blocks=n_blocks, k=proj_dim)
    chunk = min(chunk_size, len(x))
    phis, qs = [], []
    for start, stop, idx in _padded_chunks(len(x), chunk):
        phi, q = _features(params, rest, jnp.asarray(x[idx]), jnp.asarray(y[idx]), key, proj,
                           graphdef=graphdef, classification=classification, k=proj_dim,
                           n_blocks=n_blocks)
        phis.append(np.asarray(phi[: stop - start], np.float32))
        qs.append(np.asarray(q[: stop - start], np.float32))
    return np.concatenate(phis), np.concatenate(qs)


def _train_ensemble(model: nnx.Module, train: ExampleSet, n: int, train_config, seed: int) -> list:
    from stride_jax import train as train_lib

    if n and train_config is None:
        raise ValueError("n_retrain > 0 needs a train_config (stride_jax.train.TrainConfig)")
    return [train_lib.pretrain(model.cfg, train, train_config, seed=seed + j, progress=False)
            for j in range(n)]


class TRAK:
    """TRAK scores averaged over an ensemble of models (see the module docstring).

    Args:
      proj_dim: k, the random projection dimension (None: no projection).
      damping: lambda relative to the mean eigenvalue of Phi^T Phi.
      seed: projection seed (model m uses fold_in(key(seed), m)).
      ensemble: extra trained models of the same architecture, used with the fitted one.
      n_retrain: also train this many models with `train.pretrain(model.cfg, train,
        train_config, seed=retrain_seed + j)` at fit (TRAK's independently trained models).
      include_base: use the model passed to fit (False: only ensemble / retrained models).
      chunk_size: examples per vmapped gradient call.
      max_projection_bytes: build R densely when it fits in this many bytes.
    """

    name = "trak"

    def __init__(
        self,
        proj_dim: int | None = 512,
        damping: float = 1e-2,
        seed: int = 0,
        *,
        ensemble: Sequence[nnx.Module] = (),
        n_retrain: int = 0,
        train_config=None,
        retrain_seed: int = 1000,
        include_base: bool = True,
        chunk_size: int = 32,
        max_projection_bytes: int = 1 << 29,
    ):
        if proj_dim is not None and proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive int or None, got {proj_dim}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        if n_retrain < 0 or chunk_size < 1:
            raise ValueError("n_retrain must be >= 0 and chunk_size >= 1")
        if not include_base and not ensemble and not n_retrain:
            raise ValueError("TRAK needs at least one model: include_base, ensemble or n_retrain")
        if n_retrain and train_config is None:
            raise ValueError("n_retrain > 0 needs a train_config (stride_jax.train.TrainConfig)")
        self.proj_dim, self.damping, self.seed = proj_dim, float(damping), seed
        self.ensemble = list(ensemble)
        self.n_retrain, self.train_config, self.retrain_seed = n_retrain, train_config, retrain_seed
        self.include_base = include_base
        self.chunk_size, self.max_projection_bytes = chunk_size, max_projection_bytes
        self.models: list[nnx.Module] = []
        self._kernels_NxK: list[np.ndarray] = []  # Phi_m (Phi_m^T Phi_m + lambda I)^-1
        self._q_N: np.ndarray | None = None
        self._train: ExampleSet | None = None
        self.timings: dict[str, float] = {}

    def _features(self, m: int, examples: ExampleSet) -> tuple[np.ndarray, np.ndarray]:
        return trak_features(self.models[m], examples, self.proj_dim, self.seed * 7919 + m,
                             chunk_size=self.chunk_size, max_projection_bytes=self.max_projection_bytes)

    def fit(self, model: nnx.Module, train: ExampleSet) -> "TRAK":
        check_train(train)
        t0 = time.perf_counter()
        retrained = _train_ensemble(model, train, self.n_retrain, self.train_config, self.retrain_seed)
        self.timings["retrain"] = time.perf_counter() - t0
        self.models = ([model] if self.include_base else []) + self.ensemble + retrained
        cfgs = {getattr(m, "cfg", None) for m in self.models}
        if len(cfgs) != 1:
            raise ValueError("all TRAK ensemble models must share one architecture (config)")
        t0 = time.perf_counter()
        self._kernels_NxK, qs = [], []
        for m in range(len(self.models)):
            phi_NxK, q_N = self._features(m, train)
            self._kernels_NxK.append(_apply_inverse(phi_NxK, self.damping))
            qs.append(q_N)
        self._q_N = np.mean(qs, axis=0)
        self._train = train
        self.timings["fit"] = time.perf_counter() - t0
        return self

    def attribute(self, queries: ExampleSet) -> Attribution:
        if self._q_N is None:
            raise RuntimeError("call TRAK.fit(model, train) before attribute")
        check_queries(self._train, queries)
        t0 = time.perf_counter()
        scores_NxQ = np.zeros((len(self._train.inputs), len(queries.inputs)), np.float64)
        for m, a_NxK in enumerate(self._kernels_NxK):
            phi_QxK, _ = self._features(m, queries)
            scores_NxQ += a_NxK @ phi_QxK.T.astype(np.float64)
        scores_NxQ *= self._q_N[:, None] / len(self._kernels_NxK)
        self.timings["score"] = time.perf_counter() - t0
        return make_attribution(scores_NxQ, self._train, queries, self.name)


def _apply_inverse(phi_NxK: np.ndarray, damping: float) -> np.ndarray:
    """Phi (Phi^T Phi + lambda I)^-1 with lambda = damping * trace / k (float64 solve)."""
    phi = phi_NxK.astype(np.float64)
    k = phi.shape[1]
    gram_KxK = phi.T @ phi
    lam = damping * np.trace(gram_KxK) / k
    if lam == 0.0 and damping > 0:
        lam = damping  # all-zero features: any positive damping keeps the solve finite
    a_KxN = np.linalg.solve(gram_KxK + lam * np.eye(k), phi.T)  # symmetric: (A^-1 Phi^T)^T
    return a_KxN.T
