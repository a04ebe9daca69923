"""Models with a named hook point: a nanochat-style causal LM and an MLP classifier.

Every model exposes the contract of docs/interfaces.md:

    trunk(inputs, layer=l) -> h        the state after l blocks (l = 0: embeddings / raw features)
    rest(h, layer=l)       -> logits   blocks[l:], final norm and head
    model(inputs) == rest(trunk(inputs, layer=l), layer=l) for every l in [0, n_layers]

so a steering operator can edit the residual stream at layer l without a copy of the forward pass.

GPT architecture (nanochat, simplified; all choices documented on `GPTConfig`):
token embedding -> n_layers x [x += attn(norm(x)); x += mlp(norm(x))] -> norm -> head.
- RMSNorm has no learnable scale (nanochat), so every norm is a pure function.
- No biases anywhere.
- Causal multi-head attention with rotary embeddings in the half-split form (first half of
  each head dimension pairs with the second half) and RMS-normalised queries and keys
  (nanochat's QK norm; keeps attention logits bounded, switch off with `qk_norm=False`).
- MLP d -> mlp_ratio d -> d with ReLU^2 (nanochat).
- Untied head by default (nanochat); `tie_embeddings=True` reuses the embedding matrix.
- Logits are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    "GPTConfig",
    "MLPConfig",
    "ModelConfig",
    "GPT",
    "MLP",
    "example_loss",
    "build",
    "init_state",
    "graphdef_of",
    "config_from_dict",
    "save_model",
    "load_model",
]


# ----------------------------------------------------------------------------- configs


def _fields_from_dict(cls, d: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    d = dict(d)
    stored_type = d.pop("model_type", model_type)
    if stored_type != model_type:
        raise ValueError(f"config dict has model_type={stored_type!r}, expected {model_type!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return d


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Causal LM hyperparameters (frozen, hashable: safe as a static jit argument).

    Attributes:
      vocab_size: V, number of token ids.
      seq_len: maximum context T; longer inputs raise ValueError.
      n_layers: number of transformer blocks (hook points 0..n_layers).
      d_model: residual width D.
      n_heads: attention heads; d_model / n_heads must be even (RoPE pairs).
      mlp_ratio: MLP hidden width = mlp_ratio * d_model.
      rope_theta: RoPE base.
      tie_embeddings: reuse the embedding matrix as the head (nanochat unties: False).
      qk_norm: RMS-normalise queries and keys after RoPE (nanochat: True).
      init_std: std of the head and (divided by sqrt(2 n_layers)) of the residual output
        projections, GPT-2 style. Input projections (q, k, v, MLP in) use fan-in scaling
        1/sqrt(d_model); the untied embedding is N(0, 1) (nanochat: the residual stream starts
        at unit RMS); a tied embedding uses init_std so that the head starts small.
    """

    vocab_size: int
    seq_len: int
    n_layers: int
    d_model: int
    n_heads: int
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    qk_norm: bool = True
    init_std: float = 0.02

    model_type = "gpt"  # class attribute, not a field

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_layers", "d_model", "n_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.init_std <= 0 or self.rope_theta <= 0:
            raise ValueError("init_std and rope_theta must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        return cls(**_fields_from_dict(cls, d, cls.model_type))


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
        return cls(**_fields_from_dict(cls, d, cls.model_type))


ModelConfig = GPTConfig | MLPConfig
_CONFIGS = {GPTConfig.model_type: GPTConfig, MLPConfig.model_type: MLPConfig}


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of `cfg.to_dict()`; dispatches on d["model_type"] ("gpt" or "mlp")."""
    model_type = d.get("model_type")
    if model_type not in _CONFIGS:
        raise ValueError(f"config dict needs model_type in {sorted(_CONFIGS)}, got {model_type!r}")
    return _CONFIGS[model_type].from_dict(d)


# ----------------------------------------------------------------------------- helpers


def _check_layer(layer: int, n_layers: int) -> None:
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
        raise ValueError(f"layer must be a static Python int, got {type(layer).__name__}")
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer={layer} out of range: hook points are 0..{n_layers}")


def _check_flat_hidden(h_BxD: jax.Array, width: int, layer: int) -> None:
    """A classifier's hook-point activation must be [B, width]."""
    if h_BxD.ndim != 2 or h_BxD.shape[1] != width:
        raise ValueError(f"expected h of shape [B, {width}] at layer {layer}, got {h_BxD.shape}")


def _rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm without a learnable scale (nanochat)."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _rope(x_BxTxNxH: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split form: pairs (i, i + H/2), positions 0..T-1."""
    T, H = x_BxTxNxH.shape[1], x_BxTxNxH.shape[3]
    inv_freq_F = 1.0 / (theta ** (np.arange(0, H, 2, dtype=np.float32) / H))
    angle_TxF = np.arange(T, dtype=np.float32)[:, None] * inv_freq_F[None, :]
    cos, sin = np.cos(angle_TxF)[None, :, None, :], np.sin(angle_TxF)[None, :, None, :]
    x1, x2 = x_BxTxNxH[..., : H // 2], x_BxTxNxH[..., H // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


# ----------------------------------------------------------------------------- GPT


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.d_model
        in_init = nnx.initializers.normal(1.0 / math.sqrt(d))
        out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.c_q = nnx.Linear(d, d, use_bias=False, kernel_init=in_init, rngs=rngs)
        self.c_k = nnx.Linear(d, d, use_bias=False, kernel_init=in_init, rngs=rngs)
        self.c_v = nnx.Linear(d, d, use_bias=False, kernel_init=in_init, rngs=rngs)
        self.c_proj = nnx.Linear(d, d, use_bias=False, kernel_init=out_init, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        shape = (B, T, cfg.n_heads, cfg.head_dim)
        q = _rope(self.c_q(x_BxTxD).reshape(shape), cfg.rope_theta)
        k = _rope(self.c_k(x_BxTxD).reshape(shape), cfg.rope_theta)
        v = self.c_v(x_BxTxD).reshape(shape)
        if cfg.qk_norm:
            q, k = _rms_norm(q), _rms_norm(k)
        y_BxTxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y_BxTxNxH.reshape(B, T, D))


class MLPBlock(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        in_init = nnx.initializers.normal(1.0 / math.sqrt(d))
        out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.c_fc = nnx.Linear(d, h, use_bias=False, kernel_init=in_init, rngs=rngs)
        self.c_proj = nnx.Linear(h, d, use_bias=False, kernel_init=out_init, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x_BxTxD))))  # ReLU^2


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = MLPBlock(cfg, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x_BxTxD = x_BxTxD + self.attn(_rms_norm(x_BxTxD))
        return x_BxTxD + self.mlp(_rms_norm(x_BxTxD))


class GPT(nnx.Module):
    """nanochat-style causal LM; hook point l = residual stream after l blocks."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_layers = cfg.n_layers
        self.hidden_dim = cfg.d_model
        self.out_dim = cfg.vocab_size
        emb_std = cfg.init_std if cfg.tie_embeddings else 1.0
        self.wte = nnx.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(emb_std), rngs=rngs
        )
        # flax 0.12 rejects a plain Python list of Modules as an attribute ("Found data on value
        # of type list assigned to static attribute"); nnx.List makes the blocks part of the state.
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                kernel_init=nnx.initializers.normal(cfg.init_std),
                rngs=rngs,
            )

    def hidden_dim_at(self, layer: int) -> int:
        _check_layer(layer, self.n_layers)
        return self.cfg.d_model

    def _check_length(self, T: int) -> None:
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len={self.cfg.seq_len}")

    def trunk(self, inputs_BxT: jax.Array, *, layer: int) -> jax.Array:
        """Residual stream [B, T, D] after `layer` blocks (0 = token embeddings)."""
        _check_layer(layer, self.n_layers)
        if inputs_BxT.ndim != 2:
            raise ValueError(f"GPT expects int tokens [B, T], got shape {inputs_BxT.shape}")
        self._check_length(inputs_BxT.shape[1])
        if isinstance(inputs_BxT, np.ndarray) and inputs_BxT.size:
            lo, hi = int(inputs_BxT.min()), int(inputs_BxT.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.cfg.vocab_size}), got range [{lo}, {hi}]"
                )
        h_BxTxD = self.wte(inputs_BxT).astype(jnp.float32)
        for block in self.blocks[:layer]:
            h_BxTxD = block(h_BxTxD)
        return h_BxTxD

    def rest(self, h_BxTxD: jax.Array, *, layer: int) -> jax.Array:
        """Blocks[layer:], final norm and head: float32 logits [B, T, V]."""
        _check_layer(layer, self.n_layers)
        if h_BxTxD.ndim != 3 or h_BxTxD.shape[-1] != self.cfg.d_model:
            raise ValueError(f"expected h of shape [B, T, {self.cfg.d_model}], got {h_BxTxD.shape}")
        self._check_length(h_BxTxD.shape[1])
        for block in self.blocks[layer:]:
            h_BxTxD = block(h_BxTxD)
        h_BxTxD = _rms_norm(h_BxTxD)
        if self.cfg.tie_embeddings:
            logits_BxTxV = self.wte.attend(h_BxTxD)
        else:
            logits_BxTxV = self.lm_head(h_BxTxD)
        return logits_BxTxV.astype(jnp.float32)

    def __call__(self, inputs_BxT: jax.Array) -> jax.Array:
        return self.rest(self.trunk(inputs_BxT, layer=0), layer=0)


# ----------------------------------------------------------------------------- MLP


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
        _check_layer(layer, self.n_layers)
        return (self.cfg.in_dim, *self.cfg.hidden)[layer]

    def trunk(self, inputs_BxF: jax.Array, *, layer: int) -> jax.Array:
        """Activation [B, D_l] after `layer` hidden layers (0 = input features)."""
        _check_layer(layer, self.n_layers)
        if inputs_BxF.ndim != 2 or inputs_BxF.shape[1] != self.cfg.in_dim:
            raise ValueError(f"MLP expects [B, {self.cfg.in_dim}] features, got {inputs_BxF.shape}")
        h_BxD = jnp.asarray(inputs_BxF, jnp.float32)
        for linear in self.layers[:layer]:
            h_BxD = jax.nn.relu(linear(h_BxD))
        return h_BxD

    def rest(self, h_BxD: jax.Array, *, layer: int) -> jax.Array:
        """Hidden layers [layer:] and head: float32 logits [B, V]."""
        _check_layer(layer, self.n_layers)
        _check_flat_hidden(h_BxD, self.hidden_dim_at(layer), layer)
        for linear in self.layers[layer:]:
            h_BxD = jax.nn.relu(linear(h_BxD))
        return self.head(h_BxD).astype(jnp.float32)

    def __call__(self, inputs_BxF: jax.Array) -> jax.Array:
        return self.rest(self.trunk(inputs_BxF, layer=0), layer=0)


# ----------------------------------------------------------------------------- loss, build


def example_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy [B]: mean over every non-batch axis (per-token mean for an LM)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} do not match targets {targets.shape}")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return ce.reshape(ce.shape[0], -1).mean(axis=1)


def _build_with_key(cfg: ModelConfig, key: jax.Array) -> nnx.Module:
    rngs = nnx.Rngs(params=key)
    if isinstance(cfg, GPTConfig):
        return GPT(cfg, rngs=rngs)
    if isinstance(cfg, MLPConfig):
        return MLP(cfg, rngs=rngs)
    if isinstance(cfg, ConvConfig):
        return ConvNet(cfg, rngs=rngs)
    raise TypeError(f"unknown model config type {type(cfg).__name__}")


@functools.lru_cache(maxsize=64)
def graphdef_of(cfg: ModelConfig) -> nnx.GraphDef:
    """The (static) graph definition of the model `cfg` builds, without allocating it."""
    return nnx.graphdef(nnx.eval_shape(lambda: _build_with_key(cfg, jax.random.key(0))))


@functools.partial(jax.jit, static_argnames=("cfg",))
def init_state(key: jax.Array, *, cfg: ModelConfig) -> nnx.State:
    """Initial parameters of model `cfg` from a PRNG key (jitted once per config).

    One jitted init per config rather than eager or vmapped inits: threefry sampling compiles
    slowly on CPU (~0.1-0.3 s per initializer call site), and this way `build` and every
    `train.train_many` call, whatever its number of models, share one compiled init and give
    bit-identical parameters for the same seed.
    """
    return nnx.split(_build_with_key(cfg, key))[1]


def build(cfg: ModelConfig, seed: int) -> nnx.Module:
    """Fresh model initialised from `seed` (the same params as train_many's init for that seed)."""
    if not isinstance(cfg, tuple(_CONFIGS.values())):
        raise TypeError(f"unknown model config type {type(cfg).__name__}")
    return nnx.merge(graphdef_of(cfg), init_state(jax.random.key(int(seed)), cfg=cfg))


# ----------------------------------------------------------------------------- checkpoints

_METADATA_FILE = "metadata.json"
_PARAMS_DIR = "params"
_RESERVED = ("model_config", "model_type", "format_version")


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(d)))
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from e


def save_model(model: nnx.Module, directory: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
    """Write `model`'s state (orbax) and metadata.json into `directory` (must not hold a model).

    metadata.json = {"model_config", "model_type", "format_version", **metadata}; it is written
    last, so its presence marks a complete checkpoint.
    """
    import orbax.checkpoint as ocp

    clash = sorted(set(metadata) & set(_RESERVED))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved")
    cfg = model.cfg
    meta = _jsonable(
        {"model_type": cfg.model_type, "model_config": cfg.to_dict(), "format_version": 1, **metadata}
    )
    directory = os.path.abspath(os.fspath(directory))
    params_dir = os.path.join(directory, _PARAMS_DIR)
    if os.path.exists(params_dir) or os.path.exists(os.path.join(directory, _METADATA_FILE)):
        raise FileExistsError(f"{directory} already holds a checkpoint; pick a new directory")
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, nnx.state(model))
    checkpointer.wait_until_finished()
    checkpointer.close()
    tmp = os.path.join(directory, _METADATA_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, _METADATA_FILE))


def load_model(
    directory: str | os.PathLike, expected: Mapping[str, Any] | None = None
) -> tuple[nnx.Module, dict[str, Any]]:
    """Rebuild the model saved by `save_model`; check `expected` metadata before restoring.

    Raises FileNotFoundError (no checkpoint at `directory`) or ValueError (corrupted files, or a
    key of `expected` whose stored value differs).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(directory, _METADATA_FILE)
    params_dir = os.path.join(directory, _PARAMS_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no model checkpoint directory at {directory}")
    if not os.path.isfile(meta_path) or not os.path.isdir(params_dir):
        raise FileNotFoundError(
            f"{directory} is not a complete stride_jax model checkpoint "
            f"(needs {_METADATA_FILE} and {_PARAMS_DIR}/; was saving interrupted?)"
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        cfg = config_from_dict(meta["model_config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupted checkpoint metadata {meta_path}: {e!r}") from e

    if expected is not None:
        mismatched = []
        for key, want in _jsonable(expected).items():
            have = meta.get(key, "<missing>")
            if have != want:
                mismatched.append(f"{key}: checkpoint was made with {key} {have!r}, expected {want!r}")
        if mismatched:
            raise ValueError(f"checkpoint {directory} does not match: " + "; ".join(mismatched))

    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: _build_with_key(cfg, jax.random.key(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # explicit: orbax needs a target
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract_state
    )
    checkpointer = ocp.StandardCheckpointer()
    try:
        state = checkpointer.restore(params_dir, abstract_state)
    except Exception as e:  # orbax raises many types; surface one clear error with the path
        raise ValueError(f"could not restore model parameters from {params_dir}: {e!r}") from e
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, state), meta


# ----------------------------------------------------------------------------- ConvNet


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
        return cls(**_fields_from_dict(cls, d, cls.model_type))


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
        return patches @ self.kernel[...].reshape(k * k * c, -1) + self.bias[...]


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
        _check_layer(layer, self.n_layers)
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

    def trunk(self, inputs_BxF: jax.Array, *, layer: int) -> jax.Array:
        """Flattened state [B, D_l] after `layer` stages (0 = input pixels)."""
        _check_layer(layer, self.n_layers)
        if inputs_BxF.ndim != 2 or inputs_BxF.shape[1] != self.cfg.in_dim:
            raise ValueError(f"ConvNet expects flat images [B, {self.cfg.in_dim}] "
                             f"(H, W, C = {self.cfg.image_shape}, channels last), got {inputs_BxF.shape}")
        h_BxD = jnp.asarray(inputs_BxF, jnp.float32)
        for i in range(layer):
            h_BxD = self._stage(i, h_BxD)
        return h_BxD

    def rest(self, h_BxD: jax.Array, *, layer: int) -> jax.Array:
        """Stages [layer:] and head: float32 logits [B, V]."""
        _check_layer(layer, self.n_layers)
        _check_flat_hidden(h_BxD, self.hidden_dim_at(layer), layer)
        for i in range(layer, self.n_layers):
            h_BxD = self._stage(i, h_BxD)
        return self.head(h_BxD).astype(jnp.float32)

    def __call__(self, inputs_BxF: jax.Array) -> jax.Array:
        return self.rest(self.trunk(inputs_BxF, layer=0), layer=0)


ModelConfig = GPTConfig | MLPConfig | ConvConfig
_CONFIGS[ConvConfig.model_type] = ConvConfig
__all__ += ["ConvConfig", "ConvNet"]
