"""Run an experiment config end to end: prepare each cell, sweep, select, score, report.

    stride-jax run experiments/configs/pretrain_lds.yaml --out runs/pretrain

For every cell (or the task itself): prepare data, base model and ground truth (`tasks`); run
the STRIDE variants (`sweep`, shared fits) and, with `select`, choose STRIDE per group on
validation queries; run every method (`runner`, optionally in its own process); score all of
them by LDS with intervals against the ground truth, with the noise ceiling; then the cost in
n and the counterfactual check when configured; write json + markdown + png (`report`).
Everything is resumable from `out`, which is locked while the run uses it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from stride_jax import models, store
from stride_jax.config import merge, to_dict
from stride_jax.harness import counterfactual as cf_lib
from stride_jax.harness import report as report_lib
from stride_jax.harness import runner, sweep
from stride_jax.harness import tasks as tasks_lib
from stride_jax.harness.config import ClassifierTask, ExperimentConfig

log = logging.getLogger("stride_jax")


def _file_stem(name: str) -> str:
    """`name` (a target task: an evals registry name or a user's path) as one plain file name
    inside its folder: characters other than letters, digits, '.', '_' and '-' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


def _cell_dir(out: Path, cell: str) -> Path:
    return out / cell if cell else out


def _lds_rows(p: tasks_lib.Prepared, cfg: ExperimentConfig, cell: str, name: str, scores: np.ndarray,
              record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per alpha (LDS on the reported and the validation queries, cost); a task without
    ground truth gets one row with alpha and LDS None (its cost)."""
    rows = []
    for alpha in tasks_lib.alphas(p.task) or [None]:
        has_gt = alpha is not None
        rows.append({"cell": cell, "method": name, "dataset": tasks_lib.dataset_name(p.task),
                     "alpha": float(alpha) if has_gt else None,
                     "lds": p.lds(scores, cfg.split, alpha, cfg.n_boot) if has_gt else None,
                     "lds_validation": p.lds(scores, "val", alpha, min(cfg.n_boot, 200)) if has_gt else None,
                     "seconds": record.get("seconds", {}),
                     **{k: record[k] for k in ("peak_memory_bytes", "load_memory_bytes", "memory_kind",
                                               "not_converged") if k in record}})
    return rows


def _cell_groups(cfg: ExperimentConfig, cell: str) -> dict[str, dict[str, Any]]:
    """{select group: its overrides with the cell's merged in} of the STRIDE variant groups that
    run in `cell` (none without variants; a cell's `groups: {g: null}` leaves g out)."""
    if not cfg.all_variants():
        return {}
    groups = cfg.select.groups if cfg.select is not None else {"": {}}
    cell_cfg = next((c for c in cfg.cells if c.name == cell), None)
    own = cell_cfg.groups if cell_cfg is not None else {}
    return {g: merge(o, own[g]) if g in own else o for g, o in groups.items() if not (g in own and own[g] is None)}


def _variants(p: tasks_lib.Prepared, cfg: ExperimentConfig, cell: str, run_dir: Path, progress: bool,
              methods: Collection[str] | None = None):
    """Variant rows, selection records and the chosen methods' (scores, record) of one cell:
    of the select groups whose row `methods` names (all if None or if it names "stride")."""
    variants = cfg.all_variants()
    rows, selection, chosen = [], [], {}
    if not variants:
        return rows, selection, chosen
    groups = {g: o for g, o in _cell_groups(cfg, cell).items()
              if report_lib.group_runs(report_lib.group_row(g), methods)}
    alpha = cfg.select.alpha if cfg.select is not None else None
    n_boot = cfg.select.n_boot if cfg.select is not None else min(cfg.n_boot, 200)
    for group, override in groups.items():
        names = (cfg.select.only.get(group) if cfg.select is not None else None) or list(variants)
        configs = sweep.variant_configs(cfg.stride_for(cell), {n: variants[n] for n in names}, override,
                                        n_train=len(p.train))
        t0 = time.perf_counter()
        results = sweep.run_variants(p, configs, run_dir / "sweep" / (group or "stride"), progress=progress)
        val = {}
        for name, r in results.items():
            row = {"cell": cell, "group": group, "variant": name, "override": variants[name], "seconds": r.seconds,
                   "error": r.error}
            if r.attr is not None:
                scores = r.attr.dense()  # once: with recovery.sparse this builds the [N, Q] array
                row["lds_val"] = p.lds(scores, "val", alpha, n_boot)
                if row["lds_val"]["mean"] is not None:  # None: no query had a finite LDS
                    val[name] = row["lds_val"]["mean"]
                if cfg.select is None and cfg.split == "test":  # a pure sweep / ablation reports test too
                    row["lds_test"] = p.lds(scores, "test", alpha, cfg.n_boot)
                row["not_converged"] = r.attr.n_not_converged
                test = scores[:, p.test_cols]
                row["nnz_median"] = float(np.median((test != 0).sum(axis=0)))
            else:
                log.warning("[%s] variant %r: %s", cell or cfg.name, name, r.error)
            rows.append(row)
        if cfg.select is not None:
            finite = {k: v for k, v in val.items() if v is not None and np.isfinite(v)}
            if not finite:
                raise RuntimeError(f"every STRIDE variant failed for cell {cell!r} group {group!r}")
            best = max(finite, key=finite.get)
            method = report_lib.group_row(group)
            selection.append({"cell": cell, "group": group, "chosen": best, "val_lds": finite[best],
                              "grid_seconds": round(time.perf_counter() - t0, 1),
                              "settings": to_dict(results[best].cfg)})
            secs = results[best].seconds
            chosen[method] = (results[best].attr, {"seconds": {**secs, "total": round(sum(secs.values()), 3)},
                                                   "not_converged": results[best].attr.n_not_converged,
                                                   **results[best].memory})
            log.info("[%s] %s: chose %r (validation LDS %.3f of %d variants)", cell or cfg.name, method, best,
                     finite[best], len(finite))
    return rows, selection, chosen


def _extremes(p: tasks_lib.Prepared, col: np.ndarray, k: int) -> dict[str, list[dict[str, Any]]]:
    """The k highest (most helpful) and k lowest (most harmful) scored pool examples."""
    texts = p.train.texts
    entry = lambda i: {"index": int(i), "score": float(col[i]), "text": texts[i] if texts else None}
    return {"helpful": [entry(i) for i in np.argsort(-col, kind="stable")[:k]],
            "harmful": [entry(i) for i in np.argsort(col, kind="stable")[:k]]}


def _query_text(p: tasks_lib.Prepared, q: int) -> str | None:
    return p.queries.texts[q] if p.queries.texts else None


def _examples(p: tasks_lib.Prepared, cell: str, name: str, scores: np.ndarray, n: int, k: int = 3):
    return [{"cell": cell, "method": name, "query": _query_text(p, q), **_extremes(p, scores[:, q], k)}
            for q in p.test_cols[:n]]


def _qualitative(p: tasks_lib.Prepared, cfg: ExperimentConfig, cell: str,
                 scored: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per test query, each configured method's most helpful and most harmful pool examples."""
    c = cfg.qualitative
    missing = [m for m in c.methods if m not in scored]
    if missing:
        log.warning("[%s] qualitative: no scores of %s (skipped or failed)", cell or cfg.name, missing)
    return [{"cell": cell, "query_index": int(q), "query": _query_text(p, q),
             "methods": {m: _extremes(p, scored[m][:, q], c.k) for m in c.methods if m in scored}}
            for q in p.test_cols[: c.n_queries]]


def _stored_rows(cfg: ExperimentConfig, cell: str, task: Any, run_dir: Path,
                 methods: Collection[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """In a `--methods` run: the stored scores of the cell's method rows it did not run, so the
    entries derived from several methods can be recomputed, and the rows that have none for
    these inputs (a select group of the cell that did not run counts as one)."""
    missing = [report_lib.group_row(g) for g in _cell_groups(cfg, cell)
               if not report_lib.group_runs(report_lib.group_row(g), methods)]
    out = {}
    for spec in cfg.methods_in(cell):
        if spec.name in methods:
            continue
        res = runner.stored_result(task, run_dir, spec, cfg.stride_for(cell, spec))
        if res is None:
            missing.append(spec.name)
        else:
            out[spec.name] = res[0].dense()
    return out, missing


def _with_fusions(scored: dict[str, np.ndarray], fuse: tuple[str, ...], fusions: tuple[str, ...]
                  ) -> dict[str, np.ndarray]:
    """`scored` plus, when both methods of `fuse` were scored, each of `fusions` of their
    rankings as a row "<a> + <b> (<how>)" (`contamination.fuse`)."""
    from stride_jax.harness import contamination as cont

    out = dict(scored)
    if fusions and all(m in scored for m in fuse):
        for name, how in zip(_fusion_names(fuse, fusions), fusions):
            out[name] = cont.fuse(scored[fuse[0]], scored[fuse[1]], how)
    return out


def _fusion_names(fuse: tuple[str, ...], fusions: tuple[str, ...]) -> list[str]:
    """The rows `_with_fusions` adds: "<a> + <b> (<how>)" per fusion."""
    return [f"{fuse[0]} + {fuse[1]} ({how})" for how in fusions] if fuse else []


def _contamination(p: tasks_lib.Prepared, cfg: ExperimentConfig, cell: str,
                   scored: dict[str, np.ndarray]) -> dict[str, Any]:
    """Memorisation of the leaked problems and recall of their replicas per method and fusion."""
    from stride_jax import train as train_lib
    from stride_jax.harness import contamination as cont

    c, task = cfg.contamination, p.task
    replica_of = tasks_lib.replica_problem(p.train.ids)
    leaked = tasks_lib.replica_problem(p.queries.ids[p.test_cols])
    start = tasks_lib.pretrained(task.model.path, task.model.dtype)[0]
    memo = {}
    for name, model in (("loaded model", start), ("attributed model", p.model)):
        row = {}
        for split, cols in (("leaked", p.test_cols), ("clean", p.val_cols)):
            q = p.queries[cols]
            exact, acc = train_lib.greedy_match(model, q)
            row[split] = {"exact_match": float(exact.mean()), "token_accuracy": float(acc.mean()),
                          "loss": float(train_lib.eval_loss(model, q).mean()), "n": int(len(cols))}
        memo[name] = row
    n = len(p.train)
    methods = {m: s[:, p.test_cols] for m, s in _with_fusions(scored, c.fuse, c.fusions).items()}
    recall = []
    for frac in c.buckets:
        bucket = max(1, int(round(frac * n)))
        for m, s in methods.items():
            recall.append({"method": m, "bucket_fraction": frac,
                           **cont.recall(s, replica_of, leaked, bucket, n_boot=c.n_boot)})
    inj = task.data.inject
    return {"cell": cell, "kind": inj.kind, "copies": inj.copies, "leaked_problems": inj.leaked,
            "replicas": int((replica_of >= 0).sum()), "pool": n, "leak_rate": float((replica_of >= 0).mean()),
            "memorisation": memo, "recall": recall}


def _data_selection(p: tasks_lib.Prepared, cfg: ExperimentConfig, cell: str, scored: dict[str, np.ndarray],
                    run_dir: Path, progress: bool) -> list[dict[str, Any]]:
    """Per target: each method's and reference's k records, fine-tuned with every seed, scored
    by greedy exact match on the target's held-out test records (see `config.DataSelection`)."""
    from stride_jax import train as train_lib
    from stride_jax.harness import selection as sel

    c, task = cfg.data_selection, p.task
    missing = sorted((set(c.methods) | set(c.fuse if c.fusions else ())) - set(scored))
    if missing:
        log.warning("[%s] data selection: no scores of %s (skipped or failed)", cell or cfg.name, missing)
    methods = [m for m in (c.methods or [m for m in scored if m != "random"]) if m in scored]
    fused = _with_fusions(scored, c.fuse, c.fusions)
    methods += [m for m in fused if m not in scored]
    scored = fused
    start = tasks_lib.pretrained(task.model.path, task.model.dtype)[0]
    pool_target = tasks_lib.target_of(p.train.ids)
    query_target = tasks_lib.target_of(p.queries.ids)
    hooks = None
    out = []
    for t, (name, splits) in enumerate(zip(task.data.targets.tasks, p.targets)):
        val_cols = p.val_cols[query_target[p.val_cols] == t]
        in_task = np.flatnonzero(pool_target == t)
        picks: dict[str, np.ndarray] = {}  # name -> [seeds, k] pool rows
        for m in methods:
            picks[m] = np.tile(sel.select_top_k(scored[m], val_cols, c.k), (c.seeds, 1))
        for ref, candidates in (("random", np.arange(len(p.train))), ("in-task", in_task)):
            if ref in c.references:
                picks[ref] = np.stack([sel.draw(candidates, c.k, [c.seed, t, s, len(ref)]) for s in range(c.seeds)])
        test = splits["test"]
        # one store per row, keyed by what its fine-tunes depend on (not by the other rows, nor by
        # `methods` / `references` / `n_boot`): a method added later fine-tunes only its own picks
        common = ["exact, accuracy, loss", to_dict(c.finetune), to_dict(task.tune), p.train.content_hash(),
                  test.content_hash(), models.param_digest(start)]
        seeds = c.seed + np.arange(c.seeds)
        caches = {m: run_dir / "data_selection" / (f"{_file_stem(name)}-{_file_stem(m)}-"
                                                    f"{store.fingerprint([*common, store.digest([v.astype(np.int32), seeds])])[:12]}.npz")
                  for m, v in picks.items()}
        todo = [m for m in picks if not caches[m].exists()]
        if todo:
            if hooks is None:
                hooks = train_lib.hook_states(start, task.tune, p.train)
            log.info("[%s] data selection %s: fine-tune %d models on %d records each (%s)", cell or cfg.name, name,
                     len(todo) * c.seeds, c.k, ", ".join(todo))
            idx = np.concatenate([picks[m] for m in todo]).astype(np.int32)
            tuned = train_lib.finetune_many(start, p.train, idx, np.tile(seeds, len(todo)), c.finetune, task.tune,
                                            progress=progress, desc=f"select {name}", hooks=hooks)
            test_hooks = train_lib.hook_states(start, task.tune, test, like=hooks)
            exact_MxT, acc_MxT = tuned.greedy_match(test, hooks=test_hooks)
            loss_MxT = tuned.eval_losses(test, hooks=test_hooks)
            for i, m in enumerate(todo):
                part = slice(i * c.seeds, (i + 1) * c.seeds)
                caches[m].parent.mkdir(parents=True, exist_ok=True)
                store.save_npz(caches[m], {"exact": exact_MxT[part], "acc": acc_MxT[part], "loss": loss_MxT[part]})
        z = {m: store.load_npz(caches[m]) for m in picks}
        exact, acc, loss = ({m: z[m][k] for m in picks} for k in ("exact", "acc", "loss"))
        if "pretrained" in c.references:
            e0, a0 = train_lib.greedy_match(start, test)
            tile = lambda a: np.tile(a, (c.seeds, 1))
            exact["pretrained"], acc["pretrained"] = tile(e0), tile(a0)
            loss["pretrained"] = tile(train_lib.eval_loss(start, test))
        out.append({"cell": cell, "target": name, "k": c.k, "pool": len(p.train), "in_task_records": len(in_task),
                    "val_queries": len(val_cols), "test_records": len(test),
                    "in_task_fraction": {m: float((pool_target[v] == t).mean()) for m, v in picks.items()},
                    "exact_match": sel.bootstrap_means(exact, n_boot=c.n_boot),
                    "token_accuracy": sel.bootstrap_means(acc, n_boot=c.n_boot),
                    "loss": sel.bootstrap_means(loss, n_boot=c.n_boot),
                    "hits": {m: np.asarray(v, np.int8).tolist() for m, v in exact.items()},
                    "losses": {m: np.round(np.asarray(v, np.float64), 5).tolist() for m, v in loss.items()}})
        log.info("[%s] data selection %s: %s", cell or cfg.name, name,
                 ", ".join(f"{m} {r['mean']:.3f}" for m, r in out[-1]["exact_match"].items()))
    return out


def _counterfactual(p: tasks_lib.Prepared, cfg: ExperimentConfig, cell: str, scored: dict[str, np.ndarray],
                    run_dir: Path, results_dir: Path) -> dict[str, Any]:
    c = cfg.counterfactual
    cols = p.test_cols[: c.n_queries]
    names = [m for m in (c.methods or list(scored)) if m in scored and m != "random"]
    n = len(p.train)
    ks = c.ks or tuple(sorted({int(round(k)) for k in np.geomspace(max(1, round(0.01 * n)),
                                                                     min(n // 3, n - p.train_cfg.batch_size), 6)}))
    key = store.fingerprint([to_dict(c), names, list(ks)] + [store.digest([scored[m][:, cols]]) for m in names])
    cache = run_dir / f"counterfactual_{key[:12]}.npz"
    if cache.exists():
        res = cf_lib.CounterfactualResult.load(cache)
    else:
        res = cf_lib.counterfactual_removal(p.model.cfg, p.train_cfg, p.train, p.queries[cols],
                                            {m: scored[m][:, cols] for m in names}, ks, n_seeds=c.n_seeds,
                                            seed=c.seed)
        res.save(cache)
    png = cf_lib.plot_counterfactual(res, results_dir / f"{cfg.name}_counterfactual_{cell or 'task'}.png",
                                     title=f"{cell or cfg.name}: remove top-k, retrain ({len(cols)} test queries, "
                                           f"{c.n_seeds} seeds)")
    return {"cell": cell, **res.to_dict(), "png": png.name}


def _cost_n(cfg: ExperimentConfig, out: Path, progress: bool) -> list[dict[str, Any]]:
    c = cfg.cost_n
    cell = c.cell or cfg.cell_names()[0]
    specs = [m for m in cfg.methods_in(cell) if not c.methods or m.name in c.methods]
    rows = []
    for per_source in c.train_per_source:
        task = cfg.task_for(cell, train_per_source=per_source)
        run_dir = out / "cost_n" / f"{cell or 'task'}-{per_source}"
        store.check_writable_dir(run_dir)
        tasks_lib.load(task, run_dir, progress=progress)  # base model, once
        for spec in specs:
            res = runner.run_method(task, run_dir, spec, cfg.stride_for(cell, spec), isolate=cfg.isolate,
                                    progress=progress)
            if res is None:
                continue
            _, rec = res
            rows.append({"cell": cell, "method": spec.name, "n": rec["n_train"], "n_queries": rec["n_queries"],
                         "seconds": rec["seconds"],
                         **{k: rec[k] for k in ("peak_memory_bytes", "load_memory_bytes") if k in rec}})
            log.info("[cost n=%d] %s %.1f s", rec["n_train"], spec.name, rec["seconds"]["total"])
    return rows


def _earlier(results_dir: Path, name: str) -> dict[str, Any] | None:
    """The results file's previous version (its command from the markdown where the json has none)."""
    path = results_dir / f"{name}.json"
    if not path.exists():
        return None
    earlier = store.read_json(path)
    md = results_dir / f"{name}.md"
    if not earlier.get("command") and md.exists():
        for line in md.read_text().splitlines():
            if line.startswith("Command: `"):
                earlier["command"] = line.split("`")[1]
                break
    return earlier


def preflight(cfg: ExperimentConfig, methods: Collection[str] | None = None) -> dict[str, tasks_lib.TaskData]:
    """Each cell's data, after every check that needs the data and the model's shape but no
    training (`tasks.check`: K <= n d, hook layers within the depth, batch sizes, ...) passed for
    the STRIDE configs and hook layers of the method rows that will run (`methods`: all if None)."""
    import dataclasses

    out = {}
    for cell in cfg.cell_names():
        task = cfg.task_for(cell)
        stride_cfgs, steerings = [], []
        for spec in cfg.methods_in(cell):
            if methods is not None and spec.name not in methods:
                continue
            if spec.kind == "stride":
                stride_cfgs.append(cfg.stride_for(cell, spec))
            elif spec.kind == "repr-sim":
                steer = cfg.stride_for(cell, spec).steering
                if spec.params.get("layer") is not None:
                    steer = dataclasses.replace(steer, layer=spec.params["layer"], depth_fraction=None)
                steerings.append(steer)
        out[cell] = tasks_lib.task_data(task)
        try:
            tasks_lib.check(task, out[cell], stride_cfgs, steerings)
        except ValueError as e:
            raise type(e)(f"[{cell or cfg.name}] {e}") from e
    return out


def check_methods(cfg: ExperimentConfig, methods: Collection[str]) -> list[str]:
    """`methods` (names of `cfg`'s method rows; "stride" for every STRIDE select group, "stride-<group>"
    for one group), checked."""
    groups = list(cfg.select.groups) if cfg.select is not None else []
    known = ([report_lib.VARIANT_ROWS, *(report_lib.group_row(g) for g in groups if g)]
             if cfg.all_variants() else []) + [m.name for m in cfg.methods]
    names = [m.strip() for m in methods if m.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"--methods {','.join(methods)!r}: unknown method row(s) {unknown}; the config's: {known}")
    return names


def run(cfg: ExperimentConfig, out: str | Path, results_dir: str | Path | None = None, *, progress: bool = True,
        command: str = "", full: ExperimentConfig | None = None,
        methods: Collection[str] | None = None) -> dict[str, Any]:
    """Every stage of `cfg` (resuming from `out`); writes the report; returns it.

    `full`: the whole config when `cfg` runs some of its cells (`--cells`): the results file
    then keeps the other cells' entries from its previous version (ValueError if that was
    written by a different config), and says which run they come from.
    `methods`: run only these method rows ("stride": the STRIDE variants of every select group,
    "stride-<group>": one group's); the data, base
    model and ground truth are still made (or resumed). The results file keeps the other rows
    from its previous version. The entries derived from several methods (contamination, data
    selection, counterfactual removal) are recomputed when every other row's scores are stored
    in `out` for the same inputs, and kept from the results file otherwise; so are the
    qualitative examples unless all their methods ran.
    """
    if methods is not None:
        methods = set(check_methods(cfg, methods))
        full = full or cfg
    out = store.check_writable_dir(out, "output directory")
    results_dir = Path(results_dir) if results_dir is not None else out
    command = command or f"stride-jax run <config> --out {out}"
    t_start = time.perf_counter()
    earlier = _earlier(results_dir, cfg.name) if full is not None else None
    if earlier is not None:  # before hours of work, not when the results are written
        report_lib.check_earlier(earlier, full.to_dict())
    data = preflight(cfg, methods)
    with store.Lock(out):
        store.clean_leftovers(results_dir, older_than_s=600.0)  # a killed report write (another run's: minutes old)
        report: dict[str, Any] = {"rows": [], "variants": [], "selection": [], "cells": [], "counterfactual": [],
                                  "examples": [], "qualitative": [], "contamination": [], "data_selection": [],
                                  "config": cfg.to_dict()}
        prepared = {}
        for cell in cfg.cell_names():  # ground truth of every cell first: the long, resumable part
            log.info("[%s] data, base model and ground truth", cell or cfg.name)
            prepared[cell] = tasks_lib.prepare(cfg.task_for(cell), _cell_dir(out, cell), progress=progress,
                                               data=data.pop(cell))
        for cell, p in prepared.items():
            run_dir = _cell_dir(out, cell)
            task = p.task
            report["cells"].append({
                "cell": cell, **p.info, "prepare_seconds": {k: round(v, 1) for k, v in p.seconds.items()},
                "groundtruth": {str(a): to_dict(tasks_lib.groundtruth_config(task, a)) for a in tasks_lib.alphas(task)},
                "noise_ceiling": {str(a): p.noise_ceiling(cfg.split, a, cfg.n_boot) for a in tasks_lib.alphas(task)},
            })
            log.info("[%s] %s parameters, %d training examples, noise ceiling %s", cell or cfg.name,
                     f"{p.info['params']:,}", p.info["n_train"],
                     {a: report_lib.fmt_lds(c) for a, c in report["cells"][-1]["noise_ceiling"].items()})
            variant_rows, selection, chosen = _variants(p, cfg, cell, run_dir, progress, methods)
            report["variants"] += variant_rows
            report["selection"] += selection
            scored: dict[str, np.ndarray] = {}
            for name, (attr, rec) in chosen.items():
                scored[name] = attr.dense()
                report["rows"] += _lds_rows(p, cfg, cell, name, scored[name], rec)
            for spec in cfg.methods_in(cell):
                if methods is not None and spec.name not in methods:
                    continue
                res = runner.run_method(task, run_dir, spec, cfg.stride_for(cell, spec), isolate=cfg.isolate,
                                        progress=progress)
                if res is None:
                    continue
                attr, rec = res
                scored[spec.name] = attr.dense()
                rows = _lds_rows(p, cfg, cell, spec.name, scored[spec.name], rec)
                report["rows"] += rows
                log.info("[%s] %-14s LDS %s  %.1f s", cell or cfg.name, spec.name, report_lib.fmt_lds(rows[0]["lds"]),
                         rec["seconds"].get("total", 0.0))
            if cfg.qualitative is not None and (methods is None or set(cfg.qualitative.methods) <= methods):
                report["qualitative"] += _qualitative(p, cfg, cell, scored)
            if methods is not None:  # the entries derived from several methods need every row's scores
                others, missing = _stored_rows(cfg, cell, task, run_dir, methods)
                order = [*chosen, *(s.name for s in cfg.methods)]
                scored = {m: scored[m] if m in scored else others[m] for m in order if m in scored or m in others}
                if missing:
                    log.info("[%s] no stored scores of %s in %s: the data selection / counterfactual entries are "
                             "kept from the results file, and so is their contamination recall", cell or cfg.name,
                             missing, run_dir)
                    if cfg.contamination is not None:  # each method's recall is its own: the others' are recomputed
                        rows = [*(report_lib.group_row(g) for g in _cell_groups(cfg, cell)),
                                *(s.name for s in cfg.methods_in(cell)),
                                *_fusion_names(cfg.contamination.fuse, cfg.contamination.fusions)]
                        report["contamination"].append({**_contamination(p, cfg, cell, scored), "recall_rows": rows})
                    continue
            if cfg.contamination is not None:
                report["contamination"].append(_contamination(p, cfg, cell, scored))
            if cfg.data_selection is not None:
                report["data_selection"] += _data_selection(p, cfg, cell, scored, run_dir, progress)
            if cfg.counterfactual is not None:
                if not isinstance(task, ClassifierTask):
                    raise ValueError("counterfactual removal is implemented for classifier tasks")
                report["counterfactual"].append(_counterfactual(p, cfg, cell, scored, run_dir, results_dir))
            if cfg.show_examples and scored:
                name = "stride" if "stride" in scored else next(iter(scored))
                report["examples"] += _examples(p, cell, name, scored[name], cfg.show_examples)
        report["cost_n"] = _cost_n(cfg, out, progress) if cfg.cost_n is not None and methods is None else []
        report["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
        earlier = _earlier(results_dir, cfg.name) if full is not None else None  # again: another run may have written it
        if earlier is not None:
            report = report_lib.merge_earlier(report, earlier, full.to_dict(), methods)
        else:  # no results file to keep a missing row's contamination recall from
            report["contamination"] = [report_lib.recall_from_earlier(e, {}) for e in report["contamination"]]
        report_lib.write(report, results_dir, command)
        store.write_json(out / "config.json", cfg.to_dict())
    return report


__all__ = ["check_methods", "run"]
