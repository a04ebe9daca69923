"""One method registry: STRIDE and every baseline, built the same way everywhere.

`build(spec, ctx)` turns a `MethodSpec` into an attributor (`fit(model, train)` then
`attribute(queries)`, each keeping a `timings` dict). `ctx` carries what some methods need
beyond the model and pool: the STRIDE config of this cell, a work directory, the base model's
training recipe (TracIn's checkpoints, TRAK's retrained ensemble) and its seed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from stride_jax import baselines as bl
from stride_jax import train as train_lib
from stride_jax.attribution import Attribution, Stride
from stride_jax.config import StrideConfig


@dataclasses.dataclass
class Context:
    stride: StrideConfig  # the STRIDE config of this method in this cell
    workdir: Path  # where the method may keep resumable state (STRIDE's fit)
    train_cfg: train_lib.TrainConfig  # the base model's recipe
    seed: int  # the base model's seed
    progress: bool = False


class StrideMethod:
    """STRIDE behind the attributor interface, its fit resumable in `workdir/fit`."""

    name = "stride"

    def __init__(self, cfg: StrideConfig, workdir: Path, progress: bool = False):
        self.cfg, self.workdir, self.progress = cfg, Path(workdir), progress
        self.stride = Stride(cfg)
        self.timings: dict[str, float] = {}

    def fit(self, model: Any, train: Any) -> StrideMethod:
        self.stride.fit(model, train, workdir=self.workdir / "fit", progress=self.progress)
        self.timings["fit"] = self.stride.timings["fit"] + self.stride.timings["reference"]
        return self

    def attribute(self, queries: Any) -> Attribution:
        attr = self.stride.attribute(queries, progress=self.progress)
        self.timings.update(measure=self.stride.timings["measure"], recover=self.stride.timings["recover"])
        return attr


class _Timed:
    """An attributor whose construction (TracIn checkpoints, ...) is timed as a stage."""

    def __init__(self, inner: Any, stage: str, seconds: float):
        self.inner, self.name = inner, inner.name
        self.timings = {stage: seconds}

    def fit(self, model: Any, train: Any) -> _Timed:
        self.inner.fit(model, train)
        self.timings.update(getattr(self.inner, "timings", {}))
        return self

    def attribute(self, queries: Any) -> Attribution:
        attr = self.inner.attribute(queries)
        self.timings.update(getattr(self.inner, "timings", {}))
        return attr


def _tracin(ctx: Context, train: Any, model: Any, checkpoints: int = 4, **kw: Any) -> Any:
    t0 = time.perf_counter()
    ckpts = train_lib.pretrain_with_checkpoints(model.cfg, train, ctx.train_cfg, ctx.seed, checkpoints,
                                                progress=False)
    return _Timed(bl.TracIn([(c.model, c.learning_rate) for c in ckpts], **kw), "checkpoints",
                  time.perf_counter() - t0)


def _trak(ctx: Context, train: Any, model: Any, n_retrain: int = 0, **kw: Any) -> Any:
    return bl.TRAK(n_retrain=n_retrain, train_config=ctx.train_cfg if n_retrain else None, **kw)


def _repr_sim(ctx: Context, train: Any, model: Any, layer: int | None = None) -> Any:
    """Similarity at STRIDE's hook layer, or at `layer` (negative: from the top)."""
    steer = ctx.stride.steering if layer is None else dataclasses.replace(ctx.stride.steering, layer=layer)
    return bl.RepresentationSimilarity(steer.resolve(model.n_layers).layer)


# name -> builder(ctx, train, model, **params)
REGISTRY: dict[str, Callable[..., Any]] = {
    "stride": lambda ctx, train, model: StrideMethod(ctx.stride, ctx.workdir, ctx.progress),
    "random": lambda ctx, train, model, seed=0: bl.RandomAttributor(seed=seed),
    "repr-sim": _repr_sim,
    "tfidf": lambda ctx, train, model: bl.TfidfSimilarity(),
    "bm25": lambda ctx, train, model, **kw: bl.BM25(**kw),
    "encoder-sim": lambda ctx, train, model, **kw: bl.EncoderSimilarity(**kw),
    "graddot": lambda ctx, train, model, **kw: bl.GradDot(**kw),
    "tracin": _tracin,
    "trak": _trak,
    "logra": lambda ctx, train, model, **kw: bl.LoGra(**kw),
    "ekfac": lambda ctx, train, model, **kw: bl.EKFAC(**kw),
}


def build(kind: str, params: dict[str, Any], ctx: Context, train: Any, model: Any) -> Any:
    """The attributor of registry entry `kind` with constructor `params`."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown method {kind!r}; known: {sorted(REGISTRY)}")
    try:
        return REGISTRY[kind](ctx, train, model, **params)
    except TypeError as e:
        raise ValueError(f"bad params for method {kind!r}: {params} ({e})") from e
