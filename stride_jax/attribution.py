"""The `Stride` facade and the `Attribution` result.

    stride = Stride(StrideConfig.preset("lm")).fit(model, train, workdir="runs/fit")
    attr = stride.attribute(queries)
    attr.scores            # [N, Q], positive = including the example lowers the query's loss
    attr.top_k(0, k=3)     # most helpful training examples for query 0

Centring (README "Choices the paper leaves open"): by default each operator's mean effect is
measured once at fit time on a fixed sample of the pool (`n_reference` examples, each operator
averaged over the ones outside its subset), so a query's scores depend on that query alone,
whatever else shares the `attribute` call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from stride_jax import models, prior, recovery, store
from stride_jax.config import RecoveryConfig, StrideConfig, check_sizes, to_dict
from stride_jax.design import Design, left_regular_design
from stride_jax.fit import Fitter, fit_identity
from stride_jax.measure import Measurement, Reference, average, measure, responses
from stride_jax.scores import SIGN, Attribution, SparseScores  # noqa: F401 (re-exported)

log = logging.getLogger("stride_jax")

def _check_pool(model: nnx.Module, train: Any, cfg: StrideConfig) -> None:
    """Every check that needs no compile: the pool fits the model, the design fits the pool."""
    if not isinstance(model, models.HookedModel):
        raise TypeError(f"{type(model).__name__} does not implement the HookedModel protocol "
                        "(cfg, n_layers, out_dim, hidden_dim_at, trunk, rest, __call__; see docs/interfaces.md)")
    n = len(train)
    if n < 2:
        raise ValueError(f"the training set needs at least 2 examples, got {n}")
    models.check_examples(model.cfg, train)
    models.checkpoint.check_tokenizer_of(model, train, "the training pool")
    layer = cfg.steering.resolve(model.n_layers).layer
    check_sizes(cfg, in_dim=model.hidden_dim_at(layer), out_dim=model.out_dim,
                seq_len=train.inputs.shape[1] if models.is_sequence_model(model) else None)
    d = cfg.design
    if n * d.per_example < d.n_subsets:
        raise ValueError(f"design.n_subsets (K={d.n_subsets}) is too large for {n} training examples with "
                         f"design.per_example={d.per_example}: at most n * d = {n * d.per_example} subsets "
                         "can be non-empty")


# Below this K/n, STRIDE's LDS falls steeply (issue 22's law, experiments/results/nk_regime.md): K
# subset sums cannot pin a dense influence vector over n examples.
KNEE_RATIO = 0.5
_warned_knee: set[tuple[int, int]] = set()


def _warn_below_knee(n_subsets: int, n_train: int) -> None:
    """Warn once per (K, n) when K / n is below the measured knee."""
    if n_subsets >= KNEE_RATIO * n_train or (n_subsets, n_train) in _warned_knee:
        return
    _warned_knee.add((n_subsets, n_train))
    log.warning("design.n_subsets K=%d is %.2f of the pool's n=%d, below the knee K/n = %.2g measured in "
                "experiments/results/nk_regime.md: scores will be much less accurate than at K near n "
                "(design.n_subsets='auto' picks K = 2n)", n_subsets, n_subsets / n_train, n_train, KNEE_RATIO)


def recover(y_QxK: np.ndarray, design: Design, rc: RecoveryConfig, *, train_ids: np.ndarray,
            query_ids: np.ndarray | None = None,
            prior_features: np.ndarray | None = None) -> tuple[Attribution, dict[str, Any]]:
    """(scores, what the solver chose) from responses y [Q, K] of the subsets of `design` by
    `rc` (a `RecoveryConfig`): the Lasso (lambda = lambda_frac x lambda_max, or chosen by held-out
    operators for "auto"), or ridge with the features prior (`prior_features` [N, P]; `lambdas`
    then holds gamma, and the cross-validation table of (a, g) goes to the returned dict).
    Needs no fit: responses from anywhere (a fit, another tool, a synthetic y = M w) recover alike.
    """
    if rc.solver == "ridge":
        phi = prior_features if rc.prior == "features" else None
        strengths = rc.prior_strengths if rc.prior_strength == "auto" else (rc.prior_strength,)
        strengths = (0.0,) if phi is None else strengths
        gammas = rc.ridge_gammas if rc.ridge_gamma == "auto" else (rc.ridge_gamma,)
        a, g, table = strengths[0], gammas[0], []
        if len(strengths) * len(gammas) > 1:
            a, g, table = prior.select_prior(y_QxK, design, phi, strengths, gammas, rc.ridge)
        res = prior.ridge_prior_solve(y_QxK, design, phi, a, g, rc.ridge)
        info = {"solver": "ridge", "prior": rc.prior, "a": res.a, "g": res.g, "gamma": res.gamma,
                "prior_dim": 0 if phi is None else int(phi.shape[1]), "folds": rc.ridge.folds, "cv": table}
        lambdas = np.full(np.shape(y_QxK)[0], res.gamma)
        rule = f"a relative residual <= recovery.ridge.tol={rc.ridge.tol} within {rc.ridge.refine} rounds"
    else:
        lam_max = np.asarray(recovery.lambda_max(y_QxK, design))
        frac = rc.lambda_frac
        fista_cfg = dataclasses.replace(rc.fista, nonneg=rc.nonneg)
        if frac == "auto":
            frac, _ = recovery.select_lambda(y_QxK, design, fractions=rc.auto_fractions, cfg=fista_cfg)
        lambdas = float(frac) * lam_max
        info = {"solver": rc.solver, "lambda_frac": float(frac)}
        if rc.solver == "working_set":
            res = recovery.solve_lasso(y_QxK, design, lambdas,
                                       dataclasses.replace(rc.lasso, nonneg=rc.nonneg), sparse=rc.sparse)
            rule = f"a relative duality gap <= recovery.lasso.tol={rc.lasso.tol} within {rc.lasso.max_outer} rounds"
        else:
            res = recovery.fista_lasso(y_QxK, design, lambdas, fista_cfg)
            rule = f"recovery.fista.max_iter={rc.fista.max_iter} iterations"
    q = y_QxK.shape[0]
    coef = res.coef if isinstance(res.coef, recovery.SparseScores) else np.asarray(res.coef, np.float32)
    attr = Attribution(
        scores=coef, train_ids=train_ids,
        query_ids=np.arange(q) if query_ids is None else np.asarray(query_ids),
        lambdas=np.asarray(lambdas, dtype=np.float32).reshape(q), n_iter=np.asarray(res.n_iter).reshape(q),
        converged=np.asarray(res.converged).reshape(q), gap=np.asarray(res.gap, np.float32).reshape(q),
    )
    if attr.n_not_converged:
        worst = float(np.max(attr.gap[~attr.converged]))
        kind, gap_name = ("Ridge", "residual") if rc.solver == "ridge" else ("Lasso", "duality gap")
        msg = (f"{kind} recovery did not converge ({rule}) for {attr.n_not_converged} of {q} queries "
               f"(largest relative {gap_name} {worst:.2e}); their scores are approximate")
        if rc.strict:
            raise RuntimeError(msg)
        log.warning(msg)
    return attr, info


class Stride:
    """STRIDE: fit K steering operators on subsets of the pool, measure, recover by Lasso."""

    def __init__(self, cfg: StrideConfig | None = None, *, mesh=None):
        """`mesh` (a `jax.sharding.Mesh` with a "subsets" axis) splits measurement over devices.

        Without `cfg` the generic `StrideConfig()` defaults are used (unchanged, so existing runs
        reproduce) with a warning naming the presets: those defaults are tuned for no model (on a
        digits MLP they scored LDS 0.06 where the 'classifier' preset scored 0.49).
        `config.choose_preset(model, len(train))` names the preset for a model.
        """
        if cfg is None:
            import warnings

            warnings.warn("Stride() without a config uses StrideConfig()'s generic defaults, tuned for no model; "
                          "pass StrideConfig.preset(name): 'lm' for a stride_jax GPT, 'classifier' for an MLP / "
                          "ConvNet, 'llm-quick' for a pretrained LM (config.choose_preset(model, len(train)) picks "
                          "one and config.pool_preset fits its K to the pool)", UserWarning, stacklevel=2)
        self.cfg = cfg if cfg is not None else StrideConfig()
        self.mesh = mesh
        self.model: nnx.Module | None = None
        self.design: Design | None = None
        self.bank = None
        self.train_ids: np.ndarray | None = None
        self.reference: Reference | None = None  # measured at fit
        self.prior_features: np.ndarray | None = None  # [N, P] for recovery.prior="features"
        self.fit_identity: str | None = None  # digest of what the fit depends on (fit.fit_identity)
        self.recovery_info: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.members: list[Stride] = []  # the single fits of a fit.ensemble (their responses averaged)
        self._pool: Any = None
        self._workdir: str | Path | None = None

    def fit(self, model: nnx.Module, train: Any, *, workdir: str | Path | None = None,
            progress: bool = True) -> Stride:
        """Draw the design and fit all operators (resuming from `workdir` when it holds this fit).

        The workdir records fingerprints of the model's parameters, the pool's tokens and ids and
        the settings; reusing it with anything else raises `store.IdentityError`. The fit holds
        `store.Lock(workdir)` (the CLI's lock is on its output folder, the workdir's parent, so
        they nest): a second process fitting into the same workdir gets `store.LockedError`.
        """
        self.cfg = self.cfg.resolve_subsets(len(train))
        _check_pool(model, train, self.cfg)
        _warn_below_knee(self.cfg.design.n_subsets, len(train))
        if self.cfg.fit.ensemble > 1:  # member 0 in the workdir itself: the single fit of these settings
            # the ensemble recovers with member 0's prior features: the others need not compute them again
            members = [Stride(c if i == 0 else c.replace(recovery={"prior": "none"}), mesh=self.mesh).fit(
                           model, train, progress=progress,
                           workdir=None if workdir is None else Path(workdir) / f"member{i}" if i else workdir)
                       for i, c in enumerate(self.cfg.ensemble_members())]
            return self._adopt(self.cfg, members)
        self._pool, self._workdir = train, workdir
        with store.Lock(workdir) if workdir is not None else contextlib.nullcontext():
            d = self.cfg.design
            t0 = time.perf_counter()
            self.design = left_regular_design(len(train), d.n_subsets, d.per_example, d.seed)
            fitter = Fitter(model, train, self.design, self.cfg, workdir=workdir, progress=progress, mesh=self.mesh)
            self.cfg = fitter.cfg  # negative layers and the step count resolved
            self.bank = fitter.run(progress=progress)
            self.model = model
            self.train_ids = np.asarray(train.ids)
            self.timings["fit"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.reference = self._reference(train, self.cfg.measure.n_reference, workdir, progress)
            self.timings["reference"] = time.perf_counter() - t0
            self.fit_identity = store.fingerprint(fit_identity(model, train, self.design, self.cfg))
            if self.cfg.recovery.prior == "features":  # the recovery's prior: the pool's own features, once
                self._prior_features(progress)
        return self

    @classmethod
    def from_members(cls, cfg: StrideConfig, members: list[Stride]) -> Stride:
        """The `fit.ensemble` of fitted `members` (`cfg.ensemble_members()`, the same design): it
        measures every member and averages their losses (`measure.average`), so its responses are
        the mean of the members' and recovery runs once on them."""
        return cls(cfg, mesh=members[0].mesh)._adopt(cfg, members)

    def _adopt(self, cfg: StrideConfig, members: list[Stride]) -> Stride:
        """This facade as the ensemble of `members` (see `from_members`)."""
        first = members[0]
        if len(members) != cfg.fit.ensemble or any(
                not np.array_equal(m.design.ids_NxS, first.design.ids_NxS) for m in members[1:]):
            raise ValueError(f"an ensemble of fit.ensemble={cfg.fit.ensemble} needs that many fits of one design, "
                             f"got {len(members)}")
        self.cfg = first.cfg.replace(fit={"ensemble": cfg.fit.ensemble, "seed": cfg.fit.seed})
        for name in ("model", "design", "bank", "train_ids", "prior_features", "_pool", "_workdir"):
            setattr(self, name, getattr(first, name))
        self.members = list(members)
        self.reference = Reference(average([m.reference.measurement for m in members], self.cfg.measure),
                                   first.reference.member_PxK)
        self.fit_identity = store.fingerprint([m.fit_identity for m in members])
        for m in members:
            for stage, seconds in m.timings.items():
                self.timings[stage] = self.timings.get(stage, 0.0) + seconds
        return self

    def _prior_features(self, progress: bool = False) -> np.ndarray:
        """The pool's features for recovery.prior="features" (computed once, cached in the workdir)."""
        if self.prior_features is None:
            t0, dim = time.perf_counter(), self.cfg.recovery.prior_dim
            cache = None if self._workdir is None else Path(self._workdir) / f"prior_features_p{dim}.npz"
            self.prior_features = prior.cached_pool_features(self.model, self._pool, self.cfg.steering.layer,
                                                             dim=dim, cache=cache, progress=progress)
            self.timings["prior_features"] = time.perf_counter() - t0
        return self.prior_features

    def _reference(self, train: Any, n_reference: int, workdir: str | Path | None,
                   progress: bool) -> Reference:
        """Operators' effects on a fixed seeded sample of the pool (cached in the workdir); measured
        whatever the centring settings, so `with_config` can switch to fit-time centring."""
        n = len(train)
        rows = np.sort(np.random.default_rng(self.cfg.design.seed + 7).choice(n, size=min(n_reference, n),
                                                                            replace=False))
        member_PxK = np.zeros((len(rows), self.design.n_subsets), bool)
        member_PxK[np.arange(len(rows))[:, None], self.design.ids_NxS[rows]] = True
        mode = self.cfg.measure.mode  # the reference is measured the way the queries are
        name = f"reference_{len(rows)}.npz" if mode == "exact" else f"reference_{len(rows)}_{mode}.npz"
        path = Path(workdir) / name if workdir is not None else None
        if path is not None and path.exists():
            z = store.load_npz(path)
            if np.array_equal(z["rows"], rows):
                return Reference(Measurement(z["base"], z["steered"]), member_PxK)
        m = measure(self.model, self.bank, train[rows], self.cfg.steering, self.cfg.measure, progress=progress,
                    mesh=self.mesh, desc="measure reference")
        if path is not None:
            store.save_npz(path, {"rows": rows, "base": m.base_loss_Q, "steered": m.steered_loss_QxK})
        return Reference(m, member_PxK)

    def with_config(self, cfg: StrideConfig) -> Stride:
        """A facade sharing this fit under other measurement / recovery settings (no refit)."""
        self._require_fit()
        cfg = cfg.resolve_subsets(len(self.train_ids))  # K and the step count as this fit resolved them
        cfg = cfg.replace(fit={"steps": cfg.fit.resolve_steps(cfg.design.n_subsets)})
        for section in ("design", "steering", "fit"):
            a, b = to_dict(getattr(self.cfg, section)), to_dict(getattr(cfg, section))
            if section == "steering":
                b = to_dict(cfg.steering.resolve(self.model.n_layers))
            if a != b:
                raise ValueError(f"with_config can change only measure and recovery settings; {section} "
                                 f"differs ({a} vs {b}): fit a new Stride")
        if self.members:
            return Stride.from_members(cfg, [m.with_config(c) for m, c in zip(self.members, cfg.ensemble_members())])
        other = Stride(dataclasses.replace(cfg, steering=self.cfg.steering), mesh=self.mesh)
        for name in ("model", "design", "bank", "train_ids", "reference", "fit_identity", "_pool", "_workdir"):
            setattr(other, name, getattr(self, name))
        if cfg.recovery.prior_dim == self.cfg.recovery.prior_dim:
            other.prior_features = self.prior_features
        n_reference = min(cfg.measure.n_reference, len(self.train_ids))
        uses_reference = cfg.measure.center_operators and cfg.measure.reference == "fit"
        if uses_reference and (n_reference != len(self.reference.member_PxK)
                               or cfg.measure.mode != self.cfg.measure.mode):
            # the fit-time reference of another size or measurement mode: measured on the same operators
            # (cached in the workdir), so centring subtracts operator means measured like the queries
            other.reference = other._reference(self._pool, cfg.measure.n_reference, self._workdir, progress=False)
        return other

    def _require_fit(self) -> None:
        if self.bank is None:
            raise RuntimeError("call Stride.fit(model, train) before measuring or attributing")

    def measure(self, queries: Any, *, progress: bool = True) -> Measurement:
        """Base and steered losses of every query (raw, before centring)."""
        self._require_fit()
        if self.members:
            return average([m.measure(queries, progress=progress) for m in self.members], self.cfg.measure)
        return measure(self.model, self.bank, queries, self.cfg.steering, self.cfg.measure, progress=progress,
                       mesh=self.mesh)

    def responses(self, m: Measurement) -> np.ndarray:
        """Centred y [Q, K] for recovery."""
        return responses(m, self.cfg.measure, reference=self.reference)

    def recover(self, y_QxK: np.ndarray, query_ids: np.ndarray | None = None) -> Attribution:
        """Per-example scores from responses y [Q, K] by `recovery.solver` (`recover`); the ridge
        solver's cross-validation table goes to `self.recovery_info`."""
        self._require_fit()
        rc = self.cfg.recovery
        phi = self._prior_features() if rc.solver == "ridge" and rc.prior == "features" else None
        attr, self.recovery_info = recover(y_QxK, self.design, rc, train_ids=self.train_ids, query_ids=query_ids,
                                           prior_features=phi)
        return attr

    def attribute(self, queries: Any, *, progress: bool = True, confidence: int = 0, k: int = 10) -> Attribution:
        """Scores [N, Q] for `queries`: measure all operators, centre, recover. `confidence` > 0:
        that many bootstrap re-solves over the operators (the same measurement, no refit) give
        each query's top-`k` entries a stability and an interval (`confidence.attach`)."""
        self._require_fit()
        models.checkpoint.check_tokenizer_of(self.model, queries, "the queries")
        t0 = time.perf_counter()
        m = self.measure(queries, progress=progress)
        self.timings["measure"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        y = self.responses(m)
        attr = self.recover(y, queries.ids)
        attr.fit_identity = self.fit_identity
        self.timings["recover"] = time.perf_counter() - t0
        if confidence:
            from stride_jax import confidence as confidence_lib  # it builds on this module's results

            attr = confidence_lib.attach(self, attr, y, n_boot=confidence, k=min(k, attr.n_train))
        return attr

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)
