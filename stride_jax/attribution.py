"""The `Stride` facade and the `Attribution` result.

    stride = Stride(StrideConfig()).fit(model, train_examples, workdir="runs/fit")
    attr = stride.attribute(query_examples)
    attr.scores            # [N, Q], positive = including the example lowers the query's loss
    attr.top_k(0, k=3)     # most helpful training examples for query 0
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flax import nnx

from stride_jax import recovery
from stride_jax.config import StrideConfig, to_dict
from stride_jax.design import Design, left_regular_design
from stride_jax.fit import Fitter
from stride_jax.measure import Measurement, measure, responses
from stride_jax.steering import OperatorBank

# Below this many queries each operator's mean effect is estimated on reference pool examples.
MIN_QUERIES_FOR_CENTRING = 32


class ExampleSet(Protocol):
    inputs: np.ndarray
    targets: np.ndarray
    ids: np.ndarray


@dataclasses.dataclass
class Attribution:
    """Per-example influence scores for a set of queries (sign: positive = helps the query)."""

    scores: np.ndarray  # [N, Q]
    train_ids: np.ndarray  # [N]
    query_ids: np.ndarray  # [Q]
    lambdas: np.ndarray  # [Q] the l1 penalty used per query
    n_iter: np.ndarray  # [Q] FISTA iterations
    converged: np.ndarray  # [Q]
    method: str = "stride"

    @property
    def n_train(self) -> int:
        return self.scores.shape[0]

    @property
    def n_query(self) -> int:
        return self.scores.shape[1]

    def top_k(self, query: int, k: int = 10, *, harmful: bool = False) -> list[tuple[int, float]]:
        """The k most helpful (or harmful) training examples for one query: (row index, score)."""
        if not 0 <= query < self.n_query:
            raise IndexError(f"query {query} out of range [0, {self.n_query})")
        col = self.scores[:, query]
        order = np.argsort(col if harmful else -col, kind="stable")[:k]
        return [(int(i), float(col[i])) for i in order]

    def save(self, path: str | Path) -> None:
        """Write `scores.npz` and `attribution.json` into directory `path` (no pickle)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path / "scores.npz", scores=self.scores, train_ids=self.train_ids, query_ids=self.query_ids,
            lambdas=self.lambdas, n_iter=self.n_iter, converged=self.converged,
        )
        (path / "attribution.json").write_text(
            json.dumps({"method": self.method, "n_train": self.n_train, "n_query": self.n_query,
                        "sign": "positive = including the example lowers the query loss"}, indent=2)
        )

    @classmethod
    def load(cls, path: str | Path) -> "Attribution":
        path = Path(path)
        try:
            meta = json.loads((path / "attribution.json").read_text())
            with np.load(path / "scores.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read attribution from {path}: {e}") from e
        if arrays["scores"].shape != (meta["n_train"], meta["n_query"]):
            raise ValueError(f"attribution in {path} is corrupted: scores shape {arrays['scores'].shape}")
        return cls(method=meta["method"], **arrays)


class Stride:
    """STRIDE: fit K steering operators on subsets of the pool, measure, recover by Lasso."""

    def __init__(self, cfg: StrideConfig = StrideConfig(), *, mesh=None):
        """`mesh` (a `jax.sharding.Mesh` with a "subsets" axis) splits measurement over devices."""
        self.cfg = cfg
        self.mesh = mesh
        self.model: nnx.Module | None = None
        self.design: Design | None = None
        self.bank: OperatorBank | None = None
        self.train_ids: np.ndarray | None = None
        self.reference: Measurement | None = None
        self.timings: dict[str, float] = {}

    def fit(
        self,
        model: nnx.Module,
        train: ExampleSet,
        *,
        workdir: str | Path | None = None,
        fingerprint: dict[str, Any] | None = None,
        progress: bool = True,
        n_reference: int = 64,
    ) -> "Stride":
        """Draw the design and fit all operators (resuming from `workdir` when it holds a fit)."""
        import time

        n = len(train.inputs)
        if n < 2:
            raise ValueError(f"need at least 2 training examples, got {n}")
        d = self.cfg.design
        t0 = time.perf_counter()
        self.design = left_regular_design(n, d.n_subsets, d.per_example, d.seed)
        fitter = Fitter(model, train.inputs, train.targets, self.design, self.cfg, workdir=workdir,
                        fingerprint=fingerprint)
        self.bank = fitter.run(progress=progress)
        self.model = model
        self.train_ids = np.asarray(train.ids)
        self.timings["fit"] = time.perf_counter() - t0
        # Reference pool examples for estimating each operator's query-independent effect.
        rng = np.random.default_rng(d.seed + 7)
        ref = np.sort(rng.choice(n, size=min(n_reference, n), replace=False))
        self.reference = measure(model, self.bank, train.inputs[ref], train.targets[ref],
                                 self.cfg.steering, self.cfg.measure, progress=False)
        return self

    def _require_fit(self) -> None:
        if self.bank is None:
            raise RuntimeError("call Stride.fit(model, train) before measuring or attributing")

    def measure(self, queries: ExampleSet, *, progress: bool = True) -> Measurement:
        """Base and steered losses of every query (raw, before centring)."""
        self._require_fit()
        return measure(self.model, self.bank, queries.inputs, queries.targets, self.cfg.steering,
                       self.cfg.measure, progress=progress, mesh=self.mesh)

    def responses(self, m: Measurement) -> np.ndarray:
        """Centred y [Q, K] for recovery."""
        few = m.base_loss_Q.shape[0] < MIN_QUERIES_FOR_CENTRING
        return responses(m, self.cfg.measure, reference=self.reference if few else None)

    def recover(self, y_QxK: np.ndarray, query_ids: np.ndarray | None = None) -> Attribution:
        """Lasso recovery of per-example scores from responses y [Q, K]."""
        self._require_fit()
        rc = self.cfg.recovery
        lam_max = np.asarray(recovery.lambda_max(y_QxK, self.design))
        frac = rc.lambda_frac
        if frac == "auto":
            frac, _ = recovery.select_lambda(y_QxK, self.design, fractions=rc.auto_fractions, cfg=rc.fista)
        lambdas = float(frac) * lam_max
        res = recovery.fista_lasso(y_QxK, self.design, lambdas, rc.fista)
        q = y_QxK.shape[0]
        return Attribution(
            scores=np.asarray(res.coef, dtype=np.float32),
            train_ids=self.train_ids,
            query_ids=np.arange(q) if query_ids is None else np.asarray(query_ids),
            lambdas=np.asarray(lambdas, dtype=np.float32).reshape(q),
            n_iter=np.asarray(res.n_iter).reshape(q),
            converged=np.asarray(res.converged).reshape(q),
        )

    def attribute(self, queries: ExampleSet, *, progress: bool = True) -> Attribution:
        """Scores [N, Q] for `queries`: measure all operators, centre, recover."""
        import time

        t0 = time.perf_counter()
        m = self.measure(queries, progress=progress)
        self.timings["measure"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        attr = self.recover(self.responses(m), queries.ids)
        self.timings["recover"] = time.perf_counter() - t0
        return attr

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)
