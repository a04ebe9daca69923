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


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """LDS per method (by cell when there are several, with intervals and the noise ceiling)
    and seconds per method; a third panel for the cost in n."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["rows"]
    if not rows:
        return None
    alpha = sorted({r["alpha"] for r in rows})[0]
    rows = [r for r in rows if r["alpha"] == alpha]
    cells = [c["cell"] for c in report["cells"]]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    n_panels = 3 if report.get("cost_n") else 2
    fig = Figure(figsize=(5.2 * n_panels, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
    cmap = __import__("matplotlib").colormaps["tab20"]
    color = {m: ("k" if m == "stride" else cmap(i % 20)) for i, m in enumerate(methods)}
    by = {(r["method"], r["cell"]): r for r in rows}
    x = np.arange(len(cells))
    for i, m in enumerate(methods):
        pts = [(j, by[(m, c)]) for j, c in enumerate(cells)
               if (m, c) in by and (by[(m, c)]["lds"] or {}).get("mean") is not None]
        if not pts:
            continue
        xs = np.array([j for j, _ in pts], float) + (0.0 if len(cells) > 1 else i * 0.8)
        y = np.array([r["lds"]["mean"] for _, r in pts])
        err = np.array([[r["lds"]["mean"] - r["lds"]["ci95"][0], r["lds"]["ci95"][1] - r["lds"]["mean"]] for _, r in pts]).T
        kw = dict(color=color[m], label=m, capsize=3, marker="o", lw=2.5 if m.startswith("stride") else 1.2)
        axes[0].errorbar(xs, y, yerr=err, linestyle="-" if len(cells) > 1 else "none", **kw)
        axes[1].plot(xs, [r["seconds"].get("total", np.nan) for _, r in pts], marker="o", color=color[m], label=m,
                     linestyle="-" if len(cells) > 1 else "none")
    ceil = [next((c["noise_ceiling"].get(str(alpha), {}) for c in report["cells"] if c["cell"] == cell), {})
            .get("ceiling_for_seed_average", np.nan) for cell in cells]
    if len(cells) > 1:
        axes[0].plot(x, ceil, ":", color="0.4", lw=1.5, label="noise ceiling (seed avg)")
        for ax in axes[:2]:
            ax.set_xticks(x, [_cell_label(c) for c in cells])
    else:
        axes[0].axhline(ceil[0], linestyle=":", color="0.4", label="noise ceiling (seed avg)")
        for ax in axes[:2]:
            ax.set_xticks([])
    axes[0].set(ylabel=f"LDS ({report['config'].get('split', 'test')} queries)", title="LDS")
    axes[1].set(yscale="log", ylabel="seconds (all stages)", title="cost")
    if n_panels == 3:
        cn = report["cost_n"]
        for m in dict.fromkeys(r["method"] for r in cn):
            rs = sorted((r for r in cn if r["method"] == m), key=lambda r: r["n"])
            axes[2].plot([r["n"] for r in rs], [r["seconds"]["total"] for r in rs], marker="o",
                         color=color.get(m, "0.5"), label=m)
        axes[2].set(xscale="log", yscale="log", xlabel="training examples n", ylabel="seconds", title="cost by n")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


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
    aside) with different values. Settings only one of them has (a field added since) do not count.
    """
    if earlier.get("config", {}).get("name") != full_config["name"]:
        raise ValueError(f"the results file holds experiment {earlier.get('config', {}).get('name')!r}, "
                         f"not {full_config['name']!r}")
    a = _leaves({k: v for k, v in earlier["config"].items() if k not in ("cells", "methods")})
    b = _leaves({k: v for k, v in full_config.items() if k not in ("cells", "methods")})
    differ = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    if differ:
        raise ValueError(f"the results file was written by another version of {full_config['name']!r} "
                         f"(differs in {differ[:5]}); write this run elsewhere (--results)")


VARIANT_ROWS = "stride"  # the --methods name of the STRIDE variants (their chosen rows, variants, selection)
DERIVED = ("counterfactual", "examples", "cost_n", "qualitative", "contamination", "data_selection")


def row_source(method: str, method_names: Collection[str]) -> str:
    """The `--methods` name a result row comes from: its method row, or `VARIANT_ROWS` for the
    rows of the STRIDE chosen among the variants ("stride", "stride-<group>")."""
    if method in method_names:
        return method
    return VARIANT_ROWS if method == VARIANT_ROWS or method.startswith(VARIANT_ROWS + "-") else method


def _provenance(earlier: dict[str, Any], cell: str, method: str | None) -> dict[str, str]:
    """Which run wrote `earlier`'s entry of (cell, method row): an older run it kept or its own."""
    for e in earlier.get("earlier_rows", []):
        if e["cell"] == cell and method in e["methods"]:
            return {k: e[k] for k in ("command", "machine", "date")}
    for e in earlier.get("earlier_cells", []):
        if e["cell"] == cell:
            return {k: e[k] for k in ("command", "machine", "date")}
    return {k: earlier.get(k, "") for k in ("command", "machine", "date")}


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
            return row_source(e["method"], names) not in methods
        if key in ("variants", "selection"):
            return VARIANT_ROWS not in methods
        return key in DERIVED and not any(r.get("cell") == e.get("cell") for r in report.get(key, []))

    def position(e: dict[str, Any]) -> tuple[int, int]:
        m = row_source(e["method"], names) if "method" in e and isinstance(e["method"], str) else None
        return order.get(e.get("cell"), len(order)), rank.get(m, len(rank)) if methods is not None else 0

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
