"""Small vision and tabular models: STRIDE vs baselines by LDS, counterfactual removal, K/d ablation.

The exact commands behind experiments/results/small_models*.{json,md,png}:

    /work/venv/bin/python experiments/small_models.py --config experiments/configs/small_models.yaml \
        --out runs/small_models
    /work/venv/bin/python experiments/small_models.py --ablation \
        --config experiments/configs/small_models_ablation.yaml --out runs/small_models

`--smoke` runs the tiny size the tests use (experiments/configs/small_models_smoke.yaml, under a
minute) and writes into --results (default: experiments/results; the smoke config names its
files small_models_smoke*). Every stage resumes from --out. Paper values: STRIDE.md section 4.
"""

import argparse
from pathlib import Path

from stride_jax import small_models

CONFIGS = Path(__file__).resolve().parent / "configs"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/small_models"))
    ap.add_argument("--results", type=Path, default=Path("experiments/results"))
    ap.add_argument("--ablation", action="store_true", help="run the K x d ablation instead")
    ap.add_argument("--smoke", action="store_true", help="the tiny size the tests run")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.ablation:
        path = args.config or CONFIGS / ("small_models_ablation_smoke.yaml" if args.smoke else
                                         "small_models_ablation.yaml")
        small_models.run_ablation(small_models.AblationConfig.load(path), args.out, args.results,
                                  progress=args.progress)
    else:
        path = args.config or CONFIGS / ("small_models_smoke.yaml" if args.smoke else "small_models.yaml")
        small_models.run(small_models.SmallModelsConfig.load(path), args.out, args.results, progress=args.progress)


if __name__ == "__main__":
    main()
