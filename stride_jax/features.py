"""The pool's hook-layer and final states, batched: what the operator fit caches and what the
recovery's prior pools. A low module (the models' protocol only), shared by `fit` and `prior`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm


def compute_features(model: nnx.Module, examples, layer: int, *, batch_size: int = 64,
                     dtype=jnp.float32, progress: bool = False) -> tuple[jax.Array, jax.Array]:
    """Hook-layer states h_l and final states h_L of every example, batched ([N, ..., D] each).

    The last batch is padded to the batch size, so one program serves every batch.
    """
    graphdef, state = nnx.split(model)
    n = len(examples.inputs)
    batch = min(batch_size, n)
    fn = jax.jit(_trunk_pair, static_argnames=("graphdef", "layer", "n_layers", "dtype"))
    hs, outs = [], []
    for start in tqdm(range(0, n, batch), desc="cache states", disable=not progress, leave=False):
        idx = np.minimum(np.arange(start, start + batch), n - 1)
        mask = None if examples.mask is None else jnp.asarray(examples.mask[idx])
        h, h_out = fn(graphdef, state, jnp.asarray(examples.inputs[idx]), mask, layer=layer,
                      n_layers=model.n_layers, dtype=dtype)
        keep = min(batch, n - start)
        hs.append(h[:keep])
        outs.append(h_out[:keep])
    return jnp.concatenate(hs), jnp.concatenate(outs)


def _trunk_pair(graphdef, state, inputs, mask, *, layer: int, n_layers: int, dtype):
    """(trunk at `layer`, trunk at the top). The protocol has no "blocks l..L" call, so the top
    state reruns the first `layer` blocks: a one-time cost of the cache, (layer + L) / L forwards."""
    model = nnx.merge(graphdef, state)
    h = model.trunk(inputs, layer=layer, mask=mask)
    h_out = h if layer == n_layers else model.trunk(inputs, layer=n_layers, mask=mask)
    return h.astype(dtype), h_out.astype(dtype)


__all__ = ["compute_features"]
