"""Representation similarity: cosine between mean-pooled layer-l activations of query and example.

A cheap, gradient-free baseline (the paper's feature-similarity rows). A training example that
"looks like" the query inside the model is scored as helping it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.scores import Attribution
from stride_jax.data import Examples
from stride_jax.baselines.base import batches, check_queries, check_train, make_attribution


def _embed_fn(graphdef: nnx.GraphDef, state: nnx.State, batch: tuple, *, layer: int) -> jax.Array:
    inputs, _, mask, _ = batch
    h = nnx.merge(graphdef, state).trunk(inputs, layer=layer, mask=mask)
    if h.ndim == 3:  # [B, T, D]: mean over (real) positions
        w = jnp.ones(h.shape[:2]) if mask is None else mask
        h = (h * w[..., None]).sum(axis=1) / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-9)
    return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-8)


_embed = jax.jit(_embed_fn, static_argnames=("graphdef", "layer"))


def embed(model: nnx.Module, examples: Examples, layer: int, batch_size: int = 128) -> np.ndarray:
    """Unit-norm mean-pooled activations [N, D] at hook point `layer` (padding excluded)."""
    if not 0 <= layer <= model.n_layers:
        raise ValueError(f"layer {layer} is beyond the model's depth: hook points are 0..{model.n_layers}")
    graphdef, state = nnx.split(model)
    out = [np.asarray(_embed(graphdef, state, batch, layer=layer))[: stop - start]
           for start, stop, batch in batches(examples, batch_size)]
    return np.concatenate(out)


class RepresentationSimilarity:
    name = "repr-sim"

    def __init__(self, layer: int):
        self.layer = layer
        self._train: Examples | None = None
        self._model: nnx.Module | None = None
        self._emb_NxD: np.ndarray | None = None

    def fit(self, model: nnx.Module, train: Examples) -> "RepresentationSimilarity":
        self._model, self._train = model, train
        check_train(train)
        self._emb_NxD = embed(model, train, self.layer)
        return self

    def attribute(self, queries: Examples) -> Attribution:
        if self._emb_NxD is None:
            raise RuntimeError("call fit(model, train) first")
        check_queries(self._train, queries)
        q_QxD = embed(self._model, queries, self.layer)
        return make_attribution(self._emb_NxD @ q_QxD.T, self._train, queries, self.name)
