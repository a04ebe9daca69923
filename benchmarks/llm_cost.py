"""What a STRIDE preset costs on SmolLM2-135M-Instruct at several pool sizes, without running every step.

    python benchmarks/llm_cost.py                       # preset llm at n = 256 and 968 (~10 min on 2 CPU cores)
    python benchmarks/llm_cost.py --preset llm-quick --n 256

For each n: the alpaca pool of benchmarks/smollm2.py (same records, chat template, 128 tokens), the
preset's K and step count resolved for n, then, each timed with its peak memory (benchmarks/smollm2.py's
`Stages`): the fitter's setup (hook-state cache of the pool), one step (compile included), `--steps`
more steps, and XLA's FLOP count of one step (`Fitter.step_flops`). The full fit's seconds are
**extrapolated**: setup + steps x the measured seconds per step (the step program is the same at every
step; with `fit.sparse_updates` its cost does not grow with K, benchmarks/results/fit.md). The GPU line is
an **estimate**, not a measurement: the fit's FLOPs over an assumed sustained throughput (`--gpu-tflops`,
default 100 TFLOP/s, about a fifth of an H100's dense TF32 peak, which float32 matmuls use on GPU under
jax's default precision). Writes results/llm_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's stride_jax
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from smollm2 import RESULTS, Stages, cpu_name  # noqa: E402

from stride_jax import StrideConfig, data, downloads  # noqa: E402
from stride_jax.config import to_dict  # noqa: E402
from stride_jax.design import left_regular_design  # noqa: E402
from stride_jax.fit import Fitter  # noqa: E402
from stride_jax.harness.attribute import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llm")
    p.add_argument("--n", default="256,968", help="comma-separated pool sizes (alpaca_en_demo holds ~976 that fit)")
    p.add_argument("--steps", type=int, default=10, help="steps timed after the first (compiling) one")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gpu-tflops", type=float, default=100.0, help="assumed sustained TFLOP/s of the GPU estimate")
    p.add_argument("--out", default=None, help="results stem (default results/llm_cost)")
    args = p.parse_args()
    sizes = [int(x) for x in args.n.split(",")]
    stem = pathlib.Path(args.out) if args.out else RESULTS / "llm_cost"

    gguf, alpaca = downloads.fetch("smollm2"), downloads.fetch("alpaca")
    st = Stages()
    net, tok = st.run("load", load_model, gguf)
    pairs = list(dict.fromkeys(data.read_instruction_pairs(alpaca)))
    records = data.instruction_examples(pairs, tok, args.seq_len, min_response_tokens=8, seed=0)
    if len(records) < max(sizes):
        raise SystemExit(f"only {len(records)} records fit --seq-len {args.seq_len}; asked for n = {max(sizes)}")
    rows = []
    for n in sizes:
        pool = records[np.arange(n)]
        cfg = StrideConfig.preset(args.preset).resolve_subsets(n)
        d = cfg.design
        design = left_regular_design(n, d.n_subsets, d.per_example, d.seed)
        fitter = st.run(f"setup n={n}", Fitter, net, pool, design, cfg, progress=False)
        setup_s = st.rows[-1]["seconds"]
        st.run(f"first step n={n}", fitter.run, max_steps=1, progress=False)
        st.run(f"{args.steps} steps n={n}", fitter.run, max_steps=args.steps, progress=False)
        per_step = st.rows[-1]["seconds"] / args.steps
        flops = st.run(f"step FLOPs n={n}", fitter.step_flops)
        steps = fitter.cfg.fit.steps
        fit_flops = None if flops is None else flops * steps
        rows.append({"n": n, "K": d.n_subsets, "steps": steps, "setup_seconds": setup_s,
                     "seconds_per_step": round(per_step, 3), "fit_seconds_extrapolated": round(setup_s + steps * per_step, 1),
                     "step_flops": flops, "fit_flops": fit_flops,
                     "gpu_fit_seconds_estimate": None if fit_flops is None else round(fit_flops / (args.gpu_tflops * 1e12), 1),
                     "peak_rss_mib": max(r["peak_rss_mib"] or 0 for r in st.rows if r["stage"].endswith(f"n={n}"))})
        print(rows[-1], flush=True)
        del fitter

    dev = jax.devices()[0]
    result = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(["benchmarks/llm_cost.py", *sys.argv[1:]]),
              "machine": {"cpu": cpu_name(), "platform": dev.platform, "device": dev.device_kind, "jax": jax.__version__,
                          "python": platform.python_version()},
              "preset": args.preset, "config": to_dict(StrideConfig.preset(args.preset)),
              "gpu_tflops_assumed": args.gpu_tflops, "seq_len": args.seq_len, "rows": rows, "stages": st.rows}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    lines = [f"# Cost of the `{args.preset}` preset on SmolLM2-135M-Instruct", "",
             f"Machine: {m['cpu']}, backend {m['platform']} ({m['device']}), jax {m['jax']}, python {m['python']}; "
             f"date {result['date']}. Command: `{result['command']}`.", "",
             f"Fit seconds are **extrapolated** (setup + steps x seconds per step, measured over {args.steps} steps "
             f"after a compiling one); the GPU column is an **estimate**: the fit's FLOPs (XLA's count of one step x "
             f"steps) at an assumed {args.gpu_tflops:g} TFLOP/s. Measurement (first order: one gradient per query) "
             "and recovery are not included (seconds, sft_lds.md).", "",
             "| n | K | steps | setup s | s / step | fit s (extrapolated) | FLOPs / step | fit FLOPs | GPU fit s (estimate) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fl = lambda x: "-" if x is None else f"{x:.3g}"
        lines.append(f"| {r['n']} | {r['K']} | {r['steps']} | {r['setup_seconds']} | {r['seconds_per_step']} | "
                     f"{r['fit_seconds_extrapolated']} | {fl(r['step_flops'])} | {fl(r['fit_flops'])} | "
                     f"{'-' if r['gpu_fit_seconds_estimate'] is None else r['gpu_fit_seconds_estimate']} | {r['peak_rss_mib']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
