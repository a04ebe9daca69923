"""Is STRIDE's gap information or operators? Recovery from perfect responses.

For cells of a config with STRIDE groups (nk_regime.yaml, sft_lds.yaml) whose stores a run has made (base model, ground
truth, a reference method's scores), take the reference's influence vector of each query (EK-FAC
by default) as if it were the truth, synthesise the responses perfect operators would give through
the design STRIDE used at each K (y_k = the sum of w over subset k: y = M w, centred per query
as STRIDE centres), recover with STRIDE's own recoveries (Lasso, ridge; chosen on validation
queries) and report the test LDS of what comes back. Its ratio to the reference's own LDS is what
K subset sums keep of that influence vector whatever the operators: where STRIDE's real responses
fall far below it, the operators (fit noise, their per-example resolution) are the bottleneck, not
the number of subsets. No fit runs; nothing is written to the run's stores.

    PYTHONPATH=. python experiments/oracle_recovery.py experiments/configs/nk_regime.yaml --out runs/nk \
        --cells 0.2M-n3072,0.2M-n12288 --groups K=1000,K=n/3,K=n,K=2n,K=4n --results experiments/results

Writes `<results>/oracle_recovery.json` (entries keyed by cell and K, merged with earlier ones) and
`oracle_recovery.md`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np

from stride_jax import Attribution, store
from stride_jax.attribution import recover
from stride_jax.config import RecoveryConfig, merge
from stride_jax.design import left_regular_design
from stride_jax.harness import load_config, report as report_lib, sweep, tasks

RECOVERIES = {"lasso": RecoveryConfig(), "ridge": RecoveryConfig(solver="ridge")}


def subset_sums(design, w_NxQ: np.ndarray) -> np.ndarray:
    """y [Q, K]: each subset's sum of its members' w (perfect operators), centred per query."""
    y_KxQ = np.zeros((design.n_subsets, w_NxQ.shape[1]), np.float64)
    for s in range(design.ids_NxS.shape[1]):  # d columns: one scatter-add each
        np.add.at(y_KxQ, design.ids_NxS[:, s], w_NxQ)
    y = y_KxQ.T
    return (y - y.mean(axis=1, keepdims=True)).astype(np.float32)


def cell_ks(cfg, cell: str, n: int, groups: Collection[str] | None = None) -> dict[str, int]:
    """{group: K} of the config's single-fit select groups (those in `groups`, all if None) for
    `cell`, resolved as the harness resolves them (group and cell overrides merged, then
    `sweep.variant_configs`); groups the cell leaves out and ensembles (the design of their
    single-fit group) are skipped."""
    cell_cfg = next(c for c in cfg.cells if c.name == cell)
    out = {}
    for group, override in cfg.select.groups.items():
        if (groups is not None and group not in groups) or (group in cell_cfg.groups and cell_cfg.groups[group] is None):
            continue
        settings = merge(override or {}, cell_cfg.groups.get(group) or {})
        resolved = sweep.variant_configs(cfg.stride_for(cell), {"": {}}, settings, n_train=n)[""]
        if not isinstance(resolved, str) and resolved.fit.ensemble == 1:
            out[group] = resolved.design.n_subsets
    return out


def earlier_entries(path: Path) -> dict[tuple[str, str, str], dict]:
    """The entries of a results file of this kind, keyed by (config, cell, group); {} if none."""
    return {(e["config"], e["cell"], e["group"]): e
            for e in (json.loads(path.read_text())["entries"] if path.exists() else [])}


def test_lds_rows(results: Path, name: str) -> dict[tuple[str, str], float]:
    """{(cell, method row): test LDS} of the harness's results file `<name>.json`; {} if none."""
    ran = results / f"{name}.json"
    return {(r["cell"], r["method"]): r["lds"]["mean"] for r in (json.loads(ran.read_text())["rows"] if ran.exists() else [])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="the run's folder (its cells' stores)")
    ap.add_argument("--cells", required=True, help="comma-separated cells")
    ap.add_argument("--groups", help="comma-separated select groups (default: every group)")
    ap.add_argument("--reference", default="ekfac", help="the method whose scores stand for the truth")
    ap.add_argument("--results", default="experiments/results")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    results = Path(args.results)
    path = results / "oracle_recovery.json"
    entries = earlier_entries(path)
    command = "PYTHONPATH=. python experiments/oracle_recovery.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    n_boot = cfg.select.n_boot
    stride_rows = test_lds_rows(results, cfg.name)  # STRIDE's own rows (its real responses), where a run wrote them
    for cell in args.cells.split(","):
        run_dir = Path(args.out) / cell
        p = tasks.prepare(cfg.task_for(cell), run_dir, groundtruth=True)
        ref_attr = Attribution.load(run_dir / "methods" / args.reference / "scores")
        if not np.array_equal(ref_attr.train_ids, p.train.ids):
            raise ValueError(f"{args.reference}'s scores in {run_dir} are not over this cell's pool")
        ref = ref_attr.dense()
        ref_lds = p.lds(ref, "test", None, n_boot)["mean"]
        d, n = cfg.stride_for(cell).design, len(p.train)
        done: set[int] = set()
        for group, k in cell_ks(cfg, cell, n, args.groups.split(",") if args.groups else None).items():
            if k in done:  # another group of the same K (the same design)
                continue
            done.add(k)
            t0 = time.perf_counter()
            design = left_regular_design(n, k, d.per_example, d.seed)  # the design STRIDE's fit drew
            y = subset_sums(design, ref)
            val, attrs = {}, {}
            for name, rc in RECOVERIES.items():
                attrs[name], _ = recover(y, design, rc, train_ids=p.train.ids)
                val[name] = p.lds(attrs[name].dense(), "val", None, n_boot)["mean"]
            best = max(val, key=val.get)
            test = p.lds(attrs[best].dense(), "test", None, n_boot)
            entries[(cfg.name, cell, group)] = {
                "config": cfg.name, "command": command, "machine": report_lib.machine(),
                "date": time.strftime("%Y-%m-%d"), "cell": cell, "group": group, "n": n, "k": k,
                "k_over_n": round(k / n, 3), "reference": args.reference, "reference_test_lds": ref_lds,
                "val": val, "chosen": best, "test_lds": test, "kept": test["mean"] / ref_lds if ref_lds else None,
                "stride_test_lds": stride_rows.get((cell, report_lib.group_row(group))),
                "seconds": round(time.perf_counter() - t0, 1)}
            print(f"[{cell}] {group} (K={k}): perfect-operator test LDS {test['mean']:.3f} via {best} "
                  f"({entries[(cfg.name, cell, group)]['kept']:.2f} of {args.reference}'s {ref_lds:.3f})", flush=True)
    out = {"entries": sorted(entries.values(), key=lambda e: (e["config"], e["n"], e["cell"], e["k"]))}
    store.write_json(path, out)
    lines = ["# oracle_recovery: recovery from perfect responses (y = M w, w = the reference's scores)", "",
             "Each entry's command, machine and date are in oracle_recovery.json. kept = perfect-operator test LDS "
             "/ the reference's own; STRIDE = the test LDS of STRIDE's real responses at that K (its results file).",
             "", "| config | cell | group | K/n | validation LDS lasso / ridge | chosen | perfect-operator test LDS "
             "[95%] | reference's test LDS | kept | STRIDE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in out["entries"]:
        t, real = e["test_lds"], e.get("stride_test_lds")
        lines.append(f"| {e['config']} | {e['cell']} | {e['group']} | {e['k_over_n']:.2f} | {e['val']['lasso']:.3f} / "
                     f"{e['val']['ridge']:.3f} | {e['chosen']} | {t['mean']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] "
                     f"| {e['reference']} {e['reference_test_lds']:.3f} | {e['kept']:.2f} | "
                     f"{'-' if real is None else f'{real:.3f}'} |")
    store.atomic_write(results / "oracle_recovery.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
