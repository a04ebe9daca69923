"""The attributor interface shared by STRIDE and every baseline."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from flax import nnx

from stride_jax.attribution import Attribution, ExampleSet

@runtime_checkable
class Attributor(Protocol):
    """fit (or cache) on the training set once, then score any number of queries."""

    name: str

    def fit(self, model: nnx.Module, train: ExampleSet) -> "Attributor": ...

    def attribute(self, queries: ExampleSet) -> Attribution: ...


def make_attribution(scores_NxQ: np.ndarray, train: ExampleSet, queries: ExampleSet, method: str) -> Attribution:
    """Wrap a score matrix (no recovery diagnostics) as an Attribution."""
    q = scores_NxQ.shape[1]
    return Attribution(
        scores=np.asarray(scores_NxQ, dtype=np.float32),
        train_ids=np.asarray(train.ids),
        query_ids=np.asarray(queries.ids),
        lambdas=np.zeros(q, np.float32),
        n_iter=np.zeros(q, np.int32),
        converged=np.ones(q, bool),
        method=method,
    )
