"""Training or fine-tuning many models at once: M models, vmapped, each on its own subset.

The retraining loop behind the LDS ground truth (and the pretraining of the frozen model) is

    for each model m (vmapped):  params_m <- init(seed_m)     (or: the start model's parameters)
    for step s:                  params_m <- AdamW(params_m, grad mean_b loss(x[idx[m, s, b]]))

with idx[m] a stream of per-epoch permutations of subset m drawn from seed m. Steps run in chunks
of `TrainConfig.scan_steps` inside one jitted `lax.scan`; parameters, optimiser state and the
device copy of the data are arguments of that function, never closed over.

Fine-tuning (`finetune_many`, `Tune`) trains all parameters, the top blocks, or LoRA adapters
of a start model; only the trained parameters carry the model axis M, the frozen ones exist
once. With a mesh the M models are split over devices by `shard_map` (`sharding.py`).
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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from stride_jax import models, sharding

__all__ = [
    "TrainConfig",
    "Tune",
    "Tuned",
    "train_many",
    "finetune_many",
    "reads",
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
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip (the bound on the gradient's global norm) must be > 0, got {self.grad_clip}")

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
    """(inputs, targets, padding mask or None, loss weights or None) of `examples` on device
    (`Examples.device_batch`)."""
    return examples.device_batch()


def take(batch, idx):
    """Rows `idx` of every (non-None) array of a device batch."""
    return tuple(None if a is None else a[idx] for a in batch)


def batch_losses(model: nnx.Module, batch, layer: int = 0) -> jax.Array:
    """Per-example loss [B] of `model` on a device batch (padding and loss masks applied).

    With `layer` > 0 the batch holds hook states trunk(x, layer) instead of inputs, and only
    `rest(h, layer)` runs.
    """
    logits, y, weights = _batch_logits(model, batch, layer)
    return models.example_loss(logits, y, weights)


def _batch_logits(model: nnx.Module, batch, layer: int):
    """(logits, targets, weights) of a device batch; a counted-only batch (`_counted_only`: a
    fifth array of positions) reads the head at those positions only."""
    x, y, mask, weights, *pos = batch
    if not pos:
        return (model(x, mask) if layer == 0 else model.rest(x, layer=layer, mask=mask)), y, weights
    h = model.trunk(x, layer=0, mask=mask) if layer == 0 else x
    h_BxTxD = model.rest_hidden(h, layer=layer, mask=mask)
    h_BxPxD = jnp.take_along_axis(h_BxTxD, pos[0][..., None], axis=1)
    return model.readout(h_BxPxD).astype(jnp.float32), y, weights


def _counted_only(data, *, max_share: float = 0.75):
    """A sequence device batch with targets and weights kept at each row's counted positions
    (weight > 0) only, padded (weight 0) to the largest count P: (x, y [N, P], mask,
    weights [N, P], positions [N, P]). The loss is the same; the head runs at P positions
    instead of T (an instruction pair's response is often a few tokens of a long prompt). The
    batch is returned as is when it has no weights or P > max_share * T."""
    x, y, mask, weights = data
    if weights is None or y.ndim != 2:
        return data
    counted = np.asarray(weights) > 0
    p = int(counted.sum(axis=1).max())
    if p == 0 or p > max_share * y.shape[1]:
        return data
    pos = np.argsort(~counted, axis=1, kind="stable")[:, :p]  # counted positions first, in order
    gather = lambda a: jnp.asarray(np.take_along_axis(np.asarray(a), pos, axis=1))
    return x, gather(y), mask, gather(weights), jnp.asarray(pos, jnp.int32)


def _merge(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None) -> nnx.Module:
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def _mean_loss(params: nnx.State, frozen: nnx.State | None, graphdef: nnx.GraphDef, batch, layer: int) -> jax.Array:
    return batch_losses(_merge(graphdef, params, frozen), batch, layer).mean()


def _train_chunk(params_M, opt_M, frozen, data_N, idx_CxMxB, valid_C, peak_lr, total_steps, *, graphdef, opt,
                 layer):
    """`C` optimiser steps for M models (vmapped); steps with valid=False leave the state as is.

    `params_M` (leading axis M) are trained; `frozen` (one copy, or None) is shared by every
    model and never differentiated.
    """
    tx = _make_tx(opt, peak_lr, total_steps)

    def one_model(params, opt_state, batch):
        loss, grads = jax.value_and_grad(_mean_loss)(params, frozen, graphdef, batch, layer)
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


_STATIC = ("graphdef", "opt", "layer")
_train_chunk_jit = jax.jit(_train_chunk, static_argnames=_STATIC)
_train_chunk_donate = jax.jit(_train_chunk, static_argnames=_STATIC, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _sharded_train_chunk(mesh: Mesh, axis: str, donate: bool):
    """`_train_chunk` with the M models split over `mesh[axis]` by `shard_map` (cached per mesh).

    Models are independent, so each device trains its block of M / n models on the replicated
    data and frozen parameters; nothing is communicated but the [C, M] losses.
    """

    def fn(params_M, opt_M, frozen, data_N, idx_CxMxB, valid_C, peak_lr, total_steps, **static):
        body = functools.partial(_train_chunk, **static)
        specs = (P(axis), P(axis), P(), P(), P(None, axis), P(), P(), P())
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(axis), P(axis), P(None, axis)),
                             check_vma=False)(params_M, opt_M, frozen, data_N, idx_CxMxB, valid_C, peak_lr,
                                              total_steps)

    return jax.jit(fn, static_argnames=_STATIC, donate_argnums=(0, 1) if donate else ())


def _init_many(model_cfg: models.ModelConfig, seeds_M: np.ndarray) -> nnx.State:
    """Stacked initial params, model m from jax.random.key(seeds_M[m]) (== models.build)."""
    states = [models.init_state(jax.random.key(int(s)), cfg=model_cfg) for s in seeds_M]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@functools.partial(jax.jit, static_argnames=("opt",))
def _init_opt(params_M: nnx.State, *, opt: _Optim):
    return jax.vmap(_make_tx(opt, jnp.float32(0), jnp.float32(1)).init)(params_M)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _eval_batch(state_M, frozen, data_N, idx_B, *, graphdef, layer=0) -> jax.Array:
    batch = take(data_N, idx_B)
    return jax.vmap(lambda s: batch_losses(_merge(graphdef, s, frozen), batch, layer))(state_M)


def _orders(idx_MxNs: np.ndarray, seeds: np.ndarray, total_steps: int, batch: int) -> np.ndarray:
    return np.stack([_batch_order(row, s, total_steps, batch) for row, s in zip(idx_MxNs, seeds)])


def _model_axis(mesh: Mesh | None, axis: str) -> tuple[str | None, int]:
    if mesh is None:
        return None, 1
    axis = sharding.axis_of(mesh, axis)
    return axis, sharding.axis_size(mesh, axis)


def _run(graphdef, params_M, frozen, data_N, order_MxSxB, seeds, cfg: TrainConfig, *, layer: int, n_models: int,
         mesh: Mesh | None, axis: str | None, progress: bool, desc: str, on_chunk) -> nnx.State:
    """The optimiser loop shared by training from scratch and fine-tuning.

    `params_M` holds n_models real models, then copies of the last one (padding to a multiple
    of the mesh axis) whose results are dropped.
    """
    total_steps = order_MxSxB.shape[1]
    opt = _Optim.of(cfg)
    opt_M = _init_opt(params_M, opt=opt)
    donate = jax.default_backend() != "cpu"
    if mesh is None:
        train_chunk = _train_chunk_donate if donate else _train_chunk_jit
        place_idx = jnp.asarray
    else:
        params_M, opt_M = sharding.shard_leading((params_M, opt_M), mesh, axis)
        frozen, data_N = sharding.replicate((frozen, data_N), mesh)
        train_chunk = _sharded_train_chunk(mesh, axis, donate)
        idx_sharding = NamedSharding(mesh, P(None, axis))
        place_idx = lambda a: jax.device_put(a, idx_sharding)

    chunk = min(cfg.scan_steps, total_steps)
    n_chunks = math.ceil(total_steps / chunk)
    pad = n_chunks * chunk - total_steps
    order_MxSxB = np.concatenate([order_MxSxB, order_MxSxB[:, :pad]], axis=1)  # dummy, skipped
    valid_S = np.arange(n_chunks * chunk) < total_steps

    bar = tqdm(total=total_steps, desc=desc, disable=not progress, unit="step")
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        params_M, opt_M, loss_CxM = train_chunk(
            params_M,
            opt_M,
            frozen,
            data_N,
            place_idx(order_MxSxB[:, sl].transpose(1, 0, 2)),
            jnp.asarray(valid_S[sl]),
            jnp.float32(cfg.learning_rate),
            jnp.float32(total_steps),
            graphdef=graphdef,
            opt=opt,
            layer=layer,
        )
        if progress:
            loss_CxM = np.asarray(loss_CxM)[valid_S[sl]]
            bar.set_postfix(loss=f"{loss_CxM[:, :n_models].mean():.4f}")
            bar.update(len(loss_CxM))
        if on_chunk is not None:
            on_chunk(min((c + 1) * chunk, total_steps), params_M)
    bar.close()
    final_loss_M = (np.asarray(loss_CxM)[-1] if progress else np.asarray(loss_CxM)[valid_S[sl]][-1])[:n_models]
    if not np.isfinite(final_loss_M).all():
        bad = np.flatnonzero(~np.isfinite(final_loss_M))
        raise FloatingPointError(
            f"training diverged (non-finite loss) for models {bad.tolist()} (seeds "
            f"{seeds[bad].tolist()}); lower TrainConfig.learning_rate or raise warmup_frac"
        )
    if len(jax.tree.leaves(params_M)[0]) != n_models:
        params_M = jax.tree.map(lambda x: x[:n_models], params_M)
    return params_M


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
    start: nnx.Module | None = None,
    tune: Tune | None = None,
    mesh: Mesh | None = None,
    axis: str = "models",
) -> tuple[nnx.GraphDef, nnx.State]:
    """Train M fresh models (init and data order from seeds_M[m]) on rows of subset_idx_MxNs.

    `on_chunk(steps_done, state_M)`, if given, is called after every chunk of `scan_steps`
    steps (copy what you keep: off CPU the next chunk donates those buffers).

    With `start` (a model of config `model_cfg`), every model starts from its parameters
    instead of a fresh init (data order still from seeds_M) and `tune` says which parameters
    train (default: all); see `finetune_many`, which this calls. For tune modes "top" and
    "lora" the M models are materialised here as full copies; `finetune_many` keeps the frozen
    parameters shared instead.

    With a `mesh`, the M models are split over its `axis` ("models", or the only axis of a 1-D
    mesh): each device trains M / n of them (M is padded to a multiple of n with copies of the
    last model, which are dropped). Results equal the single-device run up to float32
    reassociation (vmapping another number of models at once).

    Returns (graphdef, state_M) with leading axis M on every leaf; `unstack` gives model m,
    which for M = 1 equals training that model alone (the vmap invariant). Raises ValueError on
    inconsistent inputs and FloatingPointError if a model's last training loss is not finite.
    """
    if start is not None or tune is not None:
        if start is None:
            raise ValueError("tune= needs start=: fine-tuning starts from a given model")
        if start.cfg != model_cfg:
            raise ValueError(f"start is a model of config {start.cfg}, not of model_cfg {model_cfg}")
        tuned = finetune_many(start, examples, subset_idx_MxNs, seeds_M, cfg, tune or Tune(), progress=progress,
                              desc=desc, on_chunk=on_chunk, mesh=mesh, axis=axis)
        if tuned.frozen is None:
            return tuned.graphdef, tuned.trainable_M
        return stack([tuned.model(i) for i in range(tuned.n_models)])
    models.check_examples(model_cfg, examples)
    idx_MxNs, seeds = _check_subsets(subset_idx_MxNs, seeds_M, len(examples.inputs), cfg.batch_size)
    n_models, subset_size = idx_MxNs.shape
    axis, n_dev = _model_axis(mesh, axis)
    idx_MxNs, seeds_pad = sharding.pad_to_multiple(idx_MxNs, n_dev), sharding.pad_to_multiple(seeds, n_dev)
    total_steps = cfg.num_steps(subset_size)
    order_MxSxB = _orders(idx_MxNs, seeds_pad, total_steps, cfg.batch_size)
    graphdef = models.graphdef_of(model_cfg)
    params_M = _init_many(model_cfg, seeds_pad)
    params_M = _run(graphdef, params_M, None, device_batch(examples), order_MxSxB, seeds, cfg, layer=0,
                    n_models=n_models, mesh=mesh, axis=axis, progress=progress, desc=desc, on_chunk=on_chunk)
    return graphdef, params_M


# ----------------------------------------------------------------------------- fine-tuning


TUNE_MODES = ("full", "top", "lora")


@dataclasses.dataclass(frozen=True)
class Tune:
    """Which parameters a fine-tune trains (frozen, hashable; recorded in ground-truth stores).

    - "full": every parameter.
    - "top": the last `layers` blocks, the final norm and the head: the parameters that
      `rest(h, layer=n_layers - layers)` reads and `trunk(x, layer=n_layers - layers)` does not
      (so an embedding tied to the head stays frozen: the trunk reads it too). The frozen trunk
      runs once per example, before training, not once per step and model.
    - "lora": a rank-`rank` adapter W + A B on the kernel of every `nnx.Linear` in the last
      `layers` blocks (every block when `layers` is None); not on the head. B starts at zero,
      so training starts at the start model; A ~ N(0, 1 / fan_in) is drawn from the model's
      seed. Every original parameter stays frozen. With `layers` set, the trunk below those
      blocks runs once per example, as for "top".

    Frozen parameters get no updates and no weight decay, and exist once, not once per model.
    """

    mode: str = "full"
    layers: int | None = None
    rank: int = 8

    def __post_init__(self):
        if self.mode not in TUNE_MODES:
            raise ValueError(f"Tune.mode must be one of {TUNE_MODES}, got {self.mode!r}")
        if self.mode == "full" and self.layers is not None:
            raise ValueError("Tune(mode='full') trains every layer; use mode='top' to train the last `layers`")
        if self.mode == "top" and self.layers is None:
            raise ValueError("Tune(mode='top') needs layers= (how many of the last blocks to train)")
        if self.layers is not None and (not isinstance(self.layers, (int, np.integer)) or self.layers < 1):
            raise ValueError(f"Tune.layers must be a positive int or None, got {self.layers!r}")
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"Tune.rank must be a positive int, got {self.rank!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tune:
        return cls(**d)

    def start_layer(self, n_layers: int) -> int:
        """The hook point where the trained part begins (0: the whole forward trains)."""
        if self.layers is not None and self.layers > n_layers:
            raise ValueError(f"Tune.layers={self.layers} exceeds the model's depth of {n_layers} blocks")
        return 0 if self.mode == "full" or self.layers is None else n_layers - self.layers


def _nnx_path(key_path) -> tuple:
    """A jax key path into an nnx.State -> the nnx path ('blocks', 0, 'attn', 'c_q', 'kernel')."""
    out = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        else:
            out.append(getattr(k, "name", getattr(k, "key", k)))
    return tuple(out)


def reads(model: nnx.Module, run: Callable[..., Any], *args: Any) -> set[tuple]:
    """nnx paths of the parameters that `run(model, *args)` reads, from its jaxpr (structure, not
    values). `args` are traced, so concrete-value checks inside `run` are skipped."""
    graphdef, state = nnx.split(model)
    keyed, treedef = jax.tree_util.tree_flatten_with_path(state)
    fn = lambda leaves, *a: run(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves)), *a)
    jaxpr = jax.make_jaxpr(fn)([leaf for _, leaf in keyed], *args).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return {_nnx_path(path) for (path, _), var in zip(keyed, jaxpr.invars) if id(var) in read}


def _child(module, key):
    return module[key] if isinstance(key, int) else getattr(module, key)


def _set_child(module, key, value) -> None:
    if isinstance(key, int):
        module[key] = value
    else:
        setattr(module, key, value)


def _at(module, path: tuple):
    for key in path:
        module = _child(module, key)
    return module


def _detach(state: nnx.State) -> nnx.State:
    """The same arrays in new Variable objects (nnx.split/merge share Variables with the model)."""
    return jax.tree.map(lambda x: x, state)


class _Plan(NamedTuple):
    graphdef: nnx.GraphDef  # the trained module (the start model, with LoRA adapters for "lora")
    trainable: nnx.State  # one copy (for "lora": shapes only; values are drawn per model)
    frozen: nnx.State | None
    layer: int  # hook point where the trained part starts
    sites: tuple[tuple, ...]  # paths of the nnx.Linear modules that carry LoRA adapters


def _plan(start: nnx.Module, tune: Tune, inputs_1: Any) -> _Plan:
    """Split `start` into trained and frozen parameters for `tune` (inputs_1: one example)."""
    layer = tune.start_layer(start.n_layers)
    if tune.mode == "full":
        graphdef, state = nnx.split(start)
        return _Plan(graphdef, state, None, 0, ())
    x = jnp.asarray(inputs_1)
    state_at = lambda l: jnp.zeros(jax.eval_shape(lambda x: start.trunk(x, layer=l), x).shape, jnp.float32)
    h, h_top = state_at(layer), state_at(start.n_layers)
    in_trunk = reads(start, lambda mdl, x: mdl.trunk(x, layer=layer), x)
    in_rest = reads(start, lambda mdl, h: mdl.rest(h, layer=layer), h)
    if tune.mode == "top":
        trained = in_rest - in_trunk
        graphdef, trainable, frozen = nnx.split(start, lambda path, _: tuple(path) in trained, ...)
        return _Plan(graphdef, trainable, _detach(frozen), layer, ())
    in_blocks = in_rest - in_trunk - reads(start, lambda mdl, h: mdl.rest(h, layer=mdl.n_layers), h_top)
    sites = tuple(tuple(path) for path, mod in nnx.iter_graph(start)
                  if isinstance(mod, nnx.Linear) and (*path, "kernel") in in_blocks)
    if not sites:
        raise ValueError(f"Tune(mode='lora'): {type(start).__name__} has no nnx.Linear layer in its last "
                         f"{start.n_layers - layer} blocks to adapt")
    adapted = nnx.clone(start)
    rngs = nnx.Rngs(0)  # placeholder values: `_lora_params` draws A per model
    for path in sites:
        parent, linear = _at(adapted, path[:-1]), _at(adapted, path)
        _set_child(parent, path[-1], nnx.LoRA(linear.in_features, tune.rank, linear.out_features,
                                              base_module=linear, dtype=linear.dtype, rngs=rngs))
    graphdef, trainable, frozen = nnx.split(adapted, nnx.LoRAParam, ...)
    return _Plan(graphdef, trainable, _detach(frozen), layer, sites)


@functools.partial(jax.jit, static_argnames=("shapes",))
def _lora_a(seed: jax.Array, *, shapes: tuple[tuple[int, int], ...]) -> tuple[jax.Array, ...]:
    """A of every LoRA site for one model: N(0, 1 / fan_in) from key(seed) folded with the site index."""
    key = jax.random.key(seed)
    return tuple(jax.random.normal(jax.random.fold_in(key, i), shape) / np.sqrt(shape[0])
                 for i, shape in enumerate(shapes))


def _lora_params(plan: _Plan, seeds_M: np.ndarray) -> nnx.State:
    """Stacked LoRA parameters: A_m from seeds_M[m] (independent of M), B = 0."""
    site_of = {path: i for i, path in enumerate(plan.sites)}
    keyed = jax.tree_util.tree_flatten_with_path(plan.trainable)[0]
    a_shape = {}
    for key_path, leaf in keyed:
        path = _nnx_path(key_path)
        if path[-1] == "lora_a":
            a_shape[site_of[path[:-1]]] = tuple(leaf.shape)
    shapes = tuple(a_shape[i] for i in range(len(plan.sites)))
    a_M = [_lora_a(jnp.asarray(np.uint32(s)), shapes=shapes) for s in seeds_M]

    def init(key_path, leaf):
        path = _nnx_path(key_path)
        if path[-1] == "lora_a":
            return jnp.stack([a[site_of[path[:-1]]] for a in a_M]).astype(leaf.dtype)
        return jnp.zeros((len(seeds_M), *leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(init, plan.trainable)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _trunk_batch(graphdef, states, inputs, mask, *, layer):
    return nnx.merge(graphdef, *states).trunk(inputs, layer=layer, mask=mask)


def _hook_data(graphdef, states, examples, layer: int, batch_size: int):
    """The device batch of `examples` with inputs replaced by trunk(inputs, layer) ([N, ..., D])."""
    inputs, targets, mask, weights = device_batch(examples)
    if layer > 0:
        inputs = jnp.concatenate([
            _trunk_batch(graphdef, states, inputs[idx], None if mask is None else mask[idx], layer=layer)[:real]
            for idx, real in _padded_batches(len(examples.inputs), batch_size)])
    return _counted_only((inputs, targets, mask, weights))


def _padded_batches(n: int, batch_size: int):
    """(row indices [B], real rows) of batches of min(batch_size, n) rows covering 0..n-1; the last
    batch is padded with row n - 1, so every batch has one shape (one compile)."""
    size = min(batch_size, n)
    for lo in range(0, n, size):
        yield jnp.asarray(np.minimum(np.arange(lo, lo + size), n - 1)), min(size, n - lo)


class HookStates(NamedTuple):
    """Examples as a fine-tune of one start model with one `Tune` reads them: the device batch
    with inputs replaced by the frozen trunk's output trunk(x, layer) (the inputs themselves
    when the whole model trains), and the split of the start model into trained and frozen
    parameters. Computed once by `hook_states`, reused by every `finetune_many` /
    `Tuned.eval_losses` call of the same start model and tune (a ground-truth sweep fine-tunes
    hundreds of models on one pool: the trunk is the same for all of them)."""

    plan: _Plan
    data: tuple
    n: int
    tune: Tune


def hook_states(start: nnx.Module, tune: Tune, examples, *, hook_batch_size: int = 64,
                like: HookStates | None = None) -> HookStates:
    """`examples` through the frozen trunk of `start` for fine-tunes with `tune`, once.

    `like`: hook states of another example set of the same start model and tune (the pool when
    these are the queries): its parameter split is reused.
    """
    models.check_examples(start.cfg, examples)
    if like is not None and like.tune != tune:
        raise ValueError(f"hook_states(like=...) was made for {like.tune}, not {tune}")
    plan = like.plan if like is not None else _plan(start, tune, examples.inputs[:1])
    states = (plan.trainable,) if plan.frozen is None else (plan.trainable, plan.frozen)
    return HookStates(plan, _hook_data(plan.graphdef, states, examples, plan.layer, hook_batch_size),
                      len(examples.inputs), tune)


def _check_hooks(hooks: HookStates, tune: Tune, examples) -> None:
    if hooks.tune != tune or hooks.n != len(examples.inputs):
        raise ValueError(f"hooks were computed for {hooks.n} examples with {hooks.tune}; this call has "
                         f"{len(examples.inputs)} examples with {tune}")


@dataclasses.dataclass(frozen=True, eq=False)
class Tuned:
    """M fine-tuned models that share their frozen parameters (see `finetune_many`).

    `graphdef` is the trained module (the start model's, with LoRA adapters for "lora"),
    `frozen` one copy of the parameters no model trained (None for "full"), `trainable_M` the
    trained ones with leading axis M, `layer` the hook point where the trained part starts.
    """

    graphdef: nnx.GraphDef
    trainable_M: nnx.State
    frozen: nnx.State | None
    layer: int
    tune: Tune
    sites: tuple[tuple, ...] = ()

    @property
    def n_models(self) -> int:
        return _n_models(self.trainable_M)

    def _states(self, i: int) -> tuple[nnx.State, ...]:
        trainable = jax.tree.map(lambda x: x[i], self.trainable_M)
        return (trainable,) if self.frozen is None else (trainable, self.frozen)

    def model(self, i: int) -> nnx.Module:
        """Model i as a plain model of the start model's architecture (LoRA folded: W + A B)."""
        if not -self.n_models <= i < self.n_models:
            raise IndexError(f"model index {i} out of range for {self.n_models} fine-tuned models")
        model = nnx.merge(self.graphdef, *self._states(i), copy=True)  # folding must not touch `frozen`
        for path in self.sites:
            lora = _at(model, path)
            linear = lora.base_module
            linear.kernel.set_value(linear.kernel[...] + lora.lora_a[...] @ lora.lora_b[...])
            _set_child(_at(model, path[:-1]), path[-1], linear)
        return model

    def eval_losses(self, examples, *, batch_size: int = 256, hook_batch_size: int = 64,
                    progress: bool = False, hooks: HookStates | None = None) -> np.ndarray:
        """Per-example loss [M, N] of every model; the frozen trunk runs once per example (or
        not at all with `hooks`, `hook_states` of these examples for the same start and tune)."""
        data_N = self._data(examples, hooks, hook_batch_size)
        return _eval(self.graphdef, self.trainable_M, self.frozen, data_N, self.layer, batch_size, progress)

    def greedy_match(self, examples, *, batch_size: int = 8, hook_batch_size: int = 64,
                     hooks: HookStates | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`train.greedy_match` of every model: (exact [M, N], token accuracy [M, N]), the frozen
        trunk run once per example (or not at all with `hooks` of these examples)."""
        if len(examples.inputs) == 0:
            raise ValueError("examples is empty")
        data_N = self._data(examples, hooks, hook_batch_size)
        return _greedy(self.graphdef, self.trainable_M, self.frozen, data_N, self.layer, batch_size)

    def _data(self, examples, hooks: HookStates | None, hook_batch_size: int):
        """The device batch the trained part reads: `hooks.data` (checked) or the trunk run here."""
        model_0 = nnx.merge(self.graphdef, *self._states(0))
        models.check_examples(model_0.cfg, examples)
        if hooks is not None:
            _check_hooks(hooks, self.tune, examples)
            return hooks.data
        return _hook_data(self.graphdef, self._states(0), examples, self.layer, hook_batch_size)


def finetune_many(
    start: nnx.Module,
    examples,
    subset_idx_MxNs: np.ndarray,
    seeds_M: np.ndarray,
    cfg: TrainConfig,
    tune: Tune = Tune(),
    *,
    progress: bool = True,
    desc: str = "fine-tune",
    on_chunk: Callable[[int, nnx.State], None] | None = None,
    mesh: Mesh | None = None,
    axis: str = "models",
    hook_batch_size: int = 64,
    hooks: HookStates | None = None,
) -> Tuned:
    """Fine-tune M copies of `start`, model m on rows subset_idx_MxNs[m], data order from seeds_M[m].

    The loop, schedule and optimiser are those of `train_many`; `tune` picks the trained
    parameters (`Tune`). Only those are vmapped over models (and split over `mesh[axis]` with
    a mesh): the frozen ones exist once and are shared. For "top" (and "lora" with `layers`),
    the hook states trunk(x, layer) of the pool are computed once, in batches of
    `hook_batch_size`, and the steps run `rest(h, layer)` only. `on_chunk(steps, trainable_M)`
    sees the trained parameters. `hooks`: `hook_states(start, tune, examples)`, computed once
    for many calls on the same pool (they must come from this `start`). Returns a `Tuned`.
    """
    models.check_examples(start.cfg, examples)
    idx_MxNs, seeds = _check_subsets(subset_idx_MxNs, seeds_M, len(examples.inputs), cfg.batch_size)
    n_models, subset_size = idx_MxNs.shape
    axis, n_dev = _model_axis(mesh, axis)
    idx_MxNs, seeds_pad = sharding.pad_to_multiple(idx_MxNs, n_dev), sharding.pad_to_multiple(seeds, n_dev)
    if hooks is not None:
        _check_hooks(hooks, tune, examples)
    else:
        hooks = hook_states(start, tune, examples, hook_batch_size=hook_batch_size)
    plan, data_N = hooks.plan, hooks.data
    if plan.sites:
        params_M = _lora_params(plan, seeds_pad)
    else:
        params_M = jax.tree.map(lambda x: jnp.repeat(x[None], len(seeds_pad), axis=0), plan.trainable)
    total_steps = cfg.num_steps(subset_size)
    order_MxSxB = _orders(idx_MxNs, seeds_pad, total_steps, cfg.batch_size)
    params_M = _run(plan.graphdef, params_M, plan.frozen, data_N, order_MxSxB, seeds, cfg, layer=plan.layer,
                    n_models=n_models, mesh=mesh, axis=axis, progress=progress, desc=desc, on_chunk=on_chunk)
    return Tuned(plan.graphdef, params_M, plan.frozen, plan.layer, tune, plan.sites)


def pretrain(
    model_cfg: models.ModelConfig, examples, cfg: TrainConfig, seed: int, *, progress: bool = True
) -> nnx.Module:
    """One model trained on all of `examples` (train_many with M = 1); it records the examples'
    tokenizer, so `save_model` saves it and STRIDE refuses pools of another tokenizer."""
    all_idx = np.arange(len(examples.inputs), dtype=np.int32)[None]
    graphdef, state_M = train_many(
        model_cfg, examples, all_idx, np.array([seed]), cfg, progress=progress, desc="pretrain"
    )
    model = unstack(graphdef, state_M, 0)
    models.checkpoint.attach_tokenizer(model, getattr(examples, "tokenizer", None))
    return model


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
    if len(examples.inputs) == 0:
        raise ValueError("examples is empty")
    models.check_examples(nnx.merge(graphdef, state_M).cfg, examples)  # stacked leaves; only cfg used
    return _eval(graphdef, state_M, None, device_batch(examples), 0, batch_size, progress)


def _eval(graphdef, state_M, frozen, data_N, layer: int, batch_size: int, progress: bool) -> np.ndarray:
    n = int(data_N[1].shape[0])
    per_step = min(max(1, batch_size // _n_models(state_M)), n)
    out = []
    for start in tqdm(range(0, n, per_step), desc="eval", disable=not progress):
        idx_B = np.arange(start, start + per_step) % n  # last batch padded by wrapping around
        out.append(_eval_batch(state_M, frozen, data_N, jnp.asarray(idx_B, jnp.int32), graphdef=graphdef,
                               layer=layer))
    losses_MxN = np.concatenate([np.asarray(o) for o in out], axis=1)[:, :n]
    return losses_MxN.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _hits_batch(state_M, frozen, data_N, idx_B, *, graphdef, layer=0):
    """(hits [M, B], counted [M, B]) of every model: argmax of the logits equals the target."""
    batch = take(data_N, idx_B)

    def one(s):
        logits, y, weights = _batch_logits(_merge(graphdef, s, frozen), batch, layer)
        counted = (weights > 0) if weights is not None else jnp.ones(y.shape, bool)
        return ((jnp.argmax(logits, axis=-1) == y) & counted).sum(axis=-1), counted.sum(axis=-1)

    return jax.vmap(one)(state_M)


def _greedy(graphdef, state_M, frozen, data_N, layer: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact [M, N], token accuracy [M, N]); about batch_size sequences of logits live at once."""
    n = int(data_N[1].shape[0])
    hits, counts = [], []
    for idx, real in _padded_batches(n, max(1, batch_size // _n_models(state_M))):
        h, c = _hits_batch(state_M, frozen, data_N, jnp.asarray(idx, jnp.int32), graphdef=graphdef, layer=layer)
        hits.append(np.asarray(h)[:, :real])
        counts.append(np.asarray(c)[:, :real])
    hit_MxN, count_MxN = np.concatenate(hits, axis=1), np.concatenate(counts, axis=1)
    if np.any(count_MxN[0] == 0):
        raise ValueError(f"{int((count_MxN[0] == 0).sum())} examples have no counted target token")
    return hit_MxN == count_MxN, (hit_MxN / count_MxN).astype(np.float32)


def greedy_match(model: nnx.Module, examples, *, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(exact [N] bool, token accuracy [N]) of `model` on the counted targets of each sequence
    example (its loss mask: the response tokens of an instruction pair).

    Teacher-forced, one forward pass per batch: a position counts as a hit when the argmax of its
    logits is the target token. Under causal attention the prediction at a position depends only
    on the tokens before it, so `exact` (every counted target a hit) is True exactly when greedy
    decoding from the unmasked prefix reproduces the target tokens, without a decoding loop.
    Memory: batch_size x T x V logits at once. Many fine-tuned models: `Tuned.greedy_match`.
    """
    if len(examples.inputs) == 0:
        raise ValueError("examples is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    models.check_examples(model.cfg, examples)
    if not models.is_sequence_model(model):
        raise ValueError("greedy_match needs a sequence model (token inputs and next-token targets)")
    graphdef, state = nnx.split(model)
    exact, acc = _greedy(graphdef, jax.tree.map(lambda x: x[None], state), None, device_batch(examples), 0,
                         batch_size)
    return exact[0], acc[0]


def eval_loss(model: nnx.Module, examples, *, batch_size: int = 256) -> np.ndarray:
    """Per-example loss [N] of a single model."""
    graphdef, state = nnx.split(model)
    state_1 = jax.tree.map(lambda x: x[None], state)
    return eval_losses(graphdef, state_1, examples, batch_size=batch_size)[0]
