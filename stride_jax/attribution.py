"""The `Stride` facade and the `Attribution` result.

    stride = Stride(StrideConfig.preset("lm")).fit(model, train, workdir="runs/fit")
    attr = stride.attribute(queries)
    attr.scores            # [N, Q], positive = including the example lowers the query's loss
    attr.top_k(0, k=3)     # most helpful training examples for query 0

Centring (README "Choices the paper leaves open"): by default each operator's mean effect is
measured once at fit time on a fixed sample of the pool (`n_reference` examples, each operator
averaged over the ones outside its subset), so a query's scores depend on that query alone,
whatever else shares the `attribute` call.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from stride_jax import models, recovery, store
from stride_jax.config import StrideConfig, to_dict
from stride_jax.design import Design, left_regular_design
from stride_jax.fit import Fitter
from stride_jax.measure import Measurement, Reference, measure, responses
from stride_jax.recovery import SparseScores

log = logging.getLogger("stride_jax")

SIGN = "positive = including the training example lowers the query's loss (helps it)"


@dataclasses.dataclass
class Attribution:
    """Per-example influence scores for a set of queries (sign: positive = helps the query).

    scores is a dense [N, Q] float32 array or, with `recovery.sparse`, a `SparseScores`
    (memory follows the nonzeros; `dense()` on request). For STRIDE, per query: the l1 penalty,
    the solver's iterations, `converged` (certified: relative duality gap <= tol for the
    working-set solver) and the final relative duality `gap`.
    """

    scores: np.ndarray | SparseScores  # [N, Q]
    train_ids: np.ndarray  # [N]
    query_ids: np.ndarray  # [Q]
    lambdas: np.ndarray | None = None  # [Q] the l1 penalty used per query (STRIDE)
    n_iter: np.ndarray | None = None  # [Q] solver iterations (STRIDE)
    converged: np.ndarray | None = None  # [Q] recovery converged (STRIDE)
    gap: np.ndarray | None = None  # [Q] relative duality gap of the recovered scores (STRIDE)
    method: str = "stride"

    def __post_init__(self) -> None:
        if not isinstance(self.scores, SparseScores):
            self.scores = np.asarray(self.scores, np.float32)
        self.train_ids, self.query_ids = np.asarray(self.train_ids), np.asarray(self.query_ids)
        if tuple(self.scores.shape) != (len(self.train_ids), len(self.query_ids)):
            raise ValueError(f"scores {tuple(self.scores.shape)} do not match {len(self.train_ids)} train ids x "
                             f"{len(self.query_ids)} query ids")

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
        if not 0 <= query < self.n_query:
            raise IndexError(f"query {query} out of range [0, {self.n_query})")
        if self.sparse:
            return self.scores.top_k(query, k, harmful=harmful)
        col = self.scores[:, query]
        order = np.argsort(col if harmful else -col, kind="stable")[:k]
        return [(int(i), float(col[i])) for i in order]

    def save(self, path: str | Path) -> None:
        """Write `scores.npz` (with a digest) and `attribution.json` into directory `path` (no pickle)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {"train_ids": self.train_ids, "query_ids": self.query_ids}
        if self.sparse:
            arrays.update(indptr=self.scores.indptr, rows=self.scores.rows, values=self.scores.values)
        else:
            arrays["scores"] = self.scores
        for name in ("lambdas", "n_iter", "converged", "gap"):
            if getattr(self, name) is not None:
                arrays[name] = np.asarray(getattr(self, name))
        sha = store.save_npz(path / "scores.npz", arrays)
        store.write_json(path / "attribution.json", {"method": self.method, "n_train": self.n_train,
                                                     "n_query": self.n_query, "sparse": self.sparse,
                                                     "sign": SIGN, "sha256": sha})

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
        return cls(method=meta["method"], **arrays)


def _check_pool(model: nnx.Module, train: Any, cfg: StrideConfig) -> None:
    """Every check that needs no compile: the pool fits the model, the design fits the pool."""
    if not isinstance(model, models.HookedModel):
        raise TypeError(f"{type(model).__name__} does not implement the HookedModel protocol "
                        "(n_layers, out_dim, hidden_dim_at, trunk, rest; see docs/interfaces.md)")
    n = len(train)
    if n < 2:
        raise ValueError(f"the training set needs at least 2 examples, got {n}")
    models.check_examples(model.cfg, train)
    cfg.steering.resolve(model.n_layers)
    d = cfg.design
    if n * d.per_example < d.n_subsets:
        raise ValueError(f"design.n_subsets (K={d.n_subsets}) is too large for {n} training examples with "
                         f"design.per_example={d.per_example}: at most n * d = {n * d.per_example} subsets "
                         "can be non-empty")


class Stride:
    """STRIDE: fit K steering operators on subsets of the pool, measure, recover by Lasso."""

    def __init__(self, cfg: StrideConfig | None = None, *, mesh=None):
        """`mesh` (a `jax.sharding.Mesh` with a "subsets" axis) splits measurement over devices."""
        self.cfg = cfg if cfg is not None else StrideConfig()
        self.mesh = mesh
        self.model: nnx.Module | None = None
        self.design: Design | None = None
        self.bank = None
        self.train_ids: np.ndarray | None = None
        self.reference: Reference | None = None  # measured at fit
        self.timings: dict[str, float] = {}

    def fit(self, model: nnx.Module, train: Any, *, workdir: str | Path | None = None,
            progress: bool = True) -> Stride:
        """Draw the design and fit all operators (resuming from `workdir` when it holds this fit).

        The workdir records fingerprints of the model's parameters, the pool's tokens and ids and
        the settings; reusing it with anything else raises `store.IdentityError`.
        """
        _check_pool(model, train, self.cfg)
        d = self.cfg.design
        t0 = time.perf_counter()
        self.design = left_regular_design(len(train), d.n_subsets, d.per_example, d.seed)
        fitter = Fitter(model, train, self.design, self.cfg, workdir=workdir, progress=progress, mesh=self.mesh)
        self.cfg = fitter.cfg  # negative layers resolved
        self.bank = fitter.run(progress=progress)
        self.model = model
        self.train_ids = np.asarray(train.ids)
        self.timings["fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.reference = self._reference(train, self.cfg.measure.n_reference, workdir, progress)
        self.timings["reference"] = time.perf_counter() - t0
        return self

    def _reference(self, train: Any, n_reference: int, workdir: str | Path | None,
                   progress: bool) -> Reference:
        """Operators' effects on a fixed seeded sample of the pool (cached in the workdir); measured
        whatever the centring settings, so `with_config` can switch to fit-time centring."""
        n = len(train)
        rows = np.sort(np.random.default_rng(self.cfg.design.seed + 7).choice(n, size=min(n_reference, n),
                                                                            replace=False))
        member_PxK = np.zeros((len(rows), self.design.n_subsets), bool)
        member_PxK[np.arange(len(rows))[:, None], self.design.ids_NxS[rows]] = True
        path = Path(workdir) / f"reference_{len(rows)}.npz" if workdir is not None else None
        if path is not None and path.exists():
            z = store.load_npz(path)
            if np.array_equal(z["rows"], rows):
                return Reference(Measurement(z["base"], z["steered"]), member_PxK)
        m = measure(self.model, self.bank, train[rows], self.cfg.steering, self.cfg.measure, progress=progress,
                    mesh=self.mesh, desc="measure reference")
        if path is not None:
            store.save_npz(path, {"rows": rows, "base": m.base_loss_Q, "steered": m.steered_loss_QxK})
        return Reference(m, member_PxK)

    def with_config(self, cfg: StrideConfig) -> Stride:
        """A facade sharing this fit under other measurement / recovery settings (no refit)."""
        self._require_fit()
        for section in ("design", "steering", "fit"):
            a, b = to_dict(getattr(self.cfg, section)), to_dict(getattr(cfg, section))
            if section == "steering":
                b = to_dict(cfg.steering.resolve(self.model.n_layers))
            if a != b:
                raise ValueError(f"with_config can change only measure and recovery settings; {section} "
                                 f"differs ({a} vs {b}): fit a new Stride")
        other = Stride(dataclasses.replace(cfg, steering=self.cfg.steering), mesh=self.mesh)
        for name in ("model", "design", "bank", "train_ids", "reference"):
            setattr(other, name, getattr(self, name))
        return other

    def _require_fit(self) -> None:
        if self.bank is None:
            raise RuntimeError("call Stride.fit(model, train) before measuring or attributing")

    def measure(self, queries: Any, *, progress: bool = True) -> Measurement:
        """Base and steered losses of every query (raw, before centring)."""
        self._require_fit()
        return measure(self.model, self.bank, queries, self.cfg.steering, self.cfg.measure, progress=progress,
                       mesh=self.mesh)

    def responses(self, m: Measurement) -> np.ndarray:
        """Centred y [Q, K] for recovery."""
        return responses(m, self.cfg.measure, reference=self.reference)

    def recover(self, y_QxK: np.ndarray, query_ids: np.ndarray | None = None) -> Attribution:
        """Lasso recovery of per-example scores from responses y [Q, K] (`recovery.solver`)."""
        self._require_fit()
        rc = self.cfg.recovery
        lam_max = np.asarray(recovery.lambda_max(y_QxK, self.design))
        frac = rc.lambda_frac
        fista_cfg = dataclasses.replace(rc.fista, nonneg=rc.nonneg)
        if frac == "auto":
            frac, _ = recovery.select_lambda(y_QxK, self.design, fractions=rc.auto_fractions, cfg=fista_cfg)
        lambdas = float(frac) * lam_max
        if rc.solver == "working_set":
            res = recovery.solve_lasso(y_QxK, self.design, lambdas, dataclasses.replace(rc.lasso, nonneg=rc.nonneg),
                                       sparse=rc.sparse)
            rule = f"a relative duality gap <= recovery.lasso.tol={rc.lasso.tol} within {rc.lasso.max_outer} rounds"
        else:
            res = recovery.fista_lasso(y_QxK, self.design, lambdas, fista_cfg)
            rule = f"recovery.fista.max_iter={rc.fista.max_iter} iterations"
        q = y_QxK.shape[0]
        coef = res.coef if isinstance(res.coef, recovery.SparseScores) else np.asarray(res.coef, np.float32)
        attr = Attribution(
            scores=coef, train_ids=self.train_ids,
            query_ids=np.arange(q) if query_ids is None else np.asarray(query_ids),
            lambdas=np.asarray(lambdas, dtype=np.float32).reshape(q), n_iter=np.asarray(res.n_iter).reshape(q),
            converged=np.asarray(res.converged).reshape(q), gap=np.asarray(res.gap, np.float32).reshape(q),
        )
        if attr.n_not_converged:
            worst = float(np.max(attr.gap[~attr.converged]))
            msg = (f"Lasso recovery did not converge ({rule}) for {attr.n_not_converged} of {q} queries "
                   f"(largest relative duality gap {worst:.2e}); their scores are approximate")
            if rc.strict:
                raise RuntimeError(msg)
            log.warning(msg)
        return attr

    def attribute(self, queries: Any, *, progress: bool = True) -> Attribution:
        """Scores [N, Q] for `queries`: measure all operators, centre, recover."""
        t0 = time.perf_counter()
        m = self.measure(queries, progress=progress)
        self.timings["measure"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        attr = self.recover(self.responses(m), queries.ids)
        self.timings["recover"] = time.perf_counter() - t0
        return attr

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)
