"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale").

For each model m of an ensemble, every example gets a feature vector phi = R^T grad f (the
gradient of the model output function f, projected by a random Johnson-Lindenstrauss matrix
R [P, k]), and

    tau_iq = mean_m[ phi_q,m^T (Phi_m^T Phi_m + lambda_m I)^-1 phi_i,m ] * mean_m[ 1 - p_i,m ]

with Phi_m [N, k] the training features and lambda_m = damping * trace(Phi_m^T Phi_m) / min(N, k),
the damping relative to the mean non-zero eigenvalue, so it depends neither on the gradients'
scale nor (through the zero eigenvalues when N < k) on the projection dimension.

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

import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from stride_jax.scores import Attribution
from stride_jax.baselines.base import batches, check_queries, check_train, make_attribution, one_loss
from stride_jax.baselines.gradients import dot_t, num_params, split_params
from stride_jax.data import Examples

__all__ = ["TRAK", "Projector", "trak_features", "features_with", "rademacher_block", "BLOCK_ROWS"]

BLOCK_ROWS = 8192


def rademacher_block(key: jax.Array, rows: int, k: int) -> jax.Array:
    """[rows, k] i.i.d. +-1/sqrt(k), 32 signs per random uint32."""
    words = -(-k // 32)
    bits_RxW = jax.random.bits(key, (rows, words), jnp.uint32)
    signs = (bits_RxW[..., None] >> jnp.arange(32, dtype=jnp.uint32)[None, None, :]) & 1
    signs_RxK = signs.reshape(rows, words * 32)[:, :k].astype(jnp.float32)
    return (2.0 * signs_RxK - 1.0) / math.sqrt(k)


def _dense_projection(key: jax.Array, n_blocks: int, k: int) -> jax.Array:
    """All blocks of R stacked: [n_blocks * BLOCK_ROWS, k]."""
    return jnp.concatenate(
        [rademacher_block(jax.random.fold_in(key, b), BLOCK_ROWS, k) for b in range(n_blocks)]
    )


_dense_projection_jit = jax.jit(_dense_projection, static_argnames=("n_blocks", "k"))


def _output_fn(params, rest, example, graphdef, classification: bool) -> jax.Array:
    """f for one example: the margin (classifier) or the (masked) mean token loss (LM)."""
    model = nnx.merge(graphdef, params, rest)
    if classification:
        x, y = example[0], example[1]
        logits = model(x[None])[0]
        others = logits.at[y].set(-jnp.inf)
        return logits[y] - jax.nn.logsumexp(others)
    return one_loss(model, example)


def _features_fn(params, rest, batch, key, proj_PxK, *, graphdef, classification, k, n_blocks):
    """phi [B, k] (or grad f [B, P] when k is None) and Q [B]."""

    def one(example):
        g = jax.grad(_output_fn)(params, rest, example, graphdef, classification)
        return ravel_pytree(g)[0]

    g_BxP = jax.vmap(one)(batch)
    x_B, y_B = batch[0], batch[1]
    logits = nnx.merge(graphdef, params, rest)(x_B, batch[2])
    if classification:
        # 1 - p(y|x) = sigmoid(-margin): 1 - p rounds to exactly 0 in float32 once p > 1 - 6e-8
        # (a classifier trained to zero loss), which zeroed every score; the sigmoid does not
        logit_B = jnp.take_along_axis(logits, y_B[:, None], axis=1)[:, 0]
        others_BxV = jnp.where(jax.nn.one_hot(y_B, logits.shape[-1], dtype=bool), -jnp.inf, logits)
        q_B = jax.nn.sigmoid(jax.nn.logsumexp(others_BxV, axis=-1) - logit_B)
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


class Projector:
    """The random projection R [P, k] of one model: dense when it fits in `max_bytes`, else
    regenerated block by block inside every feature call (identical values either way)."""

    def __init__(self, n_params: int, proj_dim: int | None, seed: int, max_bytes: int = 1 << 29):
        if proj_dim is not None and proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive int or None, got {proj_dim}")
        self.k, self.key = proj_dim, jax.random.key(seed)
        self.n_blocks = -(-n_params // BLOCK_ROWS)
        self.dense_PxK = None
        if proj_dim is not None and self.n_blocks * BLOCK_ROWS * proj_dim * 4 <= max_bytes:
            self.dense_PxK = _dense_projection_jit(self.key, n_blocks=self.n_blocks, k=proj_dim)


def features_with(model: nnx.Module, examples: Examples, projector: Projector,
                  chunk_size: int = 32, params: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(phi [N, k] float32, Q [N]) of `examples` under `model` with a given projector (gradients
    w.r.t. the parameters matching the glob patterns `params`, default all)."""
    graphdef, params, rest = split_params(model, params)
    phis, qs = [], []
    for start, stop, batch in batches(examples, chunk_size):
        phi, q = _features(params, rest, batch, projector.key, projector.dense_PxK, graphdef=graphdef,
                           classification=examples.targets.ndim == 1, k=projector.k, n_blocks=projector.n_blocks)
        phis.append(np.asarray(phi[: stop - start], np.float32))
        qs.append(np.asarray(q[: stop - start], np.float32))
    return np.concatenate(phis), np.concatenate(qs)


def trak_features(
    model: nnx.Module,
    examples: Examples,
    proj_dim: int | None,
    seed: int = 0,
    *,
    chunk_size: int = 32,
    max_projection_bytes: int = 1 << 29,
    params: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(phi [N, k] float32, Q [N]) of `examples` under `model` (k = P when proj_dim is None)."""
    projector = Projector(num_params(model, params), proj_dim, seed, max_projection_bytes)
    return features_with(model, examples, projector, chunk_size, params)


def _train_ensemble(model: nnx.Module, train: Examples, n: int, train_config, seed: int) -> list:
    from stride_jax import train as train_lib

    if n and train_config is None:
        raise ValueError("n_retrain > 0 needs a train_config (stride_jax.train.TrainConfig)")
    return [train_lib.pretrain(model.cfg, train, train_config, seed=seed + j, progress=False)
            for j in range(n)]


class TRAK:
    """TRAK scores averaged over an ensemble of models (see the module docstring).

    Args:
      proj_dim: k, the random projection dimension (None: no projection).
      damping: lambda relative to the mean non-zero eigenvalue of Phi^T Phi.
      seed: projection seed (model m of the ensemble uses seed * 7919 + m).
      ensemble: extra trained models of the same architecture, used with the fitted one.
      n_retrain: also train this many models with `train.pretrain(model.cfg, train,
        train_config, seed=retrain_seed + j)` at fit (TRAK's independently trained models).
      include_base: use the model passed to fit (False: only ensemble / retrained models).
      chunk_size: examples per vmapped gradient call (memory ~ chunk_size x P floats; a
        streamed projection is regenerated once per chunk, so larger chunks are faster).
      max_projection_bytes: build R densely when it fits in this many bytes.
      params: glob patterns of the parameter paths to differentiate (as GradDot's); default all.

    Defaults chosen on the demo's validation queries (GPT 2 x 64, 768 examples, one model):
    LDS 0.27 / 0.28 / 0.32 / 0.38 / 0.37 for damping 1e-3 / 1e-2 / 0.1 / 1 / 10 at k = 2048,
    and 0.17 -> 0.26 for k = 512 over the same damping range; larger k helped.
    """

    name = "trak"

    def __init__(
        self,
        proj_dim: int | None = 2048,
        damping: float = 1.0,
        seed: int = 0,
        *,
        ensemble: Sequence[nnx.Module] = (),
        n_retrain: int = 0,
        train_config=None,
        retrain_seed: int = 1000,
        include_base: bool = True,
        chunk_size: int = 128,
        max_projection_bytes: int = 1 << 29,
        params: Sequence[str] | None = None,
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
        self.params = None if params is None else list(params)
        self.models: list[nnx.Module] = []
        self._kernels_NxK: list[jax.Array] = []  # Phi_m (Phi_m^T Phi_m + lambda I)^-1
        self._projectors: list[Projector] = []
        self._q_N: np.ndarray | None = None
        self._train: Examples | None = None
        self.timings: dict[str, float] = {}

    def _features(self, m: int, examples: Examples) -> tuple[np.ndarray, np.ndarray]:
        return features_with(self.models[m], examples, self._projectors[m], self.chunk_size, self.params)

    def fit(self, model: nnx.Module, train: Examples) -> "TRAK":
        check_train(train)
        t0 = time.perf_counter()
        retrained = _train_ensemble(model, train, self.n_retrain, self.train_config, self.retrain_seed)
        self.timings["retrain"] = time.perf_counter() - t0
        self.models = ([model] if self.include_base else []) + self.ensemble + retrained
        cfgs = {getattr(m, "cfg", None) for m in self.models}
        if len(cfgs) != 1:
            raise ValueError("all TRAK ensemble models must share one architecture (config)")
        t0 = time.perf_counter()
        n_params = num_params(model, self.params)
        # model m projects with its own seed (TRAK draws one projection per model)
        self._projectors = [Projector(n_params, self.proj_dim, self.seed * 7919 + m, self.max_projection_bytes)
                            for m in range(len(self.models))]
        self._kernels_NxK, qs = [], []
        for m in range(len(self.models)):
            phi_NxK, q_N = self._features(m, train)
            self._kernels_NxK.append(_apply_inverse(phi_NxK, self.damping))
            qs.append(q_N)
        self._q_N = np.mean(qs, axis=0)
        self._train = train
        self.timings["fit"] = time.perf_counter() - t0
        return self

    def attribute(self, queries: Examples) -> Attribution:
        if self._q_N is None:
            raise RuntimeError("call TRAK.fit(model, train) before attribute")
        check_queries(self._train, queries)
        t0 = time.perf_counter()
        scores_NxQ = np.zeros((len(self._train.inputs), len(queries.inputs)), np.float64)
        for m, a_NxK in enumerate(self._kernels_NxK):
            phi_QxK, _ = self._features(m, queries)
            scores_NxQ += np.asarray(dot_t(a_NxK, jnp.asarray(phi_QxK)), np.float64)
        scores_NxQ *= self._q_N[:, None] / len(self._kernels_NxK)
        self.timings["score"] = time.perf_counter() - t0
        return make_attribution(scores_NxQ, self._train, queries, self.name)


def _apply_inverse(phi_NxK: np.ndarray, damping: float) -> jax.Array:
    """Phi (Phi^T Phi + lambda I)^-1 [N, k], lambda = damping * trace / min(N, k).

    Solved on the smaller Gram matrix: when N <= k through the push-through identity
    Phi (Phi^T Phi + lambda I)^-1 = (Phi Phi^T + lambda I)^-1 Phi. Cholesky in float32 (JAX).
    """
    phi = jnp.asarray(phi_NxK, jnp.float32)
    n, k = phi.shape
    dual = n <= k
    gram = dot_t(phi, phi) if dual else dot_t(phi.T, phi.T)
    lam = damping * jnp.trace(gram) / min(n, k)
    lam = jnp.where((lam == 0) & (damping > 0), damping, lam)  # all-zero features stay finite
    factor = jax.scipy.linalg.cho_factor(gram + lam * jnp.eye(len(gram)))
    if dual:
        out = jax.scipy.linalg.cho_solve(factor, phi)
    else:
        out = jax.scipy.linalg.cho_solve(factor, phi.T).T
    if not bool(jnp.isfinite(out).all()):
        raise FloatingPointError("TRAK kernel is singular: use damping > 0")
    return out
