"""The model registry: which config builds which model, and building one from a config or a key.

A low module of the models package (it imports only the model classes), so the checkpoint and
conversion modules build models without importing the package that re-exports them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from stride_jax.models.classifiers import MLP, ConvConfig, ConvNet, MLPConfig
from stride_jax.models.gpt import GPT, GPTConfig
from stride_jax.models.llama import Llama, LlamaConfig

ModelConfig = Any  # GPTConfig | MLPConfig | ConvConfig | LlamaConfig | any registered config
_CONFIGS: dict[str, tuple[type, type]] = {}


def register(config_cls: type, model_cls: type) -> None:
    """Make a (config, model) pair buildable, savable and loadable by its `model_type`."""
    _CONFIGS[config_cls.model_type] = (config_cls, model_cls)


register(GPTConfig, GPT)
register(MLPConfig, MLP)
register(ConvConfig, ConvNet)
register(LlamaConfig, Llama)


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of `cfg.to_dict()`; dispatches on d["model_type"]."""
    model_type = d.get("model_type")
    if model_type not in _CONFIGS:
        raise ValueError(f"config dict needs model_type in {sorted(_CONFIGS)}, got {model_type!r}")
    return _CONFIGS[model_type][0].from_dict(d)


def _build_with_key(cfg: ModelConfig, key: jax.Array) -> nnx.Module:
    entry = _CONFIGS.get(getattr(cfg, "model_type", None))
    if entry is None or not isinstance(cfg, entry[0]):
        raise TypeError(f"unknown model config type {type(cfg).__name__}")
    return entry[1](cfg, rngs=nnx.Rngs(params=key))


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
    if getattr(cfg, "model_type", None) not in _CONFIGS:
        raise TypeError(f"unknown model config type {type(cfg).__name__}")
    return nnx.merge(graphdef_of(cfg), init_state(jax.random.key(int(seed)), cfg=cfg))


__all__ = ["ModelConfig", "register", "config_from_dict", "graphdef_of", "init_state", "build"]
