"""nanochat-style causal LM with a named hook point at every residual-stream state.

token embedding -> n_layers x [x += attn(norm(x)); x += mlp(norm(x))] -> norm -> head.
- RMSNorm has no learnable scale (nanochat), so every norm is a pure function.
- No biases anywhere.
- Causal multi-head attention with rotary embeddings in the half-split form (first half of
  each head dimension pairs with the second half) and RMS-normalised queries and keys
  (nanochat's QK norm; keeps attention logits bounded, switch off with `qk_norm=False`).
- MLP d -> mlp_ratio d -> d with ReLU^2 (nanochat).
- Untied head by default (nanochat); `tie_embeddings=True` reuses the embedding matrix.
- Logits are float32. An optional [B, T] padding mask hides padded keys from attention; with
  right padding (what `data` builds) causal attention never sees them anyway.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.models.common import SequenceModel, attention_mask, fields_from_dict, rms_norm


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
        return cls(**fields_from_dict(cls, d, cls.model_type))


def rope_half_split(x_BxTxNxH: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split form: pairs (i, i + H/2), positions 0..T-1."""
    T, H = x_BxTxNxH.shape[1], x_BxTxNxH.shape[3]
    inv_freq_F = 1.0 / (theta ** (np.arange(0, H, 2, dtype=np.float32) / H))
    angle_TxF = np.arange(T, dtype=np.float32)[:, None] * inv_freq_F[None, :]
    cos, sin = np.cos(angle_TxF)[None, :, None, :], np.sin(angle_TxF)[None, :, None, :]
    x1, x2 = x_BxTxNxH[..., : H // 2], x_BxTxNxH[..., H // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


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

    def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        shape = (B, T, cfg.n_heads, cfg.head_dim)
        q = rope_half_split(self.c_q(x_BxTxD).reshape(shape), cfg.rope_theta)
        k = rope_half_split(self.c_k(x_BxTxD).reshape(shape), cfg.rope_theta)
        v = self.c_v(x_BxTxD).reshape(shape)
        if cfg.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        y_BxTxNxH = jax.nn.dot_product_attention(q, k, v, is_causal=True, mask=attention_mask(mask_BxT))
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

    def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
        x_BxTxD = x_BxTxD + self.attn(rms_norm(x_BxTxD), mask_BxT)
        return x_BxTxD + self.mlp(rms_norm(x_BxTxD))


class GPT(SequenceModel, nnx.Module):
    """nanochat-style causal LM; hook point l = residual stream after l blocks."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_layers = cfg.n_layers
        self.hidden_dim = cfg.d_model
        self.out_dim = cfg.vocab_size
        self.max_len = cfg.seq_len
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

    def embed_tokens(self, inputs_BxT: jax.Array) -> jax.Array:
        return self.wte(inputs_BxT)

    def readout(self, h_BxTxD: jax.Array) -> jax.Array:
        h_BxTxD = rms_norm(h_BxTxD)
        return self.wte.attend(h_BxTxD) if self.cfg.tie_embeddings else self.lm_head(h_BxTxD)
