"""One report writer: `<name>.json` (everything), `<name>.md` (tables) and `<name>.png` (plots).

The json holds `rows` (one per cell, method and alpha: LDS on test and validation queries with
intervals and NaN counts, seconds per stage, peak memory), `variants`, `selection`,
`noise_ceiling`, `cells`, `cost_n`, `counterfactual`, the resolved config, machine and date.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from stride_jax import store

# The paper's tables (STRIDE.md section 4), printed beside ours.
PAPER = {
    "pretrain": {
        "title": "nanochat on Nemotron-ClimbMix, 500 held-out queries, LDS (AirRep did not finish at 1.38B; "
                 "runtime at 1.38B: STRIDE 9.9 h / 8.4 GiB, LoGra 52.3 h)",
        "columns": ["286M", "537M", "897M", "1.38B"],
        "rows": {"STRIDE": [0.158, 0.179, 0.160, 0.167], "AirRep": [0.141, 0.159, 0.144, None],
                 "LoGra": [0.113, 0.127, 0.114, 0.114], "GTE (embedding similarity)": [0.101, 0.113, 0.103, 0.128],
                 "TF-IDF": [0.084, 0.095, 0.086, 0.089], "random-ish (RDS)": [0.069, 0.075, 0.070, 0.074]},
    },
    "small_models": {
        "title": "small models with explicit retraining, LDS (other data sets; alpha not stated)",
        "columns": ["STRIDE", "TRAK", "TracIn", "LoGra", "feature similarity"],
        "rows": {"MNIST MLP": [0.417, 0.012, 0.169, 0.303, 0.063],
                 "FashionMNIST MLP": [0.231, 0.198, 0.083, 0.123, -0.008],
                 "Parkinsons tabular MLP": [0.536, -0.007, 0.399, 0.405, 0.108],
                 "CIFAR-10 ResNet-9": [0.130, 0.002, 0.172, 0.285, 0.029]},
    },
}


def machine() -> str:
    import jax

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (f"{os.cpu_count()} x {cpu}, backend {jax.default_backend()} ({devices}), jax {jax.__version__}, "
            f"python {platform.python_version()}")


def fmt_lds(l: dict[str, Any] | None) -> str:
    if not l or "mean" not in l or l["mean"] is None:
        return "-"
    nan = f", {l['n_nan']} NaN" if l.get("n_nan") else ""
    return f"{l['mean']:.3f} [{l['ci95'][0]:.3f}, {l['ci95'][1]:.3f}]{nan}"


def _mib(b: Any) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _total(r: dict[str, Any]) -> float:
    """A row's total seconds (the sum of its stages where it records no total)."""
    secs = r["seconds"]
    return float(secs["total"]) if "total" in secs else float(sum(secs.values()))


def _cell_label(cell: str) -> str:
    return cell or "-"


def _kept_lines(report: dict[str, Any]) -> list[str]:
    """Where the entries a `--cells` / `--methods` run kept from earlier runs come from."""
    lines: list[str] = []
    runs: dict[tuple[str, str, str], list[str]] = {}
    for e in report.get("earlier_cells", []):
        runs.setdefault((e["command"], e["machine"], e["date"]), []).append(e["cell"])
    for (cmd, mach, date), kept in runs.items():
        lines += [f"Cells {', '.join(kept)} are kept from an earlier run: `{cmd or 'command not recorded'}`. "
                  f"Machine: {mach}; {date}.", ""]
    for e in report.get("earlier_rows", []):
        derived = f" So are its {', '.join(k.replace('_', ' ') for k in e['derived'])} entries." if e.get("derived") else ""
        lines += [f"In cell {_cell_label(e['cell'])}, the rows of {', '.join(e['methods'])} are kept from an earlier "
                  f"run: `{e['command'] or 'command not recorded'}`. Machine: {e['machine']}; {e['date']}.{derived}", ""]
    return lines


def markdown(report: dict[str, Any], command: str) -> str:
    cfg = report["config"]
    cells = [c["cell"] for c in report["cells"]]
    alphas = sorted({r["alpha"] for r in report["rows"]}) or [None]
    split = cfg.get("split", "test")
    lines = [f"# {cfg['name']}", "", f"Command: `{command}`. Machine: {report['machine']}; {report['date']}.", ""]
    lines += _kept_lines(report)
    lines += [f"LDS on held-out **{split}** queries: per query, the Spearman correlation over retrained random "
              "alpha-subsets between the summed scores of the subset's examples and minus the query's loss "
              "(seed-averaged), averaged over queries; 95% interval from a joint subset x query bootstrap; NaN = "
              "queries whose LDS is undefined. Sign: positive score = including the example lowers the query's "
              "loss.", ""]
    lines += ["| cell | params | n train | ground truth | base test loss | noise ceiling (1 seed) | ceiling for the "
              "seed average |", "|---|---|---|---|---|---|---|"]
    for c in report["cells"]:
        if not c["noise_ceiling"]:
            lines.append(f"| {_cell_label(c['cell'])} | {c['params']:,} | {c['n_train']} | none (no LDS) | "
                         f"{c['base_test_loss']:.3f} | - | - |")
        for alpha, ceil in c["noise_ceiling"].items():
            gt = c["groundtruth"][alpha]
            lines.append(f"| {_cell_label(c['cell'])} | {c['params']:,} | {c['n_train']} | {gt['n_subsets']} x "
                         f"{gt['seeds_per_subset']} (alpha {alpha}) | {c['base_test_loss']:.3f}"
                         + (f" (acc {c['base_test_accuracy']:.3f})" if "base_test_accuracy" in c else "")
                         + f" | {fmt_lds(ceil)} | {ceil.get('ceiling_for_seed_average', float('nan')):.3f} |")
    by = {(r["method"], r["cell"], r["alpha"]): r for r in report["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    cols = [(c, a) for c in cells for a in alphas]
    head = " | ".join(f"{_cell_label(c)}" + (f" a={a}" if len(alphas) > 1 else "") for c, a in cols)
    has_lds = any(r.get("lds") for r in report["rows"])
    if has_lds:
        lines += ["", f"## LDS ({split} queries)", "", f"| method | {head} |", "|---|" + "---|" * len(cols)]

    def order(m: str) -> float:
        vals = [(by[(m, c, a)]["lds"] or {}).get("mean") for c, a in cols if (m, c, a) in by]
        vals = [v for v in vals if v is not None and np.isfinite(v)]
        return -float(np.mean(vals)) if vals else 0.0

    for m in sorted(methods, key=order) if has_lds else []:
        lines.append(f"| {m} | " + " | ".join(fmt_lds(by[(m, c, a)]["lds"]) if (m, c, a) in by else "-"
                                             for c, a in cols) + " |")
    lines += ["", "## Cost (seconds per stage; peak memory)", "",
              "| method | cell | stages (s) | total s | peak MiB | method's own MiB |", "|---|---|---|---|---|---|"]
    for m in sorted(methods, key=order):
        for c in cells:
            r = by.get((m, c, alphas[0]))
            if r is None:
                continue
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items() if k != "total")
            own = (r["peak_memory_bytes"] - r["load_memory_bytes"]) if r.get("peak_memory_bytes") else None
            lines.append(f"| {m} | {_cell_label(c)} | {stages} | {_total(r):.1f} | "
                         f"{_mib(r.get('peak_memory_bytes'))} | {_mib(own)} |")
    info = {c["cell"]: c for c in report["cells"]}
    by_params: dict[int, list[str]] = {}
    for c in report["cells"]:
        by_params.setdefault(c["params"], []).append(c["cell"])
    if len(cells) >= 2 and all(len(g) == 1 for g in by_params.values()):  # a size sweep
        spans = [(cells[0], cells[-1], "parameters")]
    else:  # pool-size sweeps: growth with n within each model size
        spans = [(g[0], g[-1], "n") for g in by_params.values() if len(g) >= 2]
    for lo, hi, what in spans:
        a_c, b_c = info[lo], info[hi]
        factor = (f"{b_c['params'] / a_c['params']:.1f}x parameters" if what == "parameters" else
                  f"n {a_c['n_train']} -> {b_c['n_train']}, {b_c['n_train'] / a_c['n_train']:.0f}x; "
                  f"{a_c['params']:,} parameters")
        lines += ["", f"## Cost growth from {lo} to {hi} ({factor})", "",
                  f"| method | total s {lo} | total s {hi} | time ratio | peak memory ratio |", "|---|---|---|---|---|"]
        for m in sorted(methods, key=order):
            a, b = by.get((m, lo, alphas[0])), by.get((m, hi, alphas[0]))
            if a and b:
                mem = (f"{b['peak_memory_bytes'] / a['peak_memory_bytes']:.2f}"
                       if a.get("peak_memory_bytes") and b.get("peak_memory_bytes") else "-")
                lines.append(f"| {m} | {_total(a):.1f} | {_total(b):.1f} | {_total(b) / max(_total(a), 1e-9):.2f} | {mem} |")
    if report.get("cost_n"):
        cn = report["cost_n"]
        ns = sorted({r["n"] for r in cn})
        byn = {(r["method"], r["n"]): r for r in cn}
        lines += ["", f"## Cost growth with n (cell {_cell_label(cn[0]['cell'])}, {cn[0]['n_queries']} queries)", "",
                  "| method | " + " | ".join(f"n={n} s" for n in ns) + f" | time ratio {ns[-1]}/{ns[0]} | peak MiB |",
                  "|---|" + "---|" * (len(ns) + 2)]
        for m in dict.fromkeys(r["method"] for r in cn):
            secs = [byn[(m, n)]["seconds"]["total"] if (m, n) in byn else None for n in ns]
            ratio = f"{secs[-1] / max(secs[0], 1e-9):.2f}" if secs[0] and secs[-1] else "-"
            mem = "/".join(_mib(byn[(m, n)].get("peak_memory_bytes")) for n in ns if (m, n) in byn)
            lines.append(f"| {m} | " + " | ".join("-" if s is None else f"{s:.1f}" for s in secs) + f" | {ratio} | {mem} |")
    if report.get("variants"):
        lines += ["", "## STRIDE variants (settings chosen on validation queries only)", "",
                  "| cell | group | variant | override | LDS (val) | LDS (test) | seconds |", "|---|---|---|---|---|---|---|"]
        for v in report["variants"]:
            secs = ", ".join(f"{k} {val:.0f}" for k, val in v["seconds"].items())
            lds_val = v["error"] if v.get("error") else fmt_lds(v["lds_val"])
            lines.append(f"| {_cell_label(v['cell'])} | {v['group'] or '-'} | {v['variant']} | "
                         f"`{json.dumps(v['override'])}` | {lds_val} | {fmt_lds(v.get('lds_test'))} | {secs} |")
    vcells = list(dict.fromkeys(v["cell"] for v in report.get("variants", [])))
    if len(vcells) > 1:  # one variant across cells: the mean validation LDS chooses a setting that transfers
        by_v: dict[str, dict[str, float]] = {}
        for v in report["variants"]:
            if v.get("lds_val") and v["lds_val"].get("mean") is not None:
                by_v.setdefault(v["variant"], {})[v["cell"]] = v["lds_val"]["mean"]
        means = {name: float(np.mean(list(c.values()))) for name, c in by_v.items() if len(c) == len(vcells)}
        lines += ["", "## Variants across cells (LDS on validation queries)", "",
                  "| variant | " + " | ".join(_cell_label(c) for c in vcells) + " | mean |",
                  "|---|" + "---|" * (len(vcells) + 1)]
        for name in sorted(by_v, key=lambda n: -means.get(n, -np.inf)):
            cells_ = by_v[name]
            lines.append(f"| {name} | " + " | ".join(f"{cells_[c]:.3f}" if c in cells_ else "-" for c in vcells)
                         + f" | {means[name]:.3f} |" if name in means else f"| {name} | " + " | ".join(
                             f"{cells_[c]:.3f}" if c in cells_ else "-" for c in vcells) + " | - |")
        if means:
            best = max(means, key=means.get)
            lines += ["", f"Best mean validation LDS over the cells: **{best}** ({means[best]:.3f})."]
    if report.get("selection"):
        lines += ["", "Chosen on validation queries: " + "; ".join(
            f"{_cell_label(s['cell'])} {s['group'] or 'stride'}: {s['chosen']} ({s['val_lds']:.3f})"
            for s in report["selection"]) + "."]
    for cf in report.get("counterfactual", []):
        lines += ["", f"## Counterfactual removal, {_cell_label(cf['cell'])} (mean drop of the query's true-class "
                  f"probability; {len(cf['query_ids'])} test queries; `{cf['png']}`)", "",
                  "| method | " + " | ".join(f"k={k}" for k in cf["ks"]) + " |", "|---|" + "---|" * len(cf["ks"])]
        for m, s in cf["summary"].items():
            lines.append(f"| {m} | " + " | ".join(f"{x:.3f}" for x in s["mean_drop"]) + " |")
    for ct in report.get("contamination", []):
        lines += _contamination_markdown(ct)
    if report.get("data_selection"):
        lines += _selection_markdown(report["data_selection"], report["config"].get("data_selection") or {})
    paper = PAPER.get(cfg.get("paper") or "")
    if paper:
        lines += ["", f"## The paper's table: {paper['title']}", "", "| | " + " | ".join(paper["columns"]) + " |",
                  "|---|" + "---|" * len(paper["columns"])]
        for name, vals in paper["rows"].items():
            lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    for ex in report.get("examples", []):
        lines += ["", f"**Query** ({_cell_label(ex['cell'])}, {ex['method']}): {_clip(ex['query'])}"]
        for kind in ("helpful", "harmful"):
            for e in ex[kind]:
                lines.append(f"- {kind} {e['score']:+.4f}: {_clip(e['text'])}")
    return "\n".join(lines) + "\n"


def _contamination_markdown(ct: dict[str, Any]) -> list[str]:
    lines = ["", f"## Contamination, {_cell_label(ct['cell'])}: {ct['leaked_problems']} leaked problems x "
             f"{ct['copies']} {ct['kind']} replicas = {ct['replicas']} of {ct['pool']} pool examples "
             f"(leak rate {100 * ct['leak_rate']:.2f}%)", "",
             "Memorisation (greedy decoding reproduces the worked answer exactly, from one teacher-forced pass; "
             "response-token loss):", "",
             "| model | exact match leaked | exact match clean | token accuracy leaked / clean | loss leaked / clean |",
             "|---|---|---|---|---|"]
    for name, m in sorted(ct["memorisation"].items(), key=lambda kv: kv[0] != "loaded model"):  # before, after
        lk, cl = m["leaked"], m["clean"]
        lines.append(f"| {name} | {lk['exact_match']:.3f} ({lk['n']}) | {cl['exact_match']:.3f} ({cl['n']}) | "
                     f"{lk['token_accuracy']:.3f} / {cl['token_accuracy']:.3f} | {lk['loss']:.3f} / {cl['loss']:.3f} |")
    if ct.get("recall_kept"):
        lines += ["", f"Recall of {', '.join(ct['recall_kept'])} is kept from the results file's earlier version: "
                      "their scores are not stored with this run, and the attributed model is the same "
                      "(identical memorisation figures)."]
    if ct.get("recall_missing"):
        lines += ["", f"No recall of {', '.join(ct['recall_missing'])}: their scores are not stored with this run, "
                      "and the earlier version has none of the same attributed model."]
    fracs = sorted({r["bucket_fraction"] for r in ct["recall"]})
    by = {(r["method"], r["bucket_fraction"]): r for r in ct["recall"]}
    lines += ["", "Recall of each leaked problem's replicas in the method's most helpful bucket (mean over the "
              "leaked problems, 95% bootstrap interval; p: exact one-sided test of the total hits against random "
              "rankings):", "",
              "| method | " + " | ".join(f"top {100 * f:g}% ({by[next(iter(by))[0], f]['bucket']}; chance "
                                        f"{by[next(iter(by))[0], f]['chance']:.3f})" for f in fracs) + " |",
              "|---|" + "---|" * len(fracs)]
    for m in dict.fromkeys(r["method"] for r in ct["recall"]):
        cells = []
        for f in fracs:
            r = by.get((m, f))
            cells.append("-" if r is None else f"{r['recall']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}], "
                                                 f"p {r['p_value']:.1e}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def selection_overall(entries: list[dict[str, Any]], n_boot: int = 1000, key: str = "hits") -> dict[str, dict[str, Any]]:
    """Exact match (`key` "hits") or test loss ("losses") over every target of the cell (records
    concatenated: targets weighted by their test records), for the methods every target has."""
    from stride_jax.harness.selection import bootstrap_means

    names = [m for m in entries[0][key] if all(m in e[key] for e in entries)]
    return bootstrap_means({m: np.concatenate([np.asarray(e[key][m]) for e in entries], axis=1) for m in names},
                           n_boot=n_boot)


def _selection_markdown(entries: list[dict[str, Any]], c: dict[str, Any]) -> list[str]:
    ft = c.get("finetune", {})
    lines = ["", f"## Data selection: top {entries[0]['k']} of the pool per target, fine-tuned, greedy exact match "
             "on held-out test records", "",
             f"Each method ranks the pool ({entries[0]['pool']} records) by its scores summed over the target's "
             f"validation queries; a fresh copy of the loaded model is fine-tuned on its top k (lr "
             f"{ft.get('learning_rate')}, {ft.get('epochs')} epochs, batch {ft.get('batch_size')}) with "
             f"{c.get('seeds')} data-order seeds shared by every row. random: k pool records drawn per seed; "
             "in-task: k of the target's own train records (a perfect selector); pretrained: no fine-tune. "
             "Interval: 95% bootstrap over seeds and test records; vs random: the paired difference, its interval "
             "and the share of bootstrap draws where the method is not above random. in-task share: the fraction "
             "of the selection that is the target's own train records. Test loss: the response-token loss on the "
             "test records (lower is better).", ""]
    names = list(dict.fromkeys(m for e in entries for m in e["exact_match"]))
    cells = list(dict.fromkeys(e["cell"] for e in entries))
    for cell in cells:
        es = [e for e in entries if e["cell"] == cell]
        overall = selection_overall(es, c.get("n_boot", 1000))
        losses = selection_overall(es, c.get("n_boot", 1000), "losses") if all("losses" in e for e in es) else {}
        head = [f"{e['target']} ({e['test_records']} test)" for e in es] + ["all targets"]
        lines += [f"Cell {_cell_label(cell)}:" if len(cells) > 1 else "", "",
                  "| method | " + " | ".join(head) + " | vs random (all) | in-task share | test loss (all) |",
                  "|---|" + "---|" * (len(head) + 3)]

        def fmt(r: dict[str, Any] | None) -> str:
            return "-" if r is None else f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"

        for m in sorted(names, key=lambda m: -(overall.get(m) or {"mean": -1})["mean"]):
            o = overall.get(m)
            vs = (o or {}).get("vs_random")
            share = [e["in_task_fraction"].get(m) for e in es]
            lines.append(f"| {m} | " + " | ".join(fmt(e["exact_match"].get(m)) for e in es) + f" | {fmt(o)} | "
                         + ("-" if vs is None else f"{vs['diff']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}], "
                                                   f"p {vs['p_not_above']:.3f}") + " | "
                         + " / ".join("-" if s is None else f"{s:.2f}" for s in share) + " | "
                         + fmt(losses.get(m)) + " |")
    return lines


def qualitative_markdown(report: dict[str, Any], command: str) -> str:
    """The side-by-side top examples of `report["qualitative"]`: one table per query, a column per method."""
    q = report["config"]["qualitative"]
    lds = {(r["method"], r["cell"]): r["lds"] for r in report["rows"]}
    lines = [f"# {q['name']}: top training examples of {', '.join(q['methods'])} ({report['config']['name']})", "",
             f"Command: `{command}`. Machine: {report['machine']}; {report['date']}.", "", *_kept_lines(report)]
    if q.get("note"):
        lines += [q["note"], ""]
    lines += ["Sign: a positive score means including the example lowers the query's loss (helpful), a negative "
              "one that it raises it (harmful). Texts clipped to "
              f"{q['max_chars']} characters; `|` shown as `/`.", ""]
    for i, e in enumerate(report["qualitative"], 1):
        methods = [m for m in q["methods"] if m in e["methods"]]  # the config's order (a reread json's keys are sorted)
        lines += [f"## {i}. {_label(e['cell'])}query {e['query_index']}", "", f"> {_clip(e['query'], q['max_chars'])}",
                  "", "| | " + " | ".join(f"{m} (LDS {fmt_lds(lds.get((m, e['cell'])))})" if (m, e["cell"]) in lds
                                            else m for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for kind, label in (("helpful", "most helpful"), ("harmful", "most harmful")):
            for rank in range(q["k"]):
                cells = []
                for m in methods:
                    ex = e["methods"][m][kind]
                    cells.append("-" if rank >= len(ex) else
                                 f"**{ex[rank]['score']:+.3g}** (#{ex[rank]['index']}) {_clip(ex[rank]['text'], q['max_chars'])}")
                name = label if rank == 0 else f"{_ordinal(rank + 1)} {label.split()[1]}"
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _label(cell: str) -> str:
    return f"{cell}, " if cell else ""


def _ordinal(n: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _clip(text: str | None, n: int = 160) -> str:
    if text is None:
        return "<no text>"
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 3] + "..."


# --- Plots -----------------------------------------------------------------------------------
# Cells that are not a series (data sets, pools, settings) are drawn as points with their
# intervals, never joined by lines; lines join points only along a numeric x (pool size n, model
# size, k), and such axes carry gid "series". Reference levels (noise ceiling, chance) are
# axis-aligned segments with gid "reference". tests/test_plots.py checks all three on every
# committed plot.
SERIES = "series"
REFERENCE = "reference"
_FLOOR_S = 1e-3  # seconds below this (or 0) are drawn at it on the log axes, and the axis says so


def _is_stride(method: str) -> bool:
    """STRIDE rows and variants (not a fusion of STRIDE with another method)."""
    return method.startswith("stride") and "+" not in method


def _method_label(method: str) -> str:
    return "STRIDE" + method[len("stride"):] if method.startswith("stride") else method


def _styles(methods: list[str]) -> dict[str, dict[str, Any]]:
    """Colour and marker per method: STRIDE black (its variants in greys, each its own marker),
    the rest from a qualitative palette."""
    import matplotlib

    others = [m for m in methods if not _is_stride(m)]
    cmap = matplotlib.colormaps["tab10" if len(others) <= 10 else "tab20"]
    greys, marks = ["k", "0.35", "0.55", "0.7"], ["D", "s", "^", "v", "P", "X"]
    out, n_stride = {}, 0
    for m in methods:
        if _is_stride(m):
            out[m] = {"color": greys[min(n_stride, len(greys) - 1)], "marker": marks[n_stride % len(marks)],
                      "ms": 7, "zorder": 4}
            n_stride += 1
        else:
            out[m] = {"color": cmap(others.index(m) % cmap.N), "marker": "o", "ms": 5, "zorder": 3}
    return out


def _ci(d: dict[str, Any]) -> tuple[float, float, float]:
    """(mean, lower, upper) of a {mean, ci95} entry; the interval collapses to the mean without one."""
    lo, hi = d.get("ci95") or (d["mean"], d["mean"])
    return float(d["mean"]), float(lo), float(hi)


def _plot_alpha(report: dict[str, Any]) -> float | None:
    """The alpha a plot shows: the first ground truth (the one STRIDE variants are scored at)."""
    alphas = [r.get("alpha") for r in report["rows"] if r.get("alpha") is not None]
    task_alphas = (report.get("config", {}).get("task") or {}).get("alphas") or []
    if task_alphas and task_alphas[0] in alphas:
        return task_alphas[0]
    return min(alphas) if alphas else None


def _stride_variants(report: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """STRIDE from `variants` when no result row holds it (a sweep): every variant of a one-cell
    sweep, else the variant with the best mean validation LDS over the cells (the markdown's
    choice); method -> cell -> {"lds", "seconds"}."""
    vs = [v for v in report.get("variants", []) if (v.get("lds_test") or {}).get("mean") is not None]
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for v in vs:
        by.setdefault(v["variant"], {})[v["cell"]] = {"lds": v["lds_test"], "seconds": sum(v["seconds"].values())}
    cells = list(dict.fromkeys(v["cell"] for v in vs))
    if len(cells) <= 1:
        return {f"stride ({name})": d for name, d in by.items()}
    val = {(v["variant"], v["cell"]): v["lds_val"]["mean"] for v in vs if (v.get("lds_val") or {}).get("mean") is not None}
    full = {n: d for n, d in by.items() if all((n, c) in val for c in cells)}
    if not full:
        return {}
    best = max(full, key=lambda n: float(np.mean([val[(n, c)] for c in cells])))
    return {f"stride ({best}; best mean val LDS)": full[best]}


def _cell_data(report: dict[str, Any], alpha: float | None) -> dict[str, dict[str, dict[str, Any]]]:
    """method -> cell -> {"lds": {mean, ci95} or None, "seconds": total or None} at `alpha`."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in report["rows"]:
        if r.get("alpha") != alpha:
            continue
        lds_ = r.get("lds") if (r.get("lds") or {}).get("mean") is not None else None
        if lds_ is not None and not np.isfinite(lds_["mean"]):
            lds_ = None
        out.setdefault(r["method"], {})[r["cell"]] = {"lds": lds_, "seconds": _total(r) if r.get("seconds") else None}
    if not any(_is_stride(m) and any(e["lds"] for e in cells.values()) for m, cells in out.items()):
        out.update(_stride_variants(report))
    return out


def _layout(report: dict[str, Any]) -> str:
    """"n": cells of one model size differ in n (a series in n per size); "params": every cell is
    another model size on the same pool (a series in parameters); "cells": anything else."""
    cells = report["cells"]
    by_params: dict[int, list[dict[str, Any]]] = {}
    for c in cells:
        by_params.setdefault(c.get("params"), []).append(c)
    if len(cells) >= 2 and all(len({c.get("n_train") for c in g}) == len(g) for g in by_params.values()) \
            and any(len(g) >= 2 for g in by_params.values()):
        return "n"
    if len(cells) >= 2 and all(len(g) == 1 for g in by_params.values()) and len({c.get("n_train") for c in cells}) == 1:
        return "params"
    return "cells"


def _size(params: int) -> str:
    return f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params / 1e3:.0f}k"


def _ceiling(report: dict[str, Any], alpha: float | None) -> dict[str, float]:
    """cell -> the noise ceiling for the seed average at `alpha` (cells that have one)."""
    out = {}
    for c in report["cells"]:
        ceil = (c.get("noise_ceiling") or {}).get(str(alpha)) or {}
        if ceil.get("ceiling_for_seed_average") is not None:
            out[c["cell"]] = float(ceil["ceiling_for_seed_average"])
    return out


def _points_by_cell(ax, values: dict[str, dict[str, tuple[float, float, float]]], cells: list[str],
                    styles: dict[str, dict[str, Any]], reference: dict[str, float] | None = None,
                    reference_label: str = "", log: bool = False) -> None:
    """Categorical cells on x, one dodged point per method with its interval; `reference` a
    short level per cell (noise ceiling, chance)."""
    methods = [m for m in styles if m in values]
    width = 0.8
    step = width / max(len(methods), 1)
    for i, m in enumerate(methods):
        pts = [(j, values[m][c]) for j, c in enumerate(cells) if c in values[m]]
        xs = np.array([j for j, _ in pts], float) - width / 2 + step * (i + 0.5)
        y = np.array([v[0] for _, v in pts])
        err = np.array([[v[0] - v[1] for _, v in pts], [v[2] - v[0] for _, v in pts]])
        st = styles[m]
        ax.errorbar(xs, y, yerr=err, linestyle="none", marker=st["marker"], ms=st["ms"], color=st["color"],
                    zorder=st["zorder"], capsize=2, elinewidth=1.2, label=_method_label(m))
    for j, c in enumerate(cells):
        if reference and c in reference:
            ax.plot([j - width / 2, j + width / 2], [reference[c]] * 2, ":", color="0.3", lw=1.5, gid=REFERENCE,
                    label=reference_label if j == min(k for k, cc in enumerate(cells) if cc in reference) else None)
    labels = [_cell_label(c) for c in cells]
    long = len(cells) > 2 and max(map(len, labels)) > 8
    ax.set_xticks(range(len(cells)), labels, rotation=30 if long else 0, ha="right" if long else "center",
                  rotation_mode="anchor", fontsize=8 if long else 9)
    ax.set_xlim(-0.6, len(cells) - 0.4)
    if log:
        ax.set_yscale("log")


def _points_by_method(ax, values: dict[str, tuple[float, float, float]], order: list[str],
                      styles: dict[str, dict[str, Any]], reference: float | None = None,
                      reference_label: str = "", log: bool = False) -> None:
    """One cell: a row per method (names on the y axis), its point and interval."""
    rows = [m for m in order if m in values]
    for i, m in enumerate(rows):
        v, st = values[m], styles[m]
        ax.errorbar([v[0]], [i], xerr=[[v[0] - v[1]], [v[2] - v[0]]], linestyle="none", marker=st["marker"],
                    ms=st["ms"], color=st["color"], zorder=st["zorder"], capsize=2, label=_method_label(m))
    if reference is not None:
        ax.axvline(reference, linestyle=":", color="0.3", lw=1.5, gid=REFERENCE, label=reference_label)
    ax.set_yticks(range(len(rows)), [_method_label(m) for m in rows], fontsize=8)
    for tick, m in zip(ax.get_yticklabels(), rows):
        if _is_stride(m):
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the best on top
    if log:
        ax.set_xscale("log")


def _seconds(v: float) -> float:
    return max(float(v), _FLOOR_S)


def _cells_panels(fig, axes, report, data, styles, alpha) -> None:
    """LDS and cost of categorical cells (one cell: methods on the y axis)."""
    cells = [c["cell"] for c in report["cells"]]
    cells = [c for c in cells if any(c in d for d in data.values())] or cells
    split = report["config"].get("split", "test")
    lds_v = {m: {c: _ci(e["lds"]) for c, e in d.items() if e["lds"]} for m, d in data.items()}
    lds_v = {m: d for m, d in lds_v.items() if d}
    sec_v = {m: {c: (_seconds(e["seconds"]),) * 3 for c, e in d.items() if e["seconds"] is not None}
             for m, d in data.items()}
    sec_v = {m: d for m, d in sec_v.items() if d}
    clipped = any(e["seconds"] is not None and e["seconds"] < _FLOOR_S for d in data.values() for e in d.values())
    ceil = _ceiling(report, alpha)
    sec_label = "seconds (all stages)" + (" (< 1 ms drawn at 1 ms)" if clipped else "")
    panels = []
    if lds_v:
        panels.append(("lds", lds_v))
    if sec_v:
        panels.append(("cost", sec_v))
    for ax, (kind, vals) in zip(axes, panels):
        if len(cells) == 1:
            c = cells[0]
            one = {m: d[c] for m, d in vals.items() if c in d}
            order = sorted(lds_v, key=lambda m: -lds_v[m][c][0] if c in lds_v[m] else 0.0) if lds_v else list(one)
            order += [m for m in one if m not in order]
            _points_by_method(ax, one, order, styles, reference=ceil.get(c) if kind == "lds" else None,
                              reference_label="noise ceiling (seed avg)", log=kind == "cost")
            ax.set(xlabel=f"LDS ({split} queries)" if kind == "lds" else sec_label)
        else:
            _points_by_cell(ax, vals, cells, styles, reference=ceil if kind == "lds" else None,
                            reference_label="noise ceiling (seed avg)", log=kind == "cost")
            ax.set(ylabel=f"LDS ({split} queries)" if kind == "lds" else sec_label)
        ax.set_title("LDS" + (f" (alpha {alpha})" if alpha is not None else "") if kind == "lds" else "cost")
        if kind == "lds":
            ax.axhline(0, color="0.8", lw=0.8, zorder=0, gid=REFERENCE) if len(cells) > 1 else \
                ax.axvline(0, color="0.8", lw=0.8, zorder=0, gid=REFERENCE)


def _series_panels(axes, report, data, styles, alpha, layout) -> None:
    """LDS and cost along n (one line per model size; STRIDE a line, the rest markers) or along
    the model size (every method a line)."""
    info = {c["cell"]: c for c in report["cells"]}
    split = report["config"].get("split", "test")
    if layout == "n":
        x_of = {c: info[c]["n_train"] for c in info}
        groups = list(dict.fromkeys(info[c]["params"] for c in info))
        group_of = {c: info[c]["params"] for c in info}
        lines_for = _is_stride
        xlabel = "training examples n (log)"
    else:
        x_of = {c: info[c]["params"] for c in info}
        groups, group_of = [None], {c: None for c in info}
        lines_for = lambda m: True  # noqa: E731
        xlabel = "parameters (log)"
    group_marks, group_ls = ["o", "s", "^", "v"], ["-", "--", "-.", ":"]
    methods = [m for m in styles if m in data]
    ceil = _ceiling(report, alpha)
    others = [m for m in methods if not _is_stride(m)]  # STRIDE at the exact x, the rest spread around it
    spread = 0.025 if layout == "n" else 0.012  # decades between neighbours
    nudge = {m: 10 ** (spread * (others.index(m) - (len(others) - 1) / 2)) if m in others else 1.0 for m in methods}
    for ax, kind in zip(axes, ("lds", "cost")):
        ax.set_gid(SERIES)
        for gi, g in enumerate(groups):
            cells_g = sorted((c for c in info if group_of[c] == g), key=lambda c: x_of[c])
            size = f", {_size(g)}" if g is not None else ""
            for m in methods:
                pts = [(x_of[c], data[m][c]) for c in cells_g if c in data[m]]
                pts = [(x, e) for x, e in pts if (e["lds"] if kind == "lds" else e["seconds"] is not None)]
                if not pts:
                    continue
                st = styles[m]
                xs = np.array([x for x, _ in pts], float) * nudge[m]
                if kind == "lds":
                    v = np.array([_ci(e["lds"]) for _, e in pts])
                    y, err = v[:, 0], np.stack([v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]])
                else:
                    y, err = np.array([_seconds(e["seconds"]) for _, e in pts]), None
                marker = group_marks[gi % 4] if layout == "n" else st["marker"]
                line = lines_for(m)
                ax.errorbar(xs, y, yerr=err, color=st["color"], marker=marker, ms=st["ms"], zorder=st["zorder"],
                            linestyle=group_ls[gi % 4] if line else "none", lw=2.2 if _is_stride(m) else 1.2,
                            capsize=2, label=_method_label(m) + (size if line and layout == "n" else ""))
            if kind == "lds":
                cs = [c for c in cells_g if c in ceil]
                if cs:
                    ax.plot([x_of[c] for c in cs], [ceil[c] for c in cs], linestyle=":", marker=group_marks[gi % 4],
                            ms=3, color="0.5", lw=1.5, label=f"noise ceiling (seed avg){size}")
        xs_all = sorted(set(x_of.values()))
        ax.set_xscale("log")
        ax.set_xticks(xs_all, [f"{x:,}" if layout == "n" else _size(x) for x in xs_all], fontsize=8)
        ax.minorticks_off()
        ax.set(xlabel=xlabel)
        if kind == "lds":
            ax.set(ylabel=f"LDS ({split} queries)", title="LDS" + (f" (alpha {alpha})" if alpha is not None else ""))
            ax.axhline(0, color="0.8", lw=0.8, zorder=0, gid=REFERENCE)
        else:
            ax.set(yscale="log", ylabel="seconds (all stages)", title="cost")
    if layout == "n":
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="0.5", marker=group_marks[gi % 4], linestyle="none", label=f"{_size(g)} model")
                   for gi, g in enumerate(groups)]
        axes[0].legend(handles=handles, loc="best", fontsize=8, title="marker: model size", title_fontsize=8)


def _cost_n_panel(ax, report, styles) -> None:
    cn = report["cost_n"]
    ax.set_gid(SERIES)
    for m in dict.fromkeys(r["method"] for r in cn):
        rs = sorted((r for r in cn if r["method"] == m), key=lambda r: r["n"])
        st = styles.get(m, {"color": "0.5", "marker": "o", "ms": 5, "zorder": 3})
        ax.plot([r["n"] for r in rs], [_seconds(r["seconds"]["total"]) for r in rs], marker=st["marker"],
                ms=st["ms"], color=st["color"], zorder=st["zorder"], lw=2.2 if _is_stride(m) else 1.2,
                label=_method_label(m))
    ns = sorted({r["n"] for r in cn})
    ax.set(xscale="log", yscale="log", xlabel="training examples n (log)", ylabel="seconds (all stages)",
           title=f"cost by n ({_cell_label(cn[0]['cell'])})")
    ax.set_xticks(ns, [f"{n:,}" for n in ns], fontsize=8)
    ax.minorticks_off()


def _contamination_panels(axes, report, styles) -> None:
    """Recall of the leaked replicas in each top bucket, per cell and method, with chance."""
    entries = report["contamination"]
    cells = [ct["cell"] for ct in entries]
    fracs = sorted({r["bucket_fraction"] for ct in entries for r in ct["recall"]})
    for ax, f in zip(axes, fracs):
        vals: dict[str, dict[str, tuple[float, float, float]]] = {}
        chance = {}
        for ct in entries:
            for r in ct["recall"]:
                if r["bucket_fraction"] == f:
                    vals.setdefault(r["method"], {})[ct["cell"]] = (r["recall"], *r["ci95"])
                    chance[ct["cell"]] = r["chance"]
        _points_by_cell(ax, vals, cells, styles, reference=chance, reference_label="chance")
        ax.set(ylim=(-0.05, 1.05), ylabel="recall of the leaked replicas", title=f"top {100 * f:g}% of the pool")


def _selection_panels(axes, report, styles) -> None:
    """Exact match of the model fine-tuned on each method's selection (per target and over all
    targets), and the share of the selection that is the target's own records."""
    entries = report["data_selection"]
    cells = list(dict.fromkeys(e["cell"] for e in entries))
    em: dict[str, dict[str, tuple[float, float, float]]] = {}
    share: dict[str, dict[str, tuple[float, float, float]]] = {}
    xs: list[str] = []
    n_boot = (report["config"].get("data_selection") or {}).get("n_boot", 1000)
    for cell in cells:
        es = [e for e in entries if e["cell"] == cell]
        pre = f"{cell}/" if len(cells) > 1 else ""
        for e in es:
            xs.append(pre + e["target"])
            for m, r in e["exact_match"].items():
                em.setdefault(m, {})[xs[-1]] = _ci(r)
            for m, s in e.get("in_task_fraction", {}).items():
                if s is not None:
                    share.setdefault(m, {})[xs[-1]] = (s, s, s)
        xs.append(pre + "all targets")
        for m, r in selection_overall(es, n_boot).items():
            em.setdefault(m, {})[xs[-1]] = _ci(r)
    _points_by_cell(axes[0], em, xs, styles)
    axes[0].set(ylim=(-0.05, 1.05), ylabel="greedy exact match (test records)",
                title=f"fine-tuned on each method's top {entries[0]['k']}")
    if len(axes) > 1:
        _points_by_cell(axes[1], share, [x for x in xs if not x.endswith("all targets")], styles)
        axes[1].set(ylim=(-0.05, 1.05), ylabel="in-task share of the selection",
                    title="picks that are the target's own records")


def _k_law(report: dict[str, Any]) -> dict[str, list[tuple[float, str, int]]]:
    """{cell: [(K/n, STRIDE row, fits averaged), ...]} when the selection groups of a cell set
    different K (a K-over-n sweep such as nk_regime.yaml's law groups); {} otherwise."""
    n_of = {c["cell"]: c.get("n_train") for c in report.get("cells", [])}
    out: dict[str, list[tuple[float, str, int]]] = {}
    for s in report.get("selection", []):
        settings = s.get("settings") or {}
        k = settings.get("design", {}).get("n_subsets")
        if s.get("group") and isinstance(k, int) and n_of.get(s["cell"]):
            ens = int(settings.get("fit", {}).get("ensemble", 1))
            out.setdefault(s["cell"], []).append((k / n_of[s["cell"]], group_row(s["group"]), ens))
    return {c: sorted(v) for c, v in out.items() if len({x for x, _, e in v if e == 1}) >= 2}


def _law_panel(ax, report, data, styles, law) -> None:
    """Test LDS against K/n (log x): one STRIDE line per cell through its single fits (the K of one
    pool and model are a series); rows averaging several fits of the same K (`fit.ensemble`) as
    open markers beside them, unjoined; the reference methods of each cell as short horizontal
    marks at the right, in the line's style."""
    info = {c["cell"]: c for c in report["cells"]}
    ax.set_gid(SERIES)
    ls = ["-", "--", "-.", ":"]
    refs = [m for m in styles if m in data and not _is_stride(m)]
    right = max(x for pts in law.values() for x, _, _ in pts)
    for i, cell in enumerate(sorted(law, key=lambda c: (info[c]["n_train"], info[c].get("params") or 0))):
        pts = [(x, data[m][cell]["lds"], e) for x, m, e in law[cell] if cell in data.get(m, {}) and data[m][cell]["lds"]]
        for ensemble in sorted({e for _, _, e in pts}):
            sub = [(x, lds) for x, lds, e in pts if e == ensemble]
            v = np.array([_ci(lds) for _, lds in sub])
            xs = np.array([x for x, _ in sub]) * (1.0 if ensemble == 1 else 1.08)  # beside the single fit's point
            single = ensemble == 1
            ax.errorbar(xs, v[:, 0], yerr=[v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]], color="k", marker="D", ms=6,
                        mfc="k" if single else "white", linestyle=ls[i % len(ls)] if single else "none", capsize=2,
                        label=f"STRIDE, {cell}" if single else f"STRIDE, {ensemble} fits averaged, {cell}", zorder=4)
        for j, m in enumerate(refs):
            e = data[m].get(cell)
            if e and e["lds"]:
                x0 = right * 1.4 * 1.25 ** j
                ax.plot([x0, x0 * 1.2], [e["lds"]["mean"]] * 2, color=styles[m]["color"], lw=2.5,
                        linestyle=ls[i % len(ls)], gid=REFERENCE, label=_method_label(m))
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    ticks: list[float] = []
    for t in sorted({x for pts in law.values() for x, _, _ in pts}):
        if not ticks or t > 1.15 * ticks[-1]:  # K = 1000 and n / 3 can nearly coincide: one label
            ticks.append(t)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([f"{t:.2g}" for t in ticks], fontsize=7, rotation=45)
    ax.set_xlabel("subsets per training example, K / n (log); references at the right")
    ax.set_ylabel("test LDS")
    ax.axhline(0, color="0.8", lw=0.8, zorder=0, gid=REFERENCE)
    ax.set_title("STRIDE as K grows with n")


def figure(report: dict[str, Any]):
    """The figure of a report (a matplotlib `Figure`, no pyplot), or None when it has nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    report = upgrade(report)
    alpha = _plot_alpha(report)
    data = _cell_data(report, alpha)
    methods = list(data)
    for ct in report.get("contamination", []):
        methods += [r["method"] for r in ct["recall"]]
    for e in report.get("data_selection", []):
        methods += list(e["exact_match"])
    methods = list(dict.fromkeys(methods))
    styles = _styles(methods)
    has_lds = any(e["lds"] for d in data.values() for e in d.values())
    has_secs = any(e["seconds"] is not None for d in data.values() for e in d.values())
    layout = _layout(report) if has_lds else "cells"
    law = _k_law(report) if has_lds else {}
    plan: list[str] = ["law"] if law else []  # panel kinds, left to right
    if report.get("contamination"):
        plan += ["recall"] * len({r["bucket_fraction"] for ct in report["contamination"] for r in ct["recall"]})
    if report.get("data_selection"):
        plan += ["selection", "share"]
    plan += (["lds"] if has_lds else []) + (["cost"] if has_secs else [])
    if report.get("cost_n"):
        plan.append("cost_n")
    if not plan:
        return None
    n_cells = len(report["cells"])
    one_cell = layout == "cells" and n_cells == 1
    stacked = layout == "cells" and n_cells > 4  # many cells: one full-width panel per row
    width = 5.2 if layout != "cells" or one_cell else max(5.2, 0.9 * n_cells + 1.6)
    height = 4.8 if not one_cell else max(4.0, 0.32 * len(data) + 1.6)
    shape = (len(plan), 1) if stacked else (1, len(plan))
    fig = Figure(figsize=(width * shape[1], height * shape[0]), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(*shape, i + 1) for i in range(len(plan))]
    at = {k: [a for a, kk in zip(axes, plan) if kk == k] for k in plan}
    if "law" in at:
        _law_panel(at["law"][0], report, data, styles, law)
    if "recall" in at:
        _contamination_panels(at["recall"], report, styles)
    if "selection" in at:
        _selection_panels(at["selection"] + at["share"], report, styles)
    if "lds" in at or "cost" in at:
        panels = at.get("lds", []) + at.get("cost", [])
        drawn = {m for pts in law.values() for _, m, _ in pts}  # the law panel's rows: not drawn again
        rest = {m: d for m, d in data.items() if m not in drawn}
        if layout == "cells":
            _cells_panels(fig, panels, report, rest, styles, alpha)
        elif "lds" in at:
            _series_panels(panels, report, rest, styles, alpha, layout)
    if "cost_n" in at:
        _cost_n_panel(at["cost_n"][0], report, styles)
    seen: dict[str, Any] = {}
    for ax in axes:
        named_on_axis = one_cell and ax in at.get("lds", []) + at.get("cost", [])  # methods on its y axis
        for h, label in zip(*ax.get_legend_handles_labels()):
            if not named_on_axis or getattr(h, "get_gid", lambda: None)() == REFERENCE:
                seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(len(seen), 6), fontsize=8,
                   frameon=False)
    legend_in = 0.25 * ((len(seen) + 5) // 6) + 0.3 if seen else 0.0  # inches under the panels
    fig.tight_layout(rect=(0, min(legend_in / fig.get_figheight(), 0.4), 1, 1))
    return fig


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """`report`'s figure (see `figure`) as a png at `path`, or None when it has nothing to draw."""
    fig = figure(report)
    if fig is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def upgrade(report: dict[str, Any]) -> dict[str, Any]:
    """A results file of the pipelines before the harness (rows keyed by `size`, `models`, a
    separate `noise_ceiling`: pretrain_lds_report.json) in the current layout; others unchanged."""
    if "cells" in report or not isinstance(report.get("models"), dict):
        return report
    alpha = {s: m["groundtruth"]["alpha"] for s, m in report["models"].items()}
    cells = [{"cell": s, "params": m["params"], "n_train": m["n_train"],
              "noise_ceiling": {str(alpha[s]): report["noise_ceiling"][s]} if s in report.get("noise_ceiling", {}) else {}}
             for s, m in report["models"].items()]
    rows = [{**r, "cell": r["size"], "alpha": r.get("alpha", alpha[r["size"]])} for r in report["rows"]]
    cost_n = [{**r, "cell": r["size"]} for r in report.get("cost_n") or []]
    return {**report, "cells": cells, "rows": rows, "cost_n": cost_n,
            "config": {"split": "test", **report.get("config", {})}}


def render(json_path: str | Path, png_path: str | Path | None = None) -> Path | None:
    """Re-render a results file's plot from its json (`<name>.png` beside it unless `png_path`)."""
    json_path = Path(json_path)
    report = json.loads(json_path.read_text())
    if not isinstance(report, dict) or "rows" not in report:
        raise ValueError(f"{json_path}: not a results report (no 'rows')")
    return plot(report, Path(png_path) if png_path else json_path.with_suffix(".png"))


CELL_KEYED = ("cells", "rows", "variants", "selection", "counterfactual", "examples", "cost_n", "qualitative",
              "contamination", "data_selection")


def _leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_earlier(earlier: dict[str, Any], full_config: dict[str, Any]) -> None:
    """Raises ValueError when `earlier` (a results file) was written by a different experiment
    than `full_config`: another name, or a setting present in both configs (cells and methods
    aside) with different values. Settings only one of them has (a field added since) do not count,
    nor does a select group's `only` list that grew (variants added to the group's grid: the kept
    entries say which variants they chose among), nor which rows a contamination or data selection
    entry fuses or selects (`fuse`, `fusions`, `methods`: like the method rows, they name the rows
    they add, so a kept entry is never read as another's).
    """
    if earlier.get("config", {}).get("name") != full_config["name"]:
        raise ValueError(f"the results file holds experiment {earlier.get('config', {}).get('name')!r}, "
                         f"not {full_config['name']!r}")
    a = _leaves({k: v for k, v in earlier["config"].items() if k not in ("cells", "methods")})
    b = _leaves({k: v for k, v in full_config.items() if k not in ("cells", "methods")})
    grew = lambda k: (k.startswith("select.only.") and isinstance(a[k], list) and isinstance(b[k], list)
                      and set(a[k]) <= set(b[k]))
    def rows(k: str) -> bool:
        section, _, field = k.partition(".")
        return section in ("contamination", "data_selection") and field.split(".")[0] in ROW_NAMING

    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k] and not grew(k) and not rows(k))
    if differ:
        raise ValueError(f"the results file was written by another version of {full_config['name']!r} "
                         f"(differs in {differ[:5]}); write this run elsewhere (--results)")


ROW_NAMING = ("fuse", "fusions", "methods")  # the fields of a derived entry's section that pick its rows
VARIANT_ROWS = "stride"  # the --methods name of the STRIDE variants (their chosen rows, variants, selection)
DERIVED = ("counterfactual", "examples", "cost_n", "qualitative", "contamination", "data_selection")


def row_source(method: str, method_names: Collection[str]) -> str:
    """The `--methods` name a result row comes from: its method row, or `VARIANT_ROWS` for the
    rows of the STRIDE chosen among the variants ("stride", "stride-<group>")."""
    if method in method_names:
        return method
    return VARIANT_ROWS if method == VARIANT_ROWS or method.startswith(VARIANT_ROWS + "-") else method


def group_row(group: str) -> str:
    """The result row of the STRIDE chosen in select group `group` ("stride" for the group "")."""
    return f"{VARIANT_ROWS}-{group}" if group else VARIANT_ROWS


def group_runs(row: str, methods: Collection[str] | None) -> bool:
    """Whether a `--methods` run (`methods`; None: every row) computes the STRIDE row `row`:
    "stride" names every select group's row, "stride-<group>" one group's."""
    return methods is None or VARIANT_ROWS in methods or row in methods


def _provenance(earlier: dict[str, Any], cell: str, method: str | None) -> dict[str, str]:
    """Which run wrote `earlier`'s entry of (cell, method row): an older run it kept or its own."""
    for e in earlier.get("earlier_rows", []):
        if e["cell"] == cell and method in e["methods"]:
            return {k: e[k] for k in ("command", "machine", "date")}
    for e in earlier.get("earlier_cells", []):
        if e["cell"] == cell:
            return {k: e[k] for k in ("command", "machine", "date")}
    return {k: earlier.get(k, "") for k in ("command", "machine", "date")}


def recall_from_earlier(entry: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """A contamination entry of a `--methods` run, whose `recall_rows` (every row of the cell, in
    order) it has not all computed, with the others' recall taken from `earlier`'s entry of the
    cell when that was made on the same attributed model (identical memorisation figures);
    `recall_kept` lists those it found, `recall_missing` the rest."""
    rows = entry.get("recall_rows")
    if rows is None:
        return entry
    out = {k: v for k, v in entry.items() if k != "recall_rows"}
    done = {r["method"] for r in entry["recall"]}
    old = next((e for e in earlier.get("contamination", []) if e.get("cell") == entry["cell"]), None)
    same = old is not None and all(old.get(k) == entry[k] for k in ("memorisation", "pool", "replicas"))
    kept = [r for r in old["recall"] if r["method"] in rows and r["method"] not in done] if same else []
    fracs = list(dict.fromkeys(r["bucket_fraction"] for r in entry["recall"] + kept))
    rank = {m: i for i, m in enumerate(rows)}
    out["recall"] = sorted(entry["recall"] + kept, key=lambda r: (fracs.index(r["bucket_fraction"]),
                                                                  rank.get(r["method"], len(rank))))
    out["recall_kept"] = list(dict.fromkeys(r["method"] for r in kept))
    out["recall_missing"] = [m for m in rows if m not in done and m not in out["recall_kept"]]
    return out


def merge_earlier(report: dict[str, Any], earlier: dict[str, Any], full_config: dict[str, Any],
                  methods: Collection[str] | None = None) -> dict[str, Any]:
    """`report` (a run of some of `full_config`'s cells) with the entries of the other cells kept
    from `earlier` (the results file's previous version), in the config's cell order; ValueError
    from `check_earlier` when `earlier` was written by a different experiment.

    `methods` (a `--methods` run: only these method rows ran, `VARIANT_ROWS` for the STRIDE
    variants): in the cells that ran, the other methods' rows are kept from `earlier` too, and
    so are the entries derived from several methods (`DERIVED`) that such a run did not
    recompute; `earlier_rows` says where each kept row comes from.
    """
    check_earlier(earlier, full_config)
    now = {c["cell"] for c in report["cells"]}
    order = {c["name"]: i for i, c in enumerate(full_config.get("cells", []))}
    names = [m["name"] for m in full_config.get("methods", [])]
    rank = {n: i for i, n in enumerate([VARIANT_ROWS, *names])}

    def kept(key: str, e: dict[str, Any]) -> bool:
        if e.get("cell") not in now:
            return True
        if methods is None or key == "cells":
            return False
        if key == "rows":
            if row_source(e["method"], names) == VARIANT_ROWS:
                return not group_runs(e["method"], methods)
            return e["method"] not in methods
        if key in ("variants", "selection"):
            return not group_runs(group_row(e.get("group", "")), methods)
        return key in DERIVED and not any(r.get("cell") == e.get("cell") for r in report.get(key, []))

    def position(e: dict[str, Any]) -> tuple[int, int]:
        m = row_source(e["method"], names) if "method" in e and isinstance(e["method"], str) else None
        return order.get(e.get("cell"), len(order)), rank.get(m, len(rank)) if methods is not None else 0

    report = {**report, "contamination": [recall_from_earlier(e, earlier) for e in report.get("contamination", [])]}
    merged = dict(report)
    for key in CELL_KEYED:
        merged[key] = sorted([e for e in earlier.get(key, []) if kept(key, e)] + list(report.get(key, [])),
                             key=position)
    earlier_cells = [c["cell"] for c in merged["cells"] if c["cell"] not in now]
    if earlier_cells:
        merged["earlier_cells"] = [{"cell": c, **_provenance(earlier, c, None)} for c in earlier_cells]
    rows = [e for e in earlier.get("earlier_rows", []) if e["cell"] not in now]
    if methods is not None:
        groups: dict[tuple[str, ...], list[str]] = {}
        for r in earlier.get("rows", []):
            if r["cell"] in now and kept("rows", r):
                src = _provenance(earlier, r["cell"], r["method"])
                key_ = (r["cell"], src["command"], src["machine"], src["date"])
                groups.setdefault(key_, [])
                if r["method"] not in groups[key_]:
                    groups[key_].append(r["method"])
        rows += [{"cell": c, "methods": ms, "command": cmd, "machine": mach, "date": date,
                  "derived": [k for k in DERIVED if any(e.get("cell") == c and kept(k, e) for e in earlier.get(k, []))]}
                 for (c, cmd, mach, date), ms in groups.items()]
    if rows:
        merged["earlier_rows"] = rows
    merged["config"] = full_config
    return merged


def write(report: dict[str, Any], results_dir: Path, command: str) -> list[Path]:
    """`<name>.json`, `<name>.md`, `<name>.png` in `results_dir`."""
    name = report["config"]["name"]
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    report = {**report, "machine": report.get("machine") or machine(), "date": report.get("date") or time.strftime("%Y-%m-%d"),
              "command": command}
    paths = [store.write_json(results_dir / f"{name}.json", report),
             store.atomic_write(results_dir / f"{name}.md", markdown(report, command))]
    if report.get("qualitative"):
        q = report["config"]["qualitative"]["name"]
        paths.append(store.atomic_write(results_dir / f"{q}.md", qualitative_markdown(report, command)))
    png = plot(report, results_dir / f"{name}.png")
    return paths + ([png] if png else [])
