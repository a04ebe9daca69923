"""Representation similarity: cosine between mean-pooled layer-l activations of query and example.

A cheap, gradient-free baseline (the paper's feature-similarity rows). A training example that
"looks like" the query inside the model is scored as helping it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.attribution import Attribution, ExampleSet
from stride_jax.baselines.base import make_attribution


def _embed_fn(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, *, layer: int) -> jax.Array:
    h = nnx.merge(graphdef, state).trunk(inputs, layer=layer)
    if h.ndim == 3:  # [B, T, D]: mean over positions
        h = h.mean(axis=1)
    return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-8)


_embed = jax.jit(_embed_fn, static_argnames=("graphdef", "layer"))


def embed(model: nnx.Module, inputs: np.ndarray, layer: int, batch_size: int = 128) -> np.ndarray:
    """Unit-norm mean-pooled activations [N, D] at hook point `layer`."""
    if not 0 <= layer <= model.n_layers:
        raise ValueError(f"layer {layer} out of range [0, {model.n_layers}]")
    graphdef, state = nnx.split(model)
    out = [
        np.asarray(_embed(graphdef, state, jnp.asarray(inputs[s : s + batch_size]), layer=layer))
        for s in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(out)


class RepresentationSimilarity:
    name = "repr-sim"

    def __init__(self, layer: int):
        self.layer = layer
        self._train: ExampleSet | None = None
        self._model: nnx.Module | None = None
        self._emb_NxD: np.ndarray | None = None

    def fit(self, model: nnx.Module, train: ExampleSet) -> "RepresentationSimilarity":
        self._model, self._train = model, train
        self._emb_NxD = embed(model, train.inputs, self.layer)
        return self

    def attribute(self, queries: ExampleSet) -> Attribution:
        if self._emb_NxD is None:
            raise RuntimeError("call fit(model, train) first")
        q_QxD = embed(self._model, queries.inputs, self.layer)
        return make_attribution(self._emb_NxD @ q_QxD.T, self._train, queries, self.name)
