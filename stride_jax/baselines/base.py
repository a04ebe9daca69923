"""The attributor interface shared by STRIDE and every baseline, and their common helpers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from flax import nnx

from stride_jax import models
from stride_jax.scores import Attribution
from stride_jax.data import Examples


@runtime_checkable
class Attributor(Protocol):
    """fit (or cache) on the training set once, then score any number of queries."""

    name: str

    def fit(self, model: nnx.Module, train: Examples) -> "Attributor": ...

    def attribute(self, queries: Examples) -> Attribution: ...


def make_attribution(scores_NxQ: np.ndarray, train: Examples, queries: Examples, method: str) -> Attribution:
    """Wrap a score matrix (no recovery diagnostics) as an Attribution."""
    return Attribution(scores=np.asarray(scores_NxQ, dtype=np.float32), train_ids=np.asarray(train.ids),
                       query_ids=np.asarray(queries.ids), method=method)


def padded_chunks(n: int, chunk: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, idx) with idx of fixed length `chunk` (the last one padded by repeats), so
    every chunk has one shape and compiles once."""
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        idx = np.arange(start, start + chunk)
        idx[idx >= stop] = stop - 1
        yield start, stop, idx


def host_batch(examples: Examples, idx: np.ndarray) -> tuple[Any, Any, Any, Any]:
    """(inputs, targets, padding mask or None, loss weights or None) of rows `idx`, on device."""
    return examples.device_batch(idx)


def batches(examples: Examples, chunk: int) -> Iterator[tuple[int, int, tuple]]:
    """(start, stop, batch) over `examples` in fixed-size (padded) chunks of device arrays."""
    for start, stop, idx in padded_chunks(len(examples), min(chunk, len(examples))):
        yield start, stop, host_batch(examples, idx)


def one_loss(model: nnx.Module, example: tuple) -> jax.Array:
    """Loss of one example (inputs, targets, mask, weights without a batch axis)."""
    lift = lambda a: None if a is None else a[None]
    x, y, m, w = example
    return models.example_loss(model(x[None], lift(m)), y[None], lift(w))[0]


def batch_loss(model: nnx.Module, batch: tuple) -> jax.Array:
    """Per-example losses [B] of a batch (inputs, targets, mask, weights)."""
    x, y, m, w = batch
    return models.example_loss(model(x, m), y, w)


def check_train(train: Examples) -> None:
    if not isinstance(train, Examples):
        raise TypeError(f"the training set must be a stride_jax.Examples, got {type(train).__name__}")
    if len(train) == 0:
        raise ValueError("training set is empty")


def check_queries(train: Examples, queries: Examples) -> None:
    """Queries must look like the training examples (same per-example shapes, non-empty)."""
    if not isinstance(queries, Examples):
        raise TypeError(f"queries must be a stride_jax.Examples, got {type(queries).__name__}")
    if len(queries) == 0:
        raise ValueError("queries is empty")
    for name in ("inputs", "targets"):
        a, b = np.shape(getattr(train, name))[1:], np.shape(getattr(queries, name))[1:]
        if a != b and not (train.is_tokens and len(a) == len(b) == 1):
            raise ValueError(f"query {name} have per-example shape {b}, training examples {a}")
