"""Helpers shared by the model files: config dicts, hook-point checks, RMSNorm, padding masks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def fields_from_dict(cls: type, d: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """Keyword arguments of config `cls` from a dict, rejecting unknown fields."""
    d = dict(d)
    stored_type = d.pop("model_type", model_type)
    if stored_type != model_type:
        raise ValueError(f"config dict has model_type={stored_type!r}, expected {model_type!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return d


def check_layer(layer: int, n_layers: int) -> None:
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
        raise ValueError(f"layer must be a static Python int, got {type(layer).__name__}")
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer={layer} out of range: hook points are 0..{n_layers}")


def check_flat_hidden(h_BxD: jax.Array, width: int, layer: int) -> None:
    """A classifier's hook-point activation must be [B, width]."""
    if h_BxD.ndim != 2 or h_BxD.shape[1] != width:
        raise ValueError(f"expected h of shape [B, {width}] at layer {layer}, got {h_BxD.shape}")


def check_no_mask(mask: Any, name: str) -> None:
    if mask is not None:
        raise ValueError(f"{name} takes no padding mask (its examples have no sequence axis)")


def check_tokens(inputs_BxT: Any, vocab_size: int, max_len: int) -> None:
    """Shape, length and (for concrete arrays) id range of token inputs, before any compile."""
    if inputs_BxT.ndim != 2:
        raise ValueError(f"expected int tokens [B, T], got shape {inputs_BxT.shape}")
    if inputs_BxT.shape[1] > max_len:
        raise ValueError(f"sequence length {inputs_BxT.shape[1]} exceeds the model's context of {max_len}")
    if not isinstance(inputs_BxT, jax.core.Tracer) and np.size(inputs_BxT):
        if not jnp.issubdtype(inputs_BxT.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got dtype {inputs_BxT.dtype}")
        lo, hi = int(np.min(inputs_BxT)), int(np.max(inputs_BxT))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{lo}, {hi}]")


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm without a learnable scale (nanochat)."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def attention_mask(mask_BxT: jax.Array | None) -> jax.Array | None:
    """[B, 1, 1, T] key mask for `jax.nn.dot_product_attention` from a [B, T] padding mask."""
    if mask_BxT is None:
        return None
    return (mask_BxT > 0)[:, None, None, :]


class SequenceModel:
    """The hook-point plumbing shared by the causal LMs (GPT, Llama): `trunk` = embeddings then
    blocks[:layer], `rest` = blocks[layer:] then the readout. A subclass (an nnx.Module) sets
    `cfg` (with `vocab_size`, `d_model`), `n_layers`, `max_len`, `blocks` and defines
    `embed_tokens(inputs) -> h` and `readout(h) -> float32 logits`."""

    is_sequence_model = True

    def hidden_dim_at(self, layer: int) -> int:
        check_layer(layer, self.n_layers)
        return self.cfg.d_model

    def trunk(self, inputs_BxT: jax.Array, *, layer: int, mask: jax.Array | None = None) -> jax.Array:
        """Residual stream [B, T, D] (float32) after `layer` blocks (0 = token embeddings)."""
        check_layer(layer, self.n_layers)
        check_tokens(inputs_BxT, self.cfg.vocab_size, self.max_len)
        h_BxTxD = self.embed_tokens(inputs_BxT).astype(jnp.float32)
        for block in self.blocks[:layer]:
            h_BxTxD = block(h_BxTxD, mask)
        return h_BxTxD

    def rest(self, h_BxTxD: jax.Array, *, layer: int, mask: jax.Array | None = None) -> jax.Array:
        """Blocks[layer:], final norm and head: float32 logits [B, T, V]."""
        return self.readout(self.rest_hidden(h_BxTxD, layer=layer, mask=mask)).astype(jnp.float32)

    def rest_hidden(self, h_BxTxD: jax.Array, *, layer: int, mask: jax.Array | None = None) -> jax.Array:
        """Blocks[layer:] only: the final residual stream [B, T, D] (float32), before `readout`
        (position-wise, so the head can be read at a subset of positions)."""
        check_layer(layer, self.n_layers)
        if h_BxTxD.ndim != 3 or h_BxTxD.shape[-1] != self.cfg.d_model:
            raise ValueError(f"expected h of shape [B, T, {self.cfg.d_model}], got {h_BxTxD.shape}")
        if h_BxTxD.shape[1] > self.max_len:
            raise ValueError(f"sequence length {h_BxTxD.shape[1]} exceeds the model's context of {self.max_len}")
        h_BxTxD = h_BxTxD.astype(jnp.float32)
        for block in self.blocks[layer:]:
            h_BxTxD = block(h_BxTxD, mask)
        return h_BxTxD

    def __call__(self, inputs_BxT: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.rest(self.trunk(inputs_BxT, layer=0, mask=mask), layer=0, mask=mask)
