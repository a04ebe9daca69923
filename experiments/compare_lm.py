"""Every attribution method on the demo's ground truth (one model size): LDS, interval, seconds.

    python experiments/compare_lm.py --out runs/demo

Reuses the demo run's base model, ground-truth store and STRIDE fit (run `stride-jax demo
--out runs/demo` first, or let this script make them). Writes
experiments/results/lm_methods.json and .md. Baseline settings (TRAK k=2048, damping 1; LoGra
rank 32; TracIn 4 checkpoints) were chosen on validation queries by the baselines' author (see
their module docstrings); only test-query LDS is reported here.
"""

import argparse
import json
from pathlib import Path

from stride_jax.experiment import ExperimentConfig, compare_methods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--results", default="experiments/results/lm_methods.json")
    ap.add_argument("--skip", nargs="*", default=[], help="method names to leave out")
    args = ap.parse_args()
    rows = compare_methods(ExperimentConfig(), Path(args.out), Path(args.results), skip=set(args.skip))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
