"""Every committed plot, re-rendered from its json: no empty axes, STRIDE drawn where the json has
it, and lines only along a series (the rules of the plotting section of harness/report.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from stride_jax.harness import report

RESULTS = Path(__file__).parent.parent / "experiments" / "results"


def _source(png: Path) -> Path | None:
    """The results json a committed png is drawn from (the pre-harness pipelines: `<name>_report.json`)."""
    for path in (png.with_suffix(".json"), RESULTS / f"{png.stem}_report.json"):
        if path.exists() and isinstance(json.loads(path.read_text()), dict):
            return path
    return None


PNGS = sorted(RESULTS.glob("*.png"))
PLOTS = [(png, _source(png)) for png in PNGS if _source(png) is not None]


def _finite(xy) -> bool:
    xy = np.asarray(xy, dtype=float)
    return xy.size > 0 and bool(np.isfinite(xy).all(axis=-1).any())


def _has_data(ax) -> bool:
    """Something other than a reference level: points or lines with finite data, bars, images."""
    if any(line.get_gid() != report.REFERENCE and _finite(line.get_xydata()) for line in ax.lines):
        return True
    if any(p.get_width() != 0 and p.get_height() != 0 for p in ax.patches if hasattr(p, "get_width")):
        return True
    if any(c.get_gid() != report.REFERENCE and len(c.get_paths()) for c in ax.collections):
        return True
    return bool(ax.images)


def _drawn(line) -> bool:
    return str(line.get_linestyle()).lower() not in ("none", "", " ")


def _labelled(ax):
    """(label, Line2D holding its points) for each labelled point set or line of an axes."""
    out = [(c.get_label(), c.lines[0]) for c in ax.containers if c.lines and c.lines[0] is not None]
    out += [(line.get_label(), line) for line in ax.lines if not line.get_label().startswith("_")]
    return out


def _has_stride(rep: dict) -> bool:
    rep = report.upgrade(rep)
    methods = [r["method"] for r in rep["rows"] if (r.get("lds") or {}).get("mean") is not None or r.get("seconds")]
    methods += [r["method"] for ct in rep.get("contamination", []) for r in ct["recall"]]
    methods += [m for e in rep.get("data_selection", []) for m in e["exact_match"]]
    variants = any((v.get("lds_test") or {}).get("mean") is not None for v in rep.get("variants", []))
    return variants or any(report._is_stride(m) for m in methods)


@pytest.fixture(scope="module", params=PLOTS, ids=lambda p: p[0].name)
def rendered(request):
    png, source = request.param
    rep = json.loads(source.read_text())
    fig = report.figure(rep)
    assert fig is not None, f"{png.name}: nothing drawn from {source.name}"
    return png, rep, fig


def test_every_committed_png_comes_from_a_json():
    """A png without a results json is a counterfactual curve its experiment's json names."""
    named = " ".join(p.read_text() for p in RESULTS.glob("*.json"))
    assert PLOTS, "no committed plot found"
    for png in PNGS:
        assert _source(png) is not None or f'"{png.name}"' in named, f"{png.name}: no json it is drawn from"


def test_no_empty_axes(rendered):
    png, _, fig = rendered
    for ax in fig.axes:
        assert _has_data(ax), f"{png.name}: axes {ax.get_title()!r} is empty"


def test_stride_drawn_and_distinguishable(rendered):
    png, rep, fig = rendered
    if not _has_stride(rep):
        pytest.skip("no STRIDE entries in this json")
    stride, others = [], []
    for ax in fig.axes:
        for label, line in _labelled(ax):
            (stride if label.startswith("STRIDE") and "+" not in label else others).append(line)
    assert any(_finite(line.get_xydata()) for line in stride), f"{png.name}: STRIDE is not drawn"
    style = lambda line: (str(line.get_color()), line.get_marker())  # noqa: E731
    clash = {style(s) for s in stride} & {style(o) for o in others}
    assert not clash, f"{png.name}: STRIDE drawn like another method {clash}"


def test_lines_only_along_a_series(rendered):
    """Outside an axes declared a series, a drawn line is only an axis-aligned reference level."""
    png, _, fig = rendered
    for ax in fig.axes:
        if ax.get_gid() == report.SERIES:
            continue
        for line in ax.lines:
            xy = np.asarray(line.get_xydata(), dtype=float)
            if _drawn(line) and len(xy) > 1:
                aligned = np.ptp(xy[:, 0]) == 0 or np.ptp(xy[:, 1]) == 0
                assert aligned, f"{png.name}: axes {ax.get_title()!r} joins cells with a line ({line.get_label()})"


def test_nk_regime_is_a_series_in_n_per_model_size():
    rep = json.loads((RESULTS / "nk_regime.json").read_text())
    fig = report.figure(rep)
    lds_ax = next(ax for ax in fig.axes if ax.get_title().startswith("LDS"))
    assert lds_ax.get_gid() == report.SERIES and lds_ax.get_xscale() == "log"
    lines = {label: line for label, line in _labelled(lds_ax) if _drawn(line)}
    sizes = sorted({report._size(c["params"]) for c in rep["cells"]})
    for size in sizes:  # STRIDE: one line per model size, through every n of that size
        n_cells = sum(report._size(c["params"]) == size for c in rep["cells"])
        assert len(lines[f"STRIDE, {size}"].get_xdata()) == n_cells
    others = [line for label, line in _labelled(lds_ax) if not label.startswith(("STRIDE", "noise ceiling"))]
    assert others and not any(_drawn(line) for line in others)  # reference methods: markers only


def test_render_writes_png_from_json(tmp_path):
    png, source = PLOTS[0]
    out = report.render(source, tmp_path / png.name)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a results report"):
        report.render(_write(tmp_path / "rows.json", [{"method": "stride"}]))


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _row(method, cell, mean, secs, alpha=0.3):
    lds = None if mean is None else {"mean": mean, "ci95": [mean - 0.05, mean + 0.05], "n_nan": 0}
    return {"method": method, "cell": cell, "alpha": alpha, "lds": lds, "seconds": secs}


def _cell(name, params, n, ceiling=0.6):
    return {"cell": name, "params": params, "n_train": n,
            "noise_ceiling": {"0.3": {"ceiling_for_seed_average": ceiling}} if ceiling else {}}


@pytest.mark.parametrize("case", ["one-cell", "cells", "n-series", "no-lds", "nothing"])
def test_plot_small_reports(case, tmp_path):
    """The shapes a harness run writes (one cell, several, a sweep in n, cost only) all draw by the
    rules; a report with nothing to draw gives no png."""
    cells = {"one-cell": [_cell("", 1000, 20)], "cells": [_cell("a", 1000, 20), _cell("b", 1000, 20, None)],
             "n-series": [_cell("s-n20", 1000, 20), _cell("s-n40", 1000, 40), _cell("l-n20", 9000, 20)],
             "no-lds": [_cell("", 1000, 20, None)], "nothing": [_cell("", 1000, 20)]}[case]
    rows = [] if case == "nothing" else [
        _row(m, c["cell"], None if case == "no-lds" else v, {"fit": 1.0, "score": 0.0} if m != "stride" else {"total": 2.0})
        for c in cells for m, v in (("stride", 0.4), ("graddot", 0.3), ("random", 0.0))]
    rep = {"config": {"name": case, "split": "test"}, "cells": cells, "rows": rows}
    png = report.plot(rep, tmp_path / f"{case}.png")
    if case == "nothing":
        assert png is None
        return
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = report.figure(rep)
    assert all(_has_data(ax) for ax in fig.axes)
    assert any(label.startswith("STRIDE") for ax in fig.axes for label, _ in _labelled(ax))
    for ax in fig.axes:
        if ax.get_gid() != report.SERIES:
            assert not any(_drawn(line) and len(line.get_xdata()) > 1 and np.ptp(line.get_xdata()) > 0
                           and np.ptp(line.get_ydata()) > 0 for line in ax.lines)
    assert (case == "n-series") == any(ax.get_gid() == report.SERIES for ax in fig.axes)


def test_nk_law_draws_one_line_per_cell_through_single_fits():
    """The law panel: a line per cell (model and n) through its single-fit K only; rows that
    average several fits (`fit.ensemble`) are open markers, never joined to the line."""
    rep = json.loads((RESULTS / "nk_regime.json").read_text())  # the law groups and group ""
    fig = report.figure(rep)
    ax = next(ax for ax in fig.axes if ax.get_title() == "STRIDE as K grows with n")
    lines = {label: line for label, line in _labelled(ax) if label.startswith("STRIDE")}
    for cell, groups in report._k_law(rep).items():
        single = lines[f"STRIDE, {cell}"]
        assert _drawn(single) and len(single.get_xdata()) == sum(e == 1 for _, _, e in groups)
        if any(e > 1 for _, _, e in groups):
            assert not _drawn(lines[f"STRIDE, 2 fits averaged, {cell}"])
    # the law's rows are drawn there only: the other panels keep group ""'s row and the references
    others = {label for a in fig.axes if a is not ax for label, _ in _labelled(a)}
    assert not any(label.startswith("STRIDE-K=") for label in others) and any(label.startswith("STRIDE") for label in others)
