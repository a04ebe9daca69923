"""Sparse recovery of per-example influence from subset measurements: the Lasso.

For a query with subset responses y in R^K and membership matrix M in {0,1}^{K x N}, STRIDE
(arXiv 2606.05165, section "Recovery") estimates per-example influence as

    w = argmin_w  P(w) = 1/2 ||y - M w||_2^2 + lambda ||w||_1        (optionally w >= 0).

Two solvers share one FISTA iteration (Beck & Teboulle, SIAM J. Imaging Sci. 2009; step 1/L,
adaptive restart of O'Donoghue & Candes 2015):

- `solve_lasso`, the recommended entry point: a working-set method (celer, Massias et al.,
  ICML 2018; skglm, Bertrand et al., NeurIPS 2022). FISTA solves the Lasso restricted to a few
  hundred columns per query (its step follows the small block's Lipschitz constant, not the
  whole design's), and passes over all N columns add the largest KKT violators and certify the
  result by its duality gap. `converged` means certified: gap / P(w) <= tol.
- `fista_lasso`: plain FISTA over all N columns, the paper card's solver, kept as the reference.
  Its step 1/L with L ~ N d^2 / K shrinks with N, so at N >> K it needs thousands of iterations.
  It reports the same duality gap, but its `converged` is the relative-change stopping rule.

Duality gap (El Ghaoui et al. 2012; gap-safe rules: Fercoq et al. 2015, Ndiaye et al. 2017). The
dual is D(theta) = theta^T y - 1/2 ||theta||^2 subject to ||M^T theta||_inf <= lambda (with
w >= 0: M^T theta <= lambda). For the residual r = y - M w and c = M^T r, theta = s r with
s = min(1, lambda / ||c||_inf) (with w >= 0: lambda / max_j c_j) is feasible, and

    gap = P(w) - D(theta) = 1/2 (1 - s)^2 ||r||^2 + sum_j (lambda |w_j| - s c_j w_j) >= P(w) - P(w*),

a sum of nonnegative terms, so float32 does not lose it to the cancellation of P - D. M is a
`Design` (sparse, never densified) or a dense [K, N] array.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stride_jax.design import Design, design_matvec, design_rmatvec
from stride_jax.scores import SparseScores

_TINY = 1e-30  # floor of denominators (relative gap of an all-zero problem is 0)
_GROUP = 16  # columns per group in the candidate search of a full pass (see `_full_pass`)


@dataclasses.dataclass(frozen=True)
class FistaConfig:
    """Static FISTA settings (hashable: passed to jitted functions as a static argument).

    max_iter: iteration cap of the while loop.
    tol: stop when ||w_t - w_{t-1}|| / max(||w_t||, 1e-12) <= tol.
    nonneg: constrain w >= 0.
    power_iter: power-iteration steps for the Lipschitz constant of a dense matrix (a `Design`
      caches a Collatz-Wielandt bound instead: `Design.lipschitz()`).
    restart: adaptive momentum restart (O'Donoghue & Candes 2015, gradient scheme): same
      solution, measured 7x fewer iterations on a 60 x 300 design at tol 1e-7 (625 vs 4432).
    """

    max_iter: int = 500
    tol: float = 1e-6
    nonneg: bool = False
    power_iter: int = 50
    restart: bool = True

    def __post_init__(self) -> None:
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if not 0 <= self.tol < np.inf:
            raise ValueError(f"tol must be finite and >= 0, got {self.tol}")
        if self.power_iter < 1:
            raise ValueError(f"power_iter must be >= 1, got {self.power_iter}")


class FistaResult(NamedTuple):
    """coef [N] (one query) or [N, Q]; per query: n_iter, error (last relative change of w),
    converged (error <= tol: the stopping rule, not a certificate) and gap, the relative duality
    gap (P(w) - D(theta)) / P(w) >= (P(w) - P(w*)) / P(w) at the returned coef."""

    coef: jax.Array
    n_iter: jax.Array
    error: jax.Array
    converged: jax.Array
    gap: jax.Array


@dataclasses.dataclass(frozen=True)
class LassoConfig:
    """Static settings of `solve_lasso`, the working-set Lasso (hashable: a static jit argument).

    tol: certify a query when its relative duality gap, gap / P(w), is <= tol. P(w) - P(w*) <=
      gap, so the objective is within a factor 1 + tol of the optimum. float32 arithmetic
      resolves the gap to about 1e-6 of P (at tol = 1e-6 some queries stall at that floor);
      scikit-learn's default (gap <= 1e-4 ||y||^2, and ||y||^2 >= 2 P) is looser than 1e-4.
    max_outer: working-set rounds; each ends with one pass over all N columns.
    ws_size: working-set capacity per query (columns of the small Lasso). A query whose
      support fills 3/4 of it stops and is solved on, warm, with twice the capacity, up to
      max_ws_size (each capacity is one more compile).
    max_iter: FISTA iterations per working-set subproblem.
    inner_ratio: a subproblem is solved until its own gap is below inner_ratio x the current
      full gap (celer's rule, which uses 0.3), or below tol / 2 of P(w) once that is smaller.
      Full passes cost more than inner steps here: at N = 10^6, K = 1000, Q = 128 (planted
      benchmark) 0.3 took 15.3 s and 10 rounds, 0.03 5.7 s and 6, 0.01 6.8 s, 0.001 6.2 s.
    check_every: FISTA iterations between two evaluations of the subproblem's gap.
    nonneg: constrain w >= 0.
    block: examples per step of the scan in a full pass (a multiple of 16): bounds the pass's
      temporaries to block x Q floats.
    """

    tol: float = 1e-4
    max_outer: int = 20
    ws_size: int = 256
    max_ws_size: int = 4096
    max_iter: int = 2000
    inner_ratio: float = 0.03
    check_every: int = 10
    nonneg: bool = False
    block: int = 16384

    def __post_init__(self) -> None:
        if not 0 <= self.tol < np.inf:
            raise ValueError(f"tol must be finite and >= 0, got {self.tol}")
        for name in ("max_outer", "max_iter", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.ws_size <= self.max_ws_size:
            raise ValueError(
                f"ws_size must be >= 1 and <= max_ws_size, got {self.ws_size}, {self.max_ws_size}"
            )
        if not 0 < self.inner_ratio < 1:
            raise ValueError(f"inner_ratio must lie in (0, 1), got {self.inner_ratio}")
        if self.block < _GROUP or self.block % _GROUP:
            raise ValueError(f"block must be a positive multiple of {_GROUP}, got {self.block}")

    @classmethod
    def from_fista(cls, cfg: FistaConfig) -> LassoConfig:
        """nonneg and max_iter of a FistaConfig (its tol is a different rule and is not used)."""
        return cls(nonneg=cfg.nonneg, max_iter=cfg.max_iter)


class LassoResult(NamedTuple):
    """`solve_lasso` output. coef: [N, Q] float32 (or [N] for one query) or a `SparseScores`.
    Per query: converged (gap <= tol: certified), gap (relative duality gap, as in FistaResult),
    objective P(w), n_iter (FISTA iterations over all rounds), n_outer (working-set rounds; each
    was followed by one pass over all N columns), n_nonzero."""

    coef: np.ndarray | SparseScores
    converged: np.ndarray
    gap: np.ndarray
    objective: np.ndarray
    n_iter: np.ndarray
    n_outer: np.ndarray
    n_nonzero: np.ndarray


def prox_l1(x: jax.Array, l1reg: jax.Array, scaling: jax.Array = 1.0) -> jax.Array:
    """Soft threshold: argmin_z 1/2 ||z - x||^2 + l1reg * scaling * ||z||_1."""
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - l1reg * scaling, 0.0)


def prox_nonneg_l1(x: jax.Array, l1reg: jax.Array, scaling: jax.Array = 1.0) -> jax.Array:
    """argmin_{z >= 0} 1/2 ||z - x||^2 + l1reg * scaling * sum(z)."""
    return jnp.maximum(x - l1reg * scaling, 0.0)


def _fista_update(w_N, z_N, t, grad_N, step, l1reg, *, nonneg: bool, restart: bool,
                  dot=jnp.vdot):
    """One FISTA step from the gradient at the extrapolated point z: (w', z', t', w' - w).

    Vectors [N] with scalar t, l1reg; or [N, Q] columns with [Q] t, l1reg and
    dot = `_column_dot`.
    """
    prox = prox_nonneg_l1 if nonneg else prox_l1
    row = _as_row if jnp.ndim(w_N) == 2 else (lambda a: a)  # [Q] per-query values over [N, Q]
    w_next_N = prox(z_N - row(step) * grad_N, row(l1reg), row(step))
    t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    delta_N = w_next_N - w_N
    momentum = (t - 1.0) / t_next
    if restart:
        restart_now = dot(z_N - w_next_N, delta_N) > 0
        t_next = jnp.where(restart_now, 1.0, t_next)
        momentum = jnp.where(restart_now, 0.0, momentum)
    return w_next_N, w_next_N + row(momentum) * delta_N, t_next, delta_N


def _as_row(a):
    """A per-query [Q] value as a [1, Q] row (scalars unchanged), for [N, Q] arithmetic."""
    return a[None, :] if jnp.ndim(a) == 1 else a


def _column_dot(a_NxQ, b_NxQ):
    """[Q] dot products of columns, as a dot_general: XLA:CPU fuses a sum over axis 0 with
    its elementwise producers into a loop that measured 2x slower."""
    return jnp.einsum("nq,nq->q", a_NxQ, b_NxQ)


def _duality_gap(r_K, cw, l1, cmax, l1reg):
    """(gap, P(w)) from r = y - M w, cw = c^T w, l1 = ||w||_1, cmax = ||c||_inf (c = M^T r).

    Works elementwise on [Q] arrays too. With w >= 0 pass cmax = max_j c_j. See the module
    docstring for the formula; the gap is clipped at 0 (rounding).
    """
    rr = jnp.sum(r_K * r_K, axis=-1)
    s = jnp.where(cmax > l1reg, l1reg / jnp.maximum(cmax, _TINY), 1.0)
    gap = 0.5 * (1.0 - s) ** 2 * rr + l1reg * l1 - s * cw
    return jnp.maximum(gap, 0.0), 0.5 * rr + l1reg * l1


def _relative(gap, primal):
    return gap / jnp.maximum(primal, _TINY)


# An operand is M itself: a dense [K, N] array (n_subsets None) or a design's ids [N, S] with
# n_subsets = K static. Design ids equal to K mean "no subset" (rows removed by select_lambda).


@functools.lru_cache(maxsize=None)
def _query_batched_matvec(n_subsets: int):
    """design_matvec whose vmap over queries runs as one [N, Q] -> [K, Q] product.

    Plain vmap batches each segment sum over a leading query axis, which scatters strided
    slices; moving the query axis last scatters contiguous rows and measured 2x faster on CPU.
    """

    @jax.custom_batching.custom_vmap
    def matvec(ids_NxS, w):
        return design_matvec(ids_NxS, n_subsets, w)

    @matvec.def_vmap
    def _rule(axis_size, in_batched, ids_NxS, w):
        del axis_size
        if in_batched[0]:  # a batch of designs: no shortcut
            return jax.vmap(matvec)(ids_NxS, w), True
        out = design_matvec(ids_NxS, n_subsets, jnp.moveaxis(w, 0, -1))
        return jnp.moveaxis(out, -1, 0), True

    return matvec


def _operand_matvec(operand: jax.Array, n_subsets: int | None, w: jax.Array) -> jax.Array:
    """M w for w [N] or [N, Q]."""
    if n_subsets is None:
        return operand @ w
    return _query_batched_matvec(n_subsets)(operand, w)


def _operand_rmatvec(operand: jax.Array, n_subsets: int | None, r: jax.Array) -> jax.Array:
    """M^T r for r [K] or [K, Q]."""
    if n_subsets is None:
        return operand.T @ r
    return design_rmatvec(operand, r)


def _operand_n(operand: jax.Array, n_subsets: int | None) -> int:
    return operand.shape[1] if n_subsets is None else operand.shape[0]


def lipschitz(
    matvec: Callable[[jax.Array], jax.Array],
    rmatvec: Callable[[jax.Array], jax.Array],
    shape: tuple[int, int],
    n_iter: int,
    key: jax.Array,
) -> jax.Array:
    """1.01 x the largest eigenvalue of M^T M (M of `shape` [K, N]) by `n_iter` power steps.

    Power iteration approaches the eigenvalue from below; the 1.01 safety factor covers a small
    shortfall so that the step 1/L stays <= 1/||M||_2^2. Pure: jit it or call it inside a jit.
    """
    _, n = shape
    v_N = jax.random.normal(key, (n,), dtype=float)
    v_N = v_N / jnp.linalg.norm(v_N)

    def step(_, v_N):
        u_N = rmatvec(matvec(v_N))
        return u_N / jnp.maximum(jnp.linalg.norm(u_N), 1e-30)

    v_N = jax.lax.fori_loop(0, n_iter, step, v_N)
    return 1.01 * jnp.linalg.norm(rmatvec(matvec(v_N)))


@functools.partial(jax.jit, static_argnames=("n_subsets", "n_iter"))
def _operand_lipschitz(operand: jax.Array, *, n_subsets: int | None, n_iter: int) -> jax.Array:
    """Power-iteration estimate, capped by the bound ||M||_2^2 <= ||M||_1 ||M||_inf."""
    n = _operand_n(operand, n_subsets)
    k = operand.shape[0] if n_subsets is None else n_subsets
    estimate = lipschitz(
        functools.partial(_operand_matvec, operand, n_subsets),
        functools.partial(_operand_rmatvec, operand, n_subsets),
        (k, n),
        n_iter,
        jax.random.key(0),
    )
    if n_subsets is None:
        abs_KxN = jnp.abs(operand)
        bound = abs_KxN.sum(0).max() * abs_KxN.sum(1).max()
    else:
        subset_sizes_K = design_matvec(operand, n_subsets, jnp.ones(n, float))
        bound = operand.shape[1] * subset_sizes_K.max()
    return jnp.maximum(jnp.minimum(estimate, bound), 1e-30)


def _full_gap(operand, n_subsets, y, w, l1reg, nonneg):
    """Relative duality gap at w; y [K] / w [N] or y [K, Q] / w [N, Q] (-> [Q])."""
    r = y - _operand_matvec(operand, n_subsets, w)
    c = _operand_rmatvec(operand, n_subsets, r)
    cmax = (c if nonneg else jnp.abs(c)).max(axis=0)
    gap, primal = _duality_gap(r.T, (c * w).sum(axis=0), jnp.abs(w).sum(axis=0), cmax, l1reg)
    return _relative(gap, primal)


def fista_solve(
    y_K: jax.Array,
    operand: jax.Array,
    l1reg: jax.Array,
    lipschitz_const: jax.Array,
    init_N: jax.Array | None = None,
    *,
    cfg: FistaConfig,
    n_subsets: int | None = None,
) -> FistaResult:
    """One query's Lasso, min_w 1/2 ||y - M w||^2 + l1reg ||w||_1, by FISTA. Pure; jit/vmap it.

    `operand` is M as a dense [K, N] array (n_subsets=None) or a design's `ids_NxS` with
    n_subsets = K (static). Step 1/lipschitz_const; stops after cfg.max_iter iterations or when
    the relative change of w drops to cfg.tol. Returns coef [N] and scalars, among them the
    relative duality gap at coef (one more matvec pair).
    """
    matvec = functools.partial(_operand_matvec, operand, n_subsets)
    rmatvec = functools.partial(_operand_rmatvec, operand, n_subsets)
    y_K = jnp.asarray(y_K)
    dtype = jnp.promote_types(y_K.dtype, jnp.float32)
    y_K = y_K.astype(dtype)
    n = _operand_n(operand, n_subsets)
    w_N = jnp.zeros(n, dtype) if init_N is None else jnp.asarray(init_N, dtype)
    step = jnp.asarray(1.0 / lipschitz_const, dtype)
    l1reg = jnp.asarray(l1reg, dtype)  # a float64 lambda (numpy, or x64) must not promote the carry

    def cond(state):
        it, _, _, _, err = state
        return (it < cfg.max_iter) & (err > cfg.tol)

    def body(state):
        it, w_N, z_N, t, _ = state
        grad_N = rmatvec(matvec(z_N) - y_K)
        w_next_N, z_next_N, t_next, delta_N = _fista_update(
            w_N, z_N, t, grad_N, step, l1reg, nonneg=cfg.nonneg, restart=cfg.restart)
        err = jnp.linalg.norm(delta_N) / jnp.maximum(jnp.linalg.norm(w_next_N), 1e-12)
        return it + 1, w_next_N, z_next_N, t_next, err

    state = (jnp.int32(0), w_N, w_N, jnp.ones((), dtype), jnp.full((), jnp.inf, dtype))
    n_iter, w_N, _, _, err = jax.lax.while_loop(cond, body, state)
    gap = _full_gap(operand, n_subsets, y_K, w_N, l1reg, cfg.nonneg)
    return FistaResult(coef=w_N, n_iter=n_iter, error=err, converged=err <= cfg.tol, gap=gap)


@functools.partial(jax.jit, static_argnames=("cfg", "n_subsets"))
def _fista_batch(y_QxK, operand, l1reg_Q, lipschitz_const, init_NxQ, *, cfg, n_subsets):
    """FISTA for a block of queries in the scores layout: iterates W [N, Q], responses [K, Q].

    The gradient M^T (M Z - Y) of all queries is one pair of sparse products on [N, Q] / [K, Q]
    arrays; a query whose relative change reached tol is frozen (as a vmapped while loop
    freezes a finished lane), so each query's iterates and n_iter are its own solve's. On
    2 CPU cores (n = 10^5, Q = 64) the gradient ran 1.6-2x faster than under vmap of
    `fista_solve`, a whole iteration 1.4x (benchmarks/recovery.py, "layout").
    """
    y_KxQ = y_QxK.T
    n_queries = y_QxK.shape[0]
    step = 1.0 / lipschitz_const
    update = functools.partial(_fista_update, nonneg=cfg.nonneg, restart=cfg.restart,
                               dot=_column_dot)

    def cond(state):
        it, _, _, _, err_Q, _ = state
        return (it < cfg.max_iter) & jnp.any(err_Q > cfg.tol)

    def body(state):
        it, w_NxQ, z_NxQ, t_Q, err_Q, n_iter_Q = state
        grad_NxQ = _operand_rmatvec(operand, n_subsets,
                                    _operand_matvec(operand, n_subsets, z_NxQ) - y_KxQ)
        w_next, z_next, t_next, delta = update(w_NxQ, z_NxQ, t_Q, grad_NxQ, step, l1reg_Q)
        active_Q = err_Q > cfg.tol
        err_next = jnp.sqrt(_column_dot(delta, delta)) / jnp.maximum(
            jnp.sqrt(_column_dot(w_next, w_next)), 1e-12)
        return (it + 1, jnp.where(active_Q[None], w_next, w_NxQ), jnp.where(active_Q[None], z_next, z_NxQ),
                jnp.where(active_Q, t_next, t_Q), jnp.where(active_Q, err_next, err_Q),
                n_iter_Q + active_Q)

    dtype = y_QxK.dtype
    state = (jnp.int32(0), init_NxQ, init_NxQ, jnp.ones(n_queries, dtype),
             jnp.full(n_queries, jnp.inf, dtype), jnp.zeros(n_queries, jnp.int32))
    _, w_NxQ, _, _, err_Q, n_iter_Q = jax.lax.while_loop(cond, body, state)
    gap_Q = _full_gap(operand, n_subsets, y_KxQ, w_NxQ, l1reg_Q, cfg.nonneg)
    return FistaResult(coef=w_NxQ, n_iter=n_iter_Q, error=err_Q, converged=err_Q <= cfg.tol,
                       gap=gap_Q)


def _solve_in_chunks(y_QxK, operand, l1reg_Q, lipschitz_const, init_NxQ, *, cfg, n_subsets,
                     query_chunk):
    """`_fista_batch` over blocks of `query_chunk` queries, the last one padded (one compile).

    The loop runs every query of a block until the slowest stops; small blocks bound that
    waste and the [N, chunk] iterates. Padding queries have y = 0 and stop at once.
    """
    n_queries = y_QxK.shape[0]
    chunk = _query_bucket(query_chunk, n_queries)
    pad = -n_queries % chunk
    if pad:
        y_QxK = jnp.concatenate([y_QxK, jnp.zeros((pad, y_QxK.shape[1]), y_QxK.dtype)])
        l1reg_Q = jnp.concatenate([l1reg_Q, jnp.zeros(pad, l1reg_Q.dtype)])
        init_NxQ = jnp.concatenate([init_NxQ, jnp.zeros((init_NxQ.shape[0], pad), init_NxQ.dtype)],
                                   axis=1)
    parts = [
        _fista_batch(y_QxK[lo:lo + chunk], operand, l1reg_Q[lo:lo + chunk], lipschitz_const,
                     init_NxQ[:, lo:lo + chunk], cfg=cfg, n_subsets=n_subsets)
        for lo in range(0, n_queries + pad, chunk)
    ]
    result = FistaResult(jnp.concatenate([r.coef for r in parts], axis=1),
                         *(jnp.concatenate([r[i] for r in parts]) for i in range(1, 5)))
    if pad:
        result = FistaResult(result.coef[:, :n_queries], *(x[:n_queries] for x in result[1:]))
    return result


# ---------------------------------------------------------------------------------------------
# Working-set solver. Per query, the working set is `capacity` column indices idx [Q, W] with
# coefficients w [Q, W]; unused slots hold the sentinel N, an all-zero column (a `Design`'s
# padded ids hold K, "no subset", from row N on; a dense M gets one zero column appended).


class _SparseOp(NamedTuple):
    """A design as padded ids [B, block, S] (`Design.blocked_ids`)."""

    blocks_BxNbxS: jax.Array


class _DenseOp(NamedTuple):
    """A dense M with one zero column appended (the sentinel): [K, N + 1]."""

    m_KxN1: jax.Array


def _sub(op, idx_QxW: jax.Array, n_subsets: int) -> jax.Array:
    """The working-set columns of M, per query: a dense block [Q, W, K], or for a design the
    ids as int [S, Q, W], offset by q (K + 1) so that all queries share one flat [Q (K + 1)]
    residual (slot K of each query's K + 1 is the "no subset" zero)."""
    if isinstance(op, _DenseOp):
        return jnp.take(op.m_KxN1.T, idx_QxW, axis=0)
    blocks = op.blocks_BxNbxS
    ids_QxWxS = blocks.reshape(-1, blocks.shape[-1]).at[idx_QxW].get(mode="promise_in_bounds")
    offset_Q = jnp.arange(idx_QxW.shape[0], dtype=jnp.int32) * (n_subsets + 1)
    return jnp.moveaxis(ids_QxWxS, -1, 0) + offset_Q[None, :, None]


def _sub_matvec(sub, w_QxW: jax.Array, n_subsets: int) -> jax.Array:
    """M_W w per query: [Q, W] -> [Q, K] (one flat segment sum over the S x Q x W ids)."""
    if not jnp.issubdtype(sub.dtype, jnp.integer):
        return jnp.einsum("qwk,qw->qk", sub, w_QxW)
    n_queries = w_QxW.shape[0]
    out = jax.ops.segment_sum(jnp.broadcast_to(w_QxW, sub.shape).reshape(-1), sub.reshape(-1),
                              num_segments=n_queries * (n_subsets + 1), mode="promise_in_bounds")
    return out.reshape(n_queries, n_subsets + 1)[:, :n_subsets]


def _sub_rmatvec(sub, r_QxK: jax.Array) -> jax.Array:
    """M_W^T r per query: [Q, K] -> [Q, W]."""
    if not jnp.issubdtype(sub.dtype, jnp.integer):
        return jnp.einsum("qwk,qk->qw", sub, r_QxK)
    r_flat = jnp.concatenate([r_QxK, jnp.zeros((r_QxK.shape[0], 1), r_QxK.dtype)], 1).reshape(-1)
    out = r_flat.at[sub[0]].get(mode="promise_in_bounds")
    for s in range(1, sub.shape[0]):
        out = out + r_flat.at[sub[s]].get(mode="promise_in_bounds")
    return out


def _sub_lipschitz(sub, n_subsets: int, valid_QxW: jax.Array) -> jax.Array:
    """[Q] upper bounds on ||M_W||_2^2 by Collatz-Wielandt, two steps from v = 1.

    For the nonnegative G = |M_W|^T |M_W| and v > 0, lambda_max(G) <= max_i (G v)_i / v_i;
    ||M_W||_2 <= || |M_W| ||_2. With 0/1 entries the products are small integers, exact in
    float32.
    """
    abs_sub = sub if jnp.issubdtype(sub.dtype, jnp.integer) else jnp.abs(sub)
    gram = lambda v: _sub_rmatvec(abs_sub, _sub_matvec(abs_sub, v, n_subsets))  # noqa: E731
    v1_QxW = gram(valid_QxW.astype(jnp.float32))
    v2_QxW = gram(jnp.where(valid_QxW, v1_QxW, 0.0))
    bound1 = jnp.where(valid_QxW, v1_QxW, 0.0).max(axis=1)
    ratio = jnp.where(valid_QxW & (v1_QxW > 0), v2_QxW / jnp.maximum(v1_QxW, _TINY), 0.0)
    return jnp.maximum(jnp.minimum(bound1, ratio.max(axis=1)) * (1.0 + 1e-5), _TINY)


def _top_k_padded(x_QxM: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k along the last axis; with k > M the rest is (-inf, 0)."""
    kk = min(k, x_QxM.shape[1])
    val, pos = jax.lax.top_k(x_QxM, kk)
    if kk < k:
        val = jnp.pad(val, ((0, 0), (0, k - kk)), constant_values=-jnp.inf)
        pos = jnp.pad(pos, ((0, 0), (0, k - kk)))
    return val, pos


def _full_pass(op, r_QxK: jax.Array, n_cand: int, n: int, nonneg: bool):
    """One pass over all N columns for c = M^T r: (cmax [Q], candidates idx [Q, P], prio [Q, P]).

    cmax = ||c||_inf (max_j c_j with w >= 0); the candidates are the P columns of largest
    priority |c_j| (c_j with w >= 0). For a design the pass is a scan over blocks of examples,
    so memory is O(block x Q), never [N, Q]: within a block, c is reduced to the maxima of
    groups of 16 columns (strided, which XLA:CPU fuses with the gathers; contiguous groups
    and argmax reductions measured 10x slower), the top P groups are found, and c is
    recomputed exactly on their 16 P columns to pick the top P. Exact: a top-P column's
    group is a top-P group.
    """
    if isinstance(op, _DenseOp):
        c_QxN1 = r_QxK @ op.m_KxN1
        prio_QxN1 = (c_QxN1 if nonneg else jnp.abs(c_QxN1)).at[:, n:].set(-jnp.inf)
        val, idx = _top_k_padded(prio_QxN1, n_cand)
        return prio_QxN1.max(axis=1), jnp.where(val > -jnp.inf, idx, n), val

    blocks = op.blocks_BxNbxS
    n_blocks, block, n_per = blocks.shape
    n_groups = block // _GROUP
    r_K1xQ = jnp.concatenate([r_QxK.T, jnp.zeros((1, r_QxK.shape[0]), r_QxK.dtype)])

    def scan_block(_, ids_NbxS):
        c_NbxQ = r_K1xQ.at[ids_NbxS[:, 0]].get(mode="promise_in_bounds")
        for s in range(1, n_per):
            c_NbxQ = c_NbxQ + r_K1xQ.at[ids_NbxS[:, s]].get(mode="promise_in_bounds")
        hi = lo = c_NbxQ[:n_groups]
        for b in range(1, _GROUP):
            part = c_NbxQ[b * n_groups:(b + 1) * n_groups]
            hi, lo = jnp.maximum(hi, part), jnp.minimum(lo, part)
        return None, hi if nonneg else jnp.maximum(hi, -lo)

    _, group_max = jax.lax.scan(scan_block, None, blocks)  # [B, G, Q]
    if n_cand == 0:
        return group_max.max(axis=(0, 1)), None, None
    group_max_QxBG = group_max.reshape(n_blocks * n_groups, -1).T
    _, top_groups_QxP = _top_k_padded(group_max_QxBG, n_cand)
    rows_QxPxG = ((top_groups_QxP // n_groups) * block + top_groups_QxP % n_groups)[:, :, None] \
        + (jnp.arange(_GROUP) * n_groups)[None, None, :]
    rows_QxR = rows_QxPxG.reshape(rows_QxPxG.shape[0], -1)
    # [Q, R, S] layout: a row's S ids are one cache line (an [S, Q, R] gather measured 3x slower)
    ids_QxRxS = blocks.reshape(-1, n_per).at[rows_QxR].get(mode="promise_in_bounds")
    offset_Q = jnp.arange(r_QxK.shape[0], dtype=jnp.int32) * (r_QxK.shape[1] + 1)
    r_flat = jnp.concatenate([r_QxK, jnp.zeros((r_QxK.shape[0], 1), r_QxK.dtype)], 1).reshape(-1)
    c_QxR = r_flat.at[ids_QxRxS + offset_Q[:, None, None]].get(mode="promise_in_bounds").sum(-1)
    prio_QxR = jnp.where(rows_QxR < n, c_QxR if nonneg else jnp.abs(c_QxR), -jnp.inf)
    val, pos = _top_k_padded(prio_QxR, n_cand)
    idx = jnp.take_along_axis(rows_QxR, pos, axis=1)
    return group_max_QxBG.max(axis=1), jnp.where(val > -jnp.inf, idx, n), val


def _merge(idx_QxW, w_QxW, prio_QxW, cand_idx_QxP, cand_prio_QxP, n: int):
    """New working sets: the support (priority inf), then the highest-priority columns.

    Columns listed twice (in the set and among the candidates) count once, with their w.
    """
    width = idx_QxW.shape[1]
    prio_QxW = jnp.where(w_QxW != 0, jnp.inf, jnp.where(idx_QxW < n, prio_QxW, -jnp.inf))
    idx = jnp.concatenate([idx_QxW, cand_idx_QxP], axis=1)
    source = jnp.concatenate([jnp.zeros_like(idx_QxW), jnp.ones_like(cand_idx_QxP)], axis=1)
    prio = jnp.concatenate([prio_QxW, cand_prio_QxP], axis=1)
    w = jnp.concatenate([w_QxW, jnp.zeros(cand_idx_QxP.shape, w_QxW.dtype)], axis=1)
    idx, source, prio, w = jax.lax.sort((idx, source, prio, w), dimension=1, num_keys=2)
    repeated = jnp.concatenate([jnp.zeros_like(idx[:, :1], bool), idx[:, 1:] == idx[:, :-1]], 1)
    prio = jnp.where(repeated | (idx >= n), -jnp.inf, prio)
    top, pos = jax.lax.top_k(prio, width)
    keep = top > -jnp.inf
    return (jnp.where(keep, jnp.take_along_axis(idx, pos, 1), n),
            jnp.where(keep, jnp.take_along_axis(w, pos, 1), 0.0))


def _inner_fista(sub, y_QxK, l1reg_Q, w_QxW, lipschitz_Q, target_Q, active_Q, *, cfg, n_subsets):
    """FISTA on each query's working-set Lasso until its gap <= target (absolute), batched.

    The subproblem gap uses the subproblem's own dual point (the max of |c| over the working
    set); it is evaluated every cfg.check_every steps. Returns (w [Q, W], iterations [Q]).
    """
    step_Q = 1.0 / lipschitz_Q
    update = jax.vmap(functools.partial(_fista_update, nonneg=cfg.nonneg, restart=True))

    def sub_gap(w):
        r = y_QxK - _sub_matvec(sub, w, n_subsets)
        c = _sub_rmatvec(sub, r)
        cmax = (c if cfg.nonneg else jnp.abs(c)).max(axis=1)
        return _duality_gap(r, (c * w).sum(1), jnp.abs(w).sum(1), cmax, l1reg_Q)[0]

    def check_then_step(state):
        w, z, t, n_it, active = state
        active = active & (sub_gap(w) > target_Q) & (n_it < cfg.max_iter)

        def one(_, wzt):
            w, z, t = wzt
            grad = _sub_rmatvec(sub, _sub_matvec(sub, z, n_subsets) - y_QxK)
            w2, z2, t2, _ = update(w, z, t, grad, step_Q, l1reg_Q)
            return (jnp.where(active[:, None], w2, w), jnp.where(active[:, None], z2, z),
                    jnp.where(active, t2, t))

        w, z, t = jax.lax.cond(jnp.any(active),
                               lambda wzt: jax.lax.fori_loop(0, cfg.check_every, one, wzt),
                               lambda wzt: wzt, (w, z, t))
        return w, z, t, n_it + cfg.check_every * active, active

    # the gap is checked at the top of each round only, so the loop is compiled once; the last
    # round finds every query done and skips its steps
    state = (w_QxW, w_QxW, jnp.ones_like(l1reg_Q), jnp.zeros(l1reg_Q.shape, jnp.int32), active_Q)
    w, _, _, n_it, _ = jax.lax.while_loop(lambda s: jnp.any(s[4]), check_then_step, state)
    return w, n_it


class _ChunkResult(NamedTuple):
    idx: jax.Array  # [Q, W] column of each working-set slot (N: empty slot)
    w: jax.Array  # [Q, W]
    gap: jax.Array  # [Q] relative
    objective: jax.Array  # [Q]
    converged: jax.Array  # [Q]
    n_iter: jax.Array  # [Q]
    n_outer: jax.Array  # [Q]


@functools.partial(jax.jit, static_argnames=("cfg", "n", "n_subsets", "can_grow"))
def _ws_chunk(y_QxK, l1reg_Q, idx_QxW, w_QxW, op, *, cfg: LassoConfig, n: int, n_subsets: int,
              can_grow: bool):
    """Working-set rounds for a block of queries, all in one while loop (no host round trips).

    Round: merge the working set with the last pass's candidates; solve its Lasso by FISTA to
    inner_ratio x the current gap; one full pass for c = M^T r gives the certified gap and the
    next candidates. A query stops (is frozen) once gap / P <= tol, or, with can_grow, once its
    support fills 3/4 of the working set (`full`: the caller reruns it with more room).
    """
    width = idx_QxW.shape[1]

    def evaluate(sub, w):
        r = y_QxK - _sub_matvec(sub, w, n_subsets)
        c_w = _sub_rmatvec(sub, r)
        cmax, cand_idx, cand_prio = _full_pass(op, r, width, n, cfg.nonneg)
        gap, primal = _duality_gap(r, (c_w * w).sum(1), jnp.abs(w).sum(1), cmax, l1reg_Q)
        return gap, primal, cand_idx, cand_prio, c_w if cfg.nonneg else jnp.abs(c_w)

    def body(state):
        rnd, idx, w, _, _, n_iter, n_outer, done = state
        # certify the current w (one full pass), then, for queries not done, one more round
        sub = _sub(op, idx, n_subsets)
        gap, primal, cand_idx, cand_prio, prio = evaluate(sub, w)
        full = can_grow & (4 * (w != 0).sum(1) > 3 * width)
        done = done | (_relative(gap, primal) <= cfg.tol) | full | (rnd >= cfg.max_outer)
        active = ~done
        new_idx, new_w = _merge(idx, w, prio, cand_idx, cand_prio, n)
        idx = jnp.where(active[:, None], new_idx, idx)
        w = jnp.where(active[:, None], new_w, w)
        sub = _sub(op, idx, n_subsets)
        target = jnp.maximum(cfg.inner_ratio * gap, 0.5 * cfg.tol * primal)
        w, it = _inner_fista(sub, y_QxK, l1reg_Q, w, _sub_lipschitz(sub, n_subsets, idx < n),
                             target, active, cfg=cfg, n_subsets=n_subsets)
        return rnd + 1, idx, w, gap, primal, n_iter + it, n_outer + active, done

    zeros_Q = jnp.zeros(l1reg_Q.shape, jnp.int32)
    state = (jnp.int32(0), idx_QxW, w_QxW, jnp.zeros(l1reg_Q.shape), jnp.zeros(l1reg_Q.shape),
             zeros_Q, zeros_Q, jnp.zeros(l1reg_Q.shape, bool))
    # a frozen query's w does not change after its last evaluation, so (gap, primal) certify it
    _, idx, w, gap, primal, n_iter, n_outer, _ = jax.lax.while_loop(
        lambda s: ~jnp.all(s[-1]), body, state)
    rel = _relative(gap, primal)
    return _ChunkResult(idx, w, rel, primal, rel <= cfg.tol, n_iter, n_outer)


# ---------------------------------------------------------------------------------------------
# Sparse scores


# `SparseScores` lives in stride_jax/scores.py (imported above).


# ---------------------------------------------------------------------------------------------
# Input checks (eager: numpy only, before anything is traced or compiled)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _validate(y, design_or_matrix, l1reg, lipschitz_const=None) -> tuple[int, int, int]:
    """Check the inputs of a solve, on the host, before any jnp op; return (K, N, Q).

    Each message names the argument. Traced (jit) arguments are checked for shape only.
    """
    if isinstance(design_or_matrix, Design):
        design_or_matrix.check_nonempty()
        k, n = design_or_matrix.shape
    else:
        if _is_concrete(design_or_matrix):
            _check_dense_design(np.asarray(design_or_matrix))
        if len(np.shape(design_or_matrix)) != 2:
            raise ValueError(
                f"a dense design matrix (design_or_matrix) must be 2-D [K, N], got shape "
                f"{np.shape(design_or_matrix)}"
            )
        k, n = np.shape(design_or_matrix)
    n_queries = _check_y(y, k)
    _check_l1reg(l1reg, n_queries)
    if lipschitz_const is not None:
        _check_lipschitz(lipschitz_const)
    return k, n, n_queries


def _check_dense_design(m: np.ndarray) -> None:
    if m.ndim != 2:
        return  # the caller reports the shape
    n_bad = int(m.size - np.isfinite(m).sum())
    if n_bad:
        raise ValueError(
            f"the dense design matrix (design_or_matrix) holds {n_bad} NaN/inf entries (of "
            f"{m.size}); M must be finite"
        )
    empty_cols = np.flatnonzero(~m.any(axis=0))
    if empty_cols.size:
        raise ValueError(
            f"the dense design matrix (design_or_matrix) has {empty_cols.size} empty columns "
            f"(examples in no subset; first: column {empty_cols[0]}); each example needs a subset"
        )
    empty_rows = np.flatnonzero(~m.any(axis=1))
    if empty_rows.size:
        raise ValueError(
            f"the dense design matrix (design_or_matrix) has {empty_rows.size} empty rows "
            f"(subsets with no member; first: row {empty_rows[0]}); drop them"
        )


def _check_y(y, n_subsets: int) -> int:
    """Shape [K] or [Q, K] and finiteness of the responses y; returns Q."""
    shape = np.shape(y)
    if len(shape) not in (1, 2):
        raise ValueError(f"y must be [K] or [Q, K], got shape {shape}")
    if shape[-1] != n_subsets:
        raise ValueError(
            f"y has {shape[-1]} subset responses in its last axis, but the design has "
            f"K={n_subsets} subsets"
        )
    if _is_concrete(y):
        y = np.asarray(y)
        n_nan = int(np.isnan(y).sum())
        n_bad = int(np.size(y) - np.isfinite(y).sum())
        if n_bad:
            raise ValueError(
                f"y holds {n_nan} NaN and {n_bad - n_nan} inf entries (of {y.size}); recovery "
                "needs finite responses"
            )
    return 1 if len(shape) == 1 else shape[0]


def _check_l1reg(l1reg, n_queries: int) -> None:
    shape = np.shape(l1reg)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] != n_queries):
        raise ValueError(f"lambda (l1reg) must be a scalar or [Q={n_queries}], got shape {shape}")
    if _is_concrete(l1reg):
        arr = np.asarray(l1reg, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"lambda must be finite (argument l1reg), got {l1reg}")
        if np.any(arr < 0):
            raise ValueError(f"lambda must be >= 0 (argument l1reg), got min {arr.min()}")


def _check_lipschitz(lipschitz_const) -> None:
    if _is_concrete(lipschitz_const):
        arr = np.asarray(lipschitz_const, dtype=np.float64)
        if arr.ndim != 0 or not np.isfinite(arr) or arr <= 0:
            raise ValueError(
                f"lipschitz_const must be a finite scalar > 0 (an upper bound on ||M||_2^2), "
                f"got {lipschitz_const}"
            )


def _query_bucket(query_chunk: int, n_queries: int) -> int:
    """Queries per compiled block: the smallest power of two >= n_queries, capped at query_chunk
    (at most log2(query_chunk) + 1 block shapes whatever Q; padding wastes < 2x)."""
    return min(int(query_chunk), 1 << max(int(n_queries) - 1, 0).bit_length())


def _check_query_chunk(query_chunk: int) -> None:
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")


def _as_operand(design_or_matrix) -> tuple[jax.Array, int | None, int, int]:
    """(operand, n_subsets or None, K, N) for a Design or a dense [K, N] matrix (not checked)."""
    if isinstance(design_or_matrix, Design):
        d = design_or_matrix
        return jnp.asarray(d.ids_NxS), d.n_subsets, d.n_subsets, d.n_examples
    m_KxN = jnp.asarray(design_or_matrix, float)
    return m_KxN, None, m_KxN.shape[0], m_KxN.shape[1]


def _as_y(y, n_subsets: int) -> jax.Array:
    """y as a float [Q, K] (a [K] input becomes [1, K])."""
    return jnp.asarray(y, float).reshape(-1, n_subsets)


def _as_l1reg(l1reg, n_queries: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(l1reg, float), (n_queries,))


# ---------------------------------------------------------------------------------------------
# Public solvers


def lambda_max(y: jax.Array, design_or_matrix) -> jax.Array:
    """||M^T y||_inf per query ([K] -> scalar, [Q, K] -> [Q]): the smallest lambda giving w = 0.

    (With nonneg the smallest such lambda is max(M^T y, 0), which this bounds from above.)
    """
    k, _, _ = _validate(y, design_or_matrix, 0.0)
    y_QxK = _as_y(y, k)
    if isinstance(design_or_matrix, Design):  # blocked passes: memory O(block x 64), not N x Q
        design = design_or_matrix
        op = _SparseOp(design.blocked_ids(_block_size(LassoConfig().block, design.n_examples)))
        n_queries, chunk = y_QxK.shape[0], _query_bucket(_LMAX_CHUNK, y_QxK.shape[0])
        y_QxK = jnp.concatenate([y_QxK, jnp.zeros((-n_queries % chunk, k), y_QxK.dtype)])  # padded: lmax 0
        lmax_Q = jnp.concatenate([
            _pass_max(op, y_QxK[lo:lo + chunk], n=design.n_examples)
            for lo in range(0, y_QxK.shape[0], chunk)])[:n_queries]
    else:
        operand, n_subsets, _, _ = _as_operand(design_or_matrix)
        lmax_Q = jnp.abs(_operand_rmatvec(operand, n_subsets, y_QxK.T)).max(axis=0)
    return lmax_Q if jnp.ndim(y) == 2 else lmax_Q[0]


_LMAX_CHUNK = 64


@functools.partial(jax.jit, static_argnames=("n",))
def _pass_max(op, y_QxK, *, n):
    return _full_pass(op, y_QxK, 0, n, False)[0]


def _block_size(block: int, n: int) -> int:
    """The scan block for n examples: cfg.block, or less for a small design (>= N + 1 rows)."""
    return min(block, -(-(n + 1) // _GROUP) * _GROUP)


def solve_lasso(
    y: jax.Array,
    design_or_matrix: Design | jax.Array,
    l1reg: float | jax.Array,
    cfg: LassoConfig | FistaConfig = LassoConfig(),
    *,
    sparse: bool = False,
    query_chunk: int = 64,
) -> LassoResult:
    """Per-query Lasso with a certificate: w_q = argmin_w 1/2 ||y_q - M w||^2 + lambda_q ||w||_1.

    The recommended recovery of STRIDE (arXiv 2606.05165). A working-set method (celer,
    Massias et al. 2018): per query, FISTA (the project's solver, Beck & Teboulle 2009) solves
    the Lasso on at most cfg.ws_size columns (the support plus the largest |M^T r|); a pass over
    all N columns computes c = M^T r, the duality gap of the whole problem (module docstring)
    and the next candidates; rounds repeat until gap / P(w) <= cfg.tol. The inner steps use
    the small block's Lipschitz bound, independent of N. Each block of queries runs as one
    compiled while loop; a query whose support fills 3/4 of the working set stops and is
    rerun, warm, with twice the capacity (at most log2(max_ws_size / ws_size) more compiles).
    Args:
      y: [K] responses of one query, or [Q, K].
      design_or_matrix: a `Design` (sparse, never densified; passes are scans over blocks of
        cfg.block examples) or a dense [K, N] array (small problems).
      l1reg: lambda >= 0, a scalar or [Q]; lambda >= lambda_max(y) gives w = 0.
      cfg: a LassoConfig; a FistaConfig is read by `LassoConfig.from_fista`.
      sparse: return coef as `SparseScores` (memory follows the nonzeros) instead of a dense
        [N, Q] float32 array.
      query_chunk: queries per compiled block (the last one padded).
    Returns:
      LassoResult; coef [N] for a [K] input (SparseScores with one query if sparse).
    """
    if isinstance(cfg, FistaConfig):
        cfg = LassoConfig.from_fista(cfg)
    if not isinstance(cfg, LassoConfig):
        raise TypeError(f"cfg must be a LassoConfig or FistaConfig, got {type(cfg).__name__}")
    _check_query_chunk(query_chunk)
    k, n, n_queries = _validate(y, design_or_matrix, l1reg)
    if isinstance(design_or_matrix, Design):
        op = _SparseOp(design_or_matrix.blocked_ids(_block_size(cfg.block, n)))
    else:
        m_KxN = _as_operand(design_or_matrix)[0]
        op = _DenseOp(jnp.concatenate([m_KxN, jnp.zeros((k, 1), m_KxN.dtype)], axis=1))
    y_QxK = _as_y(y, k)
    l1reg_Q = _as_l1reg(l1reg, n_queries)

    chunk = _query_bucket(query_chunk, n_queries)
    n_padded = -(-n_queries // chunk) * chunk
    y_QxK = jnp.concatenate([y_QxK, jnp.zeros((n_padded - n_queries, k), y_QxK.dtype)])
    l1reg_Q = jnp.concatenate([l1reg_Q, jnp.ones(n_padded - n_queries, l1reg_Q.dtype)])
    width = min(cfg.ws_size, n)
    max_width = min(cfg.max_ws_size, n)
    # fields the compiled rounds do not read (the shapes carry them): one compile per width
    cfg = dataclasses.replace(cfg, ws_size=1, max_ws_size=1, block=_GROUP)
    parts = [_ws_chunk(y_QxK[lo:lo + chunk], l1reg_Q[lo:lo + chunk],
                       jnp.full((chunk, width), n, jnp.int32), jnp.zeros((chunk, width)), op,
                       cfg=cfg, n=n, n_subsets=k, can_grow=width < max_width)
             for lo in range(0, n_padded, chunk)]
    out = {f: np.concatenate([np.asarray(getattr(p, f)) for p in parts])
           for f in _ChunkResult._fields}
    # Queries whose support fills 3/4 of the working set and are not certified: more room.
    while width < max_width:
        n_nonzero = (out["w"] != 0).sum(axis=1)
        redo = np.flatnonzero(~out["converged"] & (4 * n_nonzero > 3 * width))
        if not redo.size:
            break
        wider = min(2 * width, max_width)
        grown = {f: np.zeros((n_padded, wider), out[f].dtype) for f in ("idx", "w")}
        grown["idx"][:] = n
        for f in ("idx", "w"):
            grown[f][:, :width] = out[f]
        out.update(grown)
        width = wider
        for lo in range(0, redo.size, chunk):
            sel = redo[lo:lo + chunk]
            pad = np.concatenate([sel, np.full(chunk - sel.size, sel[0])])
            res = _ws_chunk(y_QxK[pad], l1reg_Q[pad], jnp.asarray(out["idx"][pad]),
                            jnp.asarray(out["w"][pad]), op, cfg=cfg, n=n, n_subsets=k,
                            can_grow=width < max_width)
            for f in _ChunkResult._fields:
                value = np.asarray(getattr(res, f))[:sel.size]
                out[f][sel] = value + out[f][sel] if f in ("n_iter", "n_outer") else value
    out = {f: v[:n_queries] for f, v in out.items()}

    w_QxW = np.where(out["idx"] < n, out["w"], 0.0).astype(np.float32)
    if sparse:
        nonzero = w_QxW != 0
        q_idx = np.nonzero(nonzero)[0]
        order = np.lexsort((out["idx"][nonzero], q_idx))
        indptr = np.zeros(n_queries + 1, np.int64)
        np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
        coef = SparseScores(indptr, out["idx"][nonzero][order], w_QxW[nonzero][order], n)
    else:
        coef_NxQ1 = np.zeros((n + 1, n_queries), np.float32)
        coef_NxQ1[np.minimum(out["idx"], n), np.arange(n_queries)[:, None]] = w_QxW
        coef = coef_NxQ1[:n, 0] if jnp.ndim(y) == 1 else coef_NxQ1[:n]
    stats = dict(converged=out["converged"], gap=out["gap"], objective=out["objective"],
                 n_iter=out["n_iter"], n_outer=out["n_outer"],
                 n_nonzero=(w_QxW != 0).sum(axis=1))
    if jnp.ndim(y) == 1:
        stats = {f: v[0] for f, v in stats.items()}
    return LassoResult(coef=coef, **stats)


def fista_lasso(
    y: jax.Array,
    design_or_matrix: Design | jax.Array,
    l1reg: float | jax.Array,
    cfg: FistaConfig = FistaConfig(),
    *,
    lipschitz_const: float | jax.Array | None = None,
    init: jax.Array | None = None,
    query_chunk: int = 64,
) -> FistaResult:
    """Per-query Lasso by plain FISTA: w_q = argmin_w 1/2 ||y_q - M w||_2^2 + lambda_q ||w||_1.

    The paper card's solver (STRIDE, arXiv 2606.05165; FISTA, Beck & Teboulle 2009) over all N
    columns, kept as the reference; `solve_lasso` is the recommended recovery (certified, and
    at N >> K orders of magnitude faster: the step 1/L here shrinks like K / (N d^2)).
    Args:
      y: [K] responses of one query, or [Q, K] for Q queries (solved in one loop per block,
        iterates in the [N, Q] layout).
      design_or_matrix: a `Design` (sparse matvecs, never densified) or a dense [K, N] array.
      l1reg: lambda, a scalar or [Q] (one per query); lambda >= lambda_max(y) gives w = 0.
      cfg: static solver settings (with cfg.nonneg, also w >= 0).
      lipschitz_const: ||M||_2^2 (or an upper bound) if already known; else a design's cached
        `Design.lipschitz()`, or power iteration for a dense matrix.
      init: warm start, [N] or [N, Q].
      query_chunk: queries per block. The loop runs until the slowest query of its block stops
        (each query's own n_iter is reported); smaller blocks waste fewer iterations and less
        memory, larger ones use a wide accelerator better.
    Returns:
      FistaResult with coef [N] (or [N, Q], the project's scores layout) and per-query n_iter,
      error (final relative change of w), converged (error <= tol) and gap (relative duality
      gap: the certificate; `converged` is only the stopping rule).
    """
    _check_query_chunk(query_chunk)
    k, n, n_queries = _validate(y, design_or_matrix, l1reg, lipschitz_const)
    operand, n_subsets, _, _ = _as_operand(design_or_matrix)
    y_QxK = _as_y(y, k)
    l1reg_Q = _as_l1reg(l1reg, n_queries)
    if lipschitz_const is None:
        if isinstance(design_or_matrix, Design):
            lipschitz_const = design_or_matrix.lipschitz()
        else:
            lipschitz_const = _operand_lipschitz(operand, n_subsets=n_subsets,
                                                 n_iter=cfg.power_iter)
    lipschitz_const = jnp.asarray(lipschitz_const, float)
    if init is None:
        init_NxQ = jnp.zeros((n, n_queries), float)
    else:
        init_NxQ = jnp.asarray(init, float).reshape(n, -1)
        if init_NxQ.shape != (n, n_queries):
            raise ValueError(f"init must be [N={n}] or [N, Q={n_queries}], got {jnp.shape(init)}")
    result = _solve_in_chunks(y_QxK, operand, l1reg_Q, lipschitz_const, init_NxQ,
                              cfg=cfg, n_subsets=n_subsets, query_chunk=query_chunk)
    if jnp.ndim(y) == 1:
        return FistaResult(result.coef[:, 0], *(x[0] for x in result[1:]))
    return result


def select_lambda(
    y_QxK: jax.Array,
    design: Design | jax.Array,
    fractions: Sequence[float] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4),
    holdout_frac: float = 0.2,
    seed: int = 0,
    cfg: FistaConfig = FistaConfig(),
    query_chunk: int = 64,
) -> tuple[float, dict[float, float]]:
    """Choose lambda = fraction * lambda_max(y_q) by prediction error on held-out subsets.

    A random `holdout_frac` of the K subsets (rows of M, entries of y) is held out; each
    fraction's Lasso is fit on the kept subsets (largest fraction first, warm-starting the
    next), and predicts the held-out responses as M_heldout w. Returns the fraction with the
    smallest mean squared prediction error over held-out subsets and queries, and the table
    {fraction: mse}. Examples in no kept subset get coefficient 0 (their gradient is 0).
    lambda_max is that of the kept subsets; rescale with `lambda_max(y, design)` for the full fit.
    """
    fractions = sorted({float(f) for f in fractions}, reverse=True)
    if not fractions or fractions[-1] < 0:
        raise ValueError(f"fractions must be a non-empty list of values >= 0, got {fractions}")
    if not 0.0 < holdout_frac < 1.0:
        raise ValueError(f"holdout_frac must lie in (0, 1), got {holdout_frac}")
    k, n, _ = _validate(y_QxK, design, 0.0)
    operand, n_subsets, _, _ = _as_operand(design)
    y_QxK = _as_y(y_QxK, k)
    n_held = int(round(holdout_frac * k))
    if not 1 <= n_held <= k - 1:
        raise ValueError(
            f"holdout_frac={holdout_frac} of K={k} subsets holds out {n_held}; need 1..K-1"
        )
    held_H = np.sort(np.random.default_rng(seed).permutation(k)[:n_held])
    kept = np.ones(k, dtype=bool)
    kept[held_H] = False
    kept_J = np.flatnonzero(kept)

    if n_subsets is None:
        kept_operand, kept_n_subsets = operand[kept_J], None
    else:
        relabel_K = np.full(k, kept_J.size, dtype=np.int32)  # held-out subsets -> "no subset"
        relabel_K[kept_J] = np.arange(kept_J.size, dtype=np.int32)
        kept_operand, kept_n_subsets = jnp.asarray(relabel_K)[operand], kept_J.size
    y_kept_QxJ, y_held_HxQ = y_QxK[:, kept_J], y_QxK[:, held_H].T
    lmax_Q = jnp.abs(_operand_rmatvec(kept_operand, kept_n_subsets, y_kept_QxJ.T)).max(axis=0)
    lipschitz_const = _operand_lipschitz(
        kept_operand, n_subsets=kept_n_subsets, n_iter=cfg.power_iter
    )

    table = {}
    init_NxQ = jnp.zeros((n, y_QxK.shape[0]), float)
    for fraction in fractions:
        result = _solve_in_chunks(y_kept_QxJ, kept_operand, fraction * lmax_Q, lipschitz_const,
                                  init_NxQ, cfg=cfg, n_subsets=kept_n_subsets,
                                  query_chunk=query_chunk)
        pred_HxQ = _operand_matvec(operand, n_subsets, result.coef)[held_H]
        table[fraction] = float(jnp.mean((y_held_HxQ - pred_HxQ) ** 2))
        init_NxQ = result.coef
    best = min(table, key=table.get)
    return best, table
