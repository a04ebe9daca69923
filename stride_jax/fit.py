"""Fitting the steering operators: the three losses, a pure step, and a resumable shell.

Objective (STRIDE, arXiv 2606.05165, section 3; weights and batch sizes are ours, see README):

    L = E_k [ CE(steered_k; A_k) ]                                   (fidelity)
      + stability_weight * E_k [ KL(base || steered_k; R_k) ]        (stability, R_k outside A_k)
      + linearity_weight * E_p || (I - H_b) y_b(p) ||^2 / K_b         (linearity)

where, for a batch b of K_b subsets, y_b(p) = [loss_base(p) - loss_k(p)]_{k in b} on probe
example p, and H_b is the ridge hat matrix of the sketched design rows [M R | 1]_b with R an
N x q Gaussian Johnson-Lindenstrauss sketch (q = sketch_dim) and ridge gamma. Fidelity
examples are drawn from the subset's members, stability examples from outside it. Only the
operators are differentiated; the frozen model is an argument of the step, never a closure.

Memory: the pool's hook-layer states h_l [N, T, D] and final states h_L [N, T, D] are cached
(`FitConfig.cache_dtype` bfloat16 halves them); base logits are formed from h_L at the sampled
positions only (`rest(h, layer=n_layers)` is per position), so [N, T, V] never exists.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from stride_jax import models, sharding, steering, store
from stride_jax.config import FitConfig, FitShape, SteeringConfig, StrideConfig, to_dict
from stride_jax.design import Design, design_matvec
from stride_jax.features import compute_features  # noqa: F401 (re-exported: fit.compute_features)
from stride_jax.models import example_loss
from stride_jax.steering import OperatorBank

log = logging.getLogger("stride_jax")

FORMAT_VERSION = 2
# A fit whose loss exceeds this multiple of its starting loss (the frozen model's own) diverged.
DIVERGENCE_FACTOR = 10.0


class FitData(NamedTuple):
    """Device arrays one fit step reads: cached states of the pool, targets, masks, design."""

    h: jax.Array  # [N, ..., D] hook-layer states of every training example
    h_out: jax.Array  # [N, ..., D_L] final states (base logits = rest(h_out, layer=n_layers))
    targets: jax.Array  # [N, ...]
    weights: jax.Array | None  # [N, T] loss weights (None: every position)
    mask: jax.Array | None  # [N, T] padding mask (None: no padding)
    ids_NxS: jax.Array  # design: subset ids of each example
    indptr_K1: jax.Array  # design inverse (CSR): members of subset k are
    members: jax.Array  # members[indptr[k]:indptr[k+1]]
    sketch_KxQ1: jax.Array  # [M R | 1]: JL-sketched design rows plus an intercept column


class FitState(NamedTuple):
    basis: Any
    coef: Any
    opt_state: Any  # optax.ScaleByAdamState over (basis, coef), or a SparseAdamState
    step: jax.Array


class SparseAdamState(NamedTuple):
    """Lazy Adam (`FitConfig.sparse_updates`): optax Adam for the shared basis, and for the operator
    matrices one optax Adam state per operator (count [K], mu and nu [K, R, O]) whose rows change
    only in the steps that operator takes part in."""

    basis: optax.ScaleByAdamState
    coef: optax.ScaleByAdamState  # count has a leading K axis


def init_opt_state(basis: Any, coef: Any, sparse: bool) -> optax.ScaleByAdamState | SparseAdamState:
    """Adam state of a fit: dense over (basis, coef), or lazy per operator (`sparse`)."""
    adam = optax.scale_by_adam()
    if not sparse:
        return adam.init((basis, coef))
    return SparseAdamState(adam.init(basis), jax.vmap(adam.init)(coef))


def _kl_base_steered(base_logits: jax.Array, steered_logits: jax.Array, w: jax.Array | None) -> jax.Array:
    """KL(base || steered) per example: the (weighted) mean over non-batch, non-class axes."""
    lp_b = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    lp_s = jax.nn.log_softmax(steered_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(lp_b) * (lp_b - lp_s), axis=-1)
    kl = kl.reshape(kl.shape[0], -1)
    if w is None:
        return kl.mean(axis=1)
    w = w.reshape(w.shape[0], -1)
    return (kl * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-9)


def ridge_residual(sketch_BxQ: jax.Array, y_BxP: jax.Array, gamma: jax.Array) -> jax.Array:
    """Mean squared residual of the ridge fit of each column of y on the sketch rows."""
    gram = sketch_BxQ.T @ sketch_BxQ + gamma * jnp.eye(sketch_BxQ.shape[1])
    coef = jnp.linalg.solve(gram, sketch_BxQ.T @ y_BxP)
    return jnp.mean(jnp.square(y_BxP - sketch_BxQ @ coef))


def sample_batch(key: jax.Array, data: FitData, n_subsets: int, shape: FitShape):
    """Subsets of this step, and fidelity / stability / probe example indices.

    Fidelity examples are uniform draws from the subset's members A_k. Stability examples are
    uniform draws from the pool with members of A_k given weight 0 (R_k lies outside A_k).
    """
    k_sub, k_fid, k_stab, k_probe = jax.random.split(key, 4)
    n = data.targets.shape[0]
    ks = jax.random.choice(k_sub, n_subsets, (shape.subsets_per_step,), replace=False)
    start, size = data.indptr_K1[ks], data.indptr_K1[ks + 1] - data.indptr_K1[ks]
    u = jax.random.uniform(k_fid, (shape.subsets_per_step, shape.fidelity_batch))
    fid_idx = data.members[start[:, None] + jnp.floor(u * size[:, None]).astype(jnp.int32)]
    stab_idx = jax.random.randint(k_stab, (shape.subsets_per_step, shape.stability_batch), 0, n)
    stab_w = 1.0 - jnp.any(data.ids_NxS[stab_idx] == ks[:, None, None], axis=-1)
    probe_idx = jax.random.randint(k_probe, (shape.probe_batch,), 0, n)
    return ks, fid_idx, stab_idx, stab_w, probe_idx


def _gather(model, data: FitData, idx: jax.Array, key: jax.Array, shape: FitShape, steer_cfg: SteeringConfig):
    """(h, base logits, targets, loss weights, mask) of examples idx [Kb, B].

    For a sequence model under the logits placement only `positions_per_example` positions of
    each sequence are kept, drawn with probability proportional to their loss weight: losses
    on them are unbiased estimates of the weighted per-sequence means at a fraction of the
    cost. Classifiers (no sequence axis) and the residual placement (attention mixes
    positions) keep whole examples.
    """
    p = shape.positions_per_example
    seq = data.targets.shape[1] if data.targets.ndim == 2 else None
    base = lambda h_out: model.rest(h_out.astype(jnp.float32), layer=model.n_layers)
    take = lambda a: None if a is None else a[idx]
    if p is None or steer_cfg.placement != "logits" or seq is None or p >= seq:
        h_out = data.h_out[idx]
        logits = base(h_out.reshape(-1, *h_out.shape[2:]))
        logits = logits.reshape(*idx.shape, *logits.shape[1:])
        return data.h[idx].astype(jnp.float32), logits, data.targets[idx], take(data.weights), take(data.mask)
    if data.weights is None:
        pos = jax.random.randint(key, (*idx.shape, p), 0, seq)
    else:
        logw = jnp.log(data.weights[idx])  # -inf at weight 0: never drawn
        pos = jax.random.categorical(key, logw[..., None, :], axis=-1, shape=(*idx.shape, p))
    rows = idx[..., None]
    h_out = data.h_out[rows, pos]  # [Kb, B, P, D]
    logits = base(h_out.reshape(-1, p, h_out.shape[-1])).reshape(*idx.shape, p, -1)
    return data.h[rows, pos].astype(jnp.float32), logits, data.targets[rows, pos], None, None


def _sample(key: jax.Array, data: FitData, n_subsets: int, shape: FitShape,
            batch_sharding: NamedSharding | None):
    """`sample_batch`, its per-subset parts split over devices by `batch_sharding` (on a mesh)."""
    ks, fid_idx, stab_idx, stab_w, probe_idx = sample_batch(key, data, n_subsets, shape)
    if batch_sharding is not None:
        ks, fid_idx, stab_idx, stab_w = jax.lax.with_sharding_constraint((ks, fid_idx, stab_idx, stab_w),
                                                                          batch_sharding)
    return ks, fid_idx, stab_idx, stab_w, probe_idx


def fit_loss(trainable, model_state, data: FitData, key, hyper, *, model_graphdef, op_graphdef,
             steer_cfg: SteeringConfig, shape: FitShape, log_space: bool, loss_floor: float,
             batch_sharding: NamedSharding | None = None):
    """The fit objective on one sampled batch of subsets; differentiable in `trainable` only.

    `batch_sharding` (on a mesh) splits this step's subsets over devices: each device computes
    the losses of its share (data parallel); the value is unchanged.
    """
    basis, coef = trainable
    n_subsets = jax.tree_util.tree_leaves(coef)[0].shape[0]
    batch = _sample(key, data, n_subsets, shape, batch_sharding)
    coef_b = jax.tree.map(lambda x: x[batch[0]], coef)
    return batch_loss((basis, coef_b), model_state, data, batch, key, hyper, model_graphdef=model_graphdef,
                      op_graphdef=op_graphdef, steer_cfg=steer_cfg, shape=shape, log_space=log_space,
                      loss_floor=loss_floor)


def batch_loss(trainable_b, model_state, data: FitData, batch, key, hyper, *, model_graphdef, op_graphdef,
               steer_cfg: SteeringConfig, shape: FitShape, log_space: bool, loss_floor: float):
    """The fit objective given a sampled `batch` (`sample_batch`) and (basis, coef_b), coef_b the
    matrices of the batch's operators only ([Kb, R, O]); differentiable in `trainable_b`."""
    basis, coef_b = trainable_b
    ks, fid_idx, stab_idx, stab_w, probe_idx = batch
    model = nnx.merge(model_graphdef, model_state)

    def steer(coef_k, h, o, mask):
        return steering.apply_operator(op_graphdef, basis, coef_k, model, h, o, steer_cfg, mask)

    per_subset = jax.vmap(steer)  # each subset its own examples
    pos_key = jax.random.fold_in(key, 1)

    h_f, o_f, t_f, w_f, m_f = _gather(model, data, fid_idx, jax.random.fold_in(pos_key, 0), shape, steer_cfg)
    logits_f = per_subset(coef_b, h_f, o_f, m_f)
    fidelity = jnp.mean(jax.vmap(example_loss)(logits_f, t_f, w_f))

    h_s, base_s, _, w_s, m_s = _gather(model, data, stab_idx, jax.random.fold_in(pos_key, 1), shape, steer_cfg)
    logits_s = per_subset(coef_b, h_s, base_s, m_s)
    kl = jax.vmap(_kl_base_steered)(base_s, logits_s, w_s)
    stability = jnp.sum(kl * stab_w) / jnp.maximum(jnp.sum(stab_w), 1.0)

    loss = fidelity + hyper["stability_weight"] * stability
    metrics = {"fidelity": fidelity, "stability": stability}
    if shape.linearity:
        h_p, base_p, t_p, w_p, m_p = _gather(model, data, probe_idx[None], jax.random.fold_in(pos_key, 2),
                                             shape._replace(positions_per_example=None), steer_cfg)
        loss_base = example_loss(base_p[0], t_p[0], None if w_p is None else w_p[0])
        shared = jax.vmap(steer, in_axes=(0, None, None, None))
        steered_p = shared(coef_b, h_p[0], base_p[0], None if m_p is None else m_p[0])
        loss_k = jax.vmap(lambda lg: example_loss(lg, t_p[0], None if w_p is None else w_p[0]))(steered_p)
        if log_space:
            y = jnp.log(jnp.maximum(loss_base, loss_floor))[None, :] - jnp.log(jnp.maximum(loss_k, loss_floor))
        else:
            y = loss_base[None, :] - loss_k
        linearity = ridge_residual(data.sketch_KxQ1[ks], y, hyper["ridge_gamma"])
        loss = loss + hyper["linearity_weight"] * linearity
        metrics["linearity"] = linearity
    metrics["loss"] = loss
    return loss, metrics


def fit_step(state: FitState, model_state, data: FitData, base_key, hyper, *, model_graphdef, op_graphdef,
             steer_cfg: SteeringConfig, shape: FitShape, log_space: bool, loss_floor: float,
             batch_sharding: NamedSharding | None = None):
    """One Adam step on basis and operator matrices. Pure; the key is derived from the step.

    Dense (`state.opt_state` an optax Adam state over (basis, coef)): every operator and its
    moments are rewritten each step. Sparse (a `SparseAdamState`): only the step's operators
    coef[ks] and their moments are read, updated by Adam with their own counts, and written back
    with `.at[ks].set` (in place when the state is donated); the others stay bit-identical. With
    subsets_per_step == K both give the same step. `hyper` holds traced scalars (learning rate,
    loss weights): changing them reuses the compiled step.
    """
    key = jax.random.fold_in(base_key, state.step)
    static = dict(model_graphdef=model_graphdef, op_graphdef=op_graphdef, steer_cfg=steer_cfg, shape=shape,
                  log_space=log_space, loss_floor=loss_floor)
    adam, lr = optax.scale_by_adam(), hyper["learning_rate"]
    if isinstance(state.opt_state, SparseAdamState):
        n_subsets = jax.tree_util.tree_leaves(state.coef)[0].shape[0]
        batch = _sample(key, data, n_subsets, shape, batch_sharding)
        ks = batch[0]
        rows = lambda tree: jax.tree.map(lambda x: x[ks], tree)
        (g_basis, g_coef_b), metrics = jax.grad(batch_loss, has_aux=True)(
            (state.basis, rows(state.coef)), model_state, data, batch, key, hyper, **static)
        u_basis, basis_adam = adam.update(g_basis, state.opt_state.basis)
        u_coef_b, coef_adam_b = jax.vmap(adam.update)(g_coef_b, rows(state.opt_state.coef))
        basis = optax.apply_updates(state.basis, jax.tree.map(lambda u: -lr * u, u_basis))
        coef_b = optax.apply_updates(rows(state.coef), jax.tree.map(lambda u: -lr * u, u_coef_b))
        put = lambda full, part: jax.tree.map(lambda x, y: x.at[ks].set(y), full, part)
        opt_state = SparseAdamState(basis_adam, put(state.opt_state.coef, coef_adam_b))
        return FitState(basis, put(state.coef, coef_b), opt_state, state.step + 1), metrics
    grads, metrics = jax.grad(fit_loss, has_aux=True)(
        (state.basis, state.coef), model_state, data, key, hyper, batch_sharding=batch_sharding, **static)
    updates, opt_state = adam.update(grads, state.opt_state)
    updates = jax.tree.map(lambda u: -lr * u, updates)
    basis, coef = optax.apply_updates((state.basis, state.coef), updates)
    return FitState(basis, coef, opt_state, state.step + 1), metrics


_STATIC = ("model_graphdef", "op_graphdef", "steer_cfg", "shape", "log_space", "loss_floor")
_fit_step = jax.jit(fit_step, static_argnames=_STATIC, donate_argnums=(0,))


def _place_state(state: FitState, mesh: Mesh, axis: str, put) -> FitState:
    """`put(tree, sharding)` on every part of the state: the K-axis operator matrices and their
    Adam moments (and, for sparse updates, their per-operator counts) split over `mesh[axis]`; the
    shared basis, its Adam state and the step replicated."""
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
    adam = state.opt_state
    if isinstance(adam, SparseAdamState):  # per-operator counts and moments split like the operators
        adam = SparseAdamState(put(adam.basis, rep), put(adam.coef, split))
    else:  # optax.ScaleByAdamState(count, mu, nu); mu and nu mirror (basis, coef)
        moments = lambda m: (put(m[0], rep), put(m[1], split))
        adam = adam._replace(count=put(adam.count, rep), mu=moments(adam.mu), nu=moments(adam.nu))
    return FitState(put(state.basis, rep), put(state.coef, split), adam, put(state.step, rep))


def _fit_step_on_mesh(state, model_state, data, base_key, hyper, *, mesh: Mesh, axis: str, **static):
    """`fit_step` on a mesh: XLA partitions the step (GSPMD) from the input shardings and from
    this step's subsets split over devices (when subsets_per_step is a multiple of the axis
    size); the new state is constrained to the same layout, so operators and Adam moments stay
    split over K."""
    split = static["shape"].subsets_per_step % sharding.axis_size(mesh, axis) == 0
    state, metrics = fit_step(state, model_state, data, base_key, hyper,
                              batch_sharding=NamedSharding(mesh, P(axis)) if split else None, **static)
    return _place_state(state, mesh, axis, jax.lax.with_sharding_constraint), metrics


_fit_step_sharded = jax.jit(_fit_step_on_mesh, static_argnames=_STATIC + ("mesh", "axis"), donate_argnums=(0,))


def jl_sketch(design: Design, sketch_dim: int, seed: int) -> jax.Array:
    """[M R | 1] for a Gaussian R (N x q) scaled by 1/sqrt(q); never forms M densely."""
    r = jax.random.normal(jax.random.PRNGKey(seed), (design.n_examples, sketch_dim)) / np.sqrt(sketch_dim)
    mr = design_matvec(jnp.asarray(design.ids_NxS), design.n_subsets, r)
    return jnp.concatenate([mr, jnp.ones((design.n_subsets, 1))], axis=1)


def fit_settings(cfg: StrideConfig) -> dict[str, Any]:
    """The settings a fit depends on: `cfg`'s design, steering and fit sections as dicts.

    `design.auto_ratio` and `design.max_subsets` only choose K when `n_subsets` is "auto"; with K
    given (or resolved) they change nothing in the fit and are left out, so that changing their
    defaults does not orphan fits made with an explicit K. `fit.ensemble` appears only above 1:
    a single fit (every member of an ensemble) keeps the identity it had before the field existed.
    """
    config = {k: to_dict(getattr(cfg, k)) for k in ("design", "steering", "fit")}
    if cfg.fit.ensemble == 1:
        config["fit"].pop("ensemble", None)
    if cfg.design.n_subsets != "auto":
        config["design"].pop("auto_ratio", None)
        config["design"].pop("max_subsets", None)
    return config


def fit_identity(model: nnx.Module, examples, design: Design, cfg: StrideConfig) -> dict[str, Any]:
    """What a fit depends on: the model's parameters, the pool's tokens and ids, the settings.

    `cfg` is the fitter's resolved config (its `fit.steps` the resolved count), so
    `updates_per_operator` is left out, and `sparse_updates` appears only when true: fits made
    before these fields existed keep their identity, and a sparse fit never resumes a dense one.
    """
    config = fit_settings(cfg)
    config["fit"].pop("updates_per_operator", None)
    if not cfg.fit.sparse_updates:
        config["fit"].pop("sparse_updates", None)
    return {"kind": "stride-fit", "format_version": FORMAT_VERSION, "model": models.param_digest(model),
            "data": examples.content_hash(), "design": design.fingerprint(), "config": config,
            "measure": {"space": cfg.measure.space, "loss_floor": cfg.measure.loss_floor}}


def _resolve_steps(fit_cfg: FitConfig, n_subsets: int) -> int:
    """`fit_cfg.resolve_steps(K)`, logged; a warning when it overrides a `steps` set by hand."""
    steps = fit_cfg.resolve_steps(n_subsets)
    if fit_cfg.updates_per_operator is not None:
        log.info("fit: %d steps (updates_per_operator %d x K %d / subsets_per_step %d)", steps,
                 fit_cfg.updates_per_operator, n_subsets, fit_cfg.subsets_per_step)
        if fit_cfg.steps not in (steps, FitConfig.steps):
            log.warning("fit.steps=%d is ignored: fit.updates_per_operator=%d sets %d steps at K=%d",
                        fit_cfg.steps, fit_cfg.updates_per_operator, steps, n_subsets)
    return steps


class Fitter:
    """Stateful shell around `fit_step`: cached states on device, progress, metrics, checkpoints.

    With a `workdir`, the operators and optimiser state are saved every `checkpoint_every`
    steps (atomically, with a digest checked on restore); a new Fitter on the same workdir,
    model and data resumes from the last checkpoint and, since each step's randomness is
    derived from the step number, ends exactly where an uninterrupted fit would. The workdir
    records the fingerprints of the model, the data and the settings; a mismatch raises
    `store.IdentityError` naming the fields. The step count lives in Python and metrics are
    read one step late, so the loop never waits on the device.

    With a `mesh`, the K operator matrices and their Adam moments are split over its `axis`
    ("subsets", or the only axis of a 1-D mesh; K must be a multiple of its size); the basis,
    the frozen model and the design are replicated, and the cached pool states too, or split
    over examples with `shard_pool=True` (N a multiple of the axis size; less memory per
    device, a gather per step). XLA partitions each step from these layouts. Results equal
    the single-device fit up to float32 reassociation; checkpoints are the same files.

    The step count is `cfg.fit.resolve_steps(K)` (recorded in `self.cfg.fit.steps`); with
    `cfg.fit.sparse_updates` a step reads and writes only its own operators and their Adam
    state (`SparseAdamState`), so its cost does not grow with K.
    """

    def __init__(self, model: nnx.Module, examples, design: Design, cfg: StrideConfig, *,
                 workdir: str | Path | None = None, progress: bool = False, mesh: Mesh | None = None,
                 axis: str = "subsets", shard_pool: bool = False):
        if len(examples) != design.n_examples:
            raise ValueError(f"design covers {design.n_examples} examples but the pool has {len(examples)}")
        models.check_examples(model.cfg, examples)
        self.mesh, self.axis = mesh, None if mesh is None else sharding.axis_of(mesh, axis)
        if mesh is not None:
            n_dev = sharding.axis_size(mesh, self.axis)
            if design.n_subsets % n_dev:
                raise ValueError(f"K={design.n_subsets} operators do not split evenly over the {n_dev} devices of "
                                 f"mesh axis {self.axis!r}")
            if shard_pool and len(examples) % n_dev:
                raise ValueError(f"shard_pool=True needs the pool size N={len(examples)} to be a multiple of the "
                                 f"{n_dev} devices of mesh axis {self.axis!r}")
        steer_cfg = cfg.steering.resolve(model.n_layers)
        steps = _resolve_steps(cfg.fit, design.n_subsets)
        self.cfg = cfg.replace(steering={"layer": steer_cfg.layer, "depth_fraction": None}, fit={"steps": steps})
        self.design = design
        self.workdir = Path(workdir) if workdir is not None else None
        if self.workdir is not None:  # check identity before any work, so a rejected rerun costs nothing
            store.open_dir(self.workdir, fit_identity(model, examples, design, self.cfg), "operator fit")
        self.model_graphdef, self.model_state = nnx.split(model)
        dtype = jnp.bfloat16 if cfg.fit.cache_dtype == "bfloat16" else jnp.float32
        h, h_out = compute_features(model, examples, steer_cfg.layer, dtype=dtype, progress=progress)
        weights = examples.loss_weights
        indptr, members = design.inverse()
        self.data = FitData(
            h=h, h_out=h_out, targets=jnp.asarray(examples.targets),
            weights=None if weights is None else jnp.asarray(weights),
            mask=None if examples.mask is None else jnp.asarray(examples.mask),
            ids_NxS=jnp.asarray(design.ids_NxS),
            indptr_K1=jnp.asarray(indptr, dtype=jnp.int32),
            members=jnp.asarray(members, dtype=jnp.int32),
            sketch_KxQ1=jl_sketch(design, cfg.fit.sketch_dim, cfg.fit.seed + 1),
        )
        bank = steering.init_bank(model, design.n_subsets, steer_cfg, seed=cfg.fit.seed)
        self.op_graphdef = bank.graphdef
        self.state = FitState(bank.basis, bank.coef, init_opt_state(bank.basis, bank.coef, cfg.fit.sparse_updates),
                              jnp.asarray(0))
        self._step = 0
        self.base_key = jax.random.PRNGKey(cfg.fit.seed)
        self.initial_loss: float | None = None
        if mesh is not None:
            self.model_state, self.base_key = sharding.replicate((self.model_state, self.base_key), mesh)
            pool = ("h", "h_out", "targets", "weights", "mask") if shard_pool else ()
            self.data = self.data._replace(**{
                name: (jax.device_put(a, NamedSharding(mesh, P(self.axis))) if name in pool
                       else sharding.replicate(a, mesh))
                for name, a in self.data._asdict().items()})
            self.state = _place_state(self.state, mesh, self.axis, jax.device_put)
        if self.workdir is not None:
            self._restore()

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def _ckpt_dir(self) -> Path:
        return self.workdir / "checkpoints"

    def _checkpoints(self) -> list[tuple[int, Path]]:
        if not self._ckpt_dir.is_dir():
            return []
        found = [(int(p.name.split("_")[1]), p) for p in self._ckpt_dir.iterdir()
                 if p.name.startswith("step_") and p.name.split("_")[1].isdigit()]
        return sorted(found)

    def _restore(self) -> None:
        store.clean_leftovers(self._ckpt_dir)
        ckpts = self._checkpoints()
        if not ckpts:
            return
        step, path = ckpts[-1]
        remedy = f"delete the directory {path} to resume from the checkpoint before it (or from the start)"
        try:
            arrays = store.load_npz(path / "state.npz")
            meta = store.read_json(path / "meta.json")
        except (OSError, ValueError) as e:
            raise ValueError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}); {remedy}") from e
        leaves, treedef = jax.tree_util.tree_flatten(self._pure(self.state))
        if len(arrays) != len(leaves) or any(arrays[f"a{i}"].shape != np.shape(x) for i, x in enumerate(leaves)):
            raise ValueError(f"checkpoint {path} does not fit this fit's state (shapes differ); {remedy}")
        restored = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(arrays[f"a{i}"]) for i in range(len(leaves))])
        self.state = self._unpure(restored)
        if self.mesh is not None:
            self.state = _place_state(self.state, self.mesh, self.axis, jax.device_put)
        self._step = int(step)
        self.initial_loss = meta.get("initial_loss")
        self._truncate_log(self._step)

    def _pure(self, state: FitState) -> dict[str, Any]:
        return {"basis": nnx.to_pure_dict(state.basis), "coef": nnx.to_pure_dict(state.coef),
                "opt_state": state.opt_state, "step": state.step}

    def _unpure(self, d: dict[str, Any]) -> FitState:
        basis, coef = nnx.clone(self.state.basis), nnx.clone(self.state.coef)
        nnx.replace_by_pure_dict(basis, d["basis"])
        nnx.replace_by_pure_dict(coef, d["coef"])
        return FitState(basis, coef, d["opt_state"], jnp.asarray(d["step"]))

    def save(self) -> None:
        """Checkpoint the current state (atomic; keeps the last two)."""
        if self.workdir is None or any(s == self._step for s, _ in self._checkpoints()):
            return
        leaves = jax.tree_util.tree_leaves(self._pure(self.state))
        with store.atomic_dir(self._ckpt_dir / f"step_{self._step:08d}") as tmp:
            store.save_npz(tmp / "state.npz", {f"a{i}": np.asarray(x) for i, x in enumerate(leaves)})
            store.write_json(tmp / "meta.json", {"step": self._step, "initial_loss": self.initial_loss})
        for _, old in self._checkpoints()[:-2]:
            shutil.rmtree(old, ignore_errors=True)

    def _truncate_log(self, step: int) -> None:
        """Keep the metrics of steps <= `step` (the checkpoint resumed from). A torn last line (a
        kill while it was written) is dropped; a bad line elsewhere is an error naming the file."""
        path = self.workdir / "metrics.jsonl"
        if not path.exists():
            return
        text = path.read_text()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        kept = []
        for i, ln in enumerate(lines):
            try:
                record = json.loads(ln)
                record_step = int(record["step"])
            except (ValueError, KeyError, TypeError) as e:
                if i == len(lines) - 1 and not text.endswith("\n"):
                    log.warning("%s: dropped a torn last line (%d characters)", path, len(ln))
                    break
                raise ValueError(f"{path} line {i + 1} is not a metrics record ({e}); delete the file "
                                 "(it holds only logs) to resume") from None
            if record_step <= step:
                kept.append(ln)
        store.atomic_write(path, "".join(ln + "\n" for ln in kept))

    # -- running -------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    def _check(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        m = {k: float(v) for k, v in metrics.items()}
        if self.initial_loss is None:
            self.initial_loss = m["loss"]
        if not math.isfinite(m["loss"]) or m["loss"] > DIVERGENCE_FACTOR * max(self.initial_loss, 1e-3):
            raise FloatingPointError(
                f"the operator fit diverged: loss {m['loss']:.4g} at step {step} (it started at "
                f"{self.initial_loss:.4g}); lower fit.learning_rate (now {self.cfg.fit.learning_rate})")
        return m

    def _step_program(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(compiled step function, its hyperparameters, its static arguments)."""
        fit_cfg = self.cfg.fit
        hyper = {k: jnp.float32(v) for k, v in fit_cfg.hyper.items()}
        static = dict(model_graphdef=self.model_graphdef, op_graphdef=self.op_graphdef,
                      steer_cfg=self.cfg.steering, shape=fit_cfg.shape,
                      log_space=self.cfg.measure.space == "log", loss_floor=float(self.cfg.measure.loss_floor))
        if self.mesh is None:
            return _fit_step, hyper, static
        return _fit_step_sharded, sharding.replicate(hyper, self.mesh), {**static, "mesh": self.mesh, "axis": self.axis}

    def step_flops(self) -> float | None:
        """XLA's floating-point operation count of one fit step (the compiled program's
        `cost_analysis`), or None where the backend reports none. With `fit.sparse_updates` it does
        not depend on K: a fit's FLOPs are this times `cfg.fit.steps` (plus the one-off state cache)."""
        step_fn, hyper, static = self._step_program()
        compiled = step_fn.lower(self.state, self.model_state, self.data, self.base_key, hyper, **static).compile()
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
            cost = cost[0] if cost else None
        flops = None if not cost else cost.get("flops")
        return float(flops) if flops is not None and flops > 0 else None

    def run(self, *, max_steps: int | None = None, progress: bool = True, log_every: int = 10) -> OperatorBank:
        """Fit until `cfg.fit.steps` (or stop after `max_steps` more steps); return the bank."""
        fit_cfg = self.cfg.fit
        end = fit_cfg.steps if max_steps is None else min(fit_cfg.steps, self._step + max_steps)
        step_fn, hyper, static = self._step_program()
        log_path = self.workdir / "metrics.jsonl" if self.workdir is not None else None
        bar = tqdm(total=fit_cfg.steps, initial=self._step, desc="fit operators", disable=not progress)
        t0 = time.perf_counter()
        pending: tuple[int, Any] | None = None  # (step, metrics) read one step late

        def flush(step: int, metrics: Any) -> None:
            m = self._check(step, metrics)
            bar.set_postfix({k: f"{v:.4f}" for k, v in m.items()})
            if log_path is not None:
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": step, "seconds": round(time.perf_counter() - t0, 3), **m}) + "\n")

        while self._step < end:
            self.state, metrics = step_fn(self.state, self.model_state, self.data, self.base_key, hyper, **static)
            self._step += 1
            if pending is not None:
                flush(*pending)
                pending = None
            if self._step % log_every == 0 or self._step == end or self.initial_loss is None:
                pending = (self._step, metrics)
            bar.update(1)
            if self.workdir is not None and (self._step % fit_cfg.checkpoint_every == 0 or self._step == end):
                if pending is not None:
                    flush(*pending)
                    pending = None
                self.save()
        if pending is not None:
            flush(*pending)
        bar.close()
        return self.bank

    @property
    def bank(self) -> OperatorBank:
        """The operators now, as a copy: later `run` calls (which donate the state) leave it intact."""
        return OperatorBank(self.op_graphdef, jax.tree.map(jnp.copy, self.state.basis),
                            jax.tree.map(jnp.copy, self.state.coef))


def fit_operators(model: nnx.Module, examples, design: Design, cfg: StrideConfig, *,
                  workdir: str | Path | None = None, progress: bool = True, mesh: Mesh | None = None) -> OperatorBank:
    """Fit all K operators for `model` on the pool `examples` under `design` (split over `mesh`)."""
    return Fitter(model, examples, design, cfg, workdir=workdir, progress=progress, mesh=mesh).run(progress=progress)


__all__ = ["FitData", "FitState", "Fitter", "SparseAdamState", "batch_loss", "compute_features", "fit_identity", "fit_settings",
           "fit_loss", "fit_operators", "fit_step", "init_opt_state", "jl_sketch", "ridge_residual", "sample_batch"]
