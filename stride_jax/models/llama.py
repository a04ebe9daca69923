"""Llama-family causal LM (Llama, SmolLM, Qwen2) with a named hook point at every residual state.

token embedding -> n_layers x [x += attn(rmsnorm(x)); x += mlp(rmsnorm(x))] -> rmsnorm -> head.
- RMSNorm with a learnable scale, y = scale * x / sqrt(mean(x^2) + rms_eps), in float32.
- Causal grouped-query attention: n_heads query heads share n_kv_heads key/value heads (query
  head n reads kv head n // (n_heads / n_kv_heads), as HF's `repeat_kv`); optional q/k/v biases
  (Qwen2); no output bias. Softmax in float32 (`jax.nn.dot_product_attention`).
- Rotary embeddings with base `rope_theta` in one of two layouts of the head dimension:
  "half" pairs (i, i + H/2) (HF checkpoints), "interleaved" pairs (2i, 2i + 1) (llama.cpp; GGUF
  stores Q/K rows permuted for it). Both compute the same function on correspondingly
  permuted weights; loading GGUF weights with the wrong layout still runs but is a worse
  model (SmolLM2 Austen perplexity ~179 instead of ~38).
- SwiGLU MLP: down(silu(gate(x)) * up(x)).
- Tied (head = embedding matrix) or untied head; logits are float32.
- Parameters are always float32; `dtype="bfloat16"` runs the matmuls in bfloat16 while the
  residual stream (every hook point), norms, softmax and logits stay float32.
- An optional [B, T] padding mask hides padded keys from attention. Positions are 0..T-1 for
  every row (as an HF forward without position_ids): right padding (what `data` builds) is
  exact; left padding shifts the positions of the real tokens.

Hook point l is the residual stream after l blocks; `rest(h, layer=n_layers)` applies only the
final norm and head, each position on its own. Conversions from GGUF / HF safetensors live in
`convert.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.models.common import SequenceModel, attention_mask, fields_from_dict

ROPE_LAYOUTS = ("half", "interleaved")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-family hyperparameters (frozen, hashable: safe as a static jit argument).

    Attributes:
      vocab_size: V, rows of the embedding (and of the head).
      d_model: residual width D.
      n_layers: number of blocks (hook points 0..n_layers).
      n_heads: query heads N.
      n_kv_heads: key/value heads (GQA); must divide n_heads.
      ffn_dim: SwiGLU hidden width F.
      max_len: context length; longer inputs raise ValueError.
      rope_theta: RoPE base.
      rope_layout: "half" (HF) or "interleaved" (llama.cpp / GGUF), see the module docstring.
      rms_eps: RMSNorm epsilon.
      tie_embeddings: the head reuses the embedding matrix (SmolLM2: True).
      qkv_bias: biases on the q, k and v projections (Qwen2).
      head_dim: per-head width H; 0 means d_model // n_heads.
      dtype: compute dtype of the matmuls, "float32" or "bfloat16" (params stay float32).
      init_std: std of every weight matrix of a freshly built (random) model.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_len: int = 2048
    rope_theta: float = 10000.0
    rope_layout: str = "half"
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    head_dim: int = 0
    dtype: str = "float32"
    init_std: float = 0.02

    model_type = "llama"  # class attribute, not a field

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.head_dim, (int, np.integer)) or self.head_dim < 0:
            raise ValueError(f"LlamaConfig.head_dim must be an int >= 0 (0: d_model // n_heads), got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dim {self.resolved_head_dim} must be even for RoPE")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {self.rope_layout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.rope_theta > 0 and self.rms_eps > 0 and self.init_std > 0):
            raise ValueError("rope_theta, rms_eps and init_std must be positive")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> Any:
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        return cls(**fields_from_dict(cls, d, cls.model_type))


def rope_tables(T: int, H: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, H/2] of angle t * theta^(-2i/H), computed in float64, returned float32."""
    inv_freq_F = 1.0 / (theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    angle_TxF = np.arange(T, dtype=np.float64)[:, None] * inv_freq_F[None, :]
    return np.cos(angle_TxF).astype(np.float32), np.sin(angle_TxF).astype(np.float32)


def apply_rope(x_BxTxNxH: jax.Array, theta: float, layout: str) -> jax.Array:
    """Rotary embedding at positions 0..T-1 (in float32, returned in x's dtype)."""
    T, H = x_BxTxNxH.shape[1], x_BxTxNxH.shape[3]
    cos_TxF, sin_TxF = rope_tables(T, H, theta)
    cos, sin = cos_TxF[None, :, None, :], sin_TxF[None, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    if layout == "half":
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        y = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    elif layout == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        y = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
    else:
        raise ValueError(f"unknown rope layout {layout!r}")
    return y.astype(x_BxTxNxH.dtype)


class RMSNorm(nnx.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), computed in float32."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x = x_BxTxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return x * self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))


def _linear(cfg: LlamaConfig, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, H = cfg.d_model, cfg.resolved_head_dim
        self.q_proj = _linear(cfg, d, cfg.n_heads * H, cfg.qkv_bias, rngs)
        self.k_proj = _linear(cfg, d, cfg.n_kv_heads * H, cfg.qkv_bias, rngs)
        self.v_proj = _linear(cfg, d, cfg.n_kv_heads * H, cfg.qkv_bias, rngs)
        self.o_proj = _linear(cfg, cfg.n_heads * H, d, False, rngs)

    def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        B, T, _ = x_BxTxD.shape
        H = cfg.resolved_head_dim
        q_BxTxNxH = apply_rope(self.q_proj(x_BxTxD).reshape(B, T, cfg.n_heads, H), cfg.rope_theta, cfg.rope_layout)
        k_BxTxKxH = apply_rope(self.k_proj(x_BxTxD).reshape(B, T, cfg.n_kv_heads, H), cfg.rope_theta, cfg.rope_layout)
        v_BxTxKxH = self.v_proj(x_BxTxD).reshape(B, T, cfg.n_kv_heads, H)
        y_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True,
                                                 mask=attention_mask(mask_BxT))
        return self.o_proj(y_BxTxNxH.reshape(B, T, cfg.n_heads * H))


class SwiGLU(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.d_model, cfg.ffn_dim, False, rngs)
        self.up_proj = _linear(cfg, cfg.d_model, cfg.ffn_dim, False, rngs)
        self.down_proj = _linear(cfg, cfg.ffn_dim, cfg.d_model, False, rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = SwiGLU(cfg, rngs=rngs)
        self.compute_dtype = cfg.compute_dtype

    def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
        """float32 residual in, float32 residual out; the branches run in the compute dtype."""
        cd = self.compute_dtype
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD).astype(cd), mask_BxT).astype(jnp.float32)
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD).astype(cd)).astype(jnp.float32)


class Llama(SequenceModel, nnx.Module):
    """Llama-family causal LM; hook point l = residual stream (float32) after l blocks."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_layers = cfg.n_layers
        self.hidden_dim = cfg.d_model
        self.out_dim = cfg.vocab_size
        self.max_len = cfg.max_len
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                      param_dtype=jnp.float32, preferred_element_type=jnp.float32,
                                      kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)

    def embed_tokens(self, inputs_BxT: jax.Array) -> jax.Array:
        return self.embed(inputs_BxT)

    def readout(self, h_BxTxD: jax.Array) -> jax.Array:
        x_BxTxD = self.final_norm(h_BxTxD).astype(self.cfg.compute_dtype)
        if self.cfg.tie_embeddings:
            emb_VxD = self.embed.embedding[...].astype(self.cfg.compute_dtype)
            return jnp.einsum("btd,vd->btv", x_BxTxD, emb_VxD, preferred_element_type=jnp.float32)
        return self.lm_head(x_BxTxD)


def with_dtype(model: Llama, dtype: str) -> Llama:
    """The same parameters behind a model whose matmuls run in `dtype` ("float32" / "bfloat16")."""
    cfg = dataclasses.replace(model.cfg, dtype=dtype)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.state(model))
