"""The random-attribution control: i.i.d. Gaussian scores. Its LDS should straddle 0."""

from __future__ import annotations

import numpy as np
from flax import nnx

from stride_jax.scores import Attribution
from stride_jax.data import Examples
from stride_jax.baselines.base import make_attribution


class RandomAttributor:
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._train: Examples | None = None

    def fit(self, model: nnx.Module, train: Examples) -> "RandomAttributor":
        self._train = train
        return self

    def attribute(self, queries: Examples) -> Attribution:
        if self._train is None:
            raise RuntimeError("call fit(model, train) first")
        rng = np.random.default_rng(self.seed)
        scores = rng.standard_normal((len(self._train.inputs), len(queries.inputs)))
        return make_attribution(scores, self._train, queries, self.name)
