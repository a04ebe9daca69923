"""The small-model experiment: STRIDE where retraining is cheap (digits, breast cancer, wine).

For every task (a data set from `stride_jax.tabular` and a classifier from `stride_jax.models`):

1. train the base model on the training split (cached in `out/<task>/base_model`);
2. record the LDS ground truth at each alpha (m random alpha-subsets x R seeds, vmapped, in the
   resumable store `out/<task>/groundtruth_a<alpha>`), for validation and test queries at once;
3. choose STRIDE's settings per placement (logits; residual at a hidden layer) by LDS on the
   *validation* queries at `select_alpha`, from the grid `SmallModelsConfig.variants` (variants
   that differ only in measurement or recovery share one operator fit);
4. score the chosen STRIDE settings and every baseline on the *test* queries at every alpha,
   with 95% joint-bootstrap intervals, the seed-vs-seed noise ceiling and per-stage seconds;
5. run the counterfactual removal check on a few test queries.

The measured quantity is the query's cross-entropy loss (-log p(true class)); scores are
positive when including the training example lowers it. `run` writes
`<results>/small_models.json`, `<results>/small_models.md` and one counterfactual PNG per task;
`run_ablation` sweeps the design size K and the memberships per example d and writes
`<results>/small_models_ablation.{json,md}`. Every stage resumes from `out`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from stride_jax import counterfactual as cf_lib
from stride_jax import groundtruth as gt_lib
from stride_jax import lds as lds_lib
from stride_jax import models as models_lib
from stride_jax import tabular
from stride_jax import train as train_lib
from stride_jax.attribution import Attribution, Stride
from stride_jax.config import StrideConfig, from_dict, load_config_file, to_dict
from stride_jax.experiment import Prepared, Timer, concat_examples, fit_stride, noise_ceiling
from stride_jax.measure import Measurement

# Paper (STRIDE.md section 4), small models with explicit retraining, LDS.
PAPER_SMALL_MODELS = {
    "columns": ("STRIDE", "TRAK", "TracIn", "LoGra", "feature similarity"),
    "rows": {
        "MNIST MLP": (0.417, 0.012, 0.169, 0.303, 0.063),
        "FashionMNIST MLP": (0.231, 0.198, 0.083, 0.123, -0.008),
        "Parkinsons tabular MLP": (0.536, -0.007, 0.399, 0.405, 0.108),
        "CIFAR-10 ResNet-9": (0.130, 0.002, 0.172, 0.285, 0.029),
    },
}
# float32 resolution of -log p near p = 1; smaller losses are clipped before log-space responses
LOSS_FLOOR = 1e-6
BASELINES = ("graddot", "tracin", "trak", "logra", "repr-sim", "random")


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Classifier of a task: "mlp" (ReLU MLP, `hidden` widths) or "conv" (`models.ConvNet`:
    `channels` conv stages with `pool` flags, then `hidden` dense widths; image data only)."""

    kind: str = "mlp"
    hidden: tuple[int, ...] = (128, 128)
    channels: tuple[int, ...] = (8, 16)
    pool: tuple[bool, ...] = (True, False)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "conv"):
            raise ValueError(f"model kind must be 'mlp' or 'conv', got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class CounterfactualConfig:
    """Removal check: `n_queries` test queries, R = `n_seeds` retrains per (method, query, k).

    `ks` empty: a log-spaced grid up to a third of the training set. `methods`: which of the
    task's scored methods to check (the random control is always added)."""

    enabled: bool = True
    ks: tuple[int, ...] = ()
    n_queries: int = 12
    n_seeds: int = 2
    methods: tuple[str, ...] = ("stride-logits", "stride-residual", "logra", "trak", "tracin")
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One data set x classifier, with its training recipe (base model and every retrain)."""

    dataset: str = "digits"
    model: ModelSpec = ModelSpec()
    split: tabular.SplitConfig = tabular.SplitConfig()
    # AdamW with decoupled weight decay 1.0: the lowest validation loss of the recipes we tried on
    # digits, and half the seed-to-seed noise of the LDS ground truth of decay 0 (README).
    train: train_lib.TrainConfig = train_lib.TrainConfig(learning_rate=3e-3, epochs=20.0, batch_size=32,
                                                         weight_decay=1.0, scan_steps=64)
    groundtruth: gt_lib.GroundTruthConfig = gt_lib.GroundTruthConfig(n_subsets=256, seeds_per_subset=4,
                                                                     models_per_chunk=64)
    residual_layer: int | None = None  # None: the middle hook point (1 for a 2-hidden-layer MLP)
    tracin_checkpoints: int = 5
    trak_models: int = 4  # TRAK ensemble: the base model and trak_models - 1 retrains

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.model.kind}"


@dataclasses.dataclass(frozen=True)
class SmallModelsConfig:
    """The whole experiment. `stride` holds settings common to every variant; `variants` is the
    validation grid ({name: overrides of `stride`}), applied per placement."""

    name: str = "small_models"
    tasks: tuple[TaskConfig, ...] = (TaskConfig(),)
    alphas: tuple[float, ...] = (0.3, 0.5)
    select_alpha: float = 0.3
    stride: StrideConfig = StrideConfig()
    variants: tuple[tuple[str, Any], ...] = (("default", {}),)
    residual_variants: tuple[str, ...] = ()  # names of `variants` run for the residual placement (empty: all)
    placements: tuple[str, ...] = ("logits", "residual")
    baselines: tuple[str, ...] = BASELINES
    counterfactual: CounterfactualConfig = CounterfactualConfig()
    n_boot: int = 1000

    def to_dict(self) -> dict[str, Any]:
        d = to_dict(self)
        d["variants"] = {name: override for name, override in self.variants}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SmallModelsConfig":
        d = dict(d)
        tasks = tuple(from_dict(TaskConfig, t) for t in d.pop("tasks", [{}]))
        variants = d.pop("variants", {"default": {}})
        if not isinstance(variants, dict):
            raise ValueError("variants must be a mapping {name: overrides}")
        cfg = from_dict(cls, d)
        for name, override in variants.items():
            cfg.stride.replace(**override)  # fail early on unknown fields
        unknown = sorted(set(cfg.residual_variants) - set(variants))
        if unknown:
            raise ValueError(f"residual_variants names unknown variants {unknown}; known: {sorted(variants)}")
        return dataclasses.replace(cfg, tasks=tasks, variants=tuple(variants.items()))

    @classmethod
    def load(cls, path: str | Path) -> "SmallModelsConfig":
        return cls.from_dict(load_config_file(path))


# ----------------------------------------------------------------------------- data, models


def load_task_data(task: TaskConfig) -> tabular.TabularSplits:
    return tabular.load_splits(task.dataset, task.split)


def model_config(task: TaskConfig, splits: tabular.TabularSplits) -> models_lib.ModelConfig:
    m = task.model
    if m.kind == "mlp":
        return models_lib.MLPConfig(in_dim=splits.n_features, hidden=m.hidden, n_classes=splits.n_classes)
    if task.dataset not in tabular.IMAGE_SHAPE:
        raise ValueError(f"a conv model needs image data; {task.dataset!r} is not an image data set")
    return models_lib.ConvConfig(image_shape=tabular.IMAGE_SHAPE[task.dataset], n_classes=splits.n_classes,
                                 channels=m.channels, pool=m.pool, dense=m.hidden)


def residual_layer(task: TaskConfig, model: Any) -> int:
    """Hook point of the residual placement (default: the middle of the network, >= 1)."""
    layer = task.residual_layer if task.residual_layer is not None else max(1, model.n_layers // 2)
    if not 1 <= layer <= model.n_layers:
        raise ValueError(f"residual_layer {layer} must be a hidden hook point in [1, {model.n_layers}]")
    return layer


def base_model(task: TaskConfig, mcfg: Any, train: Any, out: Path, *, progress: bool = False):
    """Load the cached base model of `task`, or train and save it."""
    expected = {"data_hash": train.content_hash(), "train_config": task.train.to_dict(), "seed": task.model.seed}
    path = out / "base_model"
    if (path / "metadata.json").exists():
        return models_lib.load_model(path, expected=expected)[0]
    model = train_lib.pretrain(mcfg, train, task.train, seed=task.model.seed, progress=progress)
    models_lib.save_model(model, path, expected)
    return model


def groundtruth_config(task: TaskConfig, alpha: float) -> gt_lib.GroundTruthConfig:
    """The task's ground-truth config at `alpha`, with a subset seed of its own per alpha."""
    gt = task.groundtruth
    return dataclasses.replace(gt, alpha=float(alpha), seed=gt.seed + int(round(1000 * alpha)))


@dataclasses.dataclass
class TaskData:
    """A task's pool, queries (val then test), base model and one `Prepared` per alpha."""

    task: TaskConfig
    splits: tabular.TabularSplits
    model: Any
    model_cfg: Any
    prepared: dict[float, Prepared]

    @property
    def any(self) -> Prepared:
        return next(iter(self.prepared.values()))


def prepare_task(task: TaskConfig, alphas: tuple[float, ...], out: Path, timer: Timer, *,
                 progress: bool = False) -> TaskData:
    """Data, base model and the ground truth at every alpha, each loaded from `out` when there."""
    out.mkdir(parents=True, exist_ok=True)
    with timer("data"):
        splits = load_task_data(task)
        queries = concat_examples(splits.val, splits.test)
        mcfg = model_config(task, splits)
    with timer("base_model"):
        model = base_model(task, mcfg, splits.train, out, progress=progress)
    val_cols = np.arange(len(splits.val))
    test_cols = np.arange(len(splits.val), len(queries))
    prepared = {}
    for alpha in alphas:
        with timer(f"groundtruth_a{alpha}"):
            gcfg = groundtruth_config(task, alpha)
            store = gt_lib.GroundTruthStore.create_or_open(out / f"groundtruth_a{alpha}", gcfg, mcfg, task.train,
                                                           splits.train, queries)
            gt_lib.run_groundtruth(store, mcfg, task.train, splits.train, queries, progress=progress)
        prepared[alpha] = Prepared(train=splits.train, queries=queries, val_cols=val_cols, test_cols=test_cols,
                                   model=model, model_cfg=mcfg, subsets=store.subsets(),
                                   losses_MxRxQ=store.losses())
    return TaskData(task=task, splits=splits, model=model, model_cfg=mcfg, prepared=prepared)


def lds_of(p: Prepared, scores_NxQ: np.ndarray, split: str, n_boot: int = 1000) -> dict[str, Any]:
    """LDS of the `split` query columns ("val" or "test")."""
    cols = p.test_cols if split == "test" else p.val_cols
    return lds_lib.lds(scores_NxQ[:, cols], p.subsets, p.mean_losses[:, cols], n_boot=n_boot).to_dict()


# ----------------------------------------------------------------------------- STRIDE variants


@dataclasses.dataclass
class StrideRun:
    """One STRIDE variant's scores on all queries and what it cost."""

    name: str
    cfg: StrideConfig
    attr: Attribution
    seconds: dict[str, float]


def floor_losses(m: Measurement, floor: float = LOSS_FLOOR) -> Measurement:
    """Losses clipped below at `floor`: a confident classifier's float32 cross-entropy is
    often exactly 0 (p = 1 to float32 precision), where log-space responses are undefined."""
    return Measurement(np.maximum(m.base_loss_Q, floor), np.maximum(m.steered_loss_QxK, floor))


def fit_subsets_per_step(cfg: StrideConfig) -> StrideConfig:
    """`cfg` with fit.subsets_per_step capped at the design's K (a grid may vary K below it)."""
    if cfg.fit.subsets_per_step <= cfg.design.n_subsets:
        return cfg
    return cfg.replace(fit={"subsets_per_step": cfg.design.n_subsets})


def _fit_key(cfg: StrideConfig) -> str:
    return json.dumps({k: to_dict(getattr(cfg, k)) for k in ("design", "steering", "fit")}, sort_keys=True)


def run_stride_variants(p: Prepared, configs: dict[str, StrideConfig], workdir: Path, *,
                        progress: bool = False, errors: dict[str, str] | None = None) -> dict[str, StrideRun]:
    """Scores of every config on all of `p`'s queries; configs with equal design, steering and
    fit settings share one operator fit and one measurement (in `workdir/<hash>`).

    With an `errors` dict, a variant whose fit or recovery fails (diverged fit, NaN responses)
    is left out of the result and its error message recorded there instead of raised.
    """
    fits: dict[str, tuple[Stride, Any, dict[str, float]] | str] = {}
    runs = {}
    for name, scfg in configs.items():
        scfg = fit_subsets_per_step(scfg)
        key = _fit_key(scfg)
        try:
            runs[name] = _run_variant(p, name, scfg, key, fits, workdir, progress)
        except (FloatingPointError, ValueError) as e:
            if errors is None:
                raise
            errors[name] = f"{type(e).__name__}: {e}"
    return runs


def _logged_fit_seconds(path: Path) -> float | None:
    """Elapsed seconds of the last logged fit step (None without a log)."""
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return float(json.loads(lines[-1])["seconds"]) if lines else None


def _run_variant(p: Prepared, name: str, scfg: StrideConfig, key: str, fits: dict, workdir: Path,
                 progress: bool) -> StrideRun:
    if isinstance(fits.get(key), str):
        raise FloatingPointError(fits[key])  # the shared fit already failed
    try:
        if key not in fits:
            tag = hashlib.sha256(key.encode()).hexdigest()[:10]
            # the first fit's wall time is recorded, so a resumed run reports it, not the reload
            seconds_path = workdir / tag / "seconds.json"
            recorded = json.loads(seconds_path.read_text()) if seconds_path.exists() else None
            resumed = (workdir / tag / "checkpoints").exists()
            t0 = time.perf_counter()
            stride = fit_stride(p, scfg, workdir / tag, progress=progress)
            t1 = time.perf_counter()
            measurement = stride.measure(p.queries, progress=progress)
            t2 = time.perf_counter()
            seconds = recorded or {"fit": t1 - t0, "measure": t2 - t1}
            if recorded is None and resumed:
                # reloaded: take the fit loop's own wall time from its log instead of the reload's
                logged = _logged_fit_seconds(workdir / tag / "metrics.jsonl")
                if logged is not None:
                    seconds["fit"] = logged
                    seconds_path.write_text(json.dumps(seconds))
            elif recorded is None:
                seconds_path.write_text(json.dumps(seconds))
            fits[key] = (stride, measurement, seconds)
    except FloatingPointError as e:
        fits[key] = str(e)
        raise
    stride, measurement, seconds = fits[key]
    stride.cfg = scfg  # same operators and raw losses; this variant's centring and recovery
    t0 = time.perf_counter()
    attr = stride.recover(stride.responses(floor_losses(measurement)), p.queries.ids)
    if not np.isfinite(attr.scores).all():
        raise FloatingPointError(f"variant {name!r} recovered non-finite scores")
    return StrideRun(name, scfg, attr, {**seconds, "recover": time.perf_counter() - t0})


def placement_configs(cfg: SmallModelsConfig, layer_residual: int) -> dict[str, dict[str, StrideConfig]]:
    """{placement: {variant name: config}} for the logits and the residual placement."""
    unknown = sorted(set(cfg.placements) - {"logits", "residual"})
    if unknown:
        raise ValueError(f"unknown placements {unknown}; expected 'logits' and/or 'residual'")
    out: dict[str, dict[str, StrideConfig]] = {p: {} for p in cfg.placements}
    for name, override in cfg.variants:
        base = cfg.stride.replace(**override)
        if "logits" in out:
            out["logits"][name] = base.replace(steering={"placement": "logits"})
        if "residual" in out and (not cfg.residual_variants or name in cfg.residual_variants):
            out["residual"][name] = base.replace(steering={"placement": "residual", "layer": layer_residual})
    return out


# ----------------------------------------------------------------------------- baselines


def make_baseline(name: str, task: TaskConfig, td: TaskData):
    """A fitted-to-be attributor for baseline `name` (see `BASELINES`)."""
    from stride_jax import baselines as bl

    if name == "graddot":
        return bl.GradDot()
    if name == "tracin":
        ckpts = train_lib.pretrain_with_checkpoints(td.model_cfg, td.splits.train, task.train,
                                                    seed=task.model.seed, n_checkpoints=task.tracin_checkpoints,
                                                    progress=False)
        return bl.TracIn(ckpts)
    if name == "trak":
        return bl.TRAK(proj_dim=512, n_retrain=max(0, task.trak_models - 1), train_config=task.train)
    if name == "logra":
        return bl.LoGra()
    if name == "repr-sim":
        return bl.RepresentationSimilarity(layer=td.model.n_layers)  # the last hidden layer
    if name == "random":
        return bl.RandomAttributor(seed=0)
    raise ValueError(f"unknown baseline {name!r}; known: {BASELINES}")


def run_baseline(name: str, task: TaskConfig, td: TaskData) -> tuple[Attribution, dict[str, float]]:
    t0 = time.perf_counter()
    method = make_baseline(name, task, td)
    t1 = time.perf_counter()
    method.fit(td.model, td.splits.train)
    attr = method.attribute(td.any.queries)
    seconds = {k: float(v) for k, v in getattr(method, "timings", {}).items()}
    if name == "tracin":
        seconds["checkpoints"] = t1 - t0
    seconds["total"] = time.perf_counter() - t0
    return attr, seconds


# ----------------------------------------------------------------------------- one task


def default_ks(n: int, batch_size: int) -> tuple[int, ...]:
    """Log-spaced removal sizes from 1% to a third of the training set."""
    hi = min(n // 3, n - batch_size)
    lo = max(1, round(0.01 * n))
    return tuple(sorted({int(round(k)) for k in np.geomspace(lo, hi, 6)}))


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 2) for k, v in d.items()}


def run_task(cfg: SmallModelsConfig, task: TaskConfig, out: Path, results_dir: Path, *,
             progress: bool = False) -> dict[str, Any]:
    """Every stage of one task; returns its rows, noise ceilings, selection and counterfactual."""
    timer = Timer()
    td = prepare_task(task, cfg.alphas, out, timer, progress=progress)
    p_sel = td.prepared[cfg.select_alpha]
    acc = float((np.asarray(td.model(td.splits.test.inputs)).argmax(-1) == td.splits.test.targets).mean())
    print(f"[{task.name}] n_train {len(td.splits.train)}, {len(p_sel.val_cols)} val + {len(p_sel.test_cols)} test "
          f"queries, base test accuracy {acc:.3f}; timings {_round(timer.seconds)}", flush=True)

    layer_res = residual_layer(task, td.model)
    methods: dict[str, tuple[Attribution, dict[str, float]]] = {}
    selection: dict[str, Any] = {}
    for placement, configs in placement_configs(cfg, layer_res).items():
        t0 = time.perf_counter()
        failed: dict[str, str] = {}
        runs = run_stride_variants(p_sel, configs, out / "stride" / placement, progress=progress, errors=failed)
        if not runs:
            raise RuntimeError(f"every STRIDE variant failed for {task.name} ({placement}): {failed}")
        val = {name: lds_of(p_sel, r.attr.scores, "val", n_boot=20) for name, r in runs.items()}
        best = max(val, key=lambda k: -np.inf if np.isnan(val[k]["mean"]) else val[k]["mean"])
        selection[placement] = {"chosen": best, "val_lds": {k: round(v["mean"], 4) for k, v in val.items()},
                                "failed": failed, "settings": runs[best].cfg.to_dict(),
                                "grid_seconds": round(time.perf_counter() - t0, 1)}
        for name, err in failed.items():
            print(f"[{task.name}] stride {placement}: variant {name!r} failed: {err}", flush=True)
        methods[f"stride-{placement}"] = (runs[best].attr, runs[best].seconds)
        print(f"[{task.name}] stride {placement}: chosen {best!r} (val LDS {val[best]['mean']:.3f} of "
              f"{len(val)} variants)", flush=True)
    for name in cfg.baselines:
        methods[name] = run_baseline(name, task, td)

    rows, ceilings = [], []
    for alpha, p in td.prepared.items():
        c = noise_ceiling(p.losses_MxRxQ, p.test_cols)
        ceilings.append({"dataset": task.dataset, "model": task.model.kind, "alpha": alpha, **c})
        for name, (attr, seconds) in methods.items():
            rows.append({"dataset": task.dataset, "model": task.model.kind, "method": name, "alpha": alpha,
                         "lds": lds_of(p, attr.scores, "test", cfg.n_boot),
                         "lds_val": lds_of(p, attr.scores, "val", 200)["mean"],
                         "seconds": _round(seconds)})

    result = {"task": task.name, "n_train": len(td.splits.train), "n_val": len(p_sel.val_cols),
              "n_test": len(p_sel.test_cols), "base_test_accuracy": acc, "residual_layer": layer_res,
              "rows": rows, "noise_ceiling": ceilings, "selection": selection,
              "seconds_prepare": _round(timer.seconds)}
    if cfg.counterfactual.enabled:
        result["counterfactual"] = run_counterfactual(cfg.counterfactual, task, td, methods, out, results_dir)
    return result


def run_counterfactual(ccfg: CounterfactualConfig, task: TaskConfig, td: TaskData,
                       methods: dict[str, tuple[Attribution, dict[str, float]]], out: Path,
                       results_dir: Path) -> dict[str, Any]:
    """Removal curves on the first `n_queries` test queries; cached in `out/counterfactual.npz`."""
    p = td.any
    cols = p.test_cols[: ccfg.n_queries]
    names = [m for m in ccfg.methods if m in methods]
    ks = ccfg.ks or default_ks(len(td.splits.train), task.train.batch_size)
    cache = out / "counterfactual.npz"
    key = hashlib.sha256(json.dumps([to_dict(ccfg), names, list(ks)] + [
        hashlib.sha256(np.ascontiguousarray(methods[m][0].scores[:, cols]).tobytes()).hexdigest() for m in names
    ]).encode()).hexdigest()
    key_path = out / "counterfactual.json"
    stored = json.loads(key_path.read_text()) if key_path.exists() else {}
    if cache.exists() and stored.get("key") == key:
        res, seconds = cf_lib.CounterfactualResult.load(cache), stored["seconds"]
    else:
        t0 = time.perf_counter()
        res = cf_lib.counterfactual_removal(
            td.model_cfg, task.train, td.splits.train, p.queries[cols],
            {m: methods[m][0].scores[:, cols] for m in names}, ks, n_seeds=ccfg.n_seeds, seed=ccfg.seed)
        seconds = round(time.perf_counter() - t0, 1)
        res.save(cache)
        key_path.write_text(json.dumps({"key": key, "seconds": seconds}))
    png = cf_lib.plot_counterfactual(res, results_dir / f"small_models_counterfactual_{task.name}.png",
                                     title=f"{task.name}: remove top-k, retrain ({len(cols)} test queries, "
                                           f"{ccfg.n_seeds} seeds)")
    return {**res.to_dict(), "png": png.name, "seconds": seconds}


# ----------------------------------------------------------------------------- report


def run(cfg: SmallModelsConfig, out: str | Path, results_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """All tasks; writes small_models.json / .md and the counterfactual PNGs into `results_dir`."""
    out, results_dir = Path(out), Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tasks = [run_task(cfg, task, out / task.name, results_dir, progress=progress) for task in cfg.tasks]
    report = {
        "rows": [r for t in tasks for r in t["rows"]],
        "noise_ceiling": [c for t in tasks for c in t["noise_ceiling"]],
        "tasks": [{k: v for k, v in t.items() if k not in ("rows", "noise_ceiling")} for t in tasks],
        "config": cfg.to_dict(),
        "measured": "query cross-entropy loss; LDS_q = Spearman over subsets of (sum of scores, -loss)",
    }
    stem = cfg.name
    (results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (results_dir / f"{stem}.md").write_text(format_markdown(report))
    print(format_markdown(report))
    return report


def _fmt_lds(l: dict[str, Any]) -> str:
    return f"{l['mean']:.3f} [{l['ci95'][0]:.3f}, {l['ci95'][1]:.3f}]"


def format_markdown(report: dict[str, Any]) -> str:
    """LDS table (test queries, per alpha, with intervals), noise ceilings, runtimes, paper numbers."""
    alphas = sorted({r["alpha"] for r in report["rows"]})
    lines = [f"# {report['config']['name']}: LDS on held-out test queries", "",
             "LDS = mean over test queries of Spearman(sum of scores over the subset, -query loss) across "
             "models retrained on random alpha-subsets (ground truth averaged over its seeds); 95% joint "
             "(subset x query) bootstrap interval. STRIDE settings were chosen per placement on the "
             "validation queries only. Seconds: wall time of the method's stages on 2 shared CPU cores.", ""]
    header = "| task | method | " + " | ".join(f"LDS alpha={a}" for a in alphas) + " | seconds |"
    lines += [header, "|---|---|" + "---|" * len(alphas) + "---|"]
    by_key: dict[tuple[str, str, str], dict[float, dict]] = {}
    for r in report["rows"]:
        by_key.setdefault((r["dataset"], r["model"], r["method"]), {})[r["alpha"]] = r
    for (ds, model, method), per_alpha in by_key.items():
        any_row = next(iter(per_alpha.values()))
        secs = ", ".join(f"{k} {v:.1f}" for k, v in any_row["seconds"].items())
        cells = " | ".join(_fmt_lds(per_alpha[a]["lds"]) if a in per_alpha else "" for a in alphas)
        lines.append(f"| {ds}-{model} | {method} | {cells} | {secs} |")
    ceil: dict[tuple[str, str], dict[float, dict]] = {}
    for c in report["noise_ceiling"]:
        ceil.setdefault((c["dataset"], c["model"]), {})[c["alpha"]] = c
    for (ds, model), per_alpha in ceil.items():
        cells = []
        for a in alphas:
            c = per_alpha.get(a, {})
            cells.append(f"{_fmt_lds(c)} (avg of {c['seeds_averaged']}: {c['ceiling_for_seed_average']:.3f})"
                         if "mean" in c else "")
        lines.append(f"| {ds}-{model} | *noise ceiling (seed vs seed)* | " + " | ".join(cells) + " | |")
    placements = list(report["tasks"][0]["selection"]) if report["tasks"] else []
    lines += ["", "## Tasks", "", "| task | n train | val / test queries | base test accuracy | residual layer | "
              + " | ".join(f"STRIDE {p} choice (val LDS)" for p in placements) + " |",
              "|---|---|---|---|---|" + "---|" * len(placements)]
    for t in report["tasks"]:
        sel = t["selection"]
        cells = [f"{sel[p]['chosen']} ({sel[p]['val_lds'][sel[p]['chosen']]:.3f})" for p in placements]
        lines.append(f"| {t['task']} | {t['n_train']} | {t['n_val']} / {t['n_test']} | "
                     f"{t['base_test_accuracy']:.3f} | {t['residual_layer']} | " + " | ".join(cells) + " |")
    lines += ["", f"## STRIDE validation grid (LDS on validation queries, alpha = "
              f"{report['config']['select_alpha']})", ""]
    for t in report["tasks"]:
        for p, sel in t["selection"].items():
            grid = ", ".join([f"{name} {v:.3f}" for name, v in sel["val_lds"].items()]
                             + [f"{name} failed ({err[:80]})" for name, err in sel.get("failed", {}).items()])
            lines.append(f"- {t['task']} {p} ({sel.get('grid_seconds', '?')} s): {grid}")
    cf = [t for t in report["tasks"] if "counterfactual" in t]
    if cf:
        lines += ["", "## Counterfactual removal (mean drop of the query's true-class probability)", ""]
        for t in cf:
            c = t["counterfactual"]
            lines += [f"{t['task']} ({len(c['query_ids'])} test queries; `{c['png']}`):", "",
                      "| method | " + " | ".join(f"k={k}" for k in c["ks"]) + " |",
                      "|---|" + "---|" * len(c["ks"])]
            for m, s in c["summary"].items():
                lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in s["mean_drop"]) + " |")
            lines.append("")
    cols = PAPER_SMALL_MODELS["columns"]
    lines += ["", "## The paper's small-model LDS (STRIDE.md section 4; other data sets, alpha not stated)", "",
              "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, vals in PAPER_SMALL_MODELS["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- ablation


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """LDS (validation and test queries) of STRIDE against the design size K and memberships d."""

    name: str = "small_models_ablation"
    task: TaskConfig = TaskConfig()
    alpha: float = 0.3
    stride: StrideConfig = StrideConfig()
    ks: tuple[int, ...] = (50, 100, 250, 500, 1000, 2000)
    ds: tuple[int, ...] = (1, 2, 5, 10)
    n_boot: int = 1000

    @classmethod
    def load(cls, path: str | Path) -> "AblationConfig":
        return from_dict(cls, load_config_file(path))


def effective_sparsity(scores_NxQ: np.ndarray, mass: float = 0.9) -> np.ndarray:
    """Per query, the number of examples holding `mass` of the total |score| mass: [Q]."""
    a = np.sort(np.abs(scores_NxQ), axis=0)[::-1]
    total = a.sum(axis=0)
    cum = np.cumsum(a, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = (cum < mass * total[None]).sum(axis=0) + 1
    return np.where(total > 0, k, 0)


def cs_bound(k: float, n: int) -> float:
    """k log(n / k): the compressive-sensing measurement count, up to its constant."""
    return float(k * math.log(n / k)) if 0 < k < n else float("nan")


def run_ablation(cfg: AblationConfig, out: str | Path, results_dir: str | Path, *,
                 progress: bool = False) -> dict[str, Any]:
    """LDS against K and d, beside k log(n / k) for effective sparsities k; writes `<name>.json`, `.md`.

    k is not known for real influence; we report the number of training examples holding 50% and
    90% of the |score| mass per test query (median), for STRIDE's Lasso solutions (sparse by
    construction) and for LoGra's dense scores (no sparsity prior).
    """
    out, results_dir = Path(out), Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    td = prepare_task(cfg.task, (cfg.alpha,), out / cfg.task.name, timer, progress=progress)
    p = td.prepared[cfg.alpha]
    n = len(td.splits.train)
    rows = []
    cache = out / cfg.task.name / f"{cfg.name}_rows.json"
    done = {(r["K"], r["d"]): r for r in (json.loads(cache.read_text()) if cache.exists() else [])}
    for K in cfg.ks:
        for d in cfg.ds:
            if d > K or n * d < K:
                continue
            if (K, d) in done:
                rows.append(done[(K, d)])
                continue
            # every operator is updated at every step, as in the main config, so that the number
            # of updates per operator (and so the fit) does not change with K
            scfg = cfg.stride.replace(design={"n_subsets": K, "per_example": d}, fit={"subsets_per_step": K})
            r = run_stride_variants(p, {"v": scfg}, out / cfg.task.name / "ablation", progress=progress)["v"]
            test_scores = r.attr.scores[:, p.test_cols]
            rows.append({"K": K, "d": d, "subset_size": n * d / K,
                         "lds_val": lds_of(p, r.attr.scores, "val", 20)["mean"],
                         "lds": lds_of(p, r.attr.scores, "test", cfg.n_boot),
                         "k50_median": float(np.median(effective_sparsity(test_scores, 0.5))),
                         "k90_median": float(np.median(effective_sparsity(test_scores, 0.9))),
                         "nnz_median": float(np.median((test_scores != 0).sum(axis=0))),
                         "seconds": _round(r.seconds)})
            cache.write_text(json.dumps(rows, indent=2))
            print(f"[ablation] K={K} d={d}: LDS {rows[-1]['lds']['mean']:.3f}", flush=True)
    logra, _ = run_baseline("logra", cfg.task, td)
    logra_test = logra.scores[:, p.test_cols]
    sparsity = {
        "logra_k50": float(np.median(effective_sparsity(logra_test, 0.5))),
        "logra_k90": float(np.median(effective_sparsity(logra_test, 0.9))),
        "stride_k50": float(np.median([r["k50_median"] for r in rows])) if rows else float("nan"),
        "stride_k90": float(np.median([r["k90_median"] for r in rows])) if rows else float("nan"),
    }
    report = {"task": cfg.task.name, "n_train": n, "alpha": cfg.alpha, "rows": rows,
              "noise_ceiling": noise_ceiling(p.losses_MxRxQ, p.test_cols),
              "logra_lds": lds_of(p, logra.scores, "test", cfg.n_boot),
              "sparsity": sparsity,
              "cs_bound": {k: cs_bound(v, n) for k, v in sparsity.items()},
              "config": to_dict(cfg)}
    (results_dir / f"{cfg.name}.json").write_text(json.dumps(report, indent=2))
    (results_dir / f"{cfg.name}.md").write_text(format_ablation(report))
    print(format_ablation(report))
    return report


def format_ablation(report: dict[str, Any]) -> str:
    rows = report["rows"]
    ks = sorted({r["K"] for r in rows})
    ds = sorted({r["d"] for r in rows})
    cell = {(r["K"], r["d"]): r for r in rows}
    c = report["noise_ceiling"]
    n = report["n_train"]
    lines = [f"# STRIDE LDS vs design size K and memberships per example d ({report['task']}, "
             f"n = {n}, alpha = {report['alpha']}, test queries)", "",
             "| K | " + " | ".join(f"d={d}" for d in ds) + " | mean subset size at max d |",
             "|---|" + "---|" * (len(ds) + 1)]
    for K in ks:
        present = [d for d in ds if (K, d) in cell]
        size = f"{cell[(K, present[-1])]['subset_size']:.1f}" if present else "-"
        lines.append(f"| {K} | " + " | ".join(_fmt_lds(cell[(K, d)]["lds"]) if (K, d) in cell else "-"
                                             for d in ds) + f" | {size} |")
    lines += ["", f"Noise ceiling (seed vs seed): {c.get('mean', float('nan')):.3f}; "
              f"{c.get('seeds_averaged', '?')}-seed average: {c.get('ceiling_for_seed_average', float('nan')):.3f}. "
              f"LoGra on the same queries: {_fmt_lds(report['logra_lds'])}.", "",
              "Effective sparsity k (median over test queries of the number of training examples holding "
              "50% / 90% of the |score| mass) and the compressive-sensing measurement count k log(n/k) "
              "(up to its constant):", "", "| scores | k | k log(n/k) |", "|---|---|---|"]
    for key, k in report["sparsity"].items():
        lines.append(f"| {key} | {k:.0f} | {report['cs_bound'][key]:.0f} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "AblationConfig",
    "CounterfactualConfig",
    "ModelSpec",
    "SmallModelsConfig",
    "TaskConfig",
    "effective_sparsity",
    "prepare_task",
    "run",
    "run_ablation",
    "run_stride_variants",
    "run_task",
]
