"""Recovery benchmark: the working-set Lasso (`solve_lasso`) on planted problems at n >> K.

    python benchmarks/recovery.py            # n = 1e4 .. 1e7, Q = 1 / 50 / 500 (~15 min, 2 cores)
    python benchmarks/recovery.py --quick    # smoke run, < 1 minute (writes recovery_quick.*)

Problem (issue 11): left-d-regular design `left_regular_design(n, K=1000, d=10, seed=0)`; per
query a planted 50-sparse w (random rows, values +-U[1, 2]); y = M w + noise with noise std 1%
of the RMS of M w; lambda = 0.05 lambda_max(y). Every solve returns sparse scores.

Reported per (n, Q): run and compile seconds of one `solve_lasso` call (compile = XLA tracing,
lowering and backend compilation inside the call, from jax.monitoring; run = wall - compile),
peak resident memory while it ran (VmHWM after resetting it through /proc/self/clear_refs: the
whole process, design and data included, and that peak minus what was resident before),
FISTA iterations, working-set rounds, converged fraction (certified: gap <= tol), recall of the
planted support. Against scikit-learn (coordinate descent on a scipy CSR matrix, alpha =
lambda / K, no intercept) on a few queries per n, timed alternately with a one-query
`solve_lasso` in this process: objective gap and per-query time ratio. sklearn is given the
same stopping accuracy (its tol is a fraction of ||y||^2; we pass tol * P / ||y||^2). A layout
table times plain FISTA's batched [N, Q] gradient path against vmap of the one-query solver.
Writes results/recovery.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's stride_jax
from stride_jax import recovery
from stride_jax.design import left_regular_design
from stride_jax.recovery import LassoConfig, SparseScores, lambda_max, solve_lasso

K, D, K_SPARSE, NOISE, LAMBDA_FRAC = 1000, 10, 50, 0.01, 0.05
RESULTS = pathlib.Path(__file__).parent / "results"

_COMPILE_SECONDS = [0.0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: _COMPILE_SECONDS.__setitem__(0, _COMPILE_SECONDS[0] + secs)
    if event.startswith("/jax/core/compile/") else None)


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measured(fn):
    """(result, wall s, compile s, peak RSS GiB, peak above the start GiB) of fn()."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = _status_kib("VmRSS")
    compile0 = _COMPILE_SECONDS[0]
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return out, wall, _COMPILE_SECONDS[0] - compile0, peak / 2**20, (peak - rss0) / 2**20


def planted(design, n_queries: int, seed: int):
    """(y [Q, K] float32, support [Q, 50]): y = M w + 1% noise for 50-sparse w (+-U[1, 2])."""
    rng = np.random.default_rng(seed)
    n = design.n_examples
    support_QxS = np.stack([rng.choice(n, K_SPARSE, replace=False) for _ in range(n_queries)])
    values_QxS = rng.choice([-1.0, 1.0], support_QxS.shape) * rng.uniform(1, 2, support_QxS.shape)
    y_QxK = np.zeros((n_queries, K))
    rows = design.ids_NxS[support_QxS]  # [Q, 50, d]
    q_idx = np.broadcast_to(np.arange(n_queries)[:, None, None], rows.shape)
    np.add.at(y_QxK, (q_idx, rows), np.broadcast_to(values_QxS[:, :, None], rows.shape))
    y_QxK += NOISE * np.sqrt((y_QxK**2).mean(axis=1, keepdims=True)) * rng.normal(size=y_QxK.shape)
    return y_QxK.astype(np.float32), support_QxS


def recall(scores: SparseScores, support_QxS: np.ndarray) -> tuple[float, float]:
    """Mean over queries of |planted ∩ nonzeros| / 50 and |planted ∩ top-50 by |w|| / 50."""
    nonzero, top = [], []
    for q, planted_rows in enumerate(support_QxS):
        rows, values = scores.entries(q)
        nonzero.append(np.isin(planted_rows, rows).mean())
        top.append(np.isin(planted_rows, rows[np.argsort(-np.abs(values))[:K_SPARSE]]).mean())
    return float(np.mean(nonzero)), float(np.mean(top))


def csr_matrix(design):
    import scipy.sparse

    n, d = design.ids_NxS.shape
    return scipy.sparse.csr_matrix(
        (np.ones(n * d), (design.ids_NxS.reshape(-1), np.repeat(np.arange(n), d))), shape=(K, n))


def objective(m_csr, y_K, rows, values, l1reg) -> float:
    w = np.zeros(m_csr.shape[1])
    w[rows] = values
    r = y_K.astype(np.float64) - m_csr @ w
    return 0.5 * r @ r + l1reg * np.abs(w).sum()


def versus_sklearn(design, y_QxK, lam_Q, cfg, queries, log):
    """Alternately time sklearn and a one-query solve_lasso on each query; objective gaps."""
    from sklearn.linear_model import Lasso

    m_csr = csr_matrix(design)
    solve_lasso(y_QxK[:1], design, lam_Q[:1], cfg, sparse=True)  # compile the 1-query block
    rows = []
    for i, q in enumerate(queries):
        y, lam = y_QxK[q], float(lam_Q[q])

        def ours():
            t, c = time.perf_counter(), time.process_time()
            res = solve_lasso(y[None], design, lam_Q[q:q + 1], cfg, sparse=True)
            return res, time.perf_counter() - t, time.process_time() - c

        def theirs(tol):
            t, c = time.perf_counter(), time.process_time()
            model = Lasso(alpha=lam / K, fit_intercept=False, tol=tol, max_iter=100_000)
            model.fit(m_csr, y.astype(np.float64))
            return model, time.perf_counter() - t, time.process_time() - c

        first, _, _ = ours()
        # sklearn stops at gap <= tol ||y||^2; ours at gap <= cfg.tol P: give it the same bound
        sk_tol = cfg.tol * float(first.objective[0]) / float(y.astype(np.float64) @ y)
        timed = [ours(), theirs(sk_tol)] if i % 2 == 0 else [theirs(sk_tol), ours()][::-1]
        (res, our_wall, our_cpu), (model, sk_wall, sk_cpu) = timed
        rows_q, values_q = res.coef.entries(0)
        p_ours = objective(m_csr, y, rows_q, values_q, lam)
        p_sk = objective(m_csr, y, np.flatnonzero(model.coef_), model.coef_[model.coef_ != 0], lam)
        row = dict(query=int(q), ours_wall_s=our_wall, ours_cpu_s=our_cpu, sklearn_wall_s=sk_wall,
                   sklearn_cpu_s=sk_cpu, sklearn_epochs=int(model.n_iter_), sklearn_tol=sk_tol,
                   objective_ours=p_ours, objective_sklearn=p_sk,
                   objective_rel_diff=(p_ours - p_sk) / p_sk, ours_gap=float(res.gap[0]),
                   nnz_ours=int(res.n_nonzero[0]), nnz_sklearn=int((model.coef_ != 0).sum()),
                   same_support=bool(np.array_equal(rows_q, np.flatnonzero(model.coef_))))
        log(f"    sklearn q{q}: {sk_wall:.2f} s ({row['sklearn_epochs']} epochs) vs ours "
            f"{our_wall:.3f} s; objective (ours - sk) / sk = {row['objective_rel_diff']:.2e}")
        rows.append(row)
    return rows


def layout_table(n: int, n_queries: int, n_iter: int, repeats: int):
    """CPU seconds of n_iter plain-FISTA iterations: [N, Q] layout vs vmap of fista_solve."""
    design = left_regular_design(n, K, D, seed=0)
    ids = jnp.asarray(design.ids_NxS)
    y_QxK, _ = planted(design, n_queries, seed=1)
    lam_Q = jnp.asarray(LAMBDA_FRAC * np.asarray(lambda_max(y_QxK, design)))
    cfg = recovery.FistaConfig(max_iter=n_iter, tol=0.0)
    lip = design.lipschitz()
    y = jnp.asarray(y_QxK)
    nq = lambda: recovery._fista_batch(y, ids, lam_Q, lip, jnp.zeros((n, n_queries)), cfg=cfg,  # noqa: E731
                                       n_subsets=K).coef
    solve = functools.partial(recovery.fista_solve, cfg=cfg, n_subsets=K)
    vm_jit = jax.jit(lambda y, lam: jax.vmap(solve, in_axes=(0, None, 0, None))(y, ids, lam, lip).coef)
    vm = lambda: vm_jit(y, lam_Q)  # noqa: E731
    # the gradient M^T (M Z - Y) alone, in both layouts (vmap uses the custom matvec rule)
    z_NxQ = jnp.asarray(np.random.default_rng(2).normal(size=(n, n_queries)), jnp.float32)
    grad_nq_jit = jax.jit(lambda z: recovery._operand_rmatvec(
        ids, K, recovery._operand_matvec(ids, K, z) - y.T))
    grad_vm_jit = jax.jit(jax.vmap(lambda z, y_K: recovery._operand_rmatvec(
        ids, K, recovery._operand_matvec(ids, K, z) - y_K), in_axes=(1, 0), out_axes=1))
    fns = {"NxQ": nq, "vmap": vm, "grad_NxQ": lambda: grad_nq_jit(z_NxQ),
           "grad_vmap": lambda: grad_vm_jit(z_NxQ, y)}
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):  # alternate
        for name, fn in fns.items():
            c = time.process_time()
            jax.block_until_ready(fn())
            times[name].append(time.process_time() - c)
    np.testing.assert_allclose(np.asarray(nq()), np.asarray(vm()).T, atol=1e-4)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return dict(n=n, Q=n_queries, iterations=n_iter, cpu_s_NxQ=med["NxQ"], cpu_s_vmap=med["vmap"],
                vmap_over_NxQ=med["vmap"] / med["NxQ"], grad_cpu_s_NxQ=med["grad_NxQ"],
                grad_cpu_s_vmap=med["grad_vmap"],
                grad_vmap_over_NxQ=med["grad_vmap"] / med["grad_NxQ"], repeats=repeats)


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                  if line.startswith("Model name")), platform.processor())
    mem_kib = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
    return dict(cpu=model, cores=os.cpu_count(), memory_gib=round(mem_kib / 2**20, 1),
                python=platform.python_version(), jax=jax.__version__, numpy=np.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for q in sorted({r["Q"] for r in runs}):
        rs = sorted((r for r in runs if r["Q"] == q), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        ax_t.plot(ns, [r["run_s"] for r in rs], "o-", label=f"Q={q} run")
        ax_t.plot(ns, [r["compile_s"] for r in rs], "x:", color=ax_t.lines[-1].get_color(),
                  label=f"Q={q} compile")
        ax_m.plot(ns, [r["peak_rss_gib"] for r in rs], "o-", label=f"Q={q}")
    sk = sorted((r for r in runs if r.get("sklearn")), key=lambda r: r["n"])
    if sk:
        ax_t.plot([r["n"] for r in sk], [np.mean([s["sklearn_wall_s"] for s in r["sklearn"]])
                                         for r in sk], "s--k", label="sklearn, 1 query")
    for ax, label in ((ax_t, "seconds"), (ax_m, "peak RSS of the process (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (training examples), K = 1000, d = 10")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_title("solve_lasso on planted 50-sparse truths")
    ax_m.set_title("peak memory during the solve")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        "# Recovery benchmark: `solve_lasso` at n >> K",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, "
        f"jax {m['jax']}; {m['date']}.  ",
        f"Load average (1, 5, 15 min) at start {report['load_start']}, at end {report['load_end']}"
        " (the machine is shared; ratios of runs alternated in one process are the robust numbers).",
        "",
        f"Problem: `left_regular_design(n, K={K}, d={D}, seed=0)`, planted {K_SPARSE}-sparse w "
        f"(values +-U[1, 2]), y = M w + noise (std {NOISE:.0%} of RMS(M w)), lambda = "
        f"{LAMBDA_FRAC} lambda_max. Solver: `solve_lasso(y, design, lambda, {cfg}, sparse=True)`.",
        "",
        "| n | Q | run s | compile s | s / query | peak RSS GiB (above start) | FISTA iters mean / max "
        "| rounds mean / max | converged | max gap | recall (nonzeros) | recall (top-50) | nnz mean "
        "| sklearn / ours, one query each, alternated (wall; CPU) | sklearn per query / ours per "
        "query in this batch (wall) | objective (ours - sk) / sk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        sk = r.get("sklearn") or []
        ratio = (f"{np.mean([s['sklearn_wall_s'] / s['ours_wall_s'] for s in sk]):.1f}x; "
                 f"{np.mean([s['sklearn_cpu_s'] / s['ours_cpu_s'] for s in sk]):.1f}x"
                 if sk else "")
        gap = (f"{max(abs(s['objective_rel_diff']) for s in sk):.1e} (max abs, {len(sk)} queries)"
               if sk else "")
        batch_ratio = (f"{np.mean([s['sklearn_wall_s'] for s in sk]) / (r['run_s'] / r['Q']):.0f}x"
                       if sk else "")
        lines.append(
            f"| {r['n']:.0e} | {r['Q']} | {r['run_s']:.2f} | {r['compile_s']:.1f} | "
            f"{r['run_s'] / r['Q']:.3f} | {r['peak_rss_gib']:.2f} ({max(r['peak_above_start_gib'], 0.0):.2f}) | "
            f"{r['n_iter_mean']:.0f} / {r['n_iter_max']} | {r['n_outer_mean']:.1f} / {r['n_outer_max']} | "
            f"{r['converged']:.3f} | {r['gap_max']:.1e} | {r['recall_nonzero']:.3f} | "
            f"{r['recall_top']:.3f} | {r['nnz_mean']:.0f} | {ratio} | {batch_ratio} | {gap} |")
    target = next((r for r in report["runs"] if r["n"] == 10**6 and r["Q"] == 500), None)
    if target and target.get("sklearn"):
        sk = target["sklearn"]
        total = target["run_s"] + target["compile_s"]
        one = np.mean([s["sklearn_wall_s"] / s["ours_wall_s"] for s in sk])
        lines += ["", f"Issue 11 targets at n = 1e6, K = 1000, Q = 500: converged "
                  f"{target['converged']:.3f} in {total:.1f} s ({target['run_s']:.1f} s run + "
                  f"{target['compile_s']:.1f} s compile; target <= 60 s); per query "
                  f"{one:.1f}x faster than scikit-learn one query against one, "
                  f"{np.mean([s['sklearn_wall_s'] for s in sk]) / (target['run_s'] / 500):.0f}x "
                  f"batched (target >= 2x); recall {target['recall_nonzero']:.3f} (target >= 0.95)."]
    lines += ["", "sklearn rows (alternated with a one-query `solve_lasso`; wall seconds):", "",
              "| n | query | sklearn s | epochs | ours s (Q=1) | objective (ours - sk) / sk | our gap "
              "| nnz ours / sk | same support |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        for s in r.get("sklearn") or []:
            lines.append(f"| {r['n']:.0e} | {s['query']} | {s['sklearn_wall_s']:.2f} | "
                         f"{s['sklearn_epochs']} | {s['ours_wall_s']:.3f} | "
                         f"{s['objective_rel_diff']:.1e} | {s['ours_gap']:.1e} | {s['nnz_ours']} / "
                         f"{s['nnz_sklearn']} | {s['same_support']} |")
    if report.get("layout"):
        lay = report["layout"]
        lines += ["", f"Plain FISTA ({lay['iterations']} iterations, n = {lay['n']:.0e}, Q = "
                  f"{lay['Q']}, median CPU s of {lay['repeats']} alternated runs): [N, Q] layout "
                  f"{lay['cpu_s_NxQ']:.2f} s, vmap of `fista_solve` {lay['cpu_s_vmap']:.2f} s, "
                  f"ratio vmap / [N, Q] = {lay['vmap_over_NxQ']:.2f}. The gradient "
                  f"M^T (M Z - Y) alone: {lay['grad_cpu_s_NxQ']:.3f} s vs "
                  f"{lay['grad_cpu_s_vmap']:.3f} s, ratio {lay['grad_vmap_over_NxQ']:.2f}; the rest "
                  "of an iteration (prox, momentum, restart test, per-query freezing) is "
                  "elementwise work on [N, Q] that costs the same in both layouts."]
    lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def write(report, stem: pathlib.Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report["runs"], stem.with_suffix(".png"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 minute)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 50, 500])
    parser.add_argument("--sklearn-queries", type=int, default=3,
                        help="queries per n compared with scikit-learn (2 at n >= 1e7)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.sklearn_queries = [1e4], [1, 8], 1
    cfg = LassoConfig()
    log = functools.partial(print, flush=True)
    report = dict(command="python benchmarks/recovery.py " + " ".join(argv or sys.argv[1:]),
                  machine=machine(), load_start=[round(x, 2) for x in os.getloadavg()],
                  config=repr(cfg), runs=[], notes=[])
    log(report["machine"], "load", report["load_start"])
    for n in map(int, args.sizes):
        t0 = time.perf_counter()
        design = left_regular_design(n, K, D, seed=0)
        log(f"n={n:.0e}: design {time.perf_counter() - t0:.1f} s")
        y_QxK, support_QxS = planted(design, max(args.queries), seed=1)
        lam_Q = LAMBDA_FRAC * np.asarray(lambda_max(y_QxK, design))
        for q in args.queries:
            res, wall, comp, peak, above = measured(
                lambda: solve_lasso(y_QxK[:q], design, lam_Q[:q], cfg, sparse=True))
            rec_nonzero, rec_top = recall(res.coef, support_QxS[:q])
            run = dict(n=n, Q=q, run_s=wall - comp, compile_s=comp, wall_s=wall, peak_rss_gib=peak,
                       peak_above_start_gib=above, n_iter_mean=float(res.n_iter.mean()),
                       n_iter_max=int(res.n_iter.max()), n_outer_mean=float(res.n_outer.mean()),
                       n_outer_max=int(res.n_outer.max()), converged=float(res.converged.mean()),
                       gap_max=float(res.gap.max()), recall_nonzero=rec_nonzero, recall_top=rec_top,
                       nnz_mean=float(res.n_nonzero.mean()), nnz_max=int(res.n_nonzero.max()))
            log(f"  Q={q}: run {run['run_s']:.2f} s + compile {comp:.1f} s, peak {peak:.2f} GiB, "
                f"converged {run['converged']:.3f}, recall {rec_nonzero:.3f}/{rec_top:.3f}, "
                f"rounds {run['n_outer_mean']:.1f}/{run['n_outer_max']}, nnz {run['nnz_mean']:.0f}")
            report["runs"].append(run)
        n_sk = min(args.sklearn_queries, 2 if n >= 10**7 else args.sklearn_queries)
        if n_sk:
            report["runs"][-1]["sklearn"] = versus_sklearn(design, y_QxK, lam_Q, cfg,
                                                           list(range(n_sk)), log)
        del design
    log("layout table")
    report["layout"] = (layout_table(10**4, 8, 50, 3) if args.quick
                        else layout_table(10**5, 64, 100, 5))
    log(report["layout"])
    report["load_end"] = [round(x, 2) for x in os.getloadavg()]
    report["notes"] += [
        "run s = wall seconds of the call minus its compile seconds (tracing + lowering + XLA "
        "compilation inside the call, summed from jax.monitoring events); one compile per query "
        "block size and working-set width, so Q = 1, 50 and 500 each compile their own.",
        "peak RSS = VmHWM of the whole process while the call ran, after resetting it through "
        "/proc/self/clear_refs (includes Python, JAX, the design and y); in parentheses the "
        "peak minus the RSS at the call's start.",
        "converged = certified: relative duality gap <= tol; recall (nonzeros) = mean over "
        "queries of the fraction of the 50 planted rows that are nonzero in the solution; "
        "recall (top-50) = fraction among the 50 largest |w|.",
        "sklearn: `Lasso(alpha=lambda/K, fit_intercept=False, tol=cfg.tol * P(w_ours) / "
        "||y||^2)` on a scipy CSR matrix (the same stopping bound on the gap as ours), one "
        "thread; ours: `solve_lasso` on that single query (compiled beforehand), both timed "
        "alternately in this process. Ratios use wall seconds (ours uses both cores) and, after "
        "the semicolon, CPU seconds.",
        "Every solve returns `SparseScores` (sparse=True): dense [N, Q] float32 scores at "
        "n = 1e7, Q = 500 would be 20 GB, more than this machine has; the solver itself holds "
        "O(block x 64 + Q x width) floats besides the design's ids (the peak RSS column).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("recovery_quick" if args.quick else "recovery")
    write(report, stem)
    log(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
