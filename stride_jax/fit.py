"""Fitting the steering operators: the three losses, a pure step, and a resumable shell.

Objective (STRIDE, arXiv 2606.05165, section 3; weights and batch sizes are ours, see README):

    L = E_k [ CE(steered_k; A_k) ]                                   (fidelity)
      + stability_weight * E_k [ KL(base || steered_k; R_k) ]        (stability, R_k outside A_k)
      + linearity_weight * E_p || (I - H_b) y_b(p) ||^2 / K_b         (linearity)

where, for a batch b of K_b subsets, y_b(p) = [loss_base(p) - loss_k(p)]_{k in b} on probe
example p, and H_b is the ridge hat matrix of the sketched design rows [M R | 1]_b with R an
N x q Gaussian Johnson-Lindenstrauss sketch (q = sketch_dim) and ridge gamma. Only the
operators are differentiated; the frozen model is an argument of the step, never a closure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from stride_jax import steering
from stride_jax.config import FitConfig, SteeringConfig, StrideConfig, to_dict
from stride_jax.design import Design, design_matvec
from stride_jax.models import example_loss
from stride_jax.steering import OperatorBank


class FitData(NamedTuple):
    """Device arrays one fit step reads. `h`/`base_logits` are cached features of the pool."""

    h: jax.Array  # [N, ..., D] layer-l activations of every training example
    base_logits: jax.Array  # [N, ..., V] frozen model outputs
    targets: jax.Array  # [N, ...]
    ids_NxS: jax.Array  # design: subset ids of each example
    indptr_K1: jax.Array  # design inverse (CSR): members of subset k are
    members: jax.Array  # members[indptr[k]:indptr[k+1]]
    sketch_KxQ1: jax.Array  # [M R | 1]: JL-sketched design rows plus an intercept column


class FitState(NamedTuple):
    basis: Any
    coef: Any
    opt_state: Any
    step: jax.Array


def feature_fn(graphdef: nnx.GraphDef, state: nnx.State, inputs: jax.Array, *, cfg: SteeringConfig):
    """(h_l, base logits) of the frozen model for a batch of inputs."""
    model = nnx.merge(graphdef, state)
    h = model.trunk(inputs, layer=cfg.layer)
    return h, model.rest(h, layer=cfg.layer)


def compute_features(
    model: nnx.Module, inputs: np.ndarray, cfg: SteeringConfig, batch_size: int = 64
) -> tuple[jax.Array, jax.Array]:
    """Layer-l activations and base logits for every row of `inputs`, batched."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(feature_fn, static_argnames=("graphdef", "cfg"))
    hs, os_ = [], []
    for start in range(0, len(inputs), batch_size):
        h, o = fn(graphdef, state, jnp.asarray(inputs[start : start + batch_size]), cfg=cfg)
        hs.append(h)
        os_.append(o)
    return jnp.concatenate(hs), jnp.concatenate(os_)


def _kl_base_steered(base_logits: jax.Array, steered_logits: jax.Array) -> jax.Array:
    """KL(base || steered) per example, averaged over non-batch, non-class axes."""
    lp_b = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    lp_s = jax.nn.log_softmax(steered_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(lp_b) * (lp_b - lp_s), axis=-1)
    return kl.reshape(kl.shape[0], -1).mean(axis=1)


def ridge_residual(sketch_BxQ: jax.Array, y_BxP: jax.Array, gamma: float) -> jax.Array:
    """Mean squared residual of the ridge fit of each column of y on the sketch rows."""
    gram = sketch_BxQ.T @ sketch_BxQ + gamma * jnp.eye(sketch_BxQ.shape[1])
    coef = jnp.linalg.solve(gram, sketch_BxQ.T @ y_BxP)
    return jnp.mean(jnp.square(y_BxP - sketch_BxQ @ coef))


def _sample(key: jax.Array, data: FitData, n_subsets: int, cfg: FitConfig):
    """Subsets of this step, and fidelity / stability / probe example indices."""
    k_sub, k_fid, k_stab, k_probe = jax.random.split(key, 4)
    n = data.targets.shape[0]
    ks = jax.random.choice(k_sub, n_subsets, (cfg.subsets_per_step,), replace=False)
    start, size = data.indptr_K1[ks], data.indptr_K1[ks + 1] - data.indptr_K1[ks]
    u = jax.random.uniform(k_fid, (cfg.subsets_per_step, cfg.fidelity_batch))
    fid_idx = data.members[start[:, None] + jnp.floor(u * size[:, None]).astype(jnp.int32)]
    stab_idx = jax.random.randint(k_stab, (cfg.subsets_per_step, cfg.stability_batch), 0, n)
    # R_k is drawn from outside A_k: members that fall in get weight 0.
    stab_w = 1.0 - jnp.any(data.ids_NxS[stab_idx] == ks[:, None, None], axis=-1)
    probe_idx = jax.random.randint(k_probe, (cfg.probe_batch,), 0, n)
    return ks, fid_idx, stab_idx, stab_w, probe_idx


def _gather(data: FitData, idx: jax.Array, key: jax.Array, fit_cfg: FitConfig, steer_cfg: SteeringConfig):
    """(h, base logits, targets) of examples idx [Kb, B]; for an LM under the logits placement,
    only `positions_per_example` random positions of each sequence.

    The logits placement acts on each position independently, so losses on a uniform sample of
    positions are unbiased estimates of the per-sequence means at a fraction of the cost (and
    only the sampled rows of the cached logits are read). Classifier features (no sequence axis)
    and the residual placement (attention mixes positions) are kept whole.
    """
    p = fit_cfg.positions_per_example
    seq = data.targets.shape[1] if data.targets.ndim == 2 else None
    if p is None or steer_cfg.placement != "logits" or seq is None or p >= seq:
        return data.h[idx], data.base_logits[idx], data.targets[idx]
    pos = jax.random.randint(key, (*idx.shape, p), 0, seq)
    rows = idx[..., None]
    return data.h[rows, pos], data.base_logits[rows, pos], data.targets[rows, pos]


def fit_loss(
    trainable: tuple[Any, Any],
    model_state: nnx.State,
    data: FitData,
    key: jax.Array,
    *,
    model_graphdef: nnx.GraphDef,
    op_graphdef: nnx.GraphDef,
    steer_cfg: SteeringConfig,
    fit_cfg: FitConfig,
    log_space: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The fit objective on one sampled batch of subsets; differentiable in `trainable` only."""
    basis, coef = trainable
    model = nnx.merge(model_graphdef, model_state)
    n_subsets = jax.tree_util.tree_leaves(coef)[0].shape[0]
    ks, fid_idx, stab_idx, stab_w, probe_idx = _sample(key, data, n_subsets, fit_cfg)
    coef_b = jax.tree.map(lambda x: x[ks], coef)

    def steer(coef_k, h, o):
        return steering.apply_operator(op_graphdef, basis, coef_k, model, h, o, steer_cfg)

    per_subset = jax.vmap(steer)  # each subset its own examples
    shared = jax.vmap(steer, in_axes=(0, None, None))  # all subsets on the same examples
    pos_key = jax.random.fold_in(key, 1)

    h_f, o_f, t_f = _gather(data, fid_idx, jax.random.fold_in(pos_key, 0), fit_cfg, steer_cfg)
    logits_f = per_subset(coef_b, h_f, o_f)
    fidelity = jnp.mean(jax.vmap(example_loss)(logits_f, t_f))

    h_s, base_s, _ = _gather(data, stab_idx, jax.random.fold_in(pos_key, 1), fit_cfg, steer_cfg)
    logits_s = per_subset(coef_b, h_s, base_s)
    kl = jax.vmap(_kl_base_steered)(base_s, logits_s)
    stability = jnp.sum(kl * stab_w) / jnp.maximum(jnp.sum(stab_w), 1.0)

    loss = fidelity + fit_cfg.stability_weight * stability
    metrics = {"fidelity": fidelity, "stability": stability}
    if fit_cfg.linearity_weight > 0:
        base_p = data.base_logits[probe_idx]
        loss_base = example_loss(base_p, data.targets[probe_idx])
        loss_k = jax.vmap(lambda lg: example_loss(lg, data.targets[probe_idx]))(
            shared(coef_b, data.h[probe_idx], base_p)
        )
        y = jnp.log(loss_base) - jnp.log(loss_k) if log_space else loss_base - loss_k
        linearity = ridge_residual(data.sketch_KxQ1[ks], y, fit_cfg.ridge_gamma)
        loss = loss + fit_cfg.linearity_weight * linearity
        metrics["linearity"] = linearity
    metrics["loss"] = loss
    return loss, metrics


def fit_step(
    state: FitState,
    model_state: nnx.State,
    data: FitData,
    base_key: jax.Array,
    *,
    model_graphdef: nnx.GraphDef,
    op_graphdef: nnx.GraphDef,
    steer_cfg: SteeringConfig,
    fit_cfg: FitConfig,
    log_space: bool,
) -> tuple[FitState, dict[str, jax.Array]]:
    """One optimiser step on basis and operator matrices. Pure; the key is derived from the step."""
    key = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.grad(fit_loss, argnums=0, has_aux=True)
    grads, metrics = grad_fn(
        (state.basis, state.coef), model_state, data, key,
        model_graphdef=model_graphdef, op_graphdef=op_graphdef,
        steer_cfg=steer_cfg, fit_cfg=fit_cfg, log_space=log_space,
    )
    updates, opt_state = _optimizer(fit_cfg).update(grads, state.opt_state, (state.basis, state.coef))
    basis, coef = optax.apply_updates((state.basis, state.coef), updates)
    return FitState(basis, coef, opt_state, state.step + 1), metrics


def _optimizer(cfg: FitConfig) -> optax.GradientTransformation:
    return optax.adam(cfg.learning_rate)


def jl_sketch(design: Design, sketch_dim: int, seed: int) -> jax.Array:
    """[M R | 1] for a Gaussian R (N x q) scaled by 1/sqrt(q); never forms M densely."""
    r = jax.random.normal(jax.random.PRNGKey(seed), (design.n_examples, sketch_dim)) / np.sqrt(sketch_dim)
    mr = design_matvec(jnp.asarray(design.ids_NxS), design.n_subsets, r)
    return jnp.concatenate([mr, jnp.ones((design.n_subsets, 1))], axis=1)


class Fitter:
    """Stateful shell around `fit_step`: data on device, progress, metrics, orbax checkpoints.

    With a `workdir`, every `checkpoint_every` steps the operators and optimiser state are saved;
    a new Fitter on the same workdir resumes from the last checkpoint and, since each step's
    randomness is derived from the step number, ends exactly where an uninterrupted fit would.
    """

    def __init__(
        self,
        model: nnx.Module,
        inputs: np.ndarray,
        targets: np.ndarray,
        design: Design,
        cfg: StrideConfig,
        *,
        workdir: str | Path | None = None,
        fingerprint: dict[str, Any] | None = None,
    ):
        if len(inputs) != design.n_examples or len(targets) != design.n_examples:
            raise ValueError(
                f"design covers {design.n_examples} examples but {len(inputs)} inputs / "
                f"{len(targets)} targets were given"
            )
        self.cfg = cfg
        self.design = design
        self.model_graphdef, self.model_state = nnx.split(model)
        steering.steered_dim(model, cfg.steering)  # validates the layer early
        h, base_logits = compute_features(model, inputs, cfg.steering)
        indptr, members = design.inverse()
        self.data = FitData(
            h=h,
            base_logits=base_logits,
            targets=jnp.asarray(targets),
            ids_NxS=jnp.asarray(design.ids_NxS),
            indptr_K1=jnp.asarray(indptr, dtype=jnp.int32),
            members=jnp.asarray(members, dtype=jnp.int32),
            sketch_KxQ1=jl_sketch(design, cfg.fit.sketch_dim, cfg.fit.seed + 1),
        )
        bank = steering.init_bank(model, design.n_subsets, cfg.steering, seed=cfg.fit.seed)
        self.op_graphdef = bank.graphdef
        params = (bank.basis, bank.coef)
        self.state = FitState(bank.basis, bank.coef, _optimizer(cfg.fit).init(params), jnp.asarray(0))
        self.base_key = jax.random.PRNGKey(cfg.fit.seed)
        self._step = jax.jit(
            fit_step,
            static_argnames=("model_graphdef", "op_graphdef", "steer_cfg", "fit_cfg", "log_space"),
            donate_argnums=(0,),
        )
        self.workdir = Path(workdir) if workdir is not None else None
        self._manager = None
        if self.workdir is not None:
            self._open_workdir(fingerprint or {})

    # -- checkpoints ---------------------------------------------------------------------------
    def _open_workdir(self, fingerprint: dict[str, Any]) -> None:
        import orbax.checkpoint as ocp

        self.workdir.mkdir(parents=True, exist_ok=True)
        meta = {  # only what the fitted operators depend on
            "config": {k: to_dict(getattr(self.cfg, k)) for k in ("design", "steering", "fit")},
            "measure_space": self.cfg.measure.space,
            "design": self.design.fingerprint(),
            **fingerprint,
        }
        meta_path = self.workdir / "metadata.json"
        if meta_path.exists():
            try:
                old = json.loads(meta_path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta_path} is corrupted ({e}); delete {self.workdir} to start over") from e
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise ValueError(
                    f"fit directory {self.workdir} was made by a different run (differs in {diff}); "
                    "use another directory or delete it"
                )
        else:
            meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
        (self.workdir / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2))
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self._manager = ocp.CheckpointManager((self.workdir / "checkpoints").resolve(), options=options)
        latest = self._manager.latest_step()
        if latest is not None:
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._pure(self.state))
            try:
                restored = self._manager.restore(latest, args=ocp.args.StandardRestore(target))
            except Exception as e:  # orbax raises many types; name the file instead
                raise ValueError(
                    f"checkpoint {latest} in {self.workdir / 'checkpoints'} could not be restored ({e}); "
                    "delete it to start over"
                ) from e
            self.state = self._unpure(restored)

    def _pure(self, state: FitState) -> dict[str, Any]:
        return {
            "basis": state.basis.to_pure_dict(),
            "coef": state.coef.to_pure_dict(),
            "opt_state": state.opt_state,
            "step": state.step,
        }

    def _unpure(self, d: dict[str, Any]) -> FitState:
        basis, coef = self.state.basis, self.state.coef
        basis.replace_by_pure_dict(d["basis"])
        coef.replace_by_pure_dict(d["coef"])
        return FitState(basis, coef, d["opt_state"], jnp.asarray(d["step"]))

    def save(self) -> None:
        import orbax.checkpoint as ocp

        if self._manager is None:
            return
        step = int(self.state.step)
        if self._manager.latest_step() != step:
            self._manager.save(step, args=ocp.args.StandardSave(self._pure(self.state)))
            self._manager.wait_until_finished()

    # -- running -------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.state.step)

    def run(self, *, max_steps: int | None = None, progress: bool = True, log_every: int = 10) -> OperatorBank:
        """Fit until `cfg.fit.steps` (or stop early after `max_steps` more steps); return the bank."""
        fit_cfg = self.cfg.fit
        end = fit_cfg.steps if max_steps is None else min(fit_cfg.steps, self.step + max_steps)
        log_path = self.workdir / "metrics.jsonl" if self.workdir is not None else None
        bar = tqdm(total=fit_cfg.steps, initial=self.step, desc="fit operators", disable=not progress)
        t0 = time.perf_counter()
        while self.step < end:
            self.state, metrics = self._step(
                self.state, self.model_state, self.data, self.base_key,
                model_graphdef=self.model_graphdef, op_graphdef=self.op_graphdef,
                steer_cfg=self.cfg.steering, fit_cfg=fit_cfg, log_space=self.cfg.measure.space == "log",
            )
            step = self.step
            bar.update(1)
            if step % log_every == 0 or step == end:
                m = {k: float(v) for k, v in metrics.items()}
                if not np.isfinite(m["loss"]):
                    raise FloatingPointError(f"fit loss became {m['loss']} at step {step}; lower learning_rate")
                bar.set_postfix({k: f"{v:.4f}" for k, v in m.items()})
                if log_path is not None:
                    with log_path.open("a") as f:
                        f.write(json.dumps({"step": step, "seconds": time.perf_counter() - t0, **m}) + "\n")
            if self._manager is not None and (step % fit_cfg.checkpoint_every == 0 or step == end):
                self.save()
        bar.close()
        return self.bank

    @property
    def bank(self) -> OperatorBank:
        return OperatorBank(self.op_graphdef, self.state.basis, self.state.coef)


def fit_operators(
    model: nnx.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    design: Design,
    cfg: StrideConfig,
    *,
    workdir: str | Path | None = None,
    progress: bool = True,
) -> OperatorBank:
    """Fit all K operators for `model` on the pool (inputs, targets) under `design`."""
    return Fitter(model, inputs, targets, design, cfg, workdir=workdir).run(progress=progress)


__all__ = [
    "FitData",
    "FitState",
    "Fitter",
    "compute_features",
    "fit_loss",
    "fit_operators",
    "fit_step",
    "jl_sketch",
    "ridge_residual",
]

