"""Why STRIDE misses a leaked replica: do the operators of the subsets holding a training
example lower that example's loss (and its leaked query's) more than the other operators do?

For one cell of a run of a config with STRIDE (its fit resumed from the run's store, nothing
refitted unless `--fit` changes the fit), measure every operator on

- the cell's test queries whose problem has replicas in the pool (a contamination cell), and
- a sample of pool examples themselves (the examples STRIDE was fitted on),

and report, per query, its "own" subsets (those holding its replica, or the example itself)
against the others: the mean raw response (log loss_base - log loss_k) of each group, their
difference in units of the others' standard deviation, and the mean percentile of the own
subsets among all K (0.5 = no better than any other operator); then the same after centring
(what the Lasso sees) and the recovered score's rank. A fit that learnt per-example effects puts
the own subsets far above 0.5 on the pool examples; a query can only be found when its own
subsets stand out too.

    PYTHONPATH=. python experiments/stride_probe.py experiments/configs/contamination.yaml \
        --out runs/contamination --cell exact-1.5% --results experiments/results
    # a longer fit, in its own folder of the run (the run's stores are not touched):
    ... --fit steps=400 --name 'steps 400'
    # the fit of another STRIDE row of the config:
    ... --cell near-1.5% --method stride-400

Writes `<results>/stride_probe.json` (entries keyed by cell and name, merged with earlier ones)
and `stride_probe.md`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from stride_jax import measure as measure_lib
from stride_jax.attribution import Stride
from stride_jax.harness import load_config, report as report_lib, tasks


def own_vs_others(y_QxK: np.ndarray, own: list[np.ndarray]) -> list[dict[str, float]]:
    """Per query row: own subsets' mean response against the others' (z in the others' std) and
    the own subsets' mean percentile among all K (ties count half)."""
    out = []
    for y_K, k_own in zip(y_QxK, own):
        mask = np.zeros(len(y_K), bool)
        mask[k_own] = True
        others = y_K[~mask]
        pct = [((y_K < y_K[k]).sum() + 0.5 * ((y_K == y_K[k]).sum() - 1)) / (len(y_K) - 1) for k in k_own]
        out.append({"own": float(y_K[mask].mean()), "others": float(others.mean()),
                    "z": float((y_K[mask].mean() - others.mean()) / (others.std() + 1e-12)),
                    "percentile": float(np.mean(pct))})
    return out


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in ("z", "percentile")} | {"n": len(rows)}


def write(results: Path, entries: list[dict]) -> str:
    """stride_probe.json and .md in `results`; returns the markdown."""
    (results / "stride_probe.json").write_text(json.dumps({"entries": entries}, indent=1, sort_keys=True))
    lines = ["# STRIDE probe: do an example's own operators stand out?", "",
             "Per query, its own subsets (those holding the query's replica, or the example itself) "
             "against the other operators: z = (own mean response - others' mean) / others' std; "
             "percentile = own subsets' mean percentile among all K (0.5: no better than the rest); "
             "score rank = the recovered score's rank of the replica / example (0 = most helpful). "
             "Raw: log loss_base - log loss_k; centred: as the Lasso sees it.", "",
             *[f"- `{e['command']}` (machine: {e['machine']}; {e['date']})" for e in entries], "",
             "| cell | probe | fit steps | K | queries | n | raw z | raw percentile | centred z | centred percentile | "
             "score rank (of n pool) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        for g, r in e["groups"].items():
            lines.append(f"| {e['cell']} | {e['name']} | {e['fit_steps']} | {e['n_subsets']} | {g} | {r['raw']['n']} | "
                         f"{r['raw']['z']:+.2f} | {r['raw']['percentile']:.2f} | {r['centred']['z']:+.2f} | "
                         f"{r['centred']['percentile']:.2f} | {r.get('score rank', float('nan')):.0f} of {e['pool']} |")
    text = "\n".join(lines) + "\n"
    (results / "stride_probe.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="the run's output folder (its stores are read)")
    ap.add_argument("--cell", required=True)
    ap.add_argument("--results", default=None, help="folder for stride_probe.{json,md} (default: --out)")
    ap.add_argument("--pool-queries", type=int, default=16, help="pool examples measured as queries")
    ap.add_argument("--fit", nargs="*", default=[], metavar="KEY=VALUE",
                    help="fit overrides (a new fit in <out>/<cell>/probe/<name>)")
    ap.add_argument("--method", default="stride", help="the config's STRIDE method row whose fit is probed")
    ap.add_argument("--name", default=None, help="this probe's name in the results (default: the method's)")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    if args.cell not in cfg.cell_names():
        ap.error(f"no cell {args.cell!r} in {args.config}; cells: {cfg.cell_names()}")
    spec = next((m for m in cfg.methods if m.name == args.method and m.kind == "stride"), None)
    if spec is None:
        ap.error(f"no STRIDE method {args.method!r} in {args.config}")
    fit_over = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.fit)}
    args.name = args.name or (args.method if not fit_over else "+".join(args.fit))
    scfg = cfg.stride_for(args.cell, spec)
    if fit_over:
        scfg = scfg.replace(fit=fit_over)
    run_dir = Path(args.out) / args.cell
    p = tasks.prepare(cfg.task_for(args.cell), run_dir, groundtruth=False)
    workdir = run_dir / "methods" / args.method / "fit" if not fit_over else run_dir / "probe" / args.name / "fit"
    if not fit_over and not (workdir / "checkpoints").is_dir():
        sys.exit(f"no STRIDE fit in {workdir}: run the config first")
    t0 = time.perf_counter()
    stride = Stride(scfg).fit(p.model, p.train, workdir=workdir)
    fit_s = time.perf_counter() - t0
    ids_NxS = np.asarray(stride.design.ids_NxS)

    replica_of = tasks.replica_problem(p.train.ids)
    test_problem = tasks.replica_problem(p.queries.ids[p.test_cols])
    leaked = [(c, np.flatnonzero(replica_of == prob)) for c, prob in zip(p.test_cols, test_problem)
              if prob >= 0 and (replica_of == prob).any()]
    rng = np.random.default_rng(0)
    pool_rows = np.sort(np.concatenate([np.flatnonzero(replica_of >= 0),
                                        rng.choice(np.flatnonzero(replica_of < 0), args.pool_queries, replace=False)]))
    # (queries, each query's own subsets, each query's own pool rows (for the score rank), row selector per group)
    probes = {"pool": (p.train[pool_rows], [ids_NxS[r] for r in pool_rows], [np.array([r]) for r in pool_rows])}
    if leaked:
        probes["leaked"] = (p.queries[np.array([c for c, _ in leaked], np.int64)],
                            [np.unique(ids_NxS[r].ravel()) for _, r in leaked], [r for _, r in leaked])
    is_rep = replica_of[pool_rows] >= 0
    groups = {"leaked queries": ("leaked", np.ones(len(leaked), bool)), "pool examples (replicas)": ("pool", is_rep),
              "pool examples (others)": ("pool", ~is_rep)}  # (probe, its queries in the group)
    t0 = time.perf_counter()
    measured = {k: stride.measure(q, progress=True) for k, (q, _, _) in probes.items()}
    measure_s = time.perf_counter() - t0
    stats = {}
    for k, m in measured.items():
        _, own, rows = probes[k]
        y_QxK = stride.responses(m)
        s_NxQ = stride.recover(y_QxK).dense()
        # rank = how many pool examples score strictly higher (mean over the query's replicas)
        rank_Q = np.array([np.mean([(s_NxQ[:, j] > s_NxQ[r, j]).sum() for r in rr]) for j, rr in enumerate(rows)])
        stats[k] = {"raw": own_vs_others(measure_lib.raw_responses(m, scfg.measure), own),
                    "centred": own_vs_others(y_QxK, own), "rank": rank_Q}
    command = " ".join(["PYTHONPATH=. python experiments/stride_probe.py",
                        *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])
    entry = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": report_lib.machine(),
             "cell": args.cell, "name": args.name, "fit": fit_over, "fit_steps": scfg.fit.steps,
             "n_subsets": scfg.design.n_subsets, "per_example": scfg.design.per_example, "pool": len(p.train),
             "seconds": {"fit": round(fit_s, 1), "measure": round(measure_s, 1)}, "groups": {}}
    for g, (k, keep) in groups.items():
        if keep.any():
            entry["groups"][g] = {space: summarise([r for r, kk in zip(stats[k][space], keep) if kk])
                                  for space in ("raw", "centred")}
            entry["groups"][g]["score rank"] = float(stats[k]["rank"][keep].mean())

    results = Path(args.results or args.out)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "stride_probe.json"
    earlier = json.loads(path.read_text())["entries"] if path.exists() else []
    entries = [e for e in earlier if (e["cell"], e["name"]) != (args.cell, args.name)] + [entry]
    print(write(results, entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
