"""Result types of every attribution method: `Attribution` (dense or sparse [N, Q] scores with
per-query solver diagnostics, confidence and the fit's identity) and `SparseScores` (scores stored
by query, memory following the nonzeros).

A low module of one job: numpy and the store only, so baselines, LDS and reports use the result
types without importing the STRIDE facade or the solver.
"""

from __future__ import annotations

import dataclasses
import pathlib
from pathlib import Path
from typing import Any

import numpy as np

from stride_jax import store


@dataclasses.dataclass(frozen=True, eq=False)
class SparseScores:
    """Scores [N, Q] stored by query (CSR over queries): memory follows the nonzeros.

    Query q's nonzero rows are rows[indptr[q]:indptr[q+1]] (sorted, distinct) with values
    values[indptr[q]:indptr[q+1]]; every other row scores 0. Sign as everywhere in stride_jax:
    positive = including the example lowers the query's loss.
    """

    indptr: np.ndarray  # [Q + 1] int64
    rows: np.ndarray  # [nnz] int32 (int64 when N >= 2^31)
    values: np.ndarray  # [nnz] float32
    n_rows: int  # N

    def __post_init__(self):
        indptr = np.asarray(self.indptr, dtype=np.int64)
        n_rows = int(self.n_rows)
        rows = np.asarray(self.rows).astype(np.int32 if n_rows < 2**31 else np.int64, copy=False)
        values = np.asarray(self.values, dtype=np.float32)
        if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0 or (np.diff(indptr) < 0).any():
            raise ValueError("indptr must be [Q + 1], start at 0 and be non-decreasing")
        if rows.shape != (indptr[-1],) or values.shape != rows.shape:
            raise ValueError(
                f"rows {rows.shape} and values {values.shape} must both be [nnz = indptr[-1] = "
                f"{indptr[-1]}]"
            )
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError(f"rows must lie in [0, n_rows={n_rows}), got [{rows.min()}, {rows.max()}]")
        step = np.diff(rows.astype(np.int64))
        starts = indptr[1:-1][(indptr[1:-1] > 0) & (indptr[1:-1] < rows.size)]
        within = np.ones(step.size, bool)
        within[starts - 1] = False  # a query's first row may be below the previous query's last
        if (step[within] <= 0).any():
            raise ValueError("rows must be sorted and distinct within each query")
        for name, value in (("indptr", indptr), ("rows", rows), ("values", values)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "n_rows", n_rows)

    @property
    def n_queries(self) -> int:
        return self.indptr.size - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_queries)

    @property
    def nnz(self) -> int:
        return int(self.rows.size)

    @classmethod
    def from_dense(cls, scores_NxQ: np.ndarray) -> SparseScores:
        """The nonzeros of a dense [N, Q] array."""
        scores_NxQ = np.asarray(scores_NxQ)
        if scores_NxQ.ndim != 2:
            raise ValueError(f"scores must be [N, Q], got shape {scores_NxQ.shape}")
        q_idx, rows = np.nonzero(scores_NxQ.T)
        indptr = np.zeros(scores_NxQ.shape[1] + 1, np.int64)
        np.cumsum(np.bincount(q_idx, minlength=scores_NxQ.shape[1]), out=indptr[1:])
        return cls(indptr, rows, scores_NxQ[rows, q_idx], scores_NxQ.shape[0])

    def query_of_entries(self) -> np.ndarray:
        """[nnz] the query (column) of each stored entry."""
        return np.repeat(np.arange(self.n_queries), np.diff(self.indptr))

    def to_dense(self) -> np.ndarray:
        """Dense [N, Q] float32 (N x Q x 4 bytes: at scale, prefer the sparse methods)."""
        out = np.zeros(self.shape, np.float32)
        out[self.rows, self.query_of_entries()] = self.values
        return out

    def entries(self, q: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, values) of query q's nonzeros."""
        if not 0 <= q < self.n_queries:
            raise IndexError(f"query {q} out of range [0, {self.n_queries})")
        lo, hi = self.indptr[q], self.indptr[q + 1]
        return self.rows[lo:hi], self.values[lo:hi]

    def column(self, q: int) -> np.ndarray:
        """Query q's scores as a dense [N] float32 vector."""
        rows, values = self.entries(q)
        out = np.zeros(self.n_rows, np.float32)
        out[rows] = values
        return out

    def top_k(self, q: int, k: int = 10, *, harmful: bool = False) -> list[tuple[int, float]]:
        """The k most helpful (most harmful with harmful=True) examples for query q: (row, score).

        Same order as a stable argsort of the dense column (ties, zeros among them, by row),
        without building it.
        """
        rows, values = self.entries(q)
        signed = -values if harmful else values
        first = np.lexsort((rows, -signed))  # by signed score descending, then by row
        pos, neg = first[signed[first] > 0], first[signed[first] < 0]
        picked = [(int(rows[i]), float(values[i])) for i in pos[:k]]
        if len(picked) < k:  # zeros next, by row: unstored rows and stored zeros alike
            stored_nonzero = rows[values != 0]
            candidates = np.arange(min(self.n_rows, k + stored_nonzero.size))
            zero_rows = candidates[~np.isin(candidates, stored_nonzero)][:k - len(picked)]
            picked += [(int(i), 0.0) for i in zero_rows]
        picked += [(int(rows[i]), float(values[i])) for i in neg[:k - len(picked)]]
        return picked

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write `<path>.npz` (no pickle). Returns the path written."""
        path = pathlib.Path(path).with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, format=np.asarray("stride_jax.SparseScores/1"), indptr=self.indptr,
                 rows=self.rows, values=self.values, n_rows=np.int64(self.n_rows))
        return path

    @classmethod
    def load(cls, path: str | pathlib.Path) -> SparseScores:
        """Read scores written by `save` (allow_pickle=False; checked like a new instance)."""
        path = pathlib.Path(path).with_suffix(".npz")
        with np.load(path, allow_pickle=False) as data:
            if "format" not in data.files or str(data["format"]) != "stride_jax.SparseScores/1":
                raise ValueError(f"{path} is not a SparseScores file (no matching 'format' entry)")
            return cls(data["indptr"], data["rows"], data["values"], int(data["n_rows"]))


SIGN = "positive = including the training example lowers the query's loss (helps it)"


@dataclasses.dataclass
class Attribution:
    """Per-example influence scores for a set of queries (sign: positive = helps the query).

    scores is a dense [N, Q] float32 array or, with `recovery.sparse`, a `SparseScores`
    (memory follows the nonzeros; `dense()` on request). For STRIDE, per query: the l1 penalty,
    the solver's iterations, `converged` (certified: relative duality gap <= tol for the
    working-set solver) and the final relative duality `gap`.

    Confidence (`confidence.attach`; all three arrays or none), per query q, for the full
    solve's top-k helpful (kind 0, by descending score) and harmful (kind 1, by ascending score)
    rows: `confidence_rows[q, kind, j]` the row index into the pool, `stability[q, kind, j]` the
    fraction of resampled solves that keep it in their own top-k of that kind, and
    `interval[q, kind, j]` the (low, high) percentile interval of its score over those solves;
    `confidence_info` the settings and cost (n_boot, fraction, level, seed, seconds).
    `fit_identity` (a digest or dict, optional) names the fit the scores came from; both are
    written to attribution.json.
    """

    scores: np.ndarray | SparseScores  # [N, Q]
    train_ids: np.ndarray  # [N]
    query_ids: np.ndarray  # [Q]
    lambdas: np.ndarray | None = None  # [Q] the l1 penalty used per query (STRIDE)
    n_iter: np.ndarray | None = None  # [Q] solver iterations (STRIDE)
    converged: np.ndarray | None = None  # [Q] recovery converged (STRIDE)
    gap: np.ndarray | None = None  # [Q] relative duality gap of the recovered scores (STRIDE)
    method: str = "stride"
    confidence_rows: np.ndarray | None = None  # [Q, 2, k] row indices (kind 0 helpful, 1 harmful)
    stability: np.ndarray | None = None  # [Q, 2, k] in [0, 1]
    interval: np.ndarray | None = None  # [Q, 2, k, 2] (low, high) score percentiles
    confidence_info: dict[str, Any] | None = None  # n_boot, fraction, level, seed, seconds
    fit_identity: str | dict[str, Any] | None = None  # the fit's identity digest (or dict)

    def __post_init__(self) -> None:
        if not isinstance(self.scores, SparseScores):
            self.scores = np.asarray(self.scores, np.float32)
        self.train_ids, self.query_ids = np.asarray(self.train_ids), np.asarray(self.query_ids)
        if tuple(self.scores.shape) != (len(self.train_ids), len(self.query_ids)):
            raise ValueError(f"scores {tuple(self.scores.shape)} do not match {len(self.train_ids)} train ids x "
                             f"{len(self.query_ids)} query ids")
        self._check_confidence()
        if self.fit_identity is not None and not isinstance(self.fit_identity, (str, dict)):
            raise TypeError(f"fit_identity must be a digest string or a dict, got {type(self.fit_identity).__name__}")

    def _check_confidence(self) -> None:
        given = [x is not None for x in (self.confidence_rows, self.stability, self.interval)]
        if not any(given):
            return
        if not all(given):
            raise ValueError("confidence_rows, stability and interval come together (confidence.attach sets all)")
        self.confidence_rows = np.asarray(self.confidence_rows, np.int64)
        self.stability = np.asarray(self.stability, np.float32)
        self.interval = np.asarray(self.interval, np.float32)
        shape = self.confidence_rows.shape
        if len(shape) != 3 or shape[:2] != (self.n_query, 2):
            raise ValueError(f"confidence_rows must be [Q={self.n_query}, 2, k], got {shape}")
        if self.stability.shape != shape or self.interval.shape != (*shape, 2):
            raise ValueError(f"stability {self.stability.shape} and interval {self.interval.shape} must be {shape} "
                             f"and {(*shape, 2)} (the shape of confidence_rows)")
        rows = self.confidence_rows
        if rows.size and not 0 <= rows.min() <= rows.max() < self.n_train:
            raise ValueError(f"confidence_rows must index the {self.n_train} training rows")

    @property
    def n_train(self) -> int:
        return self.scores.shape[0]

    @property
    def n_query(self) -> int:
        return self.scores.shape[1]

    @property
    def sparse(self) -> bool:
        return isinstance(self.scores, SparseScores)

    @property
    def n_not_converged(self) -> int:
        return 0 if self.converged is None else int((~np.asarray(self.converged, bool)).sum())

    def dense(self) -> np.ndarray:
        """Scores as a dense [N, Q] float32 array (N x Q x 4 bytes)."""
        return self.scores.to_dense() if self.sparse else self.scores

    def column(self, query: int) -> np.ndarray:
        """One query's scores, dense [N]."""
        if not 0 <= query < self.n_query:
            raise IndexError(f"query {query} out of range [0, {self.n_query})")
        return self.scores.column(query) if self.sparse else self.scores[:, query]

    def top_k(self, query: int, k: int = 10, *, harmful: bool = False) -> list[tuple[int, float]]:
        """The k most helpful (or harmful) training examples for one query: (row index, score)."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"top_k: k (examples per query) must be an integer >= 1, got {k!r}")
        if not 0 <= query < self.n_query:
            raise IndexError(f"query {query} out of range [0, {self.n_query})")
        if self.sparse:
            return self.scores.top_k(query, k, harmful=harmful)
        col = self.scores[:, query]
        order = np.argsort(col if harmful else -col, kind="stable")[:k]
        return [(int(i), float(col[i])) for i in order]

    def confidence_of(self, query: int, row: int, *, harmful: bool = False) -> tuple[float, float, float] | None:
        """(stability, low, high) of training row `row` among query `query`'s top-k helpful (or
        harmful) entries, or None when it is not one of them or no confidence was computed."""
        if self.confidence_rows is None:
            return None
        if not 0 <= query < self.n_query:
            raise IndexError(f"query {query} out of range [0, {self.n_query})")
        kind = int(harmful)
        hits = np.flatnonzero(self.confidence_rows[query, kind] == row)
        if not hits.size:
            return None
        j = int(hits[0])
        lo, hi = self.interval[query, kind, j]
        return float(self.stability[query, kind, j]), float(lo), float(hi)

    def save(self, path: str | Path) -> None:
        """Write `scores.npz` (with a digest) and `attribution.json` into directory `path` (no pickle)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {"train_ids": self.train_ids, "query_ids": self.query_ids}
        if self.sparse:
            arrays.update(indptr=self.scores.indptr, rows=self.scores.rows, values=self.scores.values)
        else:
            arrays["scores"] = self.scores
        for name in ("lambdas", "n_iter", "converged", "gap", "confidence_rows", "stability", "interval"):
            if getattr(self, name) is not None:
                arrays[name] = np.asarray(getattr(self, name))
        sha = store.save_npz(path / "scores.npz", arrays)
        meta = {"method": self.method, "n_train": self.n_train, "n_query": self.n_query, "sparse": self.sparse,
                "sign": SIGN, "sha256": sha}
        for name in ("confidence_info", "fit_identity"):
            if getattr(self, name) is not None:
                meta[name] = getattr(self, name)
        store.write_json(path / "attribution.json", meta)

    @classmethod
    def load(cls, path: str | Path) -> Attribution:
        path = Path(path)
        try:
            meta = store.read_json(path / "attribution.json")
            arrays = store.load_npz(path / "scores.npz")
            if meta.get("sparse", False):
                arrays["scores"] = SparseScores(arrays.pop("indptr"), arrays.pop("rows"), arrays.pop("values"),
                                                meta["n_train"])
            shape = tuple(arrays["scores"].shape)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read attribution from {path}: {e}") from e
        if shape != (meta["n_train"], meta["n_query"]):
            raise ValueError(f"attribution in {path} is corrupted: scores shape {shape}")
        return cls(method=meta["method"], confidence_info=meta.get("confidence_info"),
                   fit_identity=meta.get("fit_identity"), **arrays)


__all__ = ["SIGN", "Attribution", "SparseScores"]
