"""Subset designs: which of the K training subsets each training example belongs to.

The membership matrix M in {0,1}^{K x N} is stored sparsely as `ids_NxS`: row i lists the S
distinct subsets holding example i (the paper's left-d-regular design, d = S). M is never
materialised densely except by `Design.dense()`, which is for tests on small designs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_DENSE_LIMIT = 50_000_000  # K * N entries above which `Design.dense()` refuses
_BLOCK_ELEMENTS = 1 << 22  # bound on per-block temporaries when drawing designs


def design_matvec(ids_NxS: jax.Array, n_subsets: int, w: jax.Array) -> jax.Array:
    """M w for w of shape [N] or [N, Q] -> [K] or [K, Q], by segment sums (never dense).

    Pure and jit/vmap-able with `n_subsets` static. One segment sum per membership column s
    (S is small and static): summing over the flattened [N * S] ids instead would materialise
    w repeated S times, an [N * S, Q] temporary, and measured several times slower on CPU.
    Ids must lie in [0, n_subsets] (`Design` checks this); an id equal to `n_subsets` means
    "no subset": it lands in a spare row that is dropped.
    """
    w = jnp.asarray(w)
    out = jnp.zeros((n_subsets + 1,) + w.shape[1:], w.dtype)
    for s in range(ids_NxS.shape[1]):
        out = out + jax.ops.segment_sum(
            w, ids_NxS[:, s], num_segments=n_subsets + 1, mode="promise_in_bounds"
        )
    return out[:n_subsets]


def design_rmatvec(ids_NxS: jax.Array, r: jax.Array) -> jax.Array:
    """M^T r for r of shape [K] or [K, Q] -> [N] or [N, Q]: sum over s of r[ids_NxS[:, s]].

    Pure and jit/vmap-able. An id equal to K (= len(r)) means "no subset" and reads a zero.
    """
    r = jnp.asarray(r)
    r = jnp.concatenate([r, jnp.zeros((1,) + r.shape[1:], r.dtype)])  # the spare zero row
    out = jnp.take(r, ids_NxS[:, 0], axis=0, mode="clip")
    for s in range(1, ids_NxS.shape[1]):
        out = out + jnp.take(r, ids_NxS[:, s], axis=0, mode="clip")
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Design:
    """Sparse membership of N examples in K subsets: `ids_NxS[i]` are the S subsets of example i."""

    ids_NxS: np.ndarray
    n_subsets: int
    seed: int | None = None

    def __post_init__(self):
        ids = np.asarray(self.ids_NxS)
        if ids.ndim != 2:
            raise ValueError(f"ids_NxS must be 2-D [N, S], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids_NxS must be integer, got dtype {ids.dtype}")
        n_subsets = int(self.n_subsets)
        if n_subsets < 1:
            raise ValueError(f"n_subsets (K={n_subsets}) must be >= 1")
        n, per_example = ids.shape
        if per_example > n_subsets:
            raise ValueError(f"per_example (S={per_example}) must be <= n_subsets (K={n_subsets})")
        if ids.size and (ids.min() < 0 or ids.max() >= n_subsets):
            raise ValueError(
                    f"subset ids must lie in [0, {n_subsets}), got range [{ids.min()}, {ids.max()}]"
            )
        if per_example > 1:
            sorted_NxS = np.sort(ids, axis=1)
            dup_rows = np.flatnonzero((sorted_NxS[:, 1:] == sorted_NxS[:, :-1]).any(axis=1))
            if dup_rows.size:
                raise ValueError(
                        f"{dup_rows.size} examples list a subset twice (first: example {dup_rows[0]}: "
                        f"{ids[dup_rows[0]].tolist()}); ids per example must be distinct"
                )
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        ids.setflags(write=False)
        object.__setattr__(self, "ids_NxS", ids)
        object.__setattr__(self, "n_subsets", n_subsets)

    @property
    def n_examples(self) -> int:
        return self.ids_NxS.shape[0]

    @property
    def per_example(self) -> int:
        return self.ids_NxS.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (K, N) of the membership matrix M."""
        return (self.n_subsets, self.n_examples)

    def _memo(self, key, compute):
        """Cache `compute()` on this (immutable) design under `key`."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def subset_sizes(self) -> np.ndarray:
        """[K] number of examples in each subset (cached)."""
        sizes = self._memo("subset_sizes", lambda: np.bincount(
            self.ids_NxS.reshape(-1), minlength=self.n_subsets))
        return sizes.copy()

    def check_nonempty(self) -> None:
        """Raise if some example is in no subset (an empty column of M) or a subset is empty."""
        if self.per_example == 0:
            raise ValueError(
                f"design has per_example S=0: all {self.n_examples} examples are in no subset "
                "(empty columns of M); each example needs at least one subset"
            )
        empty = np.flatnonzero(self.subset_sizes() == 0)
        if empty.size:
            raise ValueError(
                f"design has {empty.size} empty subsets (rows of M with no member; first: subset "
                f"{empty[0]}): their responses cannot be explained by any example; drop them"
            )

    def lipschitz(self) -> float:
        """L >= ||M||_2^2 = lambda_max(M M^T), the FISTA step 1/L: computed once, then cached.

        Collatz-Wielandt: for the nonnegative symmetric A = M M^T [K, K] and any u > 0,
        lambda_max(A) <= max_k (A u)_k / u_k, an upper bound however far u is from the top
        eigenvector. Power steps u <- A u from u = M 1 (the subset sizes) tighten it; the
        Rayleigh quotient u^T A u / u^T u bounds lambda_max from below, and the steps stop once
        the two agree to 1e-4 (or after 100 steps). In float64, blocked over examples: memory is
        O(block * S), never N x K; one step costs two passes over the ids.
        """
        return self._memo("lipschitz", self._collatz_wielandt)

    def _collatz_wielandt(self, rel_tol: float = 1e-4, max_steps: int = 100) -> float:
        self.check_nonempty()
        block = max(1, _BLOCK_ELEMENTS // self.per_example)

        def gram(u_K):  # M M^T u in float64
            out_K = np.zeros(self.n_subsets)
            for lo in range(0, self.n_examples, block):
                ids = self.ids_NxS[lo:lo + block]
                v_B = u_K[ids].sum(axis=1)
                out_K += np.bincount(ids.reshape(-1), weights=np.repeat(v_B, self.per_example),
                                     minlength=self.n_subsets)
            return out_K

        u_K = self.subset_sizes().astype(np.float64)
        u_K /= np.linalg.norm(u_K)
        upper = np.inf
        for _ in range(max_steps):
            au_K = gram(u_K)
            upper = min(upper, float((au_K / u_K).max()))
            lower = float(u_K @ au_K)  # u has unit norm
            if upper - lower <= rel_tol * upper:
                break
            u_K = au_K / np.linalg.norm(au_K)
        return upper * (1.0 + 1e-6)  # covers float64 rounding in the sums

    def blocked_ids(self, block: int) -> jax.Array:
        """ids as a device array [B, block, S], padded with id K ("no subset"), cached per block.

        At least one padding row is appended, so row N always exists and is an empty column:
        the working-set solver uses it as its "no column" sentinel.
        """
        def build():
            n_blocks = self.n_examples // block + 1
            padded = np.full((n_blocks * block, self.per_example), self.n_subsets, np.int32)
            padded[:self.n_examples] = self.ids_NxS
            return jnp.asarray(padded.reshape(n_blocks, block, self.per_example))

        return self._memo(("blocked_ids", int(block)), build)

    def inverse(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR of M: (indptr_K1 [K+1], indices) so subset k holds indices[indptr[k]:indptr[k+1]]."""
        flat_ids = self.ids_NxS.reshape(-1)
        order = np.argsort(flat_ids, kind="stable")
        indices = (order // self.per_example).astype(np.int64)
        indptr_K1 = np.zeros(self.n_subsets + 1, dtype=np.int64)
        np.cumsum(self.subset_sizes(), out=indptr_K1[1:])
        return indptr_K1, indices

    def members(self, k: int) -> np.ndarray:
        """Sorted example indices of subset k."""
        if not 0 <= k < self.n_subsets:
            raise IndexError(f"subset {k} out of range [0, {self.n_subsets})")
        return np.flatnonzero((self.ids_NxS == k).any(axis=1))

    def dense(self) -> np.ndarray:
        """Dense M [K, N] as float32. Tests and small designs only."""
        n_entries = self.n_subsets * self.n_examples
        if n_entries > _DENSE_LIMIT:
            raise ValueError(
                    f"refusing to densify a {self.n_subsets} x {self.n_examples} design "
                    f"({n_entries:.3g} > {_DENSE_LIMIT:.0e} entries); use matvec/rmatvec"
            )
        m_KxN = np.zeros((self.n_subsets, self.n_examples), dtype=np.float32)
        rows_NxS = np.broadcast_to(np.arange(self.n_examples)[:, None], self.ids_NxS.shape)
        m_KxN[self.ids_NxS, rows_NxS] = 1.0
        return m_KxN

    def matvec(self, w: jax.Array) -> jax.Array:
        """M w: [N] or [N, Q] -> [K] or [K, Q]."""
        return design_matvec(jnp.asarray(self.ids_NxS), self.n_subsets, w)

    def rmatvec(self, r: jax.Array) -> jax.Array:
        """M^T r: [K] or [K, Q] -> [N] or [N, Q]."""
        return design_rmatvec(jnp.asarray(self.ids_NxS), r)

    def fingerprint(self) -> str:
        """sha256 over (K, S, ids bytes): equal fingerprints mean the same design."""
        digest = hashlib.sha256()
        digest.update(np.asarray([self.n_subsets, self.per_example], dtype=np.int64).tobytes())
        digest.update(self.ids_NxS.tobytes())
        return digest.hexdigest()

    def summary(self) -> dict:
        """Sizes at a glance: n, K, d, min/mean/max subset size, number of empty subsets."""
        sizes = self.subset_sizes()
        return {
                "n": self.n_examples,
                "K": self.n_subsets,
                "d": self.per_example,
                "seed": self.seed,
                "min_subset_size": int(sizes.min()),
                "mean_subset_size": float(sizes.mean()),
                "max_subset_size": int(sizes.max()),
                "n_empty_subsets": int((sizes == 0).sum()),
        }

    def metadata(self) -> dict:
        """JSON-able description used by `save` and checked by `load`."""
        return {
                "n": self.n_examples,
                "K": self.n_subsets,
                "S": self.per_example,
                "seed": self.seed,
                "fingerprint": self.fingerprint(),
        }

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write `<path>.npz` (ids) and `<path>.json` (metadata). Returns the npz path."""
        npz_path = pathlib.Path(path).with_suffix(".npz")
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz_path, ids_NxS=self.ids_NxS, n_subsets=np.int64(self.n_subsets))
        npz_path.with_suffix(".json").write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return npz_path

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Design:
        """Read a design written by `save`, checking it against its metadata."""
        npz_path = pathlib.Path(path).with_suffix(".npz")
        meta = json.loads(npz_path.with_suffix(".json").read_text())
        with np.load(npz_path, allow_pickle=False) as data:
            design = cls(data["ids_NxS"], int(data["n_subsets"]), seed=meta.get("seed"))
        found = design.metadata()
        for key in ("n", "K", "S", "fingerprint"):
            if found[key] != meta[key]:
                raise ValueError(
                        f"design at {npz_path} does not match its metadata: {key} is {found[key]!r} "
                        f"in the npz, {meta[key]!r} in the json"
                )
        return design


def _floyd_sample(rng: np.random.Generator, n_rows: int, n_items: int, size: int) -> np.ndarray:
    """[n_rows, size] sorted rows, each a uniform random `size`-subset of range(n_items).

    Robert Floyd's algorithm, vectorised over rows: step j draws t in [0, j] and takes t unless
    the row already holds it, in which case it takes j (which it cannot hold yet).
    """
    out = np.empty((n_rows, size), dtype=np.int32)
    for col, j in enumerate(range(n_items - size, n_items)):
        t = rng.integers(0, j + 1, size=n_rows, dtype=np.int64).astype(np.int32)
        taken = (out[:, :col] == t[:, None]).any(axis=1)
        out[:, col] = np.where(taken, j, t)
    out.sort(axis=1)
    return out


def _fill_empty_subsets(ids_NxS: np.ndarray, n_subsets: int, rng: np.random.Generator) -> None:
    """Give every empty subset a member, in place, by moving one membership out of the largest.

    Each move keeps the example's S ids distinct (the empty subset cannot be among them) and the
    donor subset non-empty (it is the largest, holding at least 2 examples when one is empty).
    """
    sizes = np.bincount(ids_NxS.reshape(-1), minlength=n_subsets)
    for k in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        rows, cols = np.nonzero(ids_NxS == donor)
        pick = int(rng.integers(rows.size))
        ids_NxS[rows[pick], cols[pick]] = k
        sizes[donor] -= 1
        sizes[k] += 1
    ids_NxS.sort(axis=1)


def _integer(value: Any, name: str) -> int:
    """`value` as an int: integers (Python or numpy) and integral floats; anything else raises."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def left_regular_design(n: int, n_subsets: int, per_example: int, seed: int) -> Design:
    """Each of n examples joins `per_example` (d) distinct subsets of K, uniformly at random.

    This is the paper's left-d-regular bipartite design (an expander with high probability).
    Deterministic in `seed`. Memory is O(n d): rows are drawn in blocks, never as an n x K
    matrix. If some subset ends up empty (only when n d is not much larger than K), memberships
    are moved into it from the largest subsets, deterministically in `seed`.
    """
    n, n_subsets, per_example = _integer(n, "n"), _integer(n_subsets, "n_subsets"), _integer(per_example, "per_example")
    seed = _integer(seed, "seed")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if n < 1:
        raise ValueError(f"n (number of examples) must be >= 1, got {n}")
    if n_subsets < 1:
        raise ValueError(f"n_subsets (K={n_subsets}) must be >= 1")
    if not 1 <= per_example <= n_subsets:
        raise ValueError(
                f"per_example (d={per_example}) must be >= 1 and <= n_subsets (K={n_subsets})"
        )
    if n * per_example < n_subsets:
        raise ValueError(
                f"n * per_example = {n} * {per_example} = {n * per_example} memberships cannot fill "
                f"n_subsets (K={n_subsets}): some subsets would be empty; lower K or raise d"
        )
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // per_example)
    ids_NxS = np.concatenate([
            _floyd_sample(rng, min(block, n - start), n_subsets, per_example)
            for start in range(0, n, block)
    ])
    _fill_empty_subsets(ids_NxS, n_subsets, rng)
    return Design(ids_NxS, n_subsets, seed=int(seed))


def alpha_subsets(n: int, m: int, alpha: float, seed: int) -> np.ndarray:
    """[m, round(alpha n)] sorted index lists, each round(alpha n) distinct examples of range(n).

    These are the LDS evaluation subsets; draw them with a seed independent of the design's.
    """
    n, m, alpha = _integer(n, "n"), _integer(m, "m"), float(alpha)
    if n < 1 or m < 1:
        raise ValueError(f"n and m must be >= 1, got n={n}, m={m}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    size = int(round(alpha * n))
    if size < 1:
        raise ValueError(f"round(alpha * n) = round({alpha} * {n}) = 0: subsets would be empty")
    rng = np.random.default_rng(seed)
    idx_MxNs = np.stack([rng.choice(n, size=size, replace=False, shuffle=False) for _ in range(m)])
    idx_MxNs.sort(axis=1)
    return idx_MxNs.astype(np.int64)


def indices_to_mask(idx_MxNs: np.ndarray, n: int) -> np.ndarray:
    """Boolean membership mask [m, n] from index lists [m, Ns]."""
    idx_MxNs = np.asarray(idx_MxNs)
    if idx_MxNs.ndim != 2:
        raise ValueError(f"idx_MxNs must be 2-D [M, Ns], got shape {idx_MxNs.shape}")
    if idx_MxNs.size and (idx_MxNs.min() < 0 or idx_MxNs.max() >= n):
        raise ValueError(
                f"indices must lie in [0, {n}), got range [{idx_MxNs.min()}, {idx_MxNs.max()}]"
        )
    mask_MxN = np.zeros((idx_MxNs.shape[0], n), dtype=bool)
    mask_MxN[np.arange(idx_MxNs.shape[0])[:, None], idx_MxNs] = True
    return mask_MxN
