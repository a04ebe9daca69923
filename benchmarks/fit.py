"""Fit step time against K: dense Adam over all K operators vs sparse (lazy) updates.

    python benchmarks/fit.py            # K = 1000, 4096, 16384; rank 1 and 16 (demo-size GPT pool)
    python benchmarks/fit.py --smoke    # tiny sizes, < 1 minute: proves the script runs

Issue 22, part 2: with `FitConfig.sparse_updates` a step reads and writes only the
`subsets_per_step` operators it samples (and their Adam moments), so its cost should not grow
with K (goal: the sparse step time flat within 1.5x from K = 1000 to 16384); dense Adam rewrites
all K x R x V matrices and both moments every step.

Setup: the demo's pool (`data.load_examples("train", seq_len=64, max_per_source=256)`, n = 768
chunks of 64 tokens, vocabulary 1024) and a randomly initialised demo-size GPT (2 layers,
d_model 64, 4 heads; timing does not need a trained model), the logits placement at layer 1,
`FitConfig` defaults otherwise (32 subsets per step, 8 fidelity / 8 stability examples, 16
positions per example). The design has d = 32 subsets per example at every K (n d >= K keeps
every subset non-empty at K = 16384). For each (rank, K) the dense and the sparse fitter are
built, each compiled and warmed by `--warmup` steps (compile excluded), then timed alternately
in this process: `--repeats` rounds of `--steps` steps each (block on the state after each
round); per-step seconds are reported as min and median over rounds, with sparse / dense ratios
and each mode's median relative to its smallest K. Machine, load and date go into the json.
Writes results/fit.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's stride_jax
from stride_jax import data, models
from stride_jax.config import StrideConfig
from stride_jax.design import left_regular_design
from stride_jax.fit import Fitter, _fit_step

RESULTS = pathlib.Path(__file__).parent / "results"
FULL = dict(ks=(1000, 4096, 16384), ranks=(1, 16), seq_len=64, per_source=256, d_model=64, per_example=32,
            subsets_per_step=32, warmup=2, steps=5, repeats=5)
SMOKE = dict(ks=(64, 256), ranks=(1, 4), seq_len=16, per_source=32, d_model=32, per_example=8,
             subsets_per_step=8, warmup=1, steps=2, repeats=2)


def _fitter(model, pool, k: int, rank: int, size: dict, sparse: bool) -> Fitter:
    cfg = StrideConfig().replace(design={"n_subsets": k, "per_example": size["per_example"]},
                                 steering={"layer": 1, "rank": rank},
                                 fit={"subsets_per_step": size["subsets_per_step"], "sparse_updates": sparse})
    return Fitter(model, pool, left_regular_design(len(pool), k, size["per_example"], 0), cfg)


def _runner(fitter: Fitter):
    """steps(n): n jitted fit steps on the fitter's state, blocking at the end (seconds)."""
    fit_cfg = fitter.cfg.fit
    hyper = {k: jnp.float32(v) for k, v in fit_cfg.hyper.items()}
    static = dict(model_graphdef=fitter.model_graphdef, op_graphdef=fitter.op_graphdef,
                  steer_cfg=fitter.cfg.steering, shape=fit_cfg.shape,
                  log_space=fitter.cfg.measure.space == "log", loss_floor=float(fitter.cfg.measure.loss_floor))

    def steps(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fitter.state, _ = _fit_step(fitter.state, fitter.model_state, fitter.data, fitter.base_key, hyper,
                                        **static)
        jax.block_until_ready(fitter.state)
        return time.perf_counter() - t0

    return steps


def _state_mib(fitter: Fitter) -> float:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(fitter.state)) / 2**20


def run(size: dict) -> list[dict]:
    pool = data.load_examples("train", seq_len=size["seq_len"], max_per_source=size["per_source"])
    gpt = models.GPTConfig(vocab_size=1024, seq_len=size["seq_len"], n_layers=2, d_model=size["d_model"], n_heads=4)
    model = models.build(gpt, seed=0)
    rows = []
    for rank in size["ranks"]:
        for k in size["ks"]:
            fitters = {mode: _fitter(model, pool, k, rank, size, mode == "sparse") for mode in ("dense", "sparse")}
            runners = {mode: _runner(f) for mode, f in fitters.items()}
            for mode, steps in runners.items():
                t0 = time.perf_counter()
                steps(1)  # compiles
                first = time.perf_counter() - t0
                steps(size["warmup"])
                print(f"rank {rank} K {k} {mode}: first step (compile) {first:.1f} s", flush=True)
            times = {mode: [] for mode in runners}
            for _ in range(size["repeats"]):  # alternated rounds
                for mode, steps in runners.items():
                    times[mode].append(steps(size["steps"]) / size["steps"])
            for mode, ts in times.items():
                row = {"rank": rank, "K": k, "mode": mode, "n": len(pool), "step_s_min": min(ts),
                       "step_s_median": float(np.median(ts)), "step_s_all": ts,
                       "state_mib": round(_state_mib(fitters[mode]), 1)}
                rows.append(row)
                print(f"  {mode:6s} min {1e3 * row['step_s_min']:.2f} ms  median {1e3 * row['step_s_median']:.2f} ms "
                      f"state {row['state_mib']} MiB", flush=True)
            del fitters, runners
    return rows


def summarise(rows: list[dict], size: dict) -> dict:
    """Ratios: sparse / dense at each (rank, K), and each mode's median over its smallest K."""
    out = {}
    for rank in size["ranks"]:
        by = {(r["mode"], r["K"]): r for r in rows if r["rank"] == rank}
        k0 = size["ks"][0]
        out[f"rank {rank}"] = {
            "sparse_over_dense": {k: by["sparse", k]["step_s_median"] / by["dense", k]["step_s_median"]
                                  for k in size["ks"]},
            "dense_vs_smallest_K": {k: by["dense", k]["step_s_median"] / by["dense", k0]["step_s_median"]
                                    for k in size["ks"]},
            "sparse_vs_smallest_K": {k: by["sparse", k]["step_s_median"] / by["sparse", k0]["step_s_median"]
                                     for k in size["ks"]},
        }
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def markdown(result: dict) -> str:
    size, rows = result["size"], result["rows"]
    lines = [f"# Fit step time against K: dense vs sparse updates{' (smoke size)' if result['smoke'] else ''}", "",
             f"Command: `{result['command']}`. {result['machine']['date']}, {result['machine']['platform']}, "
             f"{result['machine']['cpu_count']} CPUs, load average {result['machine']['load_average'][0]:.1f} "
             f"at the end, jax {result['machine']['jax']}, devices {', '.join(result['machine']['devices'])}.", "",
             f"Pool n = {rows[0]['n']} x {size['seq_len']} tokens, GPT 2 layers d_model {size['d_model']}, "
             f"vocabulary 1024, logits placement; d = {size['per_example']} subsets per example, "
             f"{size['subsets_per_step']} subsets per step. Per-step seconds over {size['repeats']} alternated rounds "
             f"of {size['steps']} steps (compile and {size['warmup']} warm-up steps excluded).", "",
             "| rank | K | dense min ms | dense median ms | sparse min ms | sparse median ms | sparse / dense "
             "| dense state MiB | sparse state MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["rank"], r["K"], r["mode"]): r for r in rows}
    for rank in size["ranks"]:
        for k in size["ks"]:
            d, s = by[rank, k, "dense"], by[rank, k, "sparse"]
            lines.append(f"| {rank} | {k} | {1e3 * d['step_s_min']:.2f} | {1e3 * d['step_s_median']:.2f} | "
                         f"{1e3 * s['step_s_min']:.2f} | {1e3 * s['step_s_median']:.2f} | "
                         f"{s['step_s_median'] / d['step_s_median']:.2f} | {d['state_mib']} | {s['state_mib']} |")
    lines += ["", "Median step time relative to the smallest K (goal for sparse: <= 1.5 at every K):", "",
              "| rank | mode | " + " | ".join(f"K {k}" for k in size["ks"]) + " |",
              "|---|---|" + "---|" * len(size["ks"])]
    for rank in size["ranks"]:
        summ = result["summary"][f"rank {rank}"]
        for mode in ("dense", "sparse"):
            ratios = summ[f"{mode}_vs_smallest_K"]
            lines.append(f"| {rank} | {mode} | " + " | ".join(f"{ratios[k]:.2f}" for k in size["ks"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--repeats", type=int, help="alternated timing rounds (default 5; smoke 2)")
    args = parser.parse_args()
    size = dict(SMOKE if args.smoke else FULL)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be >= 1, got {args.repeats}")
        size["repeats"] = args.repeats
    rows = run(size)
    result = {"smoke": args.smoke, "command": "python benchmarks/fit.py" + (" --smoke" if args.smoke else ""),
              "machine": machine(), "size": size, "rows": rows, "summary": summarise(rows, size)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fit.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "fit.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
