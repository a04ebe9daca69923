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
