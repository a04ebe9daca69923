"""STRIDE ablations at one model size of the pretraining table, on *validation* queries.

    python experiments/ablations_lm.py --run runs/pretrain/2.2M --size 2.2M

Reuses the base model and ground truth that `stride-jax compare --config
experiments/configs/pretrain_lds.yaml --out runs/pretrain` made for that size, and varies one
setting at a time around the chosen STRIDE configuration (operator placement, rank, layer, K, d,
fit steps, loss weights, lambda rule). Rows are appended to experiments/results/ablations.json as
they finish (resumable: variants already there are skipped); a markdown table is written next to
it. Test queries are never looked at. The 0.2M size's wider sweep is experiments/results/lm_tuning.md.
"""

import argparse
import json
from pathlib import Path

from stride_jax.compare import CompareConfig
from stride_jax.config import load_config_file
from stride_jax.experiment import sweep_stride

CONFIG = Path(__file__).resolve().parent / "configs" / "pretrain_lds.yaml"

# Overrides of the chosen setting (rank 1, K 2048, d 8, logits placement at layer 1, 600 steps,
# stability 1, linearity 0, lambda 0.05 lambda_max); recovery-only rows share the chosen fit.
VARIANTS = {
    "chosen (rank 1, K 2048, 600 steps)": {},
    "lambda 0.02": {"recovery": {"lambda_frac": 0.02}},
    "lambda 0.1": {"recovery": {"lambda_frac": 0.1}},
    "lambda auto (held-out subsets)": {"recovery": {"lambda_frac": "auto"}},
    "nonneg Lasso": {"recovery": {"fista": {"nonneg": True}}},
    "no centring": {"measure": {"center_operators": False, "center_queries": False}},
    "loss-difference measurement": {"measure": {"space": "diff"}},
    "last layer": {"steering": {"layer": -1}},  # replaced by the size's n_layers in main()
    "rank 4": {"steering": {"rank": 4}},
    "steps 1200": {"fit": {"steps": 1200}},
    "fit lr 1e-2": {"fit": {"learning_rate": 1e-2}},
    "residual placement": {"steering": {"placement": "residual"}},
    "layer 2": {"steering": {"layer": 2}},
    "rank 16": {"steering": {"rank": 16}},
    "K 4096": {"design": {"n_subsets": 4096}},
    "K 1024": {"design": {"n_subsets": 1024}},
    "K 512": {"design": {"n_subsets": 512}},
    "d 4": {"design": {"per_example": 4}},
    "d 16": {"design": {"per_example": 16}},
    "steps 300": {"fit": {"steps": 300}},
    "stability 0.1": {"fit": {"stability_weight": 0.1}},
    "stability 10": {"fit": {"stability_weight": 10.0}},
    "linearity 1": {"fit": {"linearity_weight": 1.0}},
    # combinations of the single-setting winners at 2.2M (layer -1 = the last residual state)
    "fit lr 3e-3": {"fit": {"learning_rate": 3e-3}},
    "last layer + fit lr 1e-2": {"steering": {"layer": -1}, "fit": {"learning_rate": 1e-2}},
    "last layer + fit lr 1e-2 + K 4096": {"steering": {"layer": -1}, "fit": {"learning_rate": 1e-2},
                                          "design": {"n_subsets": 4096}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--size", default="2.2M")
    ap.add_argument("--run", type=Path, default=None, help="default runs/pretrain/<size>")
    ap.add_argument("--results", type=Path, default=Path("experiments/results/ablations.json"))
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = ap.parse_args()
    cfg = CompareConfig.from_dict(load_config_file(args.config))
    size = cfg.size(args.size)
    exp = cfg.experiment_for(size)
    if args.only:
        unknown = set(args.only) - set(VARIANTS)
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {list(VARIANTS)}")
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    for name, override in variants.items():  # layer -1: the last residual state of this size
        if override.get("steering", {}).get("layer") == -1:
            variants[name] = {**override, "steering": {**override["steering"], "layer": size.n_layers}}
    run = args.run or Path("runs/pretrain") / size.name
    # this size's rows live in the run directory (resumable); ablations.json gathers every size
    rows = sweep_stride(exp, run, variants, run / "ablation_rows.json")
    for r in rows:
        r["size"] = size.name
    merged = json.loads(args.results.read_text()) if args.results.exists() else []
    merged = [r for r in merged if r.get("size") != size.name] + rows
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(merged, indent=2))
    write_table(merged, args.results.with_suffix(".md"))


def write_table(rows, path: Path) -> None:
    base = {r.get("size"): r["lds"]["mean"] for r in rows if not r["override"]}
    lines = ["# STRIDE ablations on validation queries (pretraining table)", "",
             "`python experiments/ablations_lm.py --size <size>`: one setting changed at a time around the "
             "chosen configuration (rank 1, K 2048, d 8, logits placement at layer 1, 600 fit steps, stability 1, "
             "linearity 0, lambda 0.05 lambda_max), on the base model and ground truth of that size of "
             "`experiments/configs/pretrain_lds.yaml` (64 alpha = 0.3 subsets x 2 seeds). LDS on the 60 validation "
             "queries with its 95% joint bootstrap interval; 'vs chosen' is the difference from the chosen row of the "
             "same size; seconds = fit + measure + recover on 2 CPU cores "
             "(recovery-only rows reuse the chosen fit). The wider sweep at 0.2M is lm_tuning.md.", "",
             "| size | variant | override | LDS (val) | 95% CI | vs chosen | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        l = r["lds"]
        lines.append(f"| {r.get('size', '?')} | {r['variant']} | `{json.dumps(r['override'])}` | {l['mean']:.3f} | "
                     f"[{l['ci95'][0]:.3f}, {l['ci95'][1]:.3f}] | {l['mean'] - base.get(r.get('size'), float('nan')):+.3f} | {r['seconds']} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
