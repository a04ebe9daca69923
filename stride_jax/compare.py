"""STRIDE against every baseline across model sizes: LDS, wall time per stage, peak memory, cost in n.

This is the pretraining table of the paper at the sizes one machine can run:

    stride-jax compare --config experiments/configs/pretrain_lds.yaml

For each model size (its own base model and its own ground truth, see `experiment.prepare`) every
method runs in a fresh subprocess, so that its peak memory is its own: on CPU the process's peak
resident set (`getrusage`), on GPU/TPU the device allocator's `peak_bytes_in_use`. The process's
peak after loading the model and data, before the method starts, is recorded too, so the method's
own share is the difference. A method's scores and timings are stored under
`out/<size>/methods/<method>/`; a rerun skips what is there, so a killed run resumes.

The cost-in-n sweep trains one base model per pool size (no ground truth needed) and times each
method on the same queries. Results: `<results>/<name>.json` (one row per method and size),
`<name>.md` (tables with the noise ceiling and the paper's numbers), `<name>.png`, and
`<name>_cost_n.json`.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from stride_jax.config import from_dict, to_dict

# The paper's pretraining table (STRIDE.md section 4): nanochat on Nemotron-ClimbMix, 500 held-out
# queries, LDS mean per model size. Runtime at 1.38B: STRIDE 9.9 h and 8.4 GiB peak, LoGra 52.3 h.
PAPER_PRETRAIN_LDS = {
    "sizes": ["286M", "537M", "897M", "1.38B"],
    "rows": {
        "STRIDE": [0.158, 0.179, 0.160, 0.167],
        "AirRep": [0.141, 0.159, 0.144, None],
        "LoGra": [0.113, 0.127, 0.114, 0.114],
        "GTE (embedding similarity)": [0.101, 0.113, 0.103, 0.128],
        "TF-IDF": [0.084, 0.095, 0.086, 0.089],
        "random-ish (RDS)": [0.069, 0.075, 0.070, 0.074],
    },
}

ALL_METHODS = ("stride", "stride-tuned", "random", "repr-sim", "tfidf", "bm25", "encoder-sim", "graddot", "tracin", "trak",
               "trak-ensemble", "logra", "ekfac")
TRAK_ENSEMBLE_RETRAINS = 3  # trak-ensemble: the base model plus this many retrained from scratch


@dataclasses.dataclass(frozen=True)
class SizeSpec:
    """One model size: a name for tables and directories, and its architecture."""

    name: str = "small"
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """Cost in n: pool sizes (examples per source) at one model size, methods timed on each."""

    size: str = ""  # a SizeSpec name; "" = the first size
    train_per_source: tuple[int, ...] = (128, 256, 512)
    methods: tuple[str, ...] = ()  # () = the comparison's methods


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    name: str = "pretrain_lds"
    experiment: Any = None  # ExperimentConfig; None = the demo's (data, training, ground truth, STRIDE)
    sizes: tuple[SizeSpec, ...] = (
        SizeSpec("0.2M", 2, 64, 4), SizeSpec("0.7M", 2, 128, 4), SizeSpec("2.2M", 4, 192, 6),
    )
    methods: tuple[str, ...] = ALL_METHODS
    scaling: ScalingConfig | None = ScalingConfig()
    # "stride-tuned": per-size overrides of experiment.stride chosen on validation queries
    # ({size name: {section: {field: value}}}); sizes without an entry have no such row.
    stride_tuned: Any = None

    def __post_init__(self):
        from stride_jax.experiment import ExperimentConfig

        if self.experiment is None:
            object.__setattr__(self, "experiment", ExperimentConfig())
        if not self.sizes:
            raise ValueError("CompareConfig needs at least one size")
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            raise ValueError(f"size names must be unique, got {names}")
        unknown = set(self.methods) - set(ALL_METHODS)
        if self.scaling is not None:
            unknown |= set(self.scaling.methods) - set(ALL_METHODS)
            if self.scaling.size and self.scaling.size not in names:
                raise ValueError(f"scaling.size {self.scaling.size!r} is not one of the sizes {names}")
        if unknown:
            raise ValueError(f"unknown method(s) {sorted(unknown)}; known: {list(ALL_METHODS)}")
        for name, override in (self.stride_tuned or {}).items():
            if name not in names:
                raise ValueError(f"stride_tuned names size {name!r}, not one of {names}")
            self.experiment.stride.replace(**override)  # fail early on unknown fields

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompareConfig":
        from stride_jax.experiment import ExperimentConfig

        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown CompareConfig field(s): {sorted(unknown)}")
        kw: dict[str, Any] = {}
        if "name" in d:
            kw["name"] = d["name"]
        if "experiment" in d:
            kw["experiment"] = ExperimentConfig.from_dict(d["experiment"])
        if "sizes" in d:
            kw["sizes"] = tuple(from_dict(SizeSpec, s) for s in d["sizes"])
        if "methods" in d:
            kw["methods"] = tuple(d["methods"])
        if "scaling" in d:
            kw["scaling"] = None if d["scaling"] is None else from_dict(ScalingConfig, d["scaling"])
        if "stride_tuned" in d:
            kw["stride_tuned"] = dict(d["stride_tuned"] or {})
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def experiment_for(self, size: SizeSpec, train_per_source: int | None = None):
        """The experiment config of one size (and, for the n sweep, one pool size)."""
        from stride_jax.experiment import ModelSpec

        e = self.experiment
        model = ModelSpec(n_layers=size.n_layers, d_model=size.d_model, n_heads=size.n_heads, seed=e.model.seed)
        data = e.data if train_per_source is None else dataclasses.replace(e.data, train_per_source=train_per_source)
        return dataclasses.replace(e, name=f"{self.name}-{size.name}", model=model, data=data)

    def size(self, name: str) -> SizeSpec:
        return next(s for s in self.sizes if s.name == name)


# ------------------------------------------------------------------------------------------------
# One method in its own process


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux >= 4.0); False where that is not possible.

    `getrusage(...).ru_maxrss` cannot be used: a spawned child inherits its parent's high-water
    mark across fork and exec, so every method would report the (large) parent's peak.
    """
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _device_peak_bytes() -> int | None:
    import jax

    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _run_method(exp_cfg: Any, run_dir: Path, method: str, method_dir: Path) -> dict[str, Any]:
    """Load the run's model and data, run `method`, save its scores; timings and memory."""
    import jax

    from stride_jax import baselines as bl
    from stride_jax.attribution import Stride
    from stride_jax.experiment import base_model, baseline_factories, concat_examples, load_data

    train, val, test = load_data(exp_cfg)
    queries = concat_examples(val, test)
    model, mcfg = base_model(exp_cfg, train, run_dir, progress=False)
    load_peak = _status_bytes("VmHWM")
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs): no per-method memory")
    load_rss = _status_bytes("VmRSS")
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    if method in ("stride", "stride-tuned"):
        fit_dir = method_dir / "fit"
        resumed = (fit_dir / "checkpoints").exists()
        stride = Stride(exp_cfg.stride).fit(
            model, train, workdir=fit_dir, progress=False,
            fingerprint={"data_hash": train.content_hash(), "model": mcfg.to_dict()},
        )
        attr = stride.attribute(queries, progress=False)
        seconds.update({k: stride.timings[k] for k in ("fit", "measure", "recover")})
    else:
        resumed = False
        factories = {**baseline_factories(exp_cfg, train),
                     "trak-ensemble": lambda: bl.TRAK(n_retrain=TRAK_ENSEMBLE_RETRAINS, train_config=exp_cfg.pretrain)}
        t0 = time.perf_counter()
        attributor = factories[method]()
        if method == "tracin":  # its constructor trains the checkpoints
            seconds["checkpoints"] = time.perf_counter() - t0
        attr = attributor.fit(model, train).attribute(queries)
        seconds.update(getattr(attributor, "timings", {}))
    seconds["total"] = time.perf_counter() - t_start
    attr.method = method
    attr.save(method_dir / "scores")
    host_peak, device_peak = _status_bytes("VmHWM"), _device_peak_bytes()
    return {
        "method": method,
        "seconds": {k: round(float(v), 3) for k, v in seconds.items()},
        # on an accelerator the device allocator's peak; on CPU the process's peak RSS since the reset
        "peak_memory_bytes": device_peak if device_peak is not None else host_peak,
        "load_peak_bytes": 0 if device_peak is not None else load_rss,  # resident when the method started
        "host_peak_bytes": host_peak,
        "loading_peak_bytes": load_peak,
        "device_peak_bytes": device_peak,
        "memory_kind": "peak RSS while the method ran" if device_peak is None else "device peak_bytes_in_use",
        "backend": jax.default_backend(),
        "fit_resumed": resumed,
        "n_train": len(train),
        "n_queries": len(queries),
    }


def _worker(exp_dict: dict[str, Any], run_dir: str, method: str, method_dir: str) -> None:
    from stride_jax.experiment import ExperimentConfig

    method_dir_p = Path(method_dir)
    try:
        record = _run_method(ExperimentConfig.from_dict(exp_dict), Path(run_dir), method, method_dir_p)
        (method_dir_p / "run.json").write_text(json.dumps(record, indent=2))
    except ImportError as e:  # optional dependency (the MiniLM encoder package) absent
        (method_dir_p / "skipped.json").write_text(json.dumps({"method": method, "reason": str(e)}))
    except BaseException:
        (method_dir_p / "error.txt").write_text(traceback.format_exc())
        raise


def run_method_isolated(exp_cfg: Any, run_dir: Path, method: str, method_dir: Path) -> dict[str, Any] | None:
    """Run one method in a fresh spawned process (its own peak memory); None if it was skipped.

    Reuses `method_dir/run.json` when present. Raises RuntimeError when the process fails.
    """
    method_dir.mkdir(parents=True, exist_ok=True)
    done = method_dir / "run.json"
    if not done.exists():
        for stale in ("skipped.json", "error.txt"):
            (method_dir / stale).unlink(missing_ok=True)
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_worker, args=(exp_cfg.to_dict(), str(run_dir), method, str(method_dir)))
        proc.start()
        proc.join()
        if (method_dir / "skipped.json").exists():
            print(f"  {method}: skipped ({json.loads((method_dir / 'skipped.json').read_text())['reason']})",
                  flush=True)
            return None
        if proc.exitcode != 0 or not done.exists():
            err = method_dir / "error.txt"
            detail = err.read_text()[-2000:] if err.exists() else f"exit code {proc.exitcode}"
            raise RuntimeError(f"method {method!r} failed in {method_dir}:\n{detail}")
    return json.loads(done.read_text())


# ------------------------------------------------------------------------------------------------
# The comparison


def n_params(model: Any) -> int:
    from flax import nnx
    import jax

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def run_compare(cfg: CompareConfig, out: str | Path, results_dir: str | Path, *, progress: bool = True
                ) -> list[dict[str, Any]]:
    """Every size and method (resuming from `out`); writes the results files; returns the rows."""
    from stride_jax import train as train_lib
    from stride_jax.attribution import Attribution
    from stride_jax.experiment import Timer, noise_ceiling, prepare

    out, results_dir = Path(out), Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    rows: list[dict[str, Any]] = []
    ceilings: dict[str, Any] = {}
    base_info: dict[str, Any] = {}
    t_total = time.perf_counter()
    # Base models and ground truth of every size first (the long part, resumable), so that the
    # methods' timings below are not shared with retraining.
    prepared = {}
    for size in cfg.sizes:
        timer = Timer()
        print(f"[{size.name}] {size}: base model and ground truth", flush=True)
        prepared[size.name] = (prepare(cfg.experiment_for(size), out / size.name, timer, progress=progress), timer)
    for size in cfg.sizes:
        exp = cfg.experiment_for(size)
        run_dir = out / size.name
        p, timer = prepared[size.name]
        params = n_params(p.model)
        ceilings[size.name] = noise_ceiling(p.losses_MxRxQ, p.test_cols)
        qloss = train_lib.eval_loss(p.model, p.queries)
        base_info[size.name] = {"params": params, "test_query_loss": float(qloss[p.test_cols].mean()),
                                "n_train": len(p.train), "n_test_queries": len(p.test_cols),
                                "n_val_queries": len(p.val_cols), "groundtruth": to_dict(exp.groundtruth),
                                "prepare_seconds": {k: round(v, 1) for k, v in timer.seconds.items()}}
        print(f"[{size.name}] {params:,} parameters; test-query loss {base_info[size.name]['test_query_loss']:.3f}; "
              f"noise ceiling {ceilings[size.name].get('mean', float('nan')):.3f}", flush=True)
        for method in _progress(cfg.methods, progress, f"{size.name} methods"):
            exp_m = exp
            if method == "stride-tuned":
                if size.name not in (cfg.stride_tuned or {}):
                    continue
                exp_m = dataclasses.replace(exp, stride=exp.stride.replace(**cfg.stride_tuned[size.name]))
            rec = run_method_isolated(exp_m, run_dir, method, run_dir / "methods" / method)
            if rec is None:
                continue
            attr = Attribution.load(run_dir / "methods" / method / "scores")
            row = {"method": method, "size": size.name, "params": params,
                   "lds": _lds_summary(p.lds(attr, "test")), "lds_validation": _lds_summary(p.lds(attr, "val")),
                   "seconds": rec["seconds"], "peak_memory_bytes": rec["peak_memory_bytes"],
                   "load_peak_bytes": rec["load_peak_bytes"], "device_peak_bytes": rec["device_peak_bytes"],
                   "memory_kind": rec["memory_kind"], "fit_resumed": rec["fit_resumed"]}
            rows.append(row)
            print(f"  {method:<12} LDS {row['lds']['mean']:.3f} [{row['lds']['ci95'][0]:.3f}, "
                  f"{row['lds']['ci95'][1]:.3f}]  {rec['seconds']['total']:.1f} s  "
                  f"peak {rec['peak_memory_bytes'] / 2**20:.0f} MiB", flush=True)
            _write_json(results_dir / f"{cfg.name}.json", rows)
    cost_n = run_cost_in_n(cfg, out, results_dir, progress=progress) if cfg.scaling is not None else []
    report = {"rows": rows, "noise_ceiling": ceilings, "models": base_info, "cost_n": cost_n,
              "config": cfg.to_dict(), "machine": machine_description(),
              "date": time.strftime("%Y-%m-%d"), "wall_seconds_this_invocation": round(time.perf_counter() - t_total, 1)}
    _write_json(out / "report.json", report)
    (results_dir / f"{cfg.name}.md").write_text(format_markdown(report))
    _write_json(results_dir / f"{cfg.name}_report.json", report)
    plot(report, results_dir / f"{cfg.name}.png")
    print(f"wrote {results_dir / cfg.name}.{{json,md,png}}", flush=True)
    return rows


def run_cost_in_n(cfg: CompareConfig, out: Path, results_dir: Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Time each method at each pool size (one model size, no ground truth)."""
    from stride_jax.experiment import base_model, load_data

    sc = cfg.scaling
    size = cfg.size(sc.size) if sc.size else cfg.sizes[0]
    methods = [m for m in (sc.methods or cfg.methods) if m != "stride-tuned"]  # tuned per size, not per n
    rows = []
    for per_source in sc.train_per_source:
        exp = cfg.experiment_for(size, train_per_source=per_source)
        run_dir = out / "cost_n" / f"{size.name}-{per_source}"
        train, _, _ = load_data(exp)
        base_model(exp, train, run_dir, progress=progress)
        print(f"[cost in n] size {size.name}, n = {len(train)}", flush=True)
        for method in _progress(methods, progress, f"n={len(train)}"):
            rec = run_method_isolated(exp, run_dir, method, run_dir / "methods" / method)
            if rec is None:
                continue
            rows.append({"method": method, "size": size.name, "n": rec["n_train"], "n_queries": rec["n_queries"],
                         "seconds": rec["seconds"], "peak_memory_bytes": rec["peak_memory_bytes"],
                         "load_peak_bytes": rec["load_peak_bytes"]})
            print(f"  {method:<12} {rec['seconds']['total']:.1f} s  peak {rec['peak_memory_bytes'] / 2**20:.0f} MiB",
                  flush=True)
            _write_json(results_dir / f"{cfg.name}_cost_n.json", rows)
    return rows


# ------------------------------------------------------------------------------------------------
# Reporting


def growth_ratios(rows: list[dict[str, Any]], key: str, lo: Any, hi: Any) -> dict[str, dict[str, float]]:
    """Per method: total seconds and peak memory at `key == hi` over `key == lo`."""
    by = {(r["method"], r[key]): r for r in rows}
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        a, b = by.get((m, lo)), by.get((m, hi))
        if a is None or b is None:
            continue
        out[m] = {"seconds": b["seconds"]["total"] / max(a["seconds"]["total"], 1e-9),
                  "peak_memory": b["peak_memory_bytes"] / a["peak_memory_bytes"],
                  # a method that allocates under 1 MiB of its own has no meaningful memory ratio
                  "method_memory": _own(b) / _own(a) if _own(a) >= 2**20 else float("nan")}
    return out


def _own(r: dict[str, Any]) -> int:
    return max(r["peak_memory_bytes"] - r["load_peak_bytes"], 0)


def format_markdown(report: dict[str, Any]) -> str:
    rows, cfg = report["rows"], report["config"]
    sizes = [s["name"] for s in cfg["sizes"]]
    lines = [f"# {cfg['name']}: STRIDE and baselines across model sizes", "",
             f"Machine: {report['machine']}; date {report['date']}. Command: "
             f"`stride-jax compare --config experiments/configs/{cfg['name']}.yaml`.", "",
             "LDS on held-out test queries (Spearman between the summed scores of a subset and the query loss of "
             "models retrained on it, averaged over queries; 95% joint subset x query bootstrap interval). Each "
             "size has its own base model and its own ground truth. Seconds: wall time per stage on this machine. "
             "Peak memory: " + _memory_note(rows) + ".", ""]
    lines += ["| size | params | n train | GT retrains | base test-query loss | noise ceiling (1 seed) | ceiling (seed avg) |",
              "|---|---|---|---|---|---|---|"]
    for s in sizes:
        info, c = report["models"].get(s), report["noise_ceiling"].get(s, {})
        if info is None:
            continue
        gt = info["groundtruth"]
        lines.append(f"| {s} | {info['params']:,} | {info['n_train']} | {gt['n_subsets']} x {gt['seeds_per_subset']} "
                     f"(alpha {gt['alpha']}) | {info['test_query_loss']:.3f} | {_fmt_ci(c)} | "
                     f"{c.get('ceiling_for_seed_average', float('nan')):.3f} |")
    lines += ["", "## LDS (test queries)", "", "| method | " + " | ".join(sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    by = {(r["method"], r["size"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    methods.sort(key=lambda m: -np.nanmean([by[(m, s)]["lds"]["mean"] for s in sizes if (m, s) in by]))
    for m in methods:
        cells = [(_fmt_ci(by[(m, s)]["lds"]) if (m, s) in by else "-") for s in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost per size (seconds per stage; peak memory)", "",
              "| method | size | seconds | total s | peak MiB | method's own MiB |", "|---|---|---|---|---|---|"]
    for m in methods:
        for s in sizes:
            r = by.get((m, s))
            if r is None:
                continue
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items() if k != "total")
            lines.append(f"| {m} | {s} | {stages} | {r['seconds']['total']:.1f} | "
                         f"{r['peak_memory_bytes'] / 2**20:.0f} | {_own(r) / 2**20:.0f} |")
    if len(sizes) >= 2:
        ratios = growth_ratios(rows, "size", sizes[0], sizes[-1])
        p0, p1 = (report["models"][s]["params"] for s in (sizes[0], sizes[-1]))
        lines += ["", f"## Cost growth from {sizes[0]} to {sizes[-1]} ({p1 / p0:.1f}x parameters)", "",
                  "| method | time ratio | peak memory ratio | method's own memory ratio |", "|---|---|---|---|"]
        for m, r in sorted(ratios.items(), key=lambda kv: kv[1]["seconds"]):
            lines.append(f"| {m} | {r['seconds']:.2f} | {r['peak_memory']:.2f} | {r['method_memory']:.2f} |")
    cost_n = report.get("cost_n") or []
    if cost_n:
        ns = sorted({r["n"] for r in cost_n})
        lines += ["", f"## Cost growth with n (size {cost_n[0]['size']}, {cost_n[0]['n_queries']} queries)", "",
                  "| method | " + " | ".join(f"n={n} s" for n in ns) + f" | time ratio {ns[-1]}/{ns[0]} | "
                  "peak MiB at each n | own memory ratio |", "|---|" + "---|" * (len(ns) + 3)]
        byn = {(r["method"], r["n"]): r for r in cost_n}
        ratios = growth_ratios(cost_n, "n", ns[0], ns[-1])
        for m in dict.fromkeys(r["method"] for r in cost_n):
            secs = [f"{byn[(m, n)]['seconds']['total']:.1f}" if (m, n) in byn else "-" for n in ns]
            mem = "/".join(f"{byn[(m, n)]['peak_memory_bytes'] / 2**20:.0f}" for n in ns if (m, n) in byn)
            r = ratios.get(m)
            lines.append(f"| {m} | " + " | ".join(secs) + f" | {r['seconds']:.2f} | {mem} | "
                         f"{r['method_memory']:.2f} |" if r else f"| {m} | " + " | ".join(secs) + " | - | - | - |")
    lines += ["", "## The paper's pretraining table (STRIDE.md section 4; nanochat on ClimbMix, LDS; AirRep did not finish at 1.38B; runtime at 1.38B: STRIDE 9.9 h / 8.4 GiB, LoGra 52.3 h)", "",
              "| method | " + " | ".join(PAPER_PRETRAIN_LDS["sizes"]) + " |",
              "|---|" + "---|" * len(PAPER_PRETRAIN_LDS["sizes"])]
    for m, vals in PAPER_PRETRAIN_LDS["rows"].items():
        lines.append(f"| {m} | " + " | ".join("did not finish" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def _memory_note(rows: list[dict[str, Any]]) -> str:
    kinds = {r.get("memory_kind") for r in rows}
    if kinds == {"peak RSS while the method ran"}:
        return ("peak resident set of the method's own process while the method ran (measured with VmHWM after "
                "resetting it once the model and data were loaded, so it includes Python, JAX, the model and "
                "the data); 'own' subtracts what was resident when the method started")
    return "device allocator's peak bytes in use where on an accelerator, else process peak RSS"


def _fmt_ci(l: dict[str, Any]) -> str:
    if "mean" not in l:
        return "-"
    return f"{l['mean']:.3f} [{l['ci95'][0]:.3f}, {l['ci95'][1]:.3f}]"


def _lds_summary(l: dict[str, Any]) -> dict[str, Any]:
    return {"mean": l["mean"], "ci95": list(l["ci95"]), "n_nan": l["n_nan"]}


def plot(report: dict[str, Any], path: Path) -> None:
    """LDS vs parameters (with intervals and the ceiling), seconds vs parameters, seconds vs n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    sizes = [s["name"] for s in report["config"]["sizes"] if s["name"] in report["models"]]
    params = {s: report["models"][s]["params"] for s in sizes}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab20")
    known = list(ALL_METHODS)

    def style(m: str) -> dict[str, Any]:  # one colour per method in every panel
        if m == "stride":
            return dict(lw=2.5, color="k")
        i = known.index(m) if m in known else len(known)
        return dict(lw=1.2, color=cmap(i % 20), linestyle="--" if m == "stride-tuned" else "-")

    n_panels = 3 if report.get("cost_n") else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.0 * n_panels, 4.6))
    for m in methods:
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["params"])
        x = [r["params"] for r in rs]
        y = np.array([r["lds"]["mean"] for r in rs])
        lo = y - np.array([r["lds"]["ci95"][0] for r in rs])
        hi = np.array([r["lds"]["ci95"][1] for r in rs]) - y
        axes[0].errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=m, **style(m))
        axes[1].plot(x, [r["seconds"]["total"] for r in rs], marker="o", label=m, **style(m))
    ceil = [report["noise_ceiling"][s].get("ceiling_for_seed_average", np.nan) for s in sizes]
    axes[0].plot([params[s] for s in sizes], ceil, ":", color="0.4", lw=1.5, label="noise ceiling (seed avg)")
    axes[0].set(xscale="log", xlabel="parameters", ylabel="LDS (test queries)", title="LDS by model size")
    axes[1].set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds (all stages)",
                title="cost by model size")
    for ax in axes[:2]:
        ax.set_xticks([params[s] for s in sizes], [f"{s}" for s in sizes])
        ax.minorticks_off()
    if n_panels == 3:
        cn = report["cost_n"]
        ns = sorted({r["n"] for r in cn})
        for m in dict.fromkeys(r["method"] for r in cn):
            rs = sorted((r for r in cn if r["method"] == m), key=lambda r: r["n"])
            axes[2].plot([r["n"] for r in rs], [r["seconds"]["total"] for r in rs], marker="o", label=m, **style(m))
        axes[2].set(xscale="log", yscale="log", xlabel="training examples n", ylabel="seconds (all stages)",
                    title=f"cost by n (size {cn[0]['size']})")
        axes[2].set_xticks(ns, [str(n) for n in ns])
        axes[2].minorticks_off()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> str:
    import os
    import platform

    import jax

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return f"{os.cpu_count()} x {cpu}, backend {jax.default_backend()} ({devices}), jax {jax.__version__}, " \
           f"python {platform.python_version()}"


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, file=sys.stderr, leave=False)
