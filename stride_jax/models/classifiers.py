"""Classifiers with a hook point after every layer: a ReLU MLP and a small ConvNet.

Inputs are flat float features [B, F] (images flattened channels last), targets class labels
[B]; every hook-point state is flat [B, D_l], so operators and baselines see one contract.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from stride_jax.models.common import check_flat_hidden, check_layer, check_no_mask, fields_from_dict


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """MLP classifier: in_dim -> hidden[0] -> ... -> hidden[-1] -> n_classes, ReLU, with biases.

    Hook point l is the activation after l hidden layers (l = 0: the input features).
    """

    in_dim: int
    hidden: tuple[int, ...]
    n_classes: int

    model_type = "mlp"

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.in_dim < 1 or self.n_classes < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"MLPConfig widths must be positive: {self}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return {"model_type": self.model_type, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MLPConfig:
        return cls(**fields_from_dict(cls, d, cls.model_type))



class MLP(nnx.Module):
    """ReLU MLP classifier; hook point l = activation after l hidden layers (0 = input)."""

    def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_layers = len(cfg.hidden)
        self.out_dim = cfg.n_classes
        widths = (cfg.in_dim, *cfg.hidden)
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, kernel_init=nnx.initializers.he_normal(), rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )
        self.head = nnx.Linear(widths[-1], cfg.n_classes, rngs=rngs)

    def hidden_dim_at(self, layer: int) -> int:
        check_layer(layer, self.n_layers)
        return (self.cfg.in_dim, *self.cfg.hidden)[layer]

    def trunk(self, inputs_BxF: jax.Array, *, layer: int, mask: None = None) -> jax.Array:
        """Activation [B, D_l] after `layer` hidden layers (0 = input features)."""
        check_layer(layer, self.n_layers)
        check_no_mask(mask, type(self).__name__)
        if inputs_BxF.ndim != 2 or inputs_BxF.shape[1] != self.cfg.in_dim:
            raise ValueError(f"MLP expects [B, {self.cfg.in_dim}] features, got {inputs_BxF.shape}")
        h_BxD = jnp.asarray(inputs_BxF, jnp.float32)
        for linear in self.layers[:layer]:
            h_BxD = jax.nn.relu(linear(h_BxD))
        return h_BxD

    def rest(self, h_BxD: jax.Array, *, layer: int, mask: None = None) -> jax.Array:
        """Hidden layers [layer:] and head: float32 logits [B, V]."""
        check_layer(layer, self.n_layers)
        check_no_mask(mask, type(self).__name__)
        check_flat_hidden(h_BxD, self.hidden_dim_at(layer), layer)
        for linear in self.layers[layer:]:
            h_BxD = jax.nn.relu(linear(h_BxD))
        return self.head(h_BxD).astype(jnp.float32)

    def __call__(self, inputs_BxF: jax.Array, mask: None = None) -> jax.Array:
        check_no_mask(mask, type(self).__name__)
        return self.rest(self.trunk(inputs_BxF, layer=0), layer=0)


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """Small CNN classifier for images given as flat features [B, H * W * C] (channels last).

    Stages: one k x k SAME convolution + ReLU per entry of `channels` (followed by a 2x2 average
    pool where `pool` is True), then one dense layer + ReLU per entry of `dense`, then the head.
    Hook point l is the state after l stages (0 = the input pixels), always flattened to
    [B, D_l] (channels last), so operators and baselines see the same [B, D] contract as the MLP.
    """

    image_shape: tuple[int, int, int]  # (H, W, C)
    n_classes: int
    channels: tuple[int, ...] = (16, 32)
    pool: tuple[bool, ...] = (False, True)
    dense: tuple[int, ...] = (64,)
    kernel_size: int = 3

    model_type = "conv"

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("image_shape", tuple(int(s) for s in self.image_shape))
        set_("channels", tuple(int(c) for c in self.channels))
        set_("pool", tuple(bool(p) for p in self.pool))
        set_("dense", tuple(int(d) for d in self.dense))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"ConvConfig.image_shape must be positive (H, W, C), got {self.image_shape}")
        if len(self.pool) != len(self.channels):
            raise ValueError(f"ConvConfig.pool needs one flag per conv stage: {len(self.pool)} flags "
                             f"for {len(self.channels)} stages")
        if self.n_classes < 1 or self.kernel_size < 1 or any(w < 1 for w in self.channels + self.dense):
            raise ValueError(f"ConvConfig widths, kernel_size and n_classes must be positive: {self}")
        if not self.channels and not self.dense:
            raise ValueError("ConvConfig needs at least one conv or dense stage")
        h, w, _ = self.image_shape
        for i, p in enumerate(self.pool):
            if p and (h % 2 or w % 2):
                raise ValueError(f"conv stage {i} pools a {h}x{w} map: 2x2 pooling needs even sides")
            h, w = (h // 2, w // 2) if p else (h, w)

    @property
    def in_dim(self) -> int:
        return math.prod(self.image_shape)

    def stage_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Unflattened state shape at every hook point 0..n_layers ((H, W, C) or (D,))."""
        shapes: list[tuple[int, ...]] = [self.image_shape]
        h, w, _ = self.image_shape
        for c, p in zip(self.channels, self.pool):
            h, w = (h // 2, w // 2) if p else (h, w)
            shapes.append((h, w, c))
        shapes.extend((d,) for d in self.dense)
        return tuple(shapes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("image_shape", "channels", "pool", "dense"):
            d[key] = list(d[key])
        return {"model_type": self.model_type, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvConfig:
        return cls(**fields_from_dict(cls, d, cls.model_type))


class Conv2D(nnx.Module):
    """k x k SAME convolution (stride 1, with bias) as one matmul over im2col patches.

    Numerically `lax.conv_general_dilated` with HWIO weights; written as shifted slices and a
    matmul because XLA:CPU runs a convolution vmapped over models (each with its own kernel, as
    `train.train_many` does) as a slow grouped convolution, while this stays a batched matmul.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(nnx.initializers.he_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((out_channels,)))
        self.kernel_size = kernel_size

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        b, h, w, c = x_BxHxWxC.shape
        k = self.kernel_size
        lo = (k - 1) // 2
        xp = jnp.pad(x_BxHxWxC, ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
        patches = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
        return patches @ self.kernel[...].reshape(k * k * c, -1) + self.bias[...].reshape(1, 1, 1, -1)


def _avg_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
    b, h, w, c = x_BxHxWxC.shape
    return x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ConvNet(nnx.Module):
    """CNN classifier; hook point l = flattened state after l stages (0 = input pixels)."""

    def __init__(self, cfg: ConvConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_conv = len(cfg.channels)
        self.n_layers = len(cfg.channels) + len(cfg.dense)
        self.out_dim = cfg.n_classes
        init = nnx.initializers.he_normal()
        in_c = (cfg.image_shape[2], *cfg.channels)
        self.convs = nnx.List([
            Conv2D(a, b, cfg.kernel_size, rngs=rngs) for a, b in zip(in_c[:-1], in_c[1:])
        ])
        flat = math.prod(cfg.stage_shapes()[self.n_conv])
        widths = (flat, *cfg.dense)
        self.denses = nnx.List([
            nnx.Linear(a, b, kernel_init=init, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])
        ])
        self.head = nnx.Linear(widths[-1], cfg.n_classes, rngs=rngs)

    def hidden_dim_at(self, layer: int) -> int:
        check_layer(layer, self.n_layers)
        return math.prod(self.cfg.stage_shapes()[layer])

    def _stage(self, i: int, h_BxD: jax.Array) -> jax.Array:
        """Stage i (conv or dense) on a flat state [B, D_i] -> [B, D_{i+1}]."""
        if i < self.n_conv:
            x = h_BxD.reshape(h_BxD.shape[0], *self.cfg.stage_shapes()[i])
            x = jax.nn.relu(self.convs[i](x))
            if self.cfg.pool[i]:
                x = _avg_pool_2x2(x)
            return x.reshape(x.shape[0], -1)
        return jax.nn.relu(self.denses[i - self.n_conv](h_BxD))

    def trunk(self, inputs_BxF: jax.Array, *, layer: int, mask: None = None) -> jax.Array:
        """Flattened state [B, D_l] after `layer` stages (0 = input pixels)."""
        check_layer(layer, self.n_layers)
        check_no_mask(mask, type(self).__name__)
        if inputs_BxF.ndim != 2 or inputs_BxF.shape[1] != self.cfg.in_dim:
            raise ValueError(f"ConvNet expects flat images [B, {self.cfg.in_dim}] "
                             f"(H, W, C = {self.cfg.image_shape}, channels last), got {inputs_BxF.shape}")
        h_BxD = jnp.asarray(inputs_BxF, jnp.float32)
        for i in range(layer):
            h_BxD = self._stage(i, h_BxD)
        return h_BxD

    def rest(self, h_BxD: jax.Array, *, layer: int, mask: None = None) -> jax.Array:
        """Stages [layer:] and head: float32 logits [B, V]."""
        check_layer(layer, self.n_layers)
        check_no_mask(mask, type(self).__name__)
        check_flat_hidden(h_BxD, self.hidden_dim_at(layer), layer)
        for i in range(layer, self.n_layers):
            h_BxD = self._stage(i, h_BxD)
        return self.head(h_BxD).astype(jnp.float32)

    def __call__(self, inputs_BxF: jax.Array, mask: None = None) -> jax.Array:
        check_no_mask(mask, type(self).__name__)
        return self.rest(self.trunk(inputs_BxF, layer=0), layer=0)
