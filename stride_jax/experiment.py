"""The LDS experiment on the embedded corpus: base model, ground truth, STRIDE, baselines, LDS.

`run_lds_experiment(cfg, out)` is what `stride-jax demo` and the experiment configs call. Every
stage writes into `out/` and is reused on a rerun (base model checkpoint, ground-truth store,
operator fit), so a killed run resumes; `report.json` holds LDS with intervals, the random
control, the seed-vs-seed noise ceiling, per-stage seconds and the resolved config.

Queries come from held-out text. The ground truth is recorded for validation queries (used for
every choice of settings) and test queries (reported) in one sweep; columns are split after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from stride_jax import data as data_lib
from stride_jax import groundtruth as gt_lib
from stride_jax import lds as lds_lib
from stride_jax import models as models_lib
from stride_jax import train as train_lib
from stride_jax.attribution import Attribution, Stride
from stride_jax.baselines import RandomAttributor, RepresentationSimilarity
from stride_jax.config import StrideConfig, from_dict, to_dict


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = ("austen", "shakespeare", "bible")
    seq_len: int = 64
    train_per_source: int = 256
    val_queries_per_source: int = 20
    test_queries_per_source: int = 40
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "demo"
    data: DataConfig = DataConfig()
    model: ModelSpec = ModelSpec()
    pretrain: train_lib.TrainConfig = train_lib.TrainConfig(epochs=4.0)
    retrain: train_lib.TrainConfig = train_lib.TrainConfig(epochs=3.0)
    groundtruth: gt_lib.GroundTruthConfig = gt_lib.GroundTruthConfig()
    # Chosen on validation queries (experiments/results/lm_tuning.md): rank 1, K 2048, 600 steps;
    # the rest are StrideConfig's defaults.
    stride: StrideConfig = StrideConfig().replace(
        design={"n_subsets": 2048}, steering={"rank": 1}, fit={"steps": 600}
    )
    n_show: int = 3  # queries whose top passages are printed

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        return from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def quick_config() -> ExperimentConfig:
    """A size that runs end to end in about a minute (tests, CI)."""
    return ExperimentConfig(
        name="quick",
        data=DataConfig(train_per_source=48, val_queries_per_source=4, test_queries_per_source=6, seq_len=32),
        model=ModelSpec(n_layers=2, d_model=32, n_heads=2),
        pretrain=train_lib.TrainConfig(epochs=2.0, batch_size=16),
        retrain=train_lib.TrainConfig(epochs=2.0, batch_size=16),
        groundtruth=gt_lib.GroundTruthConfig(n_subsets=8, seeds_per_subset=2, models_per_chunk=8),
        stride=StrideConfig().replace(
            design={"n_subsets": 32, "per_example": 4},
            fit={"steps": 20, "subsets_per_step": 8, "checkpoint_every": 10},
        ),
        n_show=1,
    )


class Timer:
    """Collects wall seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()


def model_config(cfg: ExperimentConfig, vocab_size: int) -> models_lib.GPTConfig:
    m = cfg.model
    return models_lib.GPTConfig(
        vocab_size=vocab_size, seq_len=cfg.data.seq_len, n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads
    )


def load_data(cfg: ExperimentConfig) -> tuple[Any, Any, Any]:
    """(train pool, validation queries, test queries) from the embedded corpus."""
    d = cfg.data
    kw = dict(seq_len=d.seq_len, sources=d.sources, seed=d.seed)
    train = data_lib.load_examples("train", max_per_source=d.train_per_source, **kw)
    val = data_lib.load_examples("val", max_per_source=d.val_queries_per_source, **kw)
    test = data_lib.load_examples("test", max_per_source=d.test_queries_per_source, **kw)
    return train, val, test


def concat_examples(a: Any, b: Any) -> Any:
    """Rows of a then rows of b."""
    fields = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None or y is None:
            fields[f.name] = None
        elif isinstance(x, tuple):
            fields[f.name] = x + y
        else:
            fields[f.name] = np.concatenate([x, y])
    return type(a)(**fields)


def base_model(cfg: ExperimentConfig, train: Any, out: Path, *, progress: bool = True):
    """Load the cached base model for this config and data, or pretrain and save it."""
    tok_hash = data_lib.tokenizer_hash()
    tokenizer = data_lib.load_tokenizer()
    mcfg = model_config(cfg, len(tokenizer))
    expected = {"data_hash": train.content_hash(), "tokenizer_hash": tok_hash, "train_config": cfg.pretrain.to_dict(),
                "seed": cfg.model.seed}
    path = out / "base_model"
    if (path / "metadata.json").exists():
        model, _ = models_lib.load_model(path, expected=expected)
        data_lib.check_vocab(tokenizer, model.out_dim)
        return model, mcfg
    model = train_lib.pretrain(mcfg, train, cfg.pretrain, seed=cfg.model.seed, progress=progress)
    models_lib.save_model(model, path, expected)
    return model, mcfg


def evaluate(attr: Attribution, subsets: np.ndarray, losses_MxQ: np.ndarray, cols: np.ndarray, seed: int = 0):
    """LDS of the given query columns."""
    return lds_lib.lds(attr.scores[:, cols], subsets, losses_MxQ[:, cols], seed=seed)


@dataclasses.dataclass
class Prepared:
    """Everything STRIDE and the baselines are scored against: pool, queries, model, ground truth."""

    train: Any
    queries: Any  # validation queries then test queries
    val_cols: np.ndarray
    test_cols: np.ndarray
    model: Any
    model_cfg: models_lib.GPTConfig
    subsets: np.ndarray  # [M, Ns]
    losses_MxRxQ: np.ndarray

    @property
    def mean_losses(self) -> np.ndarray:
        return self.losses_MxRxQ.mean(axis=1)

    def lds(self, attr: Attribution, split: str = "test") -> dict[str, Any]:
        cols = self.test_cols if split == "test" else self.val_cols
        return evaluate(attr, self.subsets, self.mean_losses, cols).to_dict()


def prepare(cfg: ExperimentConfig, out: Path, timer: Timer, *, progress: bool = True) -> Prepared:
    """Data, base model and ground truth of `cfg`, each loaded from `out` when already there."""
    with timer("data"):
        train, val, test = load_data(cfg)
        queries = concat_examples(val, test)
    print(f"data: {len(train)} training examples, {len(val)} validation + {len(test)} test queries "
          f"(sources {', '.join(cfg.data.sources)}, {cfg.data.seq_len} tokens each)")
    with timer("pretrain"):
        model, mcfg = base_model(cfg, train, out, progress=progress)
    with timer("groundtruth"):
        store = gt_lib.GroundTruthStore.create_or_open(
            out / "groundtruth", cfg.groundtruth, mcfg, cfg.retrain, train, queries
        )
        gt_lib.run_groundtruth(store, mcfg, cfg.retrain, train, queries, progress=progress)
    return Prepared(
        train=train, queries=queries, val_cols=np.arange(len(val)), test_cols=np.arange(len(val), len(queries)),
        model=model, model_cfg=mcfg, subsets=store.subsets(), losses_MxRxQ=store.losses(),
    )


def fit_stride(p: Prepared, stride_cfg: StrideConfig, workdir: Path, *, progress: bool = True) -> Stride:
    """Fit STRIDE on the prepared pool (resuming from `workdir`)."""
    return Stride(stride_cfg).fit(
        p.model, p.train, workdir=workdir, progress=progress,
        fingerprint={"data_hash": p.train.content_hash(), "model": p.model_cfg.to_dict()},
    )


def run_lds_experiment(cfg: ExperimentConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Run every stage (resuming from `out`), print the LDS table, write `out/report.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    timer = Timer()
    p = prepare(cfg, out, timer, progress=progress)
    base_losses = train_lib.eval_loss(p.model, p.queries)
    print(f"base model: {p.model_cfg}; mean test-query loss {base_losses[p.test_cols].mean():.3f}")

    methods: dict[str, Attribution] = {}
    with timer("stride_fit"):
        stride = fit_stride(p, cfg.stride, out / "stride_fit", progress=progress)
    with timer("stride_attribute"):
        methods["stride"] = stride.attribute(p.queries, progress=progress)
    with timer("baselines"):
        layer = cfg.stride.steering.layer
        methods["repr-sim"] = RepresentationSimilarity(layer).fit(p.model, p.train).attribute(p.queries)
        methods["random"] = RandomAttributor(seed=0).fit(p.model, p.train).attribute(p.queries)
    methods["stride"].save(out / "stride_scores")

    with timer("lds"):
        lds_rows = {name: p.lds(attr, "test") for name, attr in methods.items()}
        val_rows = {name: p.lds(attr, "val") for name, attr in methods.items()}
        ceiling = noise_ceiling(p.losses_MxRxQ, p.test_cols)
    report = {
        "lds": lds_rows,
        "lds_validation": val_rows,
        "noise_ceiling": ceiling,
        "seconds": {k: round(v, 2) for k, v in timer.seconds.items()},
        "config": cfg.to_dict(),
        "n_train": len(p.train),
        "n_test_queries": len(p.test_cols),
        "n_val_queries": len(p.val_cols),
        "fista": {
            "mean_iter": float(methods["stride"].n_iter.mean()),
            "converged": float(methods["stride"].converged.mean()),
        },
        "examples": top_examples(methods["stride"], p.train, p.queries, p.test_cols[: cfg.n_show]),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report


def sweep_stride(
    cfg: ExperimentConfig,
    out: str | Path,
    variants: dict[str, dict[str, Any]],
    results_path: str | Path,
    *,
    split: str = "val",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """LDS on `split` queries of STRIDE under each variant (overrides of `cfg.stride` sections).

    Reuses `out`'s base model and ground truth. Each variant's fit lives in `out/sweep/<name>`
    and its row is appended to `results_path` (JSON list) as soon as it is done; variants already
    in that file are skipped, so the sweep resumes. Variants whose fit settings equal an earlier
    one's share its fit (only measurement / recovery differ).
    """
    out, results_path = Path(out), Path(results_path)
    rows: list[dict[str, Any]] = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {r["variant"] for r in rows}
    timer = Timer()
    p = prepare(cfg, out, timer, progress=progress)
    fits: dict[str, tuple[Stride, Any]] = {}
    for name, override in variants.items():
        if name in done:
            continue
        scfg = cfg.stride.replace(**override)
        fit_key = json.dumps({k: to_dict(getattr(scfg, k)) for k in ("design", "steering", "fit")}, sort_keys=True)
        t0 = time.perf_counter()
        if fit_key not in fits:
            tag = hashlib.sha256(fit_key.encode()).hexdigest()[:10]
            stride = fit_stride(p, scfg, out / "sweep" / tag, progress=progress)
            fits[fit_key] = (stride, stride.measure(p.queries, progress=progress))
        stride, measurement = fits[fit_key]
        stride.cfg = scfg  # same operators and raw losses; this variant's centring and recovery
        attr = stride.recover(stride.responses(measurement), p.queries.ids)
        row = {"variant": name, "override": override, "split": split, "lds": p.lds(attr, split),
               "seconds": round(time.perf_counter() - t0, 1),
               "fista_converged": float(attr.converged.mean())}
        rows.append(row)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(rows, indent=2))
        print(f"{name:<28} LDS({split}) {row['lds']['mean']:.3f} [{row['lds']['ci95'][0]:.3f}, "
              f"{row['lds']['ci95'][1]:.3f}]  {row['seconds']:.0f}s", flush=True)
    return rows


def baseline_factories(cfg: ExperimentConfig, train: Any) -> dict[str, Any]:
    """name -> zero-argument constructor of every baseline, on the demo's footing."""
    from stride_jax import baselines as bl

    layer = cfg.stride.steering.layer

    def tracin():
        ckpts = train_lib.pretrain_with_checkpoints(
            model_config(cfg, len(data_lib.load_tokenizer())), train, cfg.pretrain, cfg.model.seed, 4, progress=False
        )
        return bl.TracIn([(c.model, c.learning_rate) for c in ckpts])

    return {
        "random": lambda: bl.RandomAttributor(seed=0),
        "repr-sim": lambda: bl.RepresentationSimilarity(layer),
        "tfidf": bl.TfidfSimilarity,
        "bm25": bl.BM25,
        "encoder-sim": bl.EncoderSimilarity,
        "graddot": bl.GradDot,
        "tracin": tracin,
        "trak": bl.TRAK,
        "logra": bl.LoGra,
        "ekfac": bl.EKFAC,
    }


def compare_methods(
    cfg: ExperimentConfig, out: Path, results_path: Path, *, skip: set[str] = frozenset(), progress: bool = False
) -> list[dict[str, Any]]:
    """STRIDE and every baseline on one ground truth: test LDS, validation LDS, wall seconds."""
    timer = Timer()
    p = prepare(cfg, out, timer, progress=progress)
    rows = []

    def record(name: str, attr: Attribution, seconds: float) -> None:
        rows.append({"method": name, "lds": p.lds(attr, "test"), "lds_validation": p.lds(attr, "val"),
                     "seconds": round(seconds, 1)})
        print(f"{name:<12} LDS {rows[-1]['lds']['mean']:.3f} {rows[-1]['lds']['ci95']}  {seconds:.0f}s", flush=True)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(rows, indent=2))

    if "stride" not in skip:
        t0 = time.perf_counter()
        stride = fit_stride(p, cfg.stride, out / "stride_fit", progress=progress)
        record("stride", stride.attribute(p.queries, progress=progress), time.perf_counter() - t0)
    for name, make in baseline_factories(cfg, p.train).items():
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            attr = make().fit(p.model, p.train).attribute(p.queries)
        except ImportError as e:  # optional encoder package absent
            print(f"{name}: skipped ({e})")
            continue
        record(name, attr, time.perf_counter() - t0)
    ceiling = noise_ceiling(p.losses_MxRxQ, p.test_cols)
    lines = [f"LDS on {len(p.test_cols)} test queries (`python experiments/compare_lm.py --out {out}`); "
             f"noise ceiling (seed vs seed) {ceiling.get('mean', float('nan')):.3f}, for the "
             f"{ceiling.get('seeds_averaged')}-seed average {ceiling.get('ceiling_for_seed_average', float('nan')):.3f}. "
             "Seconds include the method's own cache/fit (STRIDE: its fit is reused when already in the run dir).",
             "", "| method | LDS (test) | 95% CI | LDS (val) | seconds |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["lds"]["mean"]):
        lines.append(f"| {r['method']} | {r['lds']['mean']:.3f} | [{r['lds']['ci95'][0]:.3f}, {r['lds']['ci95'][1]:.3f}] "
                     f"| {r['lds_validation']['mean']:.3f} | {r['seconds']} |")
    results_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return rows


def write_sweep_table(rows: list[dict[str, Any]], path: str | Path, header: str = "") -> None:
    """Markdown table of a sweep's rows, under an optional header paragraph."""
    lines = [header, ""] if header else []
    lines += ["| variant | override | LDS | 95% CI | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        l = r["lds"]
        lines.append(f"| {r['variant']} | `{json.dumps(r['override'])}` | {l['mean']:.3f} | "
                     f"[{l['ci95'][0]:.3f}, {l['ci95'][1]:.3f}] | {r['seconds']} |")
    Path(path).write_text("\n".join(lines) + "\n")


def noise_ceiling(losses_MxRxQ: np.ndarray, cols: np.ndarray) -> dict[str, Any]:
    """Seed-vs-seed LDS of one seed, and its Spearman-Brown value for the R-seed average used."""
    r = losses_MxRxQ.shape[1]
    if r < 2:
        return {"note": "needs seeds_per_subset >= 2"}
    res = lds_lib.noise_ceiling(losses_MxRxQ[:, 0][:, cols], losses_MxRxQ[:, 1][:, cols])
    d = res.to_dict()
    d["seeds_averaged"] = r
    d["ceiling_for_seed_average"] = float(lds_lib.spearman_brown(res.mean, r))
    return d


def top_examples(attr: Attribution, train: Any, queries: Any, cols: np.ndarray, k: int = 3) -> list[dict[str, Any]]:
    """The k most helpful and most harmful passages for a few queries, as text."""
    rows = []
    for q in cols:
        rows.append({
            "query": queries.texts[q] if queries.texts else None,
            "helpful": [{"score": s, "text": train.texts[i] if train.texts else None} for i, s in attr.top_k(int(q), k)],
            "harmful": [{"score": s, "text": train.texts[i] if train.texts else None}
                        for i, s in attr.top_k(int(q), k, harmful=True)],
        })
    return rows


def format_report(report: dict[str, Any]) -> str:
    """The LDS table, stage timings and example passages as text."""
    lines = ["", f"LDS on {report['n_test_queries']} held-out test queries (Spearman over retrained subsets; "
             "95% joint bootstrap interval)", f"{'method':<12} {'LDS':>7}  {'95% CI':>17}  NaN"]
    for name, r in report["lds"].items():
        lines.append(f"{name:<12} {r['mean']:>7.3f}  [{r['ci95'][0]:>6.3f}, {r['ci95'][1]:>6.3f}]  {r['n_nan']}")
    c = report["noise_ceiling"]
    if "mean" in c:
        lines.append(f"{'seed-vs-seed':<12} {c['mean']:>7.3f}  [{c['ci95'][0]:>6.3f}, {c['ci95'][1]:>6.3f}]  "
                     f"{c['n_nan']}   (noise ceiling; {c['seeds_averaged']}-seed average: "
                     f"{c['ceiling_for_seed_average']:.3f})")
    lines.append("")
    lines.append("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    for ex in report["examples"]:
        lines.append("")
        lines.append(f"query: {_clip(ex['query'])}")
        for kind in ("helpful", "harmful"):
            for e in ex[kind]:
                lines.append(f"  {kind:<8} {e['score']:+.4f}  {_clip(e['text'])}")
    return "\n".join(lines)


def _clip(text: str | None, n: int = 100) -> str:
    if text is None:
        return "<no text>"
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."
