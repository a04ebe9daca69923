"""Baseline attributors behind one interface: `fit(model, train)` then `attribute(queries)`.

Every method returns an `Attribution` with scores [N, Q] under the project's sign convention
(positive = including the training example lowers the query's loss), so STRIDE and every
baseline go through the same LDS code.
"""

from stride_jax.baselines.base import Attributor
from stride_jax.baselines.random import RandomAttributor
from stride_jax.baselines.similarity import RepresentationSimilarity

__all__ = ["Attributor", "RandomAttributor", "RepresentationSimilarity"]
