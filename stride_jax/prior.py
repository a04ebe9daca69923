"""Ridge recovery with a prior built from the frozen model's own per-example features.

At n >> K the K subset sums y = M w cannot pin a dense influence vector (docs/STRIDE.md section
6, issue 22). A Gaussian prior w ~ N(0, C), C = I + a Phi Phi^T, with Phi [N, P] features the
frozen model computes anyway (`pool_features`), lets similar examples share evidence. With
y = M w + e, e ~ N(0, gamma I), the posterior mean (= argmin ||y - M w||^2 / gamma + w^T C^-1 w) is

    w = C M^T (M C M^T + gamma I)^-1 y.                                                  (1)

a = 0 (or no features) gives ridge, w = M^T (M M^T + gamma I)^-1 y = argmin ||y - M w||^2 +
gamma ||w||^2. (1) is computed matrix-free (`ridge_prior_solve`): the K x K system
(M C M^T + gamma I) u = y is solved by conjugate gradients batched over queries (preconditioned
by the diagonal plus the prior's rank-P part, inverted by Woodbury), M acts through the sparse
design (segment sums) and C v = v + a Phi (Phi^T v), so nothing K x K or N x N is ever formed:
memory O(N S + N P + N Q + K P). float32 CG runs on the device inside float64 iterative
refinement on the host (float32 alone stalls near eps32 x cond, 1e-4 at cond 3000).

Scales, so one grid means the same at every K and n:
- Phi is scaled so that mean_i ||Phi_i||^2 = 1: a is the features' share of the prior variance
  of an example relative to the identity part (mean diag C = 1 + a).
- gamma = g * mean_k (M C M^T)_kk, the mean prior variance of one response: g is the ratio of
  noise to signal variance per response.
(a, g) are chosen without ground truth by K-fold cross-validation over operators
(`select_prior`): the responses of held-out subsets are predicted from a fit on the others.

`converged` means certified: the relative residual ||(M C M^T + gamma I) u - y|| / ||y|| of the
returned solution, recomputed in float64 (not CG's recursive estimate), is <= tol; it is
reported as `gap`, the role the duality gap plays for the Lasso. Measured: K = N = 1e5, S = 10,
P = 64, Q = 4 converges to 3e-7 in 17 CG iterations (a = 10) or 51 (a = 0), peak RSS 1 GB.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax import store
from stride_jax.design import Design, design_matvec, design_rmatvec

_TINY = 1e-30
_INNER_TOL = 1e-3  # relative tolerance of each float32 CG solve inside iterative refinement
_EXACT_PCA_MAX_F = 8192  # feature widths above which `pool_features` projects instead of PCA
FEATURES_VERSION = 1  # bump when `pool_features` changes what it computes (invalidates caches)


@dataclasses.dataclass(frozen=True)
class RidgeConfig:
    """Settings of the conjugate-gradient solve and of the cross-validation over operators.

    tol: certify a query when the relative residual ||(M C M^T + gamma I) u - y|| / ||y||,
      recomputed in float64, is <= tol (`RidgeResult.gap`).
    max_iter: CG iterations per float32 solve (each is one M^T, one M and two Phi products).
    refine: rounds of iterative refinement (a float32 CG solve of the current float64 residual
      to 1e-3, then the residual recomputed in float64); two or three reach 1e-6.
    folds: cross-validation folds over the K subsets (each held out once).
    cv_queries: cross-validate on at most this many queries (evenly spaced), so the choice of
      (a, g) costs the same for 300 or 300,000 queries.
    seed: the random split of subsets into folds.
    query_chunk: queries per CG solve (bounds the [N, chunk] temporaries; one compile per size).
    """

    tol: float = 1e-5
    max_iter: int = 1000
    refine: int = 6
    folds: int = 5
    cv_queries: int = 256
    seed: int = 0
    query_chunk: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.tol < 1:
            raise ValueError(f"recovery.ridge.tol must lie in (0, 1), got {self.tol!r}")
        for name in ("max_iter", "refine", "cv_queries", "query_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"recovery.ridge.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.folds, int) or isinstance(self.folds, bool) or self.folds < 2:
            raise ValueError(f"recovery.ridge.folds must be an integer >= 2, got {self.folds!r}")


class RidgeResult(NamedTuple):
    """`ridge_prior_solve` output. coef [N, Q] float32 (sign: as y); per query [Q]: converged
    (gap <= tol), gap (relative residual of the K x K system at the returned solution), n_iter
    (CG iterations); and the prior strength a, relative noise g and absolute gamma used."""

    coef: np.ndarray
    converged: np.ndarray
    gap: np.ndarray
    n_iter: np.ndarray
    a: float
    g: float
    gamma: float


# ---------------------------------------------------------------------------------------------
# Features


def pool_features(model: Any, examples: Any, layer: int, *, dim: int = 64, batch_size: int = 64,
                  chunk: int = 4096, seed: int = 0, progress: bool = False) -> np.ndarray:
    """Phi [N, P]: per-example features of the frozen model, row i for `examples[i]`.

    Per example, the mean over its counted positions (weights: loss_mask, else mask, else all
    positions) of the hook-layer state h_l and of the final state h_L, and log(number of counted
    tokens); classifiers' states are per example already. Columns are standardised (a constant
    column becomes 0), then reduced to P = min(dim, F, N) columns: the top principal components
    (eigendecomposition of the F x F covariance) or, for F > 8192, a Gaussian projection seeded
    by `seed`. Scaled so mean_i ||Phi_i||^2 = 1 (see the module docstring). States are pooled
    `chunk` examples at a time, so memory is O(chunk T D + N F), never [N, T, D] for the pool.
    """
    from stride_jax.features import compute_features

    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"recovery.prior_dim must be an integer >= 1, got {dim!r}")
    n = len(examples)
    rows = []
    for lo in range(0, n, chunk):
        part = examples[lo:lo + chunk]
        h, h_top = compute_features(model, part, layer, batch_size=batch_size, progress=progress)
        h, h_top = np.asarray(h, np.float64), np.asarray(h_top, np.float64)
        if h.ndim == 3:  # [B, T, D]: pool over counted positions
            weights = part.loss_weights
            w_BxT = np.ones(h.shape[:2]) if weights is None else np.asarray(weights, np.float64)
            count_B = w_BxT.sum(axis=1)
            pool = lambda s: np.einsum("bt,btd->bd", w_BxT, s) / np.maximum(count_B, _TINY)[:, None]
            h, h_top = pool(h), pool(h_top)
        else:
            count_B = np.ones(len(h))
        rows.append(np.concatenate([h, h_top, np.log(np.maximum(count_B, 1.0))[:, None]], axis=1))
    return reduce_features(np.concatenate(rows), dim, seed=seed)


def reduce_features(x_NxF: np.ndarray, dim: int, *, seed: int = 0) -> np.ndarray:
    """Standardise columns, keep P = min(dim, F, N) principal components, scale to mean row
    norm^2 = 1 (float32 [N, P]); see `pool_features`. Never forms an N x N matrix."""
    x = np.asarray(x_NxF, np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"features must be a finite [N, F] array, got shape {x.shape}")
    x = x - x.mean(axis=0)
    std = x.std(axis=0)
    x = np.where(std > 0, x / np.where(std > 0, std, 1.0), 0.0)
    n, f = x.shape
    p = min(dim, f, n)
    if f <= _EXACT_PCA_MAX_F:
        _, vecs_FxF = np.linalg.eigh(x.T @ x)
        v_FxP = vecs_FxF[:, ::-1][:, :p]
        v_FxP = v_FxP * np.sign(v_FxP[np.abs(v_FxP).argmax(axis=0), np.arange(p)])  # fixed signs
    else:
        v_FxP = np.random.default_rng(seed).standard_normal((f, p)) / np.sqrt(p)
    phi_NxP = x @ v_FxP
    scale = np.sqrt(np.mean(np.sum(phi_NxP ** 2, axis=1)))
    return (phi_NxP / scale if scale > 0 else phi_NxP).astype(np.float32)


def cached_pool_features(model: Any, examples: Any, layer: int, *, dim: int, cache: str | Path | None = None,
                         seed: int = 0, progress: bool = False) -> np.ndarray:
    """`pool_features`, read from / written to the npz `cache` when given. The file records the
    fingerprint of what the features depend on (model parameters, pool content, layer, dim,
    seed, `FEATURES_VERSION`); a file made from anything else is recomputed and replaced."""
    from stride_jax import models

    key = store.fingerprint({"model": models.param_digest(model), "data": examples.content_hash(),
                             "layer": int(layer), "dim": int(dim), "seed": int(seed),
                             "version": FEATURES_VERSION})
    if cache is not None and Path(cache).exists():
        z = store.load_npz(cache)
        if str(z["key"]) == key:
            return z["phi"]
    phi = pool_features(model, examples, layer, dim=dim, seed=seed, progress=progress)
    if cache is not None:
        store.save_npz(cache, {"phi": phi, "key": np.asarray(key)})
    return phi


# ---------------------------------------------------------------------------------------------
# Solver


def _prior_cov(phi_NxP: jax.Array, a: jax.Array, v_NxQ: jax.Array) -> jax.Array:
    """C v = v + a Phi (Phi^T v)."""
    return v_NxQ + a * (phi_NxP @ (phi_NxP.T @ v_NxQ))


def _system(ids_NxS, phi_NxP, mask_K, a, gamma, u_KxQ, *, n_subsets: int):
    """(D M C M^T D + gamma I) u, D = diag(mask): M restricted to the kept rows."""
    v_NxQ = design_rmatvec(ids_NxS, mask_K[:, None] * u_KxQ)
    return mask_K[:, None] * design_matvec(ids_NxS, n_subsets, _prior_cov(phi_NxP, a, v_NxQ)) + gamma * u_KxQ


def _host_coef(ids_NxS: np.ndarray, phi_NxP: np.ndarray, mask_K: np.ndarray, a: float,
               u_KxQ: np.ndarray) -> np.ndarray:
    """w = C M^T D u in float64 numpy, O(N S Q + N P Q) time, O(N Q) memory."""
    du_KxQ = mask_K[:, None] * u_KxQ
    v_NxQ = sum(du_KxQ[ids_NxS[:, s]] for s in range(ids_NxS.shape[1]))
    return v_NxQ + a * (phi_NxP @ (phi_NxP.T @ v_NxQ))


def _host_matvec(ids_NxS: np.ndarray, n_subsets: int, w_NxQ: np.ndarray) -> np.ndarray:
    """M w in float64 numpy: one bincount per query, never an [N S, Q] gather."""
    flat, per_example = ids_NxS.reshape(-1), ids_NxS.shape[1]
    return np.stack([np.bincount(flat, np.repeat(w_NxQ[:, j], per_example), minlength=n_subsets)
                     for j in range(w_NxQ.shape[1])], axis=1)


def _host_system(ids_NxS: np.ndarray, phi_NxP: np.ndarray, mask_K: np.ndarray, a: float, gamma: float,
                 u_KxQ: np.ndarray) -> np.ndarray:
    """`_system` in float64 numpy, for the residuals of iterative refinement."""
    w_NxQ = _host_coef(ids_NxS, phi_NxP, mask_K, a, u_KxQ)
    return mask_K[:, None] * _host_matvec(ids_NxS, u_KxQ.shape[0], w_NxQ) + gamma * u_KxQ


class _Precond(NamedTuple):
    """P = diag(d) + a U U^T with U = D M Phi [K, P]: the diagonal of D M M^T D + gamma I plus the
    prior's low-rank part, inverted by Woodbury, P^-1 r = d^-1 r - a d^-1 U G^-1 U^T d^-1 r with
    G = I + a U^T d^-1 U ([P, P], inverted on the host). CG then needs about as many
    iterations at a = 10 as at a = 0."""

    inv_d_K: jax.Array
    u_KxP: jax.Array
    ginv_PxP: jax.Array

    def __call__(self, a, r_KxQ):
        z_KxQ = self.inv_d_K[:, None] * r_KxQ
        low_rank = self.u_KxP @ (self.ginv_PxP @ (self.u_KxP.T @ z_KxQ))
        return z_KxQ - a * self.inv_d_K[:, None] * low_rank


def _preconditioner(design: Design, mphi_KxP: np.ndarray, a: float, gamma: float, mask_K: np.ndarray) -> _Precond:
    d_K = mask_K * design.subset_sizes() + gamma
    u_KxP = mask_K[:, None] * mphi_KxP
    g_PxP = np.eye(u_KxP.shape[1]) + a * u_KxP.T @ (u_KxP / d_K[:, None])
    ginv_PxP = np.linalg.inv(g_PxP)
    return _Precond(jnp.asarray(1.0 / d_K, jnp.float32), jnp.asarray(u_KxP, jnp.float32),
                    jnp.asarray(0.5 * (ginv_PxP + ginv_PxP.T), jnp.float32))


@functools.partial(jax.jit, static_argnames=("n_subsets", "max_iter"))
def _pcg(ids_NxS, phi_NxP, b_KxQ, mask_K, a, gamma, precond: _Precond, tol, *, n_subsets: int, max_iter: int):
    """Preconditioned CG from 0 on (D M C M^T D + gamma I) x = b, columns independent, until
    each column's recursive residual is <= tol ||b|| or `max_iter`. A converged column stops
    moving (alpha = 0); an all-zero column never starts. Returns (x, n_iter [Q])."""
    op = functools.partial(_system, ids_NxS, phi_NxP, mask_K, a, gamma, n_subsets=n_subsets)
    thresh_Q = tol * jnp.linalg.norm(b_KxQ, axis=0)

    def cond(state):
        it, _, _, _, _, active, _ = state
        return (it < max_iter) & jnp.any(active)

    def body(state):
        it, x, r, p, rz, active, n_iter = state
        ap = op(p)
        pap = jnp.sum(p * ap, axis=0)
        alpha = jnp.where(active & (pap > 0), rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = x + alpha[None, :] * p
        r = r - alpha[None, :] * ap
        z = precond(a, r)
        rz_new = jnp.sum(r * z, axis=0)
        p = z + jnp.where(active, rz_new / jnp.maximum(rz, _TINY), 0.0)[None, :] * p
        n_iter = n_iter + active
        active = active & (jnp.linalg.norm(r, axis=0) > thresh_Q)
        return it + 1, x, r, p, rz_new, active, n_iter

    z = precond(a, b_KxQ)
    active = jnp.linalg.norm(b_KxQ, axis=0) > 0
    state = (jnp.int32(0), jnp.zeros_like(b_KxQ), b_KxQ, z, jnp.sum(b_KxQ * z, axis=0), active,
             jnp.zeros(b_KxQ.shape[1], jnp.int32))
    _, x, _, _, _, _, n_iter = jax.lax.while_loop(cond, body, state)
    return x, n_iter


def _design_features(design: Design, phi_NxP: np.ndarray) -> np.ndarray:
    """M Phi [K, P] in float64 (row k: the sum of Phi over subset k), O(N S P)."""
    if not phi_NxP.shape[1]:
        return np.zeros((design.n_subsets, 0))
    return np.asarray(design.matvec(jnp.asarray(phi_NxP)), np.float64)


def _response_variance(design: Design, mphi_KxP: np.ndarray, a: float) -> np.ndarray:
    """[K] diag(M C M^T) = |subset k| + a ||sum_{i in k} Phi_i||^2 (exact)."""
    return design.subset_sizes() + a * np.sum(mphi_KxP ** 2, axis=1)


def _check_inputs(y, design: Design, phi, a: float, g: float) -> tuple[np.ndarray, np.ndarray]:
    """y as [Q, K] float32 and Phi as [N, P] float32 ([N, 0] when None), checked before any compile."""
    if not isinstance(design, Design):
        raise TypeError(f"design must be a stride_jax.design.Design, got {type(design).__name__}")
    design.check_nonempty()
    k, n = design.shape
    y = np.asarray(y, np.float32)
    if y.ndim not in (1, 2) or y.shape[-1] != k:
        raise ValueError(f"y must be [K] or [Q, K] with K={k} subset responses, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"y holds {int((~np.isfinite(y)).sum())} NaN/inf entries; recovery needs finite responses")
    if phi is None:
        phi = np.zeros((n, 0), np.float32)
    phi = np.asarray(phi, np.float32)
    if phi.ndim != 2 or phi.shape[0] != n:
        raise ValueError(f"prior features (phi) must be [N={n}, P], one row per pool example, got shape {phi.shape}")
    if not np.all(np.isfinite(phi)):
        raise ValueError(f"prior features (phi) hold {int((~np.isfinite(phi)).sum())} NaN/inf entries")
    if not (np.isfinite(a) and a >= 0):
        raise ValueError(f"prior strength a must be finite and >= 0, got {a!r}")
    if not (np.isfinite(g) and g > 0):
        raise ValueError(f"relative noise g (gamma scale) must be finite and > 0, got {g!r}")
    return y.reshape(-1, k), phi


def _solve_masked(y_QxK, design, phi_NxP, mphi_KxP, a, gamma, mask_K, cfg: RidgeConfig, init_KxQ=None):
    """(D M C M^T D + gamma I) u = D y by mixed-precision iterative refinement: float32 CG on the
    device (over query chunks) solves for a correction to `_INNER_TOL`, the residual is
    recomputed in float64 on the host, until ||residual|| <= tol ||D y|| or `cfg.refine` rounds.
    float32 CG alone stalls near eps32 x cond (1e-4 at cond 3000). Returns (u [K, Q] float64,
    n_iter [Q] CG iterations over all rounds, gap [Q] final relative residual)."""
    k, q = design.n_subsets, y_QxK.shape[0]
    ids, phi = jnp.asarray(design.ids_NxS), jnp.asarray(phi_NxP)
    mask, precond = jnp.asarray(mask_K, jnp.float32), _preconditioner(design, mphi_KxP, a, gamma, mask_K)
    host = functools.partial(_host_system, design.ids_NxS, np.asarray(phi_NxP, np.float64),
                             np.asarray(mask_K, np.float64), float(a), float(gamma))
    b_KxQ = mask_K[:, None] * np.asarray(y_QxK, np.float64).T
    b_norm_Q = np.maximum(np.linalg.norm(b_KxQ, axis=0), _TINY)
    u_KxQ = np.zeros((k, q)) if init_KxQ is None else np.array(init_KxQ, np.float64)
    r_KxQ = b_KxQ - host(u_KxQ)
    n_iter = np.zeros(q, np.int64)
    chunk = min(cfg.query_chunk, q)
    inner_tol = jnp.float32(max(cfg.tol, _INNER_TOL))
    for _ in range(cfg.refine):
        todo_Q = np.linalg.norm(r_KxQ, axis=0) > cfg.tol * b_norm_Q
        if not todo_Q.any():
            break
        rhs_KxQ = np.where(todo_Q[None, :], r_KxQ, 0.0)
        for lo in range(0, q, chunk):
            keep = min(chunk, q - lo)
            b = np.zeros((k, chunk), np.float32)
            b[:, :keep] = rhs_KxQ[:, lo:lo + keep]
            du, it = _pcg(ids, phi, jnp.asarray(b), mask, jnp.float32(a), jnp.float32(gamma), precond, inner_tol,
                          n_subsets=k, max_iter=cfg.max_iter)
            u_KxQ[:, lo:lo + keep] += np.asarray(du, np.float64)[:, :keep]
            n_iter[lo:lo + keep] += np.asarray(it)[:keep]
        r_KxQ = b_KxQ - host(u_KxQ)
    return u_KxQ, n_iter, np.linalg.norm(r_KxQ, axis=0) / b_norm_Q


def ridge_prior_solve(y: np.ndarray, design: Design, phi_NxP: np.ndarray | None, a: float, g: float,
                      cfg: RidgeConfig = RidgeConfig()) -> RidgeResult:
    """Posterior mean w = C M^T (M C M^T + gamma I)^-1 y, C = I + a Phi Phi^T (eq. 1 above).

    y: [K] or [Q, K] responses; phi_NxP: prior features (None, or a = 0: plain ridge);
    a: prior strength; g: relative noise, gamma = g * mean_k (M C M^T)_kk. Matrix-free CG; the
    coefficients come back as [N, Q] float32 (a [K] y gives Q = 1).
    """
    y_QxK, phi = _check_inputs(y, design, phi_NxP, a, g)
    a = float(a) if phi.shape[1] else 0.0
    mphi_KxP = _design_features(design, phi)
    gamma = float(g * _response_variance(design, mphi_KxP, a).mean())
    mask_K = np.ones(design.n_subsets, np.float32)
    u_KxQ, n_iter, gap = _solve_masked(y_QxK, design, phi, mphi_KxP, a, gamma, mask_K, cfg)
    phi64, chunk = np.asarray(phi, np.float64), cfg.query_chunk
    coef_NxQ = np.concatenate([_host_coef(design.ids_NxS, phi64, mask_K, a, u_KxQ[:, lo:lo + chunk]).astype(np.float32)
                               for lo in range(0, u_KxQ.shape[1], chunk)], axis=1)
    return RidgeResult(coef=coef_NxQ, converged=gap <= cfg.tol, gap=gap.astype(np.float32),
                       n_iter=n_iter, a=a, g=float(g), gamma=gamma)


def select_prior(y: np.ndarray, design: Design, phi_NxP: np.ndarray | None, strengths: Sequence[float],
                 noises: Sequence[float], cfg: RidgeConfig = RidgeConfig()) -> tuple[float, float, list[dict]]:
    """Choose (a, g) by `cfg.folds`-fold cross-validation over operators, with no ground truth.

    The K subsets are split at random into folds (seed `cfg.seed`). For each fold and each grid
    point the posterior mean is fit on the responses of the other folds' subsets only (the rows
    of M of held-out subsets are dropped, gamma rescaled on the kept rows) and predicts the
    held-out responses as M_held w. Score: mean squared prediction error over held-out subsets
    and (up to `cfg.cv_queries`) queries; the smallest wins, ties going to the smaller a and
    larger g (the simpler prior). This is what the responses themselves support: a wins only
    when similar examples (by Phi) really have similar effects on the held-out subsets.

    Returns (a, g, table), table a list of {"a", "g", "mse", "not_converged"} over the grid.
    """
    strengths = sorted({float(s) for s in strengths})
    noises = sorted({float(s) for s in noises}, reverse=True)  # large g first: warm starts get harder
    if not strengths or not noises:
        raise ValueError("the grids of prior strengths a and relative noises g must be non-empty")
    y_QxK, phi = _check_inputs(y, design, phi_NxP, strengths[-1], noises[-1])
    if strengths[0] < 0:
        raise ValueError(f"prior strengths a must be >= 0, got {strengths[0]}")
    if not phi.shape[1]:
        strengths = [0.0]
    k = design.n_subsets
    if cfg.folds > k:
        raise ValueError(f"recovery.ridge.folds ({cfg.folds}) must be <= the number of subsets K={k}")
    if y_QxK.shape[0] > cfg.cv_queries:
        y_QxK = y_QxK[np.linspace(0, y_QxK.shape[0] - 1, cfg.cv_queries).round().astype(int)]
    fold_K = np.empty(k, np.int64)
    fold_K[np.random.default_rng(cfg.seed).permutation(k)] = np.arange(k) % cfg.folds
    phi64 = np.asarray(phi, np.float64)
    mphi_KxP = _design_features(design, phi)
    sse = {(s, g): 0.0 for s in strengths for g in noises}
    bad = {key: 0 for key in sse}
    for fold in range(cfg.folds):
        mask_K = (fold_K != fold).astype(np.float32)
        held = fold_K == fold
        for s in strengths:
            signal = float(_response_variance(design, mphi_KxP, s)[mask_K > 0].mean())
            u = None
            for g in noises:
                u, _, gap = _solve_masked(y_QxK, design, phi, mphi_KxP, s, g * signal, mask_K, cfg, init_KxQ=u)
                pred_KxQ = _host_matvec(design.ids_NxS, k, _host_coef(design.ids_NxS, phi64, mask_K, s, u))
                sse[(s, g)] += float(np.sum((y_QxK.T[held] - pred_KxQ[held]) ** 2))
                bad[(s, g)] += int(np.sum(gap > cfg.tol))
    table = [{"a": s, "g": g, "mse": sse[(s, g)] / (k * y_QxK.shape[0]), "not_converged": bad[(s, g)]}
             for s in strengths for g in noises]
    best = min(table, key=lambda row: (row["mse"], row["a"], -row["g"]))
    return best["a"], best["g"], table


__all__ = ["FEATURES_VERSION", "RidgeConfig", "RidgeResult", "cached_pool_features", "pool_features",
           "reduce_features", "ridge_prior_solve", "select_prior"]
