"""Measurement benchmark: `measure.mode` exact / first_order / second_order (issue 22.1).

    python benchmarks/measure.py              # K = 1000, 4096, 16384, both placements, Q = 32 (long: run quiet)
    python benchmarks/measure.py --trained    # also: per-query correlation with exact on trained operators
    python benchmarks/measure.py --smoke      # K = 16, 64, Q = 4, 2 repeats (CI speed)

Model: the demo-size GPT (vocab 1024, seq_len 64, 2 layers, d_model 64, 4 heads; random
initialisation: the timing does not depend on the weights) on Q query chunks of the shipped
corpus; operators of rank 16 at layer 1, random N(0, s^2) with s set so that exact mode moves a
query's loss by ~0.1 nats on average (logits) / ~0.05 (residual), the size of trained operators.

Per (placement, K): each mode is called once (compile + run, reported as `first_s`), then the
modes are timed alternated in one process (exact, first_order, second_order, exact, ...;
`--repeats` rounds): min and median seconds of a `measure` call and the speed ratio
median(exact) / median(mode). Peak memory per call: the process's resident peak (VmHWM, reset
through /proc/self/clear_refs before each call; the model, bank and data included) and that
peak minus the resident size before the call; on an accelerator also the device's
peak_bytes_in_use (a process-wide high-water mark; not reset per call).

`--trained`: pretrains the demo GPT briefly on the corpus, fits K = 256 operators per placement
(300 steps) and reports each mode's per-query Pearson correlation (min / mean over the queries)
and relative error against exact. Writes results/measure.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's stride_jax
from stride_jax import data, models, steering
from stride_jax.config import MeasureConfig, SteeringConfig
from stride_jax.measure import measure

RESULTS = pathlib.Path(__file__).parent / "results"
GPT = models.GPTConfig(vocab_size=1024, seq_len=64, n_layers=2, d_model=64, n_heads=4)
MODES = {"logits": ("exact", "first_order", "second_order"), "residual": ("exact", "first_order")}
TARGET_NATS = {"logits": 0.1, "residual": 0.05}


def _status_kib(field: str) -> int | None:
    status = pathlib.Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def timed(fn) -> tuple[object, float, float | None, float | None]:
    """(result, wall s, peak RSS MiB, peak above the start MiB) of fn()."""
    clear = pathlib.Path("/proc/self/clear_refs")
    if clear.exists():
        clear.write_text("5")  # reset VmHWM to the current RSS
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    if peak is None or rss0 is None:
        return out, wall, None, None
    return out, wall, peak / 1024, (peak - rss0) / 1024


def device_peak_mib() -> float | None:
    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def random_bank(model, n_subsets: int, cfg: SteeringConfig, queries, seed: int = 0):
    """K random operators scaled so that exact mode moves a loss by ~TARGET_NATS on average."""
    bank = steering.init_bank(model, n_subsets, cfg, seed=seed)
    unit = bank._replace(coef=jax.tree.map(lambda c: jax.random.normal(jax.random.PRNGKey(seed), c.shape),
                                           bank.coef))
    probe = steering.init_bank(model, 16, cfg, seed=seed)
    probe = probe._replace(coef=jax.tree.map(lambda c: c[:16], unit.coef), basis=unit.basis)
    scale = 1.0
    for _ in range(3):  # exact |delta loss| grows about linearly in the scale: a few secant steps
        scaled = probe._replace(coef=jax.tree.map(lambda c: scale * c, probe.coef))
        m = measure(model, scaled, queries[:4], cfg, MeasureConfig(), progress=False)
        moved = float(np.abs(m.steered_loss_QxK - m.base_loss_Q[:, None]).mean())
        scale *= TARGET_NATS[cfg.placement] / max(moved, 1e-12)
    return unit._replace(coef=jax.tree.map(lambda c: scale * c, unit.coef)), scale


def time_modes(model, bank, queries, cfg: SteeringConfig, repeats: int) -> dict:
    modes = MODES[cfg.placement]
    first, times, peaks, above = {}, {m: [] for m in modes}, {m: [] for m in modes}, {m: [] for m in modes}
    for mode in modes:
        _, first[mode], _, _ = timed(lambda: measure(model, bank, queries, cfg, MeasureConfig(mode=mode),
                                                      progress=False))
    for _ in range(repeats):
        for mode in modes:
            _, wall, peak, extra = timed(lambda: measure(model, bank, queries, cfg, MeasureConfig(mode=mode),
                                                          progress=False))
            times[mode].append(wall)
            peaks[mode].append(peak)
            above[mode].append(extra)
    exact = statistics.median(times["exact"])
    return {mode: {"first_s": round(first[mode], 3), "min_s": round(min(times[mode]), 4),
                   "median_s": round(statistics.median(times[mode]), 4),
                   "speedup_vs_exact": round(exact / statistics.median(times[mode]), 2),
                   "peak_rss_mib": None if peaks[mode][0] is None else round(max(peaks[mode]), 1),
                   "peak_above_start_mib": None if above[mode][0] is None else round(max(above[mode]), 1)}
            for mode in modes}


def agreement(model, bank, queries, cfg: SteeringConfig) -> dict:
    """Per-query Pearson correlation (over operators) and relative error of each mode vs exact."""
    change = {}
    for mode in MODES[cfg.placement]:
        m = measure(model, bank, queries, cfg, MeasureConfig(mode=mode), progress=False)
        change[mode] = m.steered_loss_QxK.astype(np.float64) - m.base_loss_Q[:, None]
    exact = change["exact"]
    out = {"mean_abs_exact_change": round(float(np.abs(exact).mean()), 4)}
    for mode, c in change.items():
        if mode == "exact":
            continue
        corr = np.array([np.corrcoef(a, e)[0, 1] for a, e in zip(c, exact)])
        out[mode] = {"corr_min": round(float(corr.min()), 4), "corr_mean": round(float(corr.mean()), 4),
                     "rel_err": round(float(np.linalg.norm(c - exact) / np.linalg.norm(exact)), 4),
                     "scale_vs_exact": round(float(np.abs(c).mean() / np.abs(exact).mean()), 3)}
    return out


def trained_agreement(queries, smoke: bool) -> dict:
    """Pretrain the demo GPT briefly, fit K operators per placement, compare the modes."""
    from stride_jax.config import StrideConfig
    from stride_jax.design import left_regular_design
    from stride_jax.fit import Fitter
    from stride_jax.train import TrainConfig, pretrain

    pool = data.load_examples("train", seq_len=GPT.seq_len, max_per_source=16 if smoke else 128)
    model = pretrain(GPT, pool, TrainConfig(epochs=1.0 if smoke else 8.0), seed=0, progress=False)
    k, steps = (32, 20) if smoke else (256, 300)
    out = {"pool": len(pool), "n_subsets": k, "fit_steps": steps, "pretrain_epochs": 1.0 if smoke else 8.0}
    for placement in MODES:
        cfg = StrideConfig().replace(design={"n_subsets": k, "per_example": 8},
                                     steering={"layer": 1, "rank": 16, "placement": placement},
                                     fit={"steps": steps})
        bank = Fitter(model, pool, left_regular_design(len(pool), k, 8, 0), cfg).run(progress=False)
        out[placement] = agreement(model, bank, queries, cfg.steering)
    return out


def machine() -> dict:
    cpu = platform.processor()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    load = pathlib.Path("/proc/loadavg")
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": __import__("os").cpu_count(), "jax": jax.__version__,
            "device": str(jax.local_devices()[0].device_kind), "backend": jax.default_backend(),
            "load_avg_start": load.read_text().split()[:3] if load.exists() else None}


def to_markdown(result: dict) -> str:
    smoke = " — SMOKE RUN (tiny K; not the benchmark: rerun without --smoke)" if result["smoke"] else ""
    lines = [f"# Measurement modes{smoke}",
             "", f"Command: `{result['command']}`  ", f"Date: {result['date']}  ",
             f"Machine: {result['machine']['cpu']} ({result['machine']['cpu_count']} cores), "
             f"{result['machine']['backend']} / {result['machine']['device']}, jax {result['machine']['jax']}, "
             f"load average at start {result['machine']['load_avg_start']}", "",
             f"Demo GPT (V 1024, T 64, 2 layers, D 64), rank-16 operators at layer 1, Q = {result['n_queries']} "
             f"queries, {result['repeats']} alternated rounds; random operators scaled to move a loss by ~0.1 "
             "nats (logits) / ~0.05 (residual). Seconds per `measure` call; speed-up = median(exact) / "
             "median(mode); peak = process resident peak during the call (VmHWM), and above the resident "
             "size before it. First call = compile + run (no compile where the same program ran before, "
             "e.g. exact at K = 16, which also scaled the operators).", "",
             "| placement | K | mode | first call s | min s | median s | speed-up | peak RSS MiB "
             "| peak above start MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["timings"]:
        for mode, r in row["modes"].items():
            lines.append(f"| {row['placement']} | {row['n_subsets']} | {mode} | {r['first_s']} | {r['min_s']} | "
                         f"{r['median_s']} | {r['speedup_vs_exact']}x | {r['peak_rss_mib']} | "
                         f"{r['peak_above_start_mib']} |")
    trained = result.get("trained")
    lines += ["", "## Agreement with exact on trained operators", ""]
    if trained is None:
        lines.append("Not run (pass --trained). tests/test_measure.py asserts it on a tiny GPT: logits first order "
                     "0.91 / 0.94 (min / mean per-query correlation), second order 0.985 / 0.992; residual first "
                     "order 0.91 / 0.94.")
    else:
        lines += [f"Pool {trained['pool']} corpus chunks, GPT pretrained {trained['pretrain_epochs']} epochs, "
                  f"K = {trained['n_subsets']} operators fitted {trained['fit_steps']} steps, {result['n_queries']} "
                  "queries.", "", "| placement | mode | corr min | corr mean | relative error | scale vs exact |",
                  "|---|---|---|---|---|---|"]
        for placement in MODES:
            for mode, r in trained[placement].items():
                if isinstance(r, dict):
                    lines.append(f"| {placement} | {mode} | {r['corr_min']} | {r['corr_mean']} | {r['rel_err']} | "
                                 f"{r['scale_vs_exact']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny K (16, 64), 4 queries, 2 rounds")
    parser.add_argument("--subsets", type=int, nargs="+", default=None, help="K values (default 1000 4096 16384)")
    parser.add_argument("--queries", type=int, default=None, help="Q (default 32; smoke 4)")
    parser.add_argument("--repeats", type=int, default=None, help="alternated rounds (default 3; smoke 2)")
    parser.add_argument("--trained", action="store_true", help="also compare the modes on trained operators")
    args = parser.parse_args()
    ks = args.subsets or ([16, 64] if args.smoke else [1000, 4096, 16384])
    n_queries = args.queries or (4 if args.smoke else 32)
    repeats = args.repeats or (2 if args.smoke else 3)

    result = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "smoke": args.smoke, "machine": machine(), "n_queries": n_queries, "repeats": repeats,
              "model": {"vocab_size": GPT.vocab_size, "seq_len": GPT.seq_len, "n_layers": GPT.n_layers,
                        "d_model": GPT.d_model, "n_heads": GPT.n_heads}, "rank": 16, "layer": 1,
              "memory_note": "peak_rss_mib: VmHWM of this process during the call (reset before it); "
                             "peak_above_start_mib: that minus VmRSS before the call",
              "timings": []}
    queries = data.load_examples("test", seq_len=GPT.seq_len)[:n_queries]
    if len(queries) < n_queries:
        raise ValueError(f"the corpus's test split has only {len(queries)} chunks; pass --queries <= that")
    model = models.build(GPT, seed=0)
    for placement in MODES:
        cfg = SteeringConfig(layer=1, rank=16, placement=placement)
        for k in ks:
            bank, scale = random_bank(model, k, cfg, queries)
            modes = time_modes(model, bank, queries, cfg, repeats)
            row = {"placement": placement, "n_subsets": k, "coef_scale": scale, "modes": modes}
            print(json.dumps(row), flush=True)
            result["timings"].append(row)
    result["device_peak_mib"] = device_peak_mib()
    if args.trained:
        result["trained"] = trained_agreement(queries, args.smoke)
        print(json.dumps(result["trained"]), flush=True)
    result["machine"]["load_avg_end"] = pathlib.Path("/proc/loadavg").read_text().split()[:3] \
        if pathlib.Path("/proc/loadavg").exists() else None
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "measure.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "measure.md").write_text(to_markdown(result))
    print(f"wrote {RESULTS / 'measure.json'} and {RESULTS / 'measure.md'}")


if __name__ == "__main__":
    main()
