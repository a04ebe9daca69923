"""Training many small models at once: M fresh models, vmapped, each on its own subset.

The retraining loop behind the LDS ground truth (and the pretraining of the frozen model) is

    for each model m (vmapped):  params_m <- init(seed_m)
    for step s:                  params_m <- AdamW(params_m, grad mean_b loss(x[idx[m, s, b]]))

with idx[m] a stream of per-epoch permutations of subset m drawn from seed m. Steps run in chunks
of `TrainConfig.scan_steps` inside one jitted `lax.scan`; parameters, optimiser state and the
device copy of the data are arguments of that function, never closed over.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from stride_jax import models

__all__ = [
    "TrainConfig",
    "train_many",
    "pretrain",
    "pretrain_with_checkpoints",
    "Checkpoint",
    "stack",
    "unstack",
    "eval_losses",
    "eval_loss",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule (frozen, hashable; its optimiser fields reach jit as static).

    AdamW (b1, b2), global-norm clipping, linear warmup over floor(warmup_frac * steps) steps
    (step i at lr (i+1)/warmup), then cosine decay to `final_lr_frac * learning_rate` at the
    last step. Weight decay applies to matrices only (ndim >= 2). Steps = ceil(epochs *
    subset_size / batch_size); data are drawn as a stream of per-epoch permutations of each
    model's subset, so no example is dropped at epoch ends.
    `scan_steps` (steps per jitted chunk) changes speed, never results.
    """

    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: float = 4.0
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    scan_steps: int = 32

    def __post_init__(self):
        if self.batch_size < 1 or self.scan_steps < 1:
            raise ValueError("batch_size and scan_steps must be >= 1")
        if not self.epochs > 0 or not self.learning_rate > 0:
            raise ValueError("epochs and learning_rate must be positive")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.final_lr_frac <= 1:
            raise ValueError("warmup_frac must be in [0, 1) and final_lr_frac in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)

    def num_steps(self, subset_size: int) -> int:
        return max(1, math.ceil(self.epochs * subset_size / self.batch_size))


class _Optim(NamedTuple):
    """The part of TrainConfig that reaches jit as static. The learning rate and step count are
    traced scalars and batch size / scan_steps set shapes, so sweeps over epochs or learning
    rates reuse one compiled step."""

    weight_decay: float
    warmup_frac: float
    final_lr_frac: float
    grad_clip: float
    b1: float
    b2: float

    @classmethod
    def of(cls, cfg: TrainConfig) -> _Optim:
        return cls(*(float(getattr(cfg, f)) for f in cls._fields))


def _learning_rate(step: jax.Array, peak: jax.Array, total_steps: jax.Array, opt: _Optim) -> jax.Array:
    """Linear warmup over floor(warmup_frac * total) steps, then cosine to final_lr_frac * lr."""
    warmup = jnp.floor(opt.warmup_frac * total_steps)
    warm = (step + 1) / jnp.maximum(warmup, 1.0)
    frac = jnp.clip((step - warmup) / jnp.maximum(total_steps - warmup, 1.0), 0.0, 1.0)
    cosine = opt.final_lr_frac + (1 - opt.final_lr_frac) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    return peak * jnp.where(step < warmup, warm, cosine)


def _make_tx(opt: _Optim, peak: jax.Array, total_steps: jax.Array) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(
            lambda step: _learning_rate(step, peak, total_steps, opt),
            b1=opt.b1,
            b2=opt.b2,
            weight_decay=opt.weight_decay,
            mask=decay_mask,
        ),
    )


# ----------------------------------------------------------------------------- stacking


def stack(modules: Sequence[nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
    """Modules of one architecture -> (graphdef, state with leading axis M on every leaf)."""
    if not modules:
        raise ValueError("stack needs at least one module")
    graphdefs, states = zip(*(nnx.split(m) for m in modules))
    if any(g != graphdefs[0] for g in graphdefs[1:]):
        raise ValueError("stack needs modules of identical structure and config")
    return graphdefs[0], jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack(graphdef: nnx.GraphDef, state_M: nnx.State, i: int) -> nnx.Module:
    """Model i of a stacked state as a standalone module."""
    n = _n_models(state_M)
    if not -n <= i < n:
        raise IndexError(f"model index {i} out of range for {n} stacked models")
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state_M))


def _n_models(state_M: nnx.State) -> int:
    return int(jax.tree.leaves(state_M)[0].shape[0])


# ----------------------------------------------------------------------------- validation


def _check_subsets(subset_idx_MxNs: np.ndarray, seeds_M: np.ndarray, n: int, batch_size: int):
    idx = np.asarray(subset_idx_MxNs)
    seeds = np.asarray(seeds_M)
    if idx.ndim != 2 or idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"subset_idx must be a non-empty [M, Ns] index array, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"subset_idx must hold integer indices, got {idx.dtype}")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"subset indices span [{idx.min()}, {idx.max()}], outside [0, {n})")
    if seeds.shape != (idx.shape[0],):
        raise ValueError(f"{idx.shape[0]} subsets but seeds of shape {seeds.shape}")
    if not np.issubdtype(seeds.dtype, np.integer) or seeds.min() < 0 or seeds.max() >= 2**32:
        raise ValueError("seeds must be integers in [0, 2**32)")
    if batch_size > idx.shape[1]:
        raise ValueError(f"batch_size={batch_size} exceeds the subset size {idx.shape[1]}")
    return idx.astype(np.int32), seeds.astype(np.int64)


def _batch_order(subset_idx_Ns: np.ndarray, seed: int, total_steps: int, batch: int) -> np.ndarray:
    """[steps, B] example indices: a stream of per-epoch permutations of the subset, from seed."""
    rng = np.random.default_rng([int(seed), 1])  # stream 1: data order; init uses jax.random.key(seed)
    n_epochs = math.ceil(total_steps * batch / len(subset_idx_Ns))
    order = np.concatenate([rng.permutation(subset_idx_Ns) for _ in range(n_epochs)])
    return order[: total_steps * batch].reshape(total_steps, batch)


# ----------------------------------------------------------------------------- pure steps


def device_batch(examples) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """(inputs, targets, padding mask or None, loss weights or None) of `examples` on device."""
    weights = examples.loss_mask if examples.loss_mask is not None else examples.mask
    as_dev = lambda a: None if a is None else jnp.asarray(a)
    return (jnp.asarray(examples.inputs), jnp.asarray(examples.targets), as_dev(examples.mask), as_dev(weights))


def take(batch, idx):
    """Rows `idx` of every (non-None) array of a device batch."""
    return tuple(None if a is None else a[idx] for a in batch)


def batch_losses(model: nnx.Module, batch) -> jax.Array:
    """Per-example loss [B] of `model` on a device batch (padding and loss masks applied)."""
    x, y, mask, weights = batch
    return models.example_loss(model(x, mask), y, weights)


def _mean_loss(params: nnx.State, graphdef: nnx.GraphDef, batch) -> jax.Array:
    return batch_losses(nnx.merge(graphdef, params), batch).mean()


def _train_chunk(params_M, opt_M, data_N, idx_CxMxB, valid_C, peak_lr, total_steps, *, graphdef, opt):
    """`C` optimiser steps for M models (vmapped); steps with valid=False leave the state as is."""
    tx = _make_tx(opt, peak_lr, total_steps)

    def one_model(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_mean_loss)(params, graphdef, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def step(carry, xs):
        idx_MxB, valid = xs

        def run(carry):
            params_M, opt_M, loss_M = jax.vmap(one_model)(*carry, take(data_N, idx_MxB))
            return (params_M, opt_M), loss_M

        def skip(carry):
            return carry, jnp.full(idx_MxB.shape[:1], jnp.nan, jnp.float32)

        return jax.lax.cond(valid, run, skip, carry)

    (params_M, opt_M), loss_CxM = jax.lax.scan(step, (params_M, opt_M), (idx_CxMxB, valid_C))
    return params_M, opt_M, loss_CxM


_STATIC = ("graphdef", "opt")
_train_chunk_jit = jax.jit(_train_chunk, static_argnames=_STATIC)
_train_chunk_donate = jax.jit(_train_chunk, static_argnames=_STATIC, donate_argnums=(0, 1))


def _init_many(model_cfg: models.ModelConfig, seeds_M: np.ndarray) -> nnx.State:
    """Stacked initial params, model m from jax.random.key(seeds_M[m]) (== models.build)."""
    states = [models.init_state(jax.random.key(int(s)), cfg=model_cfg) for s in seeds_M]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@functools.partial(jax.jit, static_argnames=("opt",))
def _init_opt(params_M: nnx.State, *, opt: _Optim):
    return jax.vmap(_make_tx(opt, jnp.float32(0), jnp.float32(1)).init)(params_M)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_batch(state_M, data_N, idx_B, *, graphdef) -> jax.Array:
    batch = take(data_N, idx_B)
    return jax.vmap(lambda s: batch_losses(nnx.merge(graphdef, s), batch))(state_M)


# ----------------------------------------------------------------------------- public API


def train_many(
    model_cfg: models.ModelConfig,
    examples,
    subset_idx_MxNs: np.ndarray,
    seeds_M: np.ndarray,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    desc: str = "train",
    on_chunk: Callable[[int, nnx.State], None] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Train M fresh models (init and data order from seeds_M[m]) on rows of subset_idx_MxNs.

    `on_chunk(steps_done, state_M)`, if given, is called after every chunk of `scan_steps`
    steps (copy what you keep: off CPU the next chunk donates those buffers).

    Returns (graphdef, state_M) with leading axis M on every leaf; `unstack` gives model m,
    which for M = 1 equals training that model alone (the vmap invariant). Raises ValueError on
    inconsistent inputs and FloatingPointError if a model's last training loss is not finite.
    """
    models.check_examples(model_cfg, examples)
    idx_MxNs, seeds = _check_subsets(subset_idx_MxNs, seeds_M, len(examples.inputs), cfg.batch_size)
    n_models, subset_size = idx_MxNs.shape
    total_steps = cfg.num_steps(subset_size)
    order_MxSxB = np.stack(
        [_batch_order(row, s, total_steps, cfg.batch_size) for row, s in zip(idx_MxNs, seeds)]
    )

    graphdef = models.graphdef_of(model_cfg)
    params_M = _init_many(model_cfg, seeds)
    opt = _Optim.of(cfg)
    opt_M = _init_opt(params_M, opt=opt)
    data_N = device_batch(examples)

    chunk = min(cfg.scan_steps, total_steps)
    n_chunks = math.ceil(total_steps / chunk)
    pad = n_chunks * chunk - total_steps
    order_MxSxB = np.concatenate([order_MxSxB, order_MxSxB[:, :pad]], axis=1)  # dummy, skipped
    valid_S = np.arange(n_chunks * chunk) < total_steps
    train_chunk = _train_chunk_jit if jax.default_backend() == "cpu" else _train_chunk_donate

    bar = tqdm(total=total_steps, desc=desc, disable=not progress, unit="step")
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        params_M, opt_M, loss_CxM = train_chunk(
            params_M,
            opt_M,
            data_N,
            jnp.asarray(order_MxSxB[:, sl].transpose(1, 0, 2)),
            jnp.asarray(valid_S[sl]),
            jnp.float32(cfg.learning_rate),
            jnp.float32(total_steps),
            graphdef=graphdef,
            opt=opt,
        )
        if progress:
            loss_CxM = np.asarray(loss_CxM)[valid_S[sl]]
            bar.set_postfix(loss=f"{loss_CxM.mean():.4f}")
            bar.update(len(loss_CxM))
        if on_chunk is not None:
            on_chunk(min((c + 1) * chunk, total_steps), params_M)
    bar.close()
    final_loss_M = np.asarray(loss_CxM)[-1] if progress else np.asarray(loss_CxM)[valid_S[sl]][-1]
    if not np.isfinite(final_loss_M).all():
        bad = np.flatnonzero(~np.isfinite(final_loss_M))
        raise FloatingPointError(
            f"training diverged (non-finite loss) for models {bad.tolist()} (seeds "
            f"{seeds[bad].tolist()}); lower TrainConfig.learning_rate or raise warmup_frac"
        )
    return graphdef, params_M


def pretrain(
    model_cfg: models.ModelConfig, examples, cfg: TrainConfig, seed: int, *, progress: bool = True
) -> nnx.Module:
    """One model trained on all of `examples` (train_many with M = 1)."""
    all_idx = np.arange(len(examples.inputs), dtype=np.int32)[None]
    graphdef, state_M = train_many(
        model_cfg, examples, all_idx, np.array([seed]), cfg, progress=progress, desc="pretrain"
    )
    return unstack(graphdef, state_M, 0)


class Checkpoint(NamedTuple):
    """A model during training, the mean learning rate of the steps since the previous
    checkpoint (TracIn's eta_c), and the number of steps taken."""

    model: nnx.Module
    learning_rate: float
    step: int


def pretrain_with_checkpoints(
    model_cfg: models.ModelConfig, examples, cfg: TrainConfig, seed: int, n_checkpoints: int,
    *, progress: bool = True,
) -> list[Checkpoint]:
    """`pretrain`, keeping up to n_checkpoints evenly spaced models (the last is the final one).

    Checkpoints fall at chunk ends: scan_steps is set to ceil(steps / n_checkpoints), which
    changes speed, never results, so the last checkpoint equals `pretrain(...)`.
    """
    if n_checkpoints < 1:
        raise ValueError(f"n_checkpoints must be >= 1, got {n_checkpoints}")
    total = cfg.num_steps(len(examples.inputs))
    cfg = dataclasses.replace(cfg, scan_steps=math.ceil(total / n_checkpoints))
    kept: list[tuple[int, nnx.State]] = []
    save = lambda step, state_M: kept.append((step, jax.tree.map(jnp.copy, state_M)))
    all_idx = np.arange(len(examples.inputs), dtype=np.int32)[None]
    graphdef, _ = train_many(model_cfg, examples, all_idx, np.array([seed]), cfg, progress=progress,
                             desc="pretrain", on_chunk=save)
    lr_S = np.asarray(_learning_rate(jnp.arange(total, dtype=jnp.float32), jnp.float32(cfg.learning_rate),
                                     jnp.float32(total), _Optim.of(cfg)))
    bounds = [0] + [step for step, _ in kept]
    return [Checkpoint(unstack(graphdef, state_M, 0), float(lr_S[a:b].mean()), b)
            for a, b, (_, state_M) in zip(bounds[:-1], bounds[1:], kept)]


def eval_losses(
    graphdef: nnx.GraphDef,
    state_M: nnx.State,
    examples,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """Per-example loss [M, N] (float32) of every stacked model on every example.

    Memory bound: each step evaluates max(1, batch_size // M) examples on all M models, so at
    most about `batch_size` sequences of logits are live at once.
    """
    n = len(examples.inputs)
    if n == 0:
        raise ValueError("examples is empty")
    n_models = _n_models(state_M)
    models.check_examples(nnx.merge(graphdef, state_M).cfg, examples)  # stacked leaves; only cfg used
    per_step = max(1, batch_size // n_models)
    per_step = min(per_step, n)
    data_N = device_batch(examples)
    out = []
    starts = range(0, n, per_step)
    for start in tqdm(starts, desc="eval", disable=not progress):
        idx_B = np.arange(start, start + per_step) % n  # last batch padded by wrapping around
        out.append(_eval_batch(state_M, data_N, jnp.asarray(idx_B, jnp.int32), graphdef=graphdef))
    losses_MxN = np.concatenate([np.asarray(o) for o in out], axis=1)[:, :n]
    return losses_MxN.astype(np.float32)


def eval_loss(model: nnx.Module, examples, *, batch_size: int = 256) -> np.ndarray:
    """Per-example loss [N] of a single model."""
    graphdef, state = nnx.split(model)
    state_1 = jax.tree.map(lambda x: x[None], state)
    return eval_losses(graphdef, state_1, examples, batch_size=batch_size)[0]
