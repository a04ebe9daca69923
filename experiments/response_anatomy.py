"""Why do STRIDE's real responses fall short? Their anatomy per cell and K, from stored measurements.

oracle_recovery.py showed that responses additive in EK-FAC's scores (y = M w_ekfac) would keep
97-100% of EK-FAC's test LDS through STRIDE's own designs at K = 2n; STRIDE's real responses keep
less, and less in a larger pool. This script takes the responses the sweep recovered from (the
stored `measure_<queries>.npz` and `reference_<P>.npz` of each fit, transformed by the library's
own `measure.responses`: log space, operators centred on the fit-time reference, queries centred;
an ensemble's members averaged by `measure.average`, as `sweep.run_variants` does) and, for every
query over the K operators, reports

1. var(y[q, :]);
2. the additive part: a lightly ridge-regularised least-squares fit y ~ M w + c (intercept c;
   min ||y - M w - c||^2 + lambda ||w||^2, lambda = --ridge, default 0.1 against diag(M^T M) = d =
   10), its R^2, the chance R^2 of the same fit to y permuted across operators (one permutation per
   query: what the fit gets from noise; ~ n/K for exact least squares) and the excess
   (R^2 - chance) / (1 - chance);
3. fit noise, where a second fit of the same subsets exists (groups "K=2n x2" / "K=4n x2": member 1
   = fit seed 1): var(y0 - y1) / 2 over var(y0) (for an ensemble entry, whose y is the members'
   mean, var(y0 - y1) / 4 over var(y)), the correlation of y0 with y1 across operators, and the
   share of var(y) that is reproducible but not additive, (1 - R^2) - noise (1 - chance R^2);
4. alignment with EK-FAC: the correlation across operators of y with y_oracle = M w_ekfac (centred
   per query, oracle_recovery.subset_sums), also of the raw log responses (centred per query only,
   no operator centring) with y_oracle, and the correlation across examples of the additive
   solution w_hat (step 2) with w_ekfac.

Medians over queries with the 25-75% range; test queries in the markdown, validation too in the
json. As a check that the responses are the ones the sweep recovered from, `--check` re-runs the
Lasso variant (the group's own recovery settings) on them for the cell's first group and compares
its validation LDS with the one the results file stores. No fit runs; no store is written.

    nice -n 19 env PYTHONPATH=. python experiments/response_anatomy.py experiments/configs/nk_regime.yaml \
        --out runs/nk --cells 0.2M-n768,0.2M-n3072,2.2M-n768,0.2M-n12288

Writes `<results>/response_anatomy.json` (entries keyed by config, cell and group, merged with
earlier ones) and `response_anatomy.md`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.sparse
from oracle_recovery import earlier_entries, subset_sums, test_lds_rows

from stride_jax import Attribution, store
from stride_jax.attribution import recover
from stride_jax.config import StrideConfig, merge
from stride_jax.design import Design, left_regular_design
from stride_jax.harness import load_config, sweep, tasks
from stride_jax.harness import report as report_lib
from stride_jax.measure import Measurement, Reference, average, raw_responses, responses

GROUPS = "K=n,K=2n,K=4n,K=2n x2,K=4n x2"
METRICS = {  # name: what the markdown calls it
    "r2": "R^2 additive", "r2_chance": "chance R^2", "r2_excess": "excess R^2", "noise": "noise share",
    "r_seeds": "r(y0, y1)", "nonadditive": "reproducible non-additive", "r_oracle": "r(y, M w_ekfac)",
    "r_oracle_raw": "r(raw y, M w_ekfac)", "r_w": "r(w_hat, w_ekfac)"}


def group_configs(cfg, cell: str, n: int, groups: list[str]) -> dict[str, StrideConfig]:
    """{group: resolved config} of `groups` for `cell`, resolved as the harness resolves them
    (oracle_recovery.cell_ks: group and cell overrides merged, then `sweep.variant_configs`);
    groups the cell leaves out or the config lacks are skipped."""
    cell_cfg = next(c for c in cfg.cells if c.name == cell)
    out = {}
    for group in groups:
        if group not in cfg.select.groups or (group in cell_cfg.groups and cell_cfg.groups[group] is None):
            continue
        settings = merge(cfg.select.groups[group] or {}, cell_cfg.groups.get(group) or {})
        resolved = sweep.variant_configs(cfg.stride_for(cell), {"": {}}, settings, n_train=n)[""]
        if not isinstance(resolved, str):
            out[group] = resolved
    return out


def member_dirs(group_dir: Path, cfg: StrideConfig) -> list[Path]:
    """The fit folder of each single fit of `cfg` (`sweep._member_fits`: `<group>/<fit key>`; a
    `Stride.fit` ensemble keeps member i > 0 in `member<i>` of member 0's folder instead)."""
    out = []
    for i, member in enumerate(cfg.ensemble_members()):
        d = group_dir / sweep.fit_key(member)
        if not d.exists() and i > 0 and (out[0] / f"member{i}").exists():
            d = out[0] / f"member{i}"
        if not d.exists():
            raise FileNotFoundError(f"no fit of {group_dir.name!r} member {i} at {d}")
        out.append(d)
    return out


def load_fit(fit_dir: Path, cfg: StrideConfig, design: Design, train, queries) -> tuple[Measurement, Reference]:
    """The stored query measurement and fit-time reference of one fit (after checking that the fit
    was made on this pool and this design, in this measurement space)."""
    ident = store.read_json(fit_dir / store.IDENTITY_FILE)
    if ident["design"] != design.fingerprint() or ident["data"] != train.content_hash():
        raise ValueError(f"{fit_dir} was fitted on another design or pool")
    mc = cfg.measure
    if ident["measure"] != {"space": mc.space, "loss_floor": mc.loss_floor}:
        raise ValueError(f"{fit_dir} was measured as {ident['measure']}, the config says {mc.space} / {mc.loss_floor}")
    suffix = "" if mc.mode == "exact" else f"_{mc.mode}"  # the file names of sweep._measurement / Stride._reference
    z = store.load_npz(fit_dir / f"measure_{queries.content_hash()[:16]}{suffix}.npz")
    m = Measurement(z["base"], z["steered"])
    n_ref = min(mc.n_reference, len(train))
    r = store.load_npz(fit_dir / (f"reference_{n_ref}.npz" if mc.mode == "exact" else f"reference_{n_ref}_{mc.mode}.npz"))
    member_PxK = np.zeros((len(r["rows"]), design.n_subsets), bool)
    member_PxK[np.arange(len(r["rows"]))[:, None], design.ids_NxS[r["rows"]]] = True
    return m, Reference(Measurement(r["base"], r["steered"]), member_PxK)


def group_responses(fits: list[tuple[Measurement, Reference]], cfg: StrideConfig) -> np.ndarray:
    """y [Q, K] as the sweep recovers from it: one fit's `responses`, or the members' measurements
    and references averaged first (`sweep.run_variants`, `Stride.from_members`)."""
    if len(fits) == 1:
        m, ref = fits[0]
    else:
        m = average([f[0] for f in fits], cfg.measure)
        ref = Reference(average([f[1].measurement for f in fits], cfg.measure), fits[0][1].member_PxK)
    return responses(m, cfg.measure, reference=ref).astype(np.float64)


class AdditiveFit:
    """Ridge least squares y ~ M w + c per query: w = (Mc^T Mc + lambda I)^-1 Mc^T y with Mc = M
    less its column means over operators (the intercept's elimination), factored once per design."""

    def __init__(self, design: Design, ridge: float):
        n, d = design.ids_NxS.shape
        self.m_KxN = scipy.sparse.csr_matrix(
            (np.ones(n * d), (design.ids_NxS.ravel(), np.repeat(np.arange(n), d))), shape=(design.n_subsets, n))
        self.mean_N = np.asarray(self.m_KxN.mean(axis=0)).ravel()
        gram_NxN = (self.m_KxN.T @ self.m_KxN).toarray()
        for start in range(0, n, 1024):  # Mc^T Mc = M^T M - K m m^T, in row blocks (no second n x n array)
            gram_NxN[start:start + 1024] -= design.n_subsets * np.outer(self.mean_N[start:start + 1024], self.mean_N)
        gram_NxN[np.diag_indices(n)] += ridge
        # symmetric: its transpose is the Fortran-ordered array LAPACK factors in place
        self.chol = scipy.linalg.cho_factor(gram_NxN.T, overwrite_a=True, check_finite=False)

    def fit(self, y_QxK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(w [N, Q], R^2 [Q]) of the ridge fit of each query's responses (rows of y)."""
        yc_QxK = y_QxK - y_QxK.mean(axis=1, keepdims=True)
        w_NxQ = scipy.linalg.cho_solve(self.chol, np.asarray(self.m_KxN.T @ yc_QxK.T), check_finite=False)
        fitted_KxQ = self.m_KxN @ w_NxQ - self.mean_N @ w_NxQ  # Mc w
        r2_Q = 1 - ((yc_QxK.T - fitted_KxQ) ** 2).sum(axis=0) / (yc_QxK ** 2).sum(axis=1)
        return w_NxQ, r2_Q


def row_corr(a_QxK: np.ndarray, b_QxK: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b`."""
    a = a_QxK - a_QxK.mean(axis=1, keepdims=True)
    b = b_QxK - b_QxK.mean(axis=1, keepdims=True)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def anatomy(y_QxK: np.ndarray, fit: AdditiveFit, y_oracle_QxK: np.ndarray, raw_QxK: np.ndarray,
            ref_NxQ: np.ndarray, seed: int, noise_Q: np.ndarray | None, r_seeds_Q: np.ndarray | None) -> dict:
    """Per-query metrics (module docstring) of responses y [Q, K]."""
    rng = np.random.default_rng(seed)
    w_NxQ, r2 = fit.fit(y_QxK)
    perm = np.stack([y[rng.permutation(len(y))] for y in y_QxK])
    _, chance = fit.fit(perm)
    out = {"var": y_QxK.var(axis=1), "r2": r2, "r2_chance": chance, "r2_excess": (r2 - chance) / (1 - chance),
           "r_oracle": row_corr(y_QxK, y_oracle_QxK),
           "r_oracle_raw": row_corr(raw_QxK - raw_QxK.mean(axis=1, keepdims=True), y_oracle_QxK),
           "r_w": row_corr(w_NxQ.T, ref_NxQ.T)}
    if noise_Q is not None:
        out.update(noise=noise_Q, r_seeds=r_seeds_Q, nonadditive=(1 - r2) - noise_Q * (1 - chance))
    return out


def summarise(per_query: dict[str, np.ndarray], cols: np.ndarray) -> dict[str, dict[str, float]]:
    """{metric: median, q25, q75, mean} over the queries `cols`."""
    out = {}
    for name, v in per_query.items():
        v = np.asarray(v, np.float64)[cols]
        q25, med, q75 = np.nanquantile(v, [0.25, 0.5, 0.75])
        out[name] = {"median": float(med), "q25": float(q25), "q75": float(q75), "mean": float(np.nanmean(v))}
    return out


def check_lasso(p, y_QxK: np.ndarray, design: Design, cfg: StrideConfig, config_name: str, cell: str, group: str,
                results: Path, n_boot: int) -> dict:
    """Validation LDS of the Lasso variant recovered from `y`, beside the one the results file stores."""
    attr, _ = recover(y_QxK.astype(np.float32), design, cfg.recovery, train_ids=p.train.ids)
    path = results / f"{config_name}.json"
    stored = [r for r in (json.loads(path.read_text()).get("variants", []) if path.exists() else [])
              if r["cell"] == cell and r["group"] == group and r["variant"] == "lasso" and r.get("lds_val")]
    return {"group": group, "variant": "lasso", "val_lds_here": p.lds(attr.dense(), "val", None, n_boot)["mean"],
            "val_lds_stored": stored[-1]["lds_val"]["mean"] if stored else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="the run's folder (its cells' stores)")
    ap.add_argument("--cells", required=True, help="comma-separated cells")
    ap.add_argument("--groups", default=GROUPS, help="comma-separated select groups")
    ap.add_argument("--reference", default="ekfac", help="the method whose scores stand for the truth")
    ap.add_argument("--ridge", type=float, default=0.1, help="lambda of the additive fit")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the Lasso re-recovery check")
    ap.add_argument("--results", default="experiments/results")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    results = Path(args.results)
    path = results / "response_anatomy.json"
    entries = earlier_entries(path)
    command = "nice -n 19 env PYTHONPATH=. python experiments/response_anatomy.py " + " ".join(
        shlex.quote(a) for a in (argv or sys.argv[1:]))
    lds_rows = test_lds_rows(results, cfg.name)
    machine = report_lib.machine()
    for cell in args.cells.split(","):
        t_cell = time.perf_counter()
        run_dir = Path(args.out) / cell
        p = tasks.prepare(cfg.task_for(cell), run_dir, groundtruth=args.check)
        ref_attr = Attribution.load(run_dir / "methods" / args.reference / "scores")
        if not (np.array_equal(ref_attr.train_ids, p.train.ids) and np.array_equal(ref_attr.query_ids, p.queries.ids)):
            raise ValueError(f"{args.reference}'s scores in {run_dir} are not over this cell's pool and queries")
        ref_NxQ = ref_attr.dense().astype(np.float64)
        n = len(p.train)
        configs = group_configs(cfg, cell, n, args.groups.split(","))
        configs = dict(sorted(configs.items(), key=lambda gc: (gc[1].design.n_subsets, gc[1].fit.ensemble)))
        fits, designs, additive = {}, {}, {}  # by fit folder / K
        for i, (group, gcfg) in enumerate(configs.items()):
            t0 = time.perf_counter()
            k, d = gcfg.design.n_subsets, gcfg.design
            if k not in designs:
                designs[k] = left_regular_design(n, k, d.per_example, d.seed)  # the design STRIDE's fit drew
            if k not in additive:
                additive.clear()  # one factorisation in memory at a time (groups come sorted by K)
                additive[k] = AdditiveFit(designs[k], args.ridge)
            design = designs[k]
            dirs = member_dirs(run_dir / "sweep" / group, gcfg)
            for fd in dirs:
                if fd.resolve() not in fits:
                    fits[fd.resolve()] = load_fit(fd, gcfg, design, p.train, p.queries)
            members = [fits[fd.resolve()] for fd in dirs]
            y = group_responses(members, gcfg)
            # a second fit of these subsets: this ensemble's own, or member 1 of the ensemble group whose member 0
            # has this fit's settings (its fit key; a fit is deterministic in them)
            second = dirs[1] if len(dirs) > 1 else next(
                (member_dirs(run_dir / "sweep" / g, c)[1] for g, c in configs.items()
                 if c.fit.ensemble == 2 and sweep.fit_key(c.ensemble_members()[0]) == sweep.fit_key(gcfg)), None)
            noise = r_seeds = None
            if second is not None:
                if second.resolve() not in fits:
                    fits[second.resolve()] = load_fit(second, gcfg, design, p.train, p.queries)
                single = gcfg.ensemble_members()[0]
                y0 = group_responses([members[0]], single)
                y1 = group_responses([fits[second.resolve()]], single)
                half = (y0 - y1).var(axis=1) / 2  # one fit's noise variance
                noise = half / y0.var(axis=1) if len(dirs) == 1 else (half / 2) / y.var(axis=1)
                r_seeds = row_corr(y0, y1)
            raw = np.mean([raw_responses(m, gcfg.measure) for m, _ in members], axis=0)
            per_query = anatomy(y, additive[k], subset_sums(design, ref_NxQ).astype(np.float64), raw, ref_NxQ,
                                seed=k, noise_Q=noise, r_seeds_Q=r_seeds)
            check = check_lasso(p, y, design, gcfg, cfg.name, cell, group, results, cfg.select.n_boot) \
                if args.check and i == 0 else None
            entries[(cfg.name, cell, group)] = {
                "config": cfg.name, "command": command, "machine": machine, "date": time.strftime("%Y-%m-%d"),
                "cell": cell, "group": group, "n": n, "k": k, "k_over_n": round(k / n, 3), "ensemble": gcfg.fit.ensemble,
                "fits": [str(fd) for fd in dirs], "second_fit": None if second is None else str(second),
                "ridge_lambda": args.ridge, "reference": args.reference,
                "n_queries": {"val": len(p.val_cols), "test": len(p.test_cols)},
                "test": summarise(per_query, p.test_cols), "val": summarise(per_query, p.val_cols),
                "stride_test_lds": lds_rows.get((cell, report_lib.group_row(group))),
                "reference_test_lds": lds_rows.get((cell, args.reference)), "check": check,
                "seconds": round(time.perf_counter() - t0, 1)}
            s = entries[(cfg.name, cell, group)]["test"]
            print(f"[{cell}] {group} (K={k}): R2 {s['r2']['median']:.3f} (chance {s['r2_chance']['median']:.3f}), "
                  f"noise {s['noise']['median'] if 'noise' in s else float('nan'):.3f}, r(y, oracle) "
                  f"{s['r_oracle']['median']:.3f}, r(w, ref) {s['r_w']['median']:.3f}"
                  + (f"; check {check}" if check else "") + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        print(f"[{cell}] {time.perf_counter() - t_cell:.0f} s", flush=True)
    out = {"entries": sorted(entries.values(), key=lambda e: (e["config"], e["n"], e["cell"], e["k"], e["ensemble"]))}
    store.write_json(path, out)
    store.atomic_write(results / "response_anatomy.md", markdown(out["entries"]))
    return 0


def markdown(entries: list[dict]) -> str:
    cell = lambda s, name: "-" if name not in s else (f"{s[name]['median']:.2f} [{s[name]['q25']:.2f}, "
                                                       f"{s[name]['q75']:.2f}]")
    lines = ["# response_anatomy: what STRIDE's real responses are made of", "",
             ("Per query over the K operators, test queries: median [25%, 75%] over queries. y = the responses the "
             "sweep recovered from (`measure.responses`: log space, operators centred on the fit-time reference, "
             "queries centred; an ensemble's members averaged). R^2 additive: ridge fit y ~ M w + c (lambda in the "
             "json, against diag(M^T M) = d = 10); chance R^2: the same fit to y permuted across operators; excess = "
             "(R^2 - chance) / (1 - chance). noise share: one fit's noise variance, var(y0 - y1) / 2, over var(y) "
             "(ensembles: of their averaged y, var(y0 - y1) / 4); r(y0, y1): the two fit seeds' responses; "
             "reproducible non-additive: (1 - R^2) - noise (1 - chance R^2). r(y, M w_ekfac): with EK-FAC's implied "
             "subset sums; raw y: log responses centred per query only; r(w_hat, w_ekfac): the additive fit's "
             "solution with EK-FAC's scores, over examples. STRIDE / EK-FAC: their test LDS (the config's results "
             "file). Commands, machine, date and validation-query values: response_anatomy.json."), ""]
    head = ["config", "cell", "group", "K/n"] + list(METRICS.values()) + ["STRIDE", "EK-FAC"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        s = e["test"]
        lds = lambda v: "-" if v is None else f"{v:.3f}"
        lines.append("| " + " | ".join([e["config"], e["cell"], e["group"], f"{e['k_over_n']:.2f}"]
                                       + [cell(s, m) for m in METRICS]
                                       + [lds(e.get("stride_test_lds")), lds(e.get("reference_test_lds"))]) + " |")
    checks = [e for e in entries if e.get("check")]
    if checks:
        lines += ["", "Check that y is what the sweep recovered from: the Lasso variant re-recovered from it, validation "
                  "LDS here vs stored: " + "; ".join(
                      f"{e['cell']} {e['check']['group']} {e['check']['val_lds_here']:.4f} vs "
                      + ("-" if e['check']['val_lds_stored'] is None else f"{e['check']['val_lds_stored']:.4f}")
                      for e in checks) + "."]
    lines += ["", "## Reading", "", reading(entries)]
    runs = sorted({(e["command"], e["machine"], e["date"]) for e in entries})
    lines += ["", "Runs:"] + [f"- `{c}` ({m}, {d})" for c, m, d in runs]
    return "\n".join(lines) + "\n"


def reading(entries: list[dict]) -> str:
    """Plain sentences of what the table shows (test medians), generated from it: per single-fit K/n, each
    metric across the pools of one model; then what a second fit and a larger model change."""
    med = lambda e, m: e["test"][m]["median"] if m in e["test"] else None
    fmt = lambda vs: " / ".join("-" if v is None else f"{v:.2f}" for v in vs)
    lds = lambda vs: " / ".join("-" if v is None else f"{v:.3f}" for v in vs)
    out = []
    models = sorted({e["cell"].split("-")[0] for e in entries})
    for model in models:
        singles = [e for e in entries if e["cell"].startswith(model + "-") and e["ensemble"] == 1]
        for ratio in sorted({e["k_over_n"] for e in singles}):
            row = sorted((e for e in singles if e["k_over_n"] == ratio), key=lambda e: e["n"])
            if len(row) < 2:
                continue
            ns = " / ".join(f"{e['n']:,}" for e in row)
            nonadd = [1 - med(e, "r2_excess") for e in row]
            out.append(
                f"{model} model, K = {ratio:g}n, n = {ns}: additive R^2 {fmt(med(e, 'r2') for e in row)} against "
                f"chance {fmt(med(e, 'r2_chance') for e in row)}, so the excess R^2 is "
                f"{fmt(med(e, 'r2_excess') for e in row)} and the share of var(y) beyond chance that the additive "
                f"model leaves {fmt(nonadd)} (spread {max(nonadd) - min(nonadd):.2f} across n); noise share "
                f"{fmt(med(e, 'noise') for e in row)}, reproducible non-additive share "
                f"{fmt(med(e, 'nonadditive') for e in row)} ('-': no second fit); r(y, M w_ekfac) "
                f"{fmt(med(e, 'r_oracle') for e in row)}; r(w_hat, w_ekfac) {fmt(med(e, 'r_w') for e in row)}; "
                f"meanwhile STRIDE's test LDS is {lds(e.get('stride_test_lds') for e in row)} and EK-FAC's "
                f"{lds(e.get('reference_test_lds') for e in row)}.")
    for n in sorted({e["n"] for e in entries}):
        by_model = {}
        for e in entries:
            if e["n"] == n and e["ensemble"] == 1:
                by_model.setdefault(e["cell"].split("-")[0], {})[e["k_over_n"]] = e
        if len(by_model) < 2:
            continue
        ratios = sorted(set.intersection(*(set(v) for v in by_model.values())))
        names = sorted(by_model)
        clause = lambda m, by_model=by_model, ratios=ratios, names=names: " vs ".join(
            fmt(med(by_model[name][r], m) for r in ratios) for name in names)
        out.append(f"n = {n:,}, {' vs '.join(names)} model at K = {' / '.join(f'{r:g}n' for r in ratios)}: excess R^2 "
                   f"{clause('r2_excess')}; noise share {clause('noise')}; r(y, M w_ekfac) {clause('r_oracle')}; "
                   f"r(w_hat, w_ekfac) {clause('r_w')}.")
    pairs = [(e, f) for e in entries for f in entries if f["ensemble"] == 2 and e["ensemble"] == 1
             and (e["config"], e["cell"], e["k"]) == (f["config"], f["cell"], f["k"]) and "noise" in e["test"]]
    if pairs:
        gain = [med(f, "r2") - med(e, "r2") for e, f in pairs]
        ratio = [med(f, "noise") / med(e, "noise") for e, f in pairs]
        shift = [med(f, "nonadditive") - med(e, "nonadditive") for e, f in pairs]
        out.append(f"Averaging the second fit (x2 groups, {len(pairs)} cell-K pairs) multiplies the noise share by "
                   f"{min(ratio):.2f}-{max(ratio):.2f}, raises the additive R^2 by {min(gain):+.3f} to {max(gain):+.3f} "
                   f"and moves the reproducible non-additive share by {min(shift):+.3f} to {max(shift):+.3f}.")
    return "\n\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
