"""`stride-jax` command line: thin subcommands that parse arguments and call the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stride_jax.config import load_config_file


def _experiment_config(args: argparse.Namespace):
    from stride_jax.experiment import ExperimentConfig, quick_config

    if getattr(args, "config", None):
        return ExperimentConfig.from_dict(load_config_file(args.config))
    return quick_config() if getattr(args, "quick", False) else ExperimentConfig()


def cmd_demo(args: argparse.Namespace) -> int:
    from stride_jax.experiment import run_lds_experiment

    cfg = _experiment_config(args)
    out = Path(args.out or f"runs/{cfg.name}")
    print(f"stride-jax demo: config '{cfg.name}', writing to {out}")
    run_lds_experiment(cfg, out, progress=not args.no_progress)
    print(f"\nreport: {out / 'report.json'}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from stride_jax.experiment import base_model, load_data

    cfg = _experiment_config(args)
    out = Path(args.out or f"runs/{cfg.name}")
    train, _, _ = load_data(cfg)
    model, mcfg = base_model(cfg, train, out, progress=not args.no_progress)
    print(f"base model {mcfg} saved in {out / 'base_model'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from stride_jax.compare import CompareConfig, run_compare

    cfg = CompareConfig.from_dict(load_config_file(args.config)) if args.config else CompareConfig()
    out = Path(args.out or f"runs/{cfg.name}")
    print(f"stride-jax compare: config '{cfg.name}', sizes {[s.name for s in cfg.sizes]}, writing to {out} "
          f"and {args.results}")
    run_compare(cfg, out, Path(args.results), progress=not args.no_progress)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _experiment_config(args)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stride-jax", description="STRIDE training-data attribution in JAX")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="experiment config (YAML or JSON); default: the built-in demo config")
        sp.add_argument("--quick", action="store_true", help="the tiny size used by the tests")
        sp.add_argument("--out", help="run directory (default runs/<config name>); reruns resume from it")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    d = sub.add_parser("demo", help="pretrain, ground truth, STRIDE + baselines, LDS table on the embedded corpus")
    common(d)
    d.set_defaults(fn=cmd_demo)
    pt = sub.add_parser("pretrain", help="train (or load the cached) base model of an experiment config")
    common(pt)
    pt.set_defaults(fn=cmd_pretrain)
    cp = sub.add_parser("compare", help="STRIDE vs every baseline across model sizes: LDS, time per stage, "
                        "peak memory, cost in n")
    cp.add_argument("--config", help="compare config (YAML or JSON); default: experiments/configs/pretrain_lds.yaml's "
                    "built-in equivalent")
    cp.add_argument("--out", help="run directory (default runs/<config name>); reruns resume from it")
    cp.add_argument("--results", default="experiments/results", help="where <name>.json/.md/.png go")
    cp.add_argument("--no-progress", action="store_true", help="no progress bars")
    cp.set_defaults(fn=cmd_compare)
    c = sub.add_parser("config", help="print the resolved experiment config as JSON")
    common(c)
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"stride-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
