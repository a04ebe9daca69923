"""Configuration: small frozen dataclasses that reach `jit`, the `StrideConfig` around them, presets.

Two layers (STYLE.md rule 4): `SteeringConfig`, `MeasureConfig` and `recovery.FistaConfig` are
frozen and hashable and reach jitted functions as static arguments; `FitConfig` splits into
the fields that set shapes (static) and the hyperparameters that do not (learning rate and loss
weights, passed traced, so a learning-rate sweep compiles one step). `StrideConfig` groups them
with the design; it is what a user edits, loads from YAML/JSON (`from_dict` rejects unknown
keys and wrongly typed values, naming them) or takes from `StrideConfig.preset(name)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

from stride_jax.prior import RidgeConfig
from stride_jax.recovery import FistaConfig, LassoConfig

Placement = Literal["logits", "residual"]
# Below this fit learning rate the operators barely leave zero (a warning, not an error).
MIN_FIT_LEARNING_RATE = 1e-6
# Refuse an operator bank whose float32 parameters, gradients and two Adam moments exceed this
# (or the accelerator's memory, where it reports one).
MAX_BANK_BYTES = 16 * 2**30


def _check_positive_int(owner: str, **fields: Any) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


def _check_seed(owner: str, **fields: Any) -> None:
    for name, value in fields.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{owner}.{name} must be an integer >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DesignConfig:
    """Subset design: every training example lands in `per_example` of `n_subsets` subsets.

    n_subsets="auto" picks K from the pool size n when the fit starts (`resolve_subsets`):
    K = ceil(auto_ratio * n), at least per_example and at most min(n * per_example, max_subsets).
    auto_ratio's default is the measured law of issue 22 (experiments/results/nk_regime.md: on
    validation queries STRIDE reaches 90% of its best LDS over K in {n/3, n, 2n, 4n} at K = 2n on
    both pools measured, not at K = n); max_subsets is the budget cap (operators' fit and
    measurement cost grow linearly in K; with fit.sparse_updates a step's cost does not).
    """

    n_subsets: int | Literal["auto"] = 512  # K
    per_example: int = 8  # the paper's d (S in shape names)
    seed: int = 0
    auto_ratio: float = 2.0  # K / n for n_subsets="auto" (the measured knee, nk_regime.md)
    max_subsets: int = 65536  # the cap of n_subsets="auto"

    def __post_init__(self) -> None:
        if self.n_subsets != "auto":
            _check_positive_int("design", n_subsets=self.n_subsets)
        _check_positive_int("design", per_example=self.per_example, max_subsets=self.max_subsets)
        _check_seed("design", seed=self.seed)
        if isinstance(self.auto_ratio, bool) or not isinstance(self.auto_ratio, (int, float)) \
                or not 0 < self.auto_ratio < float("inf"):
            raise ValueError(f"design.auto_ratio must be a positive finite number, got {self.auto_ratio!r}")
        if self.n_subsets != "auto" and self.per_example > self.n_subsets:
            raise ValueError(f"design.per_example (d={self.per_example}) must be <= design.n_subsets "
                             f"(K={self.n_subsets})")


@dataclasses.dataclass(frozen=True)
class SteeringConfig:
    """Where and how operators steer the frozen model.

    placement="logits": o~ = o + B(h_l) a_k (paper text); "residual": z~_l = z_l + B(z_l) a_k, then
    the rest of the frozen network (paper figure). B is a linear map of the RMS-normalised
    layer-`layer` activation to `rank` numbers (the paper does not publish B's form). A
    negative `layer` counts from the top (-1 = the last hook point, the final residual state);
    `depth_fraction` (if set) picks layer round(depth_fraction * n_layers) instead, so one
    setting fits models of any depth (the paper: about 0.6).
    """

    layer: int = 1
    depth_fraction: float | None = None
    rank: int = 16
    placement: Placement = "logits"
    normalize_input: bool = True
    basis_init_std: float = 1.0

    def __post_init__(self) -> None:
        _check_positive_int("steering", rank=self.rank)
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise ValueError(f"steering.layer must be an integer, got {self.layer!r}")
        if self.placement not in ("logits", "residual"):
            raise ValueError(f"steering.placement must be 'logits' or 'residual', got {self.placement!r}")
        if not self.basis_init_std > 0:
            raise ValueError(f"steering.basis_init_std must be > 0, got {self.basis_init_std}")
        if self.depth_fraction is not None and not 0 <= self.depth_fraction <= 1:
            raise ValueError(f"steering.depth_fraction must lie in [0, 1], got {self.depth_fraction}")

    def resolve(self, n_layers: int) -> SteeringConfig:
        """This config with an absolute layer for a model of depth `n_layers` (depth_fraction and
        negative layers resolved)."""
        if self.depth_fraction is not None:
            return dataclasses.replace(self, layer=int(round(self.depth_fraction * n_layers)), depth_fraction=None)
        layer = self.layer + n_layers + 1 if self.layer < 0 else self.layer
        if not 0 <= layer <= n_layers:
            raise ValueError(f"steering.layer {self.layer} is beyond the model's depth: hook points are "
                             f"0..{n_layers} (or -1..-{n_layers + 1} from the top)")
        return dataclasses.replace(self, layer=layer)


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Joint fit of the basis and all per-subset matrices (paper section 3, our defaults).

    Loss = fidelity + stability_weight * KL(base || steered) + linearity_weight * ridge residual.
    Fields that set array shapes reach the jitted step as static (`FitShape`); the learning
    rate and loss weights are traced (`hyper`), so changing them does not recompile.

    sparse_updates: lazy Adam. A step gathers only its `subsets_per_step` operators a_k and their
      Adam moments, updates them with per-operator bias correction (an operator's Adam count is
      the number of steps it took part in) and scatters them back, so a step's cost does not
      grow with K. False (dense): optax Adam over every a_k each step (moments of operators not
      in the step still decay and move them). The shared basis always takes ordinary Adam.
    updates_per_operator: when set, the fit runs ceil(updates_per_operator * K / subsets_per_step)
      steps (`resolve_steps`) and `steps` is ignored (with a warning when it was changed from its
      default and disagrees); the fitter records the resolved number in its config's `steps`.
    ensemble: fit this many independent operator banks on the same subsets (fit seeds seed,
      seed + 1, ...) and average their responses before recovery (`measure.average`); each member
      costs one fit and one measurement. Member i is an ordinary fit (ensemble 1, seed + i), so
      member 0 is the single fit of the same settings. Measured (nk_regime.md, x2 rows): at most
      +0.013 validation LDS at K = 2n and none at 4n; more updates per operator paid more.
    """

    steps: int = 300
    learning_rate: float = 3e-2
    subsets_per_step: int = 32
    fidelity_batch: int = 8
    stability_batch: int = 8
    probe_batch: int = 8
    positions_per_example: int | None = 16  # LM logits placement: positions sampled per sequence
    stability_weight: float = 1.0
    linearity_weight: float = 0.0
    sketch_dim: int = 8  # q of the JL sketch M R, R in R^{N x q}
    ridge_gamma: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    cache_dtype: Literal["float32", "bfloat16"] = "float32"  # cached hook-layer / final states
    sparse_updates: bool = False  # update only the step's operators and their Adam state (lazy Adam)
    updates_per_operator: int | None = None  # steps = ceil(this * K / subsets_per_step); overrides steps
    ensemble: int = 1  # independent fits (seeds seed .. seed + ensemble - 1) whose responses are averaged

    def __post_init__(self) -> None:
        if not isinstance(self.sparse_updates, bool):
            raise ValueError(f"fit.sparse_updates must be true or false, got {self.sparse_updates!r}")
        if self.updates_per_operator is not None:
            _check_positive_int("fit", updates_per_operator=self.updates_per_operator)
        _check_positive_int("fit", steps=self.steps, subsets_per_step=self.subsets_per_step, ensemble=self.ensemble,
                            fidelity_batch=self.fidelity_batch, stability_batch=self.stability_batch,
                            probe_batch=self.probe_batch, sketch_dim=self.sketch_dim,
                            checkpoint_every=self.checkpoint_every)
        if self.positions_per_example is not None:
            _check_positive_int("fit", positions_per_example=self.positions_per_example)
        for name in ("stability_weight", "linearity_weight", "ridge_gamma"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"fit.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < float(self.learning_rate) < float("inf"):
            raise ValueError(f"fit.learning_rate must be a positive finite number, got {self.learning_rate}")
        if self.learning_rate < MIN_FIT_LEARNING_RATE:
            warnings.warn(f"fit.learning_rate={self.learning_rate:g} is below {MIN_FIT_LEARNING_RATE:g}: Adam moves each "
                          f"operator by about the learning rate per step, so {self.steps} steps leave them near zero "
                          "and every score near 0", stacklevel=3)
        _check_seed("fit", seed=self.seed)
        if self.cache_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"fit.cache_dtype must be 'float32' or 'bfloat16', got {self.cache_dtype!r}")

    @property
    def shape(self) -> FitShape:
        return FitShape(self.subsets_per_step, self.fidelity_batch, self.stability_batch, self.probe_batch,
                        self.positions_per_example, self.sketch_dim, self.linearity_weight > 0)

    @property
    def hyper(self) -> dict[str, float]:
        return {"learning_rate": float(self.learning_rate), "stability_weight": float(self.stability_weight),
                "linearity_weight": float(self.linearity_weight), "ridge_gamma": float(self.ridge_gamma)}

    def resolve_steps(self, n_subsets: int) -> int:
        """Steps of a fit of K = n_subsets operators: `steps`, or, with `updates_per_operator` set,
        ceil(updates_per_operator * K / subsets_per_step) (each operator then takes part in that
        many steps on average)."""
        if self.updates_per_operator is None:
            return self.steps
        return -(-self.updates_per_operator * n_subsets // self.subsets_per_step)


class FitShape(typing.NamedTuple):
    """The static (shape-setting) part of a FitConfig."""

    subsets_per_step: int
    fidelity_batch: int
    stability_batch: int
    probe_batch: int
    positions_per_example: int | None
    sketch_dim: int
    linearity: bool


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """How y[q, k] is formed and centred before recovery.

    space="log": y = log loss_base - log loss_k (losses are heavy-tailed); "diff": loss_base - loss_k.
    loss_floor: losses are clipped below at this value before the log (a confident classifier's
      float32 cross-entropy is often exactly 0); applied to queries and reference alike.
    center_operators: subtract each operator's mean effect; with reference="fit" it is measured
      once at fit time on a fixed sample of the pool (each operator averaged over the reference
      examples outside its subset), so a query's scores do not depend on the other queries of a
      call; with reference="queries", on the queries of the call.
    center_queries: subtract each query's mean over operators (an intercept).
    n_reference: pool examples of the fit-time reference (measured once per fit).
    operator_chunk / query_chunk: operators applied at once (`lax.map` batch) / queries per
      compiled call (the last chunk is padded, so one program serves every call).
    chunk_bytes: bound on the float32 logits of one step (operator_chunk x query_chunk x T x V x
      4 bytes); both chunks shrink (operators first) until it holds, so a large vocabulary or long
      sequences cannot exhaust memory. Chunking changes speed, never results.
    mode: "exact" runs every operator through the (rest of the) frozen model; "first_order" uses
      that operators are linear in a_k: loss_k ~= loss_base + <G_x, a_k>, one gradient per query
      and one [K, R*O] product; "second_order" adds the softmax-Hessian term (logits placement
      only). Approximated losses are floored at loss_floor (see `measure.measure`).
    """

    space: Literal["log", "diff"] = "log"
    loss_floor: float = 1e-6
    center_operators: bool = True
    center_queries: bool = True
    reference: Literal["fit", "queries"] = "fit"
    n_reference: int = 64
    operator_chunk: int = 32
    query_chunk: int = 64
    chunk_bytes: int = 2**30
    mode: Literal["exact", "first_order", "second_order"] = "exact"

    def __post_init__(self) -> None:
        if self.mode not in ("exact", "first_order", "second_order"):
            raise ValueError(f"measure.mode must be 'exact', 'first_order' or 'second_order', got {self.mode!r}")
        if self.space not in ("log", "diff"):
            raise ValueError(f"measure.space must be 'log' or 'diff', got {self.space!r}")
        if self.reference not in ("fit", "queries"):
            raise ValueError(f"measure.reference must be 'fit' or 'queries', got {self.reference!r}")
        if not 0 < float(self.loss_floor) < 1:
            raise ValueError(f"measure.loss_floor must lie in (0, 1), got {self.loss_floor}")
        _check_positive_int("measure", operator_chunk=self.operator_chunk, query_chunk=self.query_chunk,
                            n_reference=self.n_reference, chunk_bytes=self.chunk_bytes)


def _check_grid(name: str, values: Any, low: float | None, single: bool = False) -> None:
    """A non-empty tuple of finite numbers, each >= low (low None: each > 0), or raise naming `name`."""
    bound = "> 0" if low is None else f">= {low:g}"
    what = f"a finite number {bound} or 'auto'" if single else f"a non-empty list of finite numbers {bound}"
    ok = isinstance(values, (tuple, list)) and len(values) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        and (v > 0 if low is None else v >= low) for v in values)
    if not ok:
        raise ValueError(f"{name} must be {what}, got {values[0] if single else values!r}")


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    """Lasso recovery. lambda = lambda_frac * ||M^T y||_inf per query, or chosen on held-out subsets.

    solver: "working_set" (default: `recovery.solve_lasso`, certified by its duality gap, fast
      at N >> K; settings in `lasso`) or "fista" (plain FISTA over all N columns, the paper
      card's solver; settings in `fista`; its `converged` is a relative-change stopping rule).
    nonneg: constrain the scores to w >= 0 (both solvers; set it here, not in `lasso`/`fista`).
    sparse: return `SparseScores` (memory follows the nonzeros; working_set only).
    strict: raise (instead of logging a warning) when a query's recovery did not converge.
    `fista` also sets the held-out fits of lambda_frac="auto".

    solver="ridge" (`prior.ridge_prior_solve`; lambda_frac, lasso, fista unused; dense scores):
    the posterior mean w = C M^T (M C M^T + gamma I)^-1 y of the Gaussian prior w ~ N(0, C),
    C = I + a Phi Phi^T, by matrix-free conjugate gradients (K ~ n ~ 1e5 works: nothing K x K or
    n x n is formed); `converged`: relative residual <= ridge.tol.
    prior: "none" (C = I: ridge) or "features" (Phi = the pool's own features, `prior_dim`
      principal components of mean-pooled hook-layer and final states and log token counts,
      computed at fit; needs solver="ridge").
    prior_strength: a (features' share of prior variance; mean ||Phi_i||^2 = 1), or "auto": chosen
      from `prior_strengths` by cross-validation over held-out operators (no ground truth).
    ridge_gamma: g, noise relative to the mean prior variance of one response (gamma = g x mean
      diag M C M^T), or "auto": chosen from `ridge_gammas` jointly with a.
    ridge: CG tolerance and iterations, cross-validation folds (`prior.RidgeConfig`).
    """

    lambda_frac: float | Literal["auto"] = 0.05
    auto_fractions: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    solver: Literal["working_set", "fista", "ridge"] = "working_set"
    lasso: LassoConfig = LassoConfig()
    fista: FistaConfig = FistaConfig()
    nonneg: bool = False
    sparse: bool = False
    strict: bool = False
    prior: Literal["none", "features"] = "none"
    prior_dim: int = 64
    prior_strength: float | Literal["auto"] = "auto"
    prior_strengths: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)
    ridge_gamma: float | Literal["auto"] = "auto"
    ridge_gammas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    ridge: RidgeConfig = RidgeConfig()

    def __post_init__(self) -> None:
        if self.lambda_frac != "auto" and not (isinstance(self.lambda_frac, (int, float))
                                               and not isinstance(self.lambda_frac, bool)
                                               and 0 <= self.lambda_frac < float("inf")):
            raise ValueError(f"recovery.lambda_frac (lambda) must be >= 0 and finite, or 'auto'; got "
                             f"{self.lambda_frac!r}")
        if self.solver not in ("working_set", "fista", "ridge"):
            raise ValueError(f"recovery.solver must be 'working_set', 'fista' or 'ridge', got {self.solver!r}")
        if self.prior not in ("none", "features"):
            raise ValueError(f"recovery.prior must be 'none' or 'features', got {self.prior!r}")
        if self.prior == "features" and self.solver != "ridge":
            raise ValueError(f"recovery.prior='features' needs recovery.solver='ridge', got {self.solver!r}")
        if self.nonneg and self.solver == "ridge":
            raise ValueError("recovery.nonneg needs a Lasso solver (recovery.solver 'working_set' or 'fista'), "
                             "not 'ridge'")
        _check_positive_int("recovery", prior_dim=self.prior_dim)
        for name, low in (("prior_strength", 0.0), ("ridge_gamma", None)):
            _check_grid(f"recovery.{name}s", getattr(self, f"{name}s"), low)
            if getattr(self, name) != "auto":
                _check_grid(f"recovery.{name}", (getattr(self, name),), low, single=True)
        if self.lasso.nonneg or self.fista.nonneg:
            raise ValueError("set recovery.nonneg (it applies to both solvers), not recovery.lasso.nonneg or "
                             "recovery.fista.nonneg")
        if self.sparse and self.solver != "working_set":
            raise ValueError("recovery.sparse needs recovery.solver='working_set'")


@dataclasses.dataclass(frozen=True)
class StrideConfig:
    """Everything a STRIDE run needs besides the model and the data."""

    design: DesignConfig = DesignConfig()
    steering: SteeringConfig = SteeringConfig()
    fit: FitConfig = FitConfig()
    measure: MeasureConfig = MeasureConfig()
    recovery: RecoveryConfig = RecoveryConfig()

    def __post_init__(self) -> None:
        if self.design.n_subsets != "auto" and self.fit.subsets_per_step > self.design.n_subsets:
            raise ValueError(f"fit.subsets_per_step ({self.fit.subsets_per_step}) must be <= design.n_subsets "
                             f"(K={self.design.n_subsets})")
        if self.measure.mode == "second_order" and self.steering.placement != "logits":
            raise ValueError(f"measure.mode='second_order' needs steering.placement='logits' (got "
                             f"{self.steering.placement!r}); use measure.mode='first_order' or 'exact'")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StrideConfig:
        return from_dict(cls, d)

    def replace(self, **sections: dict[str, Any]) -> StrideConfig:
        """Copy with fields of sections overridden: `cfg.replace(fit={"steps": 10})`."""
        return from_dict(StrideConfig, merge(self.to_dict(), sections))

    def resolve_subsets(self, n_train: int) -> StrideConfig:
        """This config with an integer K for a pool of `n_train` examples (design.n_subsets="auto":
        ceil(auto_ratio * n), between per_example and min(n * per_example, max_subsets);
        fit.subsets_per_step is lowered to K when it is larger). Integer K is returned unchanged."""
        d = self.design
        if d.n_subsets != "auto":
            return self
        k = math.ceil(d.auto_ratio * n_train)
        k = max(d.per_example, min(k, n_train * d.per_example, d.max_subsets))
        fit = {"subsets_per_step": min(self.fit.subsets_per_step, k)}
        return self.replace(design={"n_subsets": k}, fit=fit)

    def ensemble_members(self) -> list[StrideConfig]:
        """The single fits of a `fit.ensemble` (member i: ensemble 1, fit seed + i); [self] without one."""
        if self.fit.ensemble == 1:
            return [self]
        return [self.replace(fit={"ensemble": 1, "seed": self.fit.seed + i}) for i in range(self.fit.ensemble)]

    @classmethod
    def preset(cls, name: str, **sections: dict[str, Any]) -> StrideConfig:
        """A named, measured setting (see `PRESETS` and README "Presets"), optionally overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return from_dict(StrideConfig, merge(PRESETS[name], sections))


def _device_bytes() -> int | None:
    """The first accelerator's memory in bytes (None on CPU, or where it reports none)."""
    import jax

    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        return None
    return (dev.memory_stats() or {}).get("bytes_limit")


def check_sizes(cfg: StrideConfig, *, in_dim: int, out_dim: int, seq_len: int | None) -> None:
    """Raise ValueError, naming the field, when `cfg` cannot fit a model of these widths.

    `in_dim`: the width at the (resolved) hook layer; `out_dim`: the model's output width;
    `seq_len`: the pool's sequence length (None for classifiers). The operator bank (K matrices
    R x O and the basis D x R, with gradients and two Adam moments, float32) must stay within
    the accelerator's memory (on CPU `MAX_BANK_BYTES`); `fit.positions_per_example` may not
    exceed the sequence length (values up to the default of 16 are accepted on shorter
    sequences: like null, they keep whole sequences).
    """
    width = out_dim if cfg.steering.placement == "logits" else in_dim
    n_bank = cfg.steering.rank * (in_dim + cfg.design.n_subsets * width)
    need, limit = 4 * 4 * n_bank, _device_bytes() or MAX_BANK_BYTES
    if need > limit:
        raise ValueError(f"steering.rank={cfg.steering.rank} makes an operator bank of {need / 2**30:.1f} GiB "
                         f"(K={cfg.design.n_subsets} matrices {cfg.steering.rank} x {width} and a basis "
                         f"{in_dim} x {cfg.steering.rank}, with gradients and Adam moments in float32), above the "
                         f"bound of {limit / 2**30:.0f} GiB (the device's memory, else config.MAX_BANK_BYTES): "
                         "lower steering.rank or design.n_subsets")
    p = cfg.fit.positions_per_example
    default = FitConfig.positions_per_example
    if seq_len is not None and p is not None and p > max(seq_len, default):
        raise ValueError(f"fit.positions_per_example={p} exceeds the sequence length T={seq_len}; use at most "
                         f"{seq_len}, or null to keep whole sequences")


# Named settings, each chosen by LDS on validation queries (README "Presets" has the grids):
#   lm: the nanochat-style GPT pool of the demo (experiments/results/lm_tuning.md).
#   classifier: MLP classifiers, the best mean validation LDS of 10 settings over 3 data sets x 3
#     training recipes (experiments/results/presets_classifier.md); needs n * 10 >= 1000 examples-slots.
#   quick: tiny and fast, for smoke tests; not for results.
PRESETS: dict[str, dict[str, Any]] = {
    "lm": {"design": {"n_subsets": 2048}, "steering": {"rank": 1}, "fit": {"steps": 600}},
    "classifier": {
        "design": {"n_subsets": 1000, "per_example": 10},
        "steering": {"layer": 1, "rank": 64},
        "fit": {"steps": 400, "learning_rate": 3e-3, "subsets_per_step": 1000, "fidelity_batch": 16,
                "stability_batch": 16, "positions_per_example": None},
        "recovery": {"lambda_frac": 0.1},
    },
    # The n >> K law's setting (experiments/results/nk_regime.md, issue 22): K = 2n subsets (d 10), each
    # operator updated 40 times whatever K (sparse updates: a step's cost does not grow with K; 40
    # instead of the law run's 20 won on validation at K = 2n in all three cells tried, +0.018 to +0.024,
    # experiments/results/nk_factors.md), and recovery by ridge with the prior from the pool's own
    # features (strength chosen by held-out operators). For the project's GPTs on pools larger than
    # the `lm` preset's K / 2 = 1024.
    "lm-auto": {"design": {"n_subsets": "auto", "per_example": 10},
                "steering": {"rank": 1},
                "fit": {"learning_rate": 0.01, "updates_per_operator": 40, "sparse_updates": True},
                "recovery": {"solver": "ridge", "prior": "features"}},
    "quick": {"design": {"n_subsets": 32, "per_example": 4},
              "fit": {"steps": 20, "subsets_per_step": 8, "checkpoint_every": 10}},
    # A real pretrained LM in minutes on a CPU (stride-jax attribute --preset llm-quick): the hook at
    # 0.6 of the depth (the paper's choice), few subsets and short, position-sampled fits. Each
    # operator gets steps x subsets_per_step / n_subsets = 10 updates; raise steps with n_subsets:
    # at 2.5 updates an example's own operators barely stood out on it (its self-score ranked 82nd of
    # 201), at 25 it ranked 1st (experiments/results/stride_probe.md).
    "llm-quick": {"design": {"n_subsets": 64, "per_example": 4},
                  "steering": {"depth_fraction": 0.6, "rank": 1},
                  "fit": {"steps": 40, "subsets_per_step": 16, "fidelity_batch": 4, "stability_batch": 4,
                          "positions_per_example": 8, "checkpoint_every": 20},
                  "measure": {"operator_chunk": 8, "query_chunk": 4, "n_reference": 16}},
    # A real pretrained LM where accuracy matters more than minutes (issue 23, sft_lds.md, group "K=n"):
    # K = n subsets (d 4), each operator updated 25 times (sparse updates: a step's cost does not grow
    # with K), the first-order measurement (one gradient per query), lr 1e-2, and the recovery with the
    # features prior (validation LDS on alpaca 0.237 against Lasso 0.225, llm-quick 0.080); the
    # llm-quick hook and batch shape. Its fit costs ~10x llm-quick's (benchmarks/results/llm_cost.md).
    "llm": {"design": {"n_subsets": "auto", "auto_ratio": 1.0, "per_example": 4},
            "steering": {"depth_fraction": 0.6, "rank": 1},
            "fit": {"learning_rate": 0.01, "updates_per_operator": 25, "sparse_updates": True,
                    "subsets_per_step": 16, "fidelity_batch": 4, "stability_batch": 4, "positions_per_example": 8,
                    "checkpoint_every": 50},
            "measure": {"mode": "first_order", "operator_chunk": 8, "query_chunk": 4, "n_reference": 16},
            "recovery": {"solver": "ridge", "prior": "features"}},
}

# model_type -> (preset, why): what `choose_preset` picks for a model of that kind
_PRESET_FOR_MODEL = {
    "gpt": ("lm", "a stride_jax GPT: 'lm', measured on the demo's GPT pool"),
    "gpt-large-pool": ("lm-auto", "a stride_jax GPT on a pool of more than 1,024 examples: 'lm-auto', K = 2n with "
                                  "the features prior (the n >> K law, nk_regime.md)"),
    "llama": ("llm-quick", "a pretrained LM (Llama family, GGUF / HF): 'llm-quick', minutes on a CPU"),
    "mlp": ("classifier", "a classifier: 'classifier', measured on MLPs over 3 data sets"),
    "conv": ("classifier", "a classifier: 'classifier', measured on MLPs over 3 data sets"),
}


def choose_preset(model: Any, n_train: int) -> tuple[str, str]:
    """(preset name, why) for `model` (a model, its config or its `model_type`) and a pool of
    `n_train` examples; `pool_preset(name, n_train)` then fits the preset's K to the pool."""
    kind = model if isinstance(model, str) else getattr(getattr(model, "cfg", model), "model_type", None)
    if kind not in _PRESET_FOR_MODEL:
        raise ValueError(f"no preset is known for a model of type {kind!r}; pass a StrideConfig "
                         f"(presets: {sorted(PRESETS)})")
    if kind == "gpt" and n_train > 1024:  # lm's K = 2048 is below 2n: the law's preset
        kind = "gpt-large-pool"
    name, why = _PRESET_FOR_MODEL[kind]
    cfg, note = pool_preset(name, n_train)
    return name, why + (f"; {note}" if note else "")


def pool_preset(name: str, n_train: int, **sections: dict[str, Any]) -> tuple[StrideConfig, str]:
    """(the preset with K = design.n_subsets lowered to at most n_train, never below d, and
    fit.subsets_per_step to at most K; a note saying so, or ""). At most n * d subsets can be
    non-empty, and K beyond n gained little (docs/STRIDE.md section 6)."""
    cfg = StrideConfig.preset(name, **sections)
    if cfg.design.n_subsets == "auto":  # K follows the pool by design.auto_ratio
        return cfg.resolve_subsets(n_train), ""
    k, d, step = cfg.design.n_subsets, cfg.design.per_example, cfg.fit.subsets_per_step
    if k <= n_train:
        return cfg, ""
    capped = max(int(n_train), d)
    cfg = cfg.replace(design={"n_subsets": capped}, fit={"subsets_per_step": min(step, capped)})
    return cfg, f"design.n_subsets K capped from {k} to {capped} for {n_train} training examples"


def check_design_fits(cfg: StrideConfig, n_train: int, what: str = "the config") -> None:
    """ValueError naming the fix when `cfg`'s K is more than n * d subsets can fill."""
    k, d = cfg.design.n_subsets, cfg.design.per_example
    if n_train * d < k:
        fit = max(int(n_train), d)
        raise ValueError(f"{what} has design.n_subsets K={k}, more than n * d = {n_train} * {d} = {n_train * d} "
                         f"subsets {n_train} training examples can fill; lower K (e.g. a config with design: "
                         f"{{n_subsets: {fit}}}), or leave the preset out to have it chosen and fitted to the pool")


# ----------------------------------------------------------------------------- dict <-> dataclass


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against (and, for lists/ints, converted to) the annotated type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(value, option, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        real = [e for option, e in zip(args, errors) if option is not type(None)]
        if len(real) == 1 and isinstance(value, dict):  # an optional section: its own error says more
            raise ValueError(real[0])
        raise TypeError(f"{where}: {value!r} is none of {_type_name(tp)} ({'; '.join(errors)})")
    if tp is type(None):
        if value is None:
            return None
        raise TypeError(f"{where} must be null, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        if args and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args:
            if len(args) != len(value):
                raise ValueError(f"{where} must have {len(args)} entries, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a mapping, got {type(value).__name__}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{where} must be true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{where} must be a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{where} must be a string, got {type(value).__name__} {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def from_dict(cls: type, d: Any, where: str | None = None) -> Any:
    """Build dataclass `cls` from a nested dict: unknown keys and wrong types raise, named."""
    where = where or cls.__name__
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a mapping, got {type(d).__name__} {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {where}; known: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in d.items()}
    return cls(**kwargs)


def merge(base: dict, override: dict) -> dict:
    """Recursive dict update (override wins)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _unique_keys(path: Path) -> Any:
    """A json `object_pairs_hook` that rejects a key given twice in one mapping."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"config {path} gives key {k!r} twice in one mapping")
            out[k] = v
        return out

    return hook


def _yaml_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` entries may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line})",
                        key_node.start_mark)
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return Loader


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config into a dict; a missing file, a syntax error or a key given twice in
    one mapping (YAML and JSON would keep the last silently) raises."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except yaml.YAMLError as e:
            raise ValueError(f"config {path} is not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping at top level")
    return data
