"""Frozen models behind one hook protocol, their configs, the per-example loss and checkpoints.

A model enters STRIDE, the baselines and the training loops through `HookedModel`
(docs/interfaces.md): a depth, the width at every hook point, the output width, and the forward
pass split at any hook point l into

    trunk(inputs, layer=l, mask=None) -> h        the state after l blocks (0: embeddings / features)
    rest(h, layer=l, mask=None)       -> logits   blocks[l:], final norm and head (float32)
    model(inputs, mask) == rest(trunk(inputs, layer=l, mask), layer=l, mask)  for l in [0, n_layers]

`rest(h, layer=n_layers)` runs no block: for a sequence model it acts on each position on its
own, so logits can be formed from cached final states at any subset of positions. `mask` is a
[B, T] padding mask of sequence models (1 = real token; None = all real); classifiers take none.

| module | models |
|---|---|
| `gpt.py` | nanochat-style GPT (`GPTConfig`) |
| `classifiers.py` | MLP (`MLPConfig`) and ConvNet (`ConvConfig`) classifiers |
| `llama.py` | Llama-family LM: Llama, SmolLM, Qwen2 (`LlamaConfig`) |
| `convert.py` | GGUF / HF safetensors in (`load_gguf`, `load_hf`, `load_pretrained`), safetensors out (`save_hf`) |
| `checkpoint.py` | `save_model` / `load_model`: orbax state + metadata, atomic, digest-checked |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stride_jax.models.classifiers import MLP, Conv2D, ConvConfig, ConvNet, MLPConfig
from stride_jax.models.gpt import GPT, GPTConfig
from stride_jax.models.llama import Llama, LlamaConfig

__all__ = [
    "HookedModel",
    "GPTConfig",
    "MLPConfig",
    "ConvConfig",
    "LlamaConfig",
    "ModelConfig",
    "GPT",
    "MLP",
    "ConvNet",
    "Llama",
    "example_loss",
    "build",
    "init_state",
    "graphdef_of",
    "config_from_dict",
    "register",
    "save_model",
    "load_model",
    "is_sequence_model",
    "check_examples",
    "context_length",
    "param_digest",
    "param_shapes",
    "set_params",
    "Pretrained",
    "load_gguf",
    "load_hf",
    "save_hf",
    "load_pretrained",
]


@runtime_checkable
class HookedModel(Protocol):
    """What STRIDE and every baseline read off a frozen model (docs/interfaces.md).

    `cfg` is a frozen, hashable config that describes the inputs: a token model's has
    `vocab_size` (and `seq_len` or `max_len`, its context), a classifier's `in_dim` and
    `n_classes` (each optional; what is there is checked by `check_examples`). `to_dict()` on it
    names the model in fit identities (its repr otherwise); `model_type`, `to_dict` and
    `from_dict` are needed only to `register` it for `build`, `save_model` and `load_model`. A
    token model also sets the class attribute `is_sequence_model = True`.
    """

    cfg: Any
    n_layers: int
    out_dim: int

    def hidden_dim_at(self, layer: int) -> int: ...

    def trunk(self, inputs: jax.Array, *, layer: int, mask: jax.Array | None = None) -> jax.Array: ...

    def rest(self, h: jax.Array, *, layer: int, mask: jax.Array | None = None) -> jax.Array: ...

    def __call__(self, inputs: jax.Array, mask: jax.Array | None = None) -> jax.Array: ...


from stride_jax.models.registry import (  # noqa: E402  (the registry: config -> model class)
    _CONFIGS, ModelConfig, _build_with_key, build, config_from_dict, graphdef_of, init_state, register)


def is_sequence_model(model: Any) -> bool:
    """True for token models (inputs [B, T], logits [B, T, V])."""
    return bool(getattr(model, "is_sequence_model", False))


def example_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-example cross-entropy [B]: the (mask-weighted) mean over every non-batch axis.

    For an LM, the mean next-token loss over the positions where `mask` [B, T] is nonzero
    (weights in [0, 1]; None = every position). A row whose mask is all zero has loss 0.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} do not match targets {targets.shape}")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    ce = ce.reshape(ce.shape[0], -1)
    if mask is None:
        return ce.mean(axis=1)
    if mask.shape != targets.shape:
        raise ValueError(f"loss mask {mask.shape} does not match targets {targets.shape}")
    w = mask.reshape(mask.shape[0], -1).astype(jnp.float32)
    return (ce * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-9)


def context_length(cfg: ModelConfig) -> int | None:
    """The longest sequence a token model accepts (None for classifiers)."""
    for name in ("seq_len", "max_len"):
        if hasattr(cfg, name):
            return int(getattr(cfg, name))
    return None


def check_examples(cfg: ModelConfig, examples: Any) -> None:
    """Raise ValueError, naming the problem, unless `examples` fit the model of config `cfg`.

    Token models: integer inputs and targets [N, T] with T <= the context and ids in
    [0, vocab_size). Classifiers: float features [N, in_dim] and labels in [0, n_classes).
    """
    x, y = np.asarray(examples.inputs), np.asarray(examples.targets)
    n = len(x)
    if n == 0:
        raise ValueError("examples is empty")
    if len(y) != n:
        raise ValueError(f"{n} inputs but {len(y)} targets")
    if hasattr(cfg, "vocab_size"):
        if x.ndim != 2 or y.shape != x.shape:
            raise ValueError(f"LM examples need inputs and targets [N, T], got {x.shape}, {y.shape}")
        context = context_length(cfg)
        if context is not None and x.shape[1] > context:
            raise ValueError(f"examples have length {x.shape[1]}, longer than the model's context of {context}")
        for name, a in (("inputs", x), ("targets", y)):
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"LM {name} must be integer token ids, got {a.dtype}")
            if a.min() < 0 or a.max() >= cfg.vocab_size:
                raise ValueError(f"{name} token ids span [{a.min()}, {a.max()}], outside the model's "
                                 f"vocabulary [0, {cfg.vocab_size})")
    else:
        in_dim, n_classes = getattr(cfg, "in_dim", None), getattr(cfg, "out_dim", getattr(cfg, "n_classes", None))
        if x.ndim != 2 or (in_dim is not None and x.shape[1] != in_dim):
            raise ValueError(f"classifier inputs must be [N, {in_dim}] features, got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"classifier inputs must be float features, got {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"classifier inputs hold {int((~np.isfinite(x)).sum())} NaN/inf values")
        if y.shape != (n,) or (n_classes is not None and (y.min() < 0 or y.max() >= n_classes)):
            raise ValueError(f"classifier targets must be [N] labels in [0, {n_classes}), got shape {y.shape} "
                             f"and range [{y.min()}, {y.max()}]")


def param_digest(model: nnx.Module) -> str:
    """sha256 of the model's config and parameter values: equal digests mean the same model."""
    from stride_jax import store

    cfg = getattr(model, "cfg", None)
    return store.fingerprint({"config": cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg),
                              "params": store.tree_digest(nnx.state(model, nnx.Param))})


def param_shapes(model: nnx.Module) -> dict[str, Any]:
    """The nested {name: shape} of the model's parameters: the layout `set_params` expects."""
    return jax.tree.map(lambda x: tuple(np.shape(x)), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def set_params(model: nnx.Module, params: Mapping[str, Any]) -> nnx.Module:
    """Put your own trained weights into `model` (in place; returned for chaining).

    `params` is a nested dict of arrays with exactly the layout of `param_shapes(model)` (dense
    kernels are [in, out], applied as x @ kernel: a PyTorch `Linear.weight` is [out, in], transpose
    it). Every missing or extra entry and every shape mismatch is named before anything changes.
    """
    want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    try:
        flat_got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(dict(params))[0]}
    except TypeError as e:
        raise ValueError(f"set_params needs a nested dict of arrays: {e}") from e
    problems = [f"missing {k} {np.shape(v)}" for k, v in flat_want.items() if k not in flat_got]
    problems += [f"unexpected {k}" for k in flat_got if k not in flat_want]
    problems += [f"{k}: shape {np.shape(flat_got[k])}, the model needs {np.shape(v)}"
                 for k, v in flat_want.items() if k in flat_got and np.shape(flat_got[k]) != np.shape(v)]
    if problems:
        raise ValueError(f"set_params: the weights do not fit {type(model).__name__} ({len(problems)} problems): "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
                         + "; models.param_shapes(model) shows the layout")
    bad = [k for k, v in flat_got.items() if not np.all(np.isfinite(np.asarray(v, np.float64)))]
    if bad:
        raise ValueError(f"set_params: non-finite weights in {bad[:4]}")
    converted = jax.tree.map(lambda old, new: jnp.asarray(new, dtype=jnp.asarray(old).dtype), want, dict(params))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, converted)
    nnx.update(model, state)
    return model


from stride_jax.models.checkpoint import load_model, save_model  # noqa: E402
from stride_jax.models.convert import Pretrained, load_gguf, load_hf, load_pretrained, save_hf  # noqa: E402
