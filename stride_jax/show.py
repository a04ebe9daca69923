"""`stride-jax show RUN_DIR`: one self-contained HTML page from a run of `stride-jax attribute`.

    stride-jax show runs/attr                    writes runs/attr/report.html
    show.write_report("runs/attr", "r.html")     the same from Python

The page needs no server and loads nothing: inline CSS, no script, no external resource. It
reads what `attribute` writes (harness/attribute.py): `top_k.jsonl` (required: per query its text
and its top helpful / harmful training examples with text and score), `attribution.json` +
`scores.npz` (`Attribution.load`: the stability and interval of each top entry when the run
computed confidence, and the fit identity), `config.json` (the resolved config, preset, timings)
and, when present, `per_token.jsonl` and `generations.jsonl`.

Per query it shows the text with the chat template's boilerplate (`<|im_start|>system ...
<|im_end|>` and the other special-token markers of ChatML and Llama 3) folded into `<details>`,
the model's generated continuation when the run attributed one, and two columns of training
examples, most helpful and most harmful, each with its score (positive = including the example
lowers the query's loss), a bar of its size and its stability. With per-token scores each counted
token is shaded by its support: the sum of the positive scores of that token's top examples in
per_token.jsonl, relative to the query's best-supported token (the tooltip lists the examples).
Without per_token.jsonl the query is shown plainly, unshaded, and the page says so. An `lds`
entry of config.json or attribution.json is shown with how to read it. All text is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from stride_jax import store

log = logging.getLogger("stride_jax")

REQUIRED = "top_k.jsonl"

# Chat-template boilerplate: a whole system turn (ChatML, Llama 3), a role header, other markers.
_TEMPLATE = re.compile(
    r"(?P<system><\|im_start\|>system\n?.*?(?:<\|im_end\|>\n?|$)"
    r"|<\|start_header_id\|>system<\|end_header_id\|>\n*.*?(?:<\|eot_id\|>\n?|$))"
    r"|(?P<role><\|im_start\|>(?P<r1>\w+)\n?|<\|start_header_id\|>(?P<r2>\w+)<\|end_header_id\|>\n*)"
    r"|(?P<marks>(?:(?!<\|im_start\|>|<\|start_header_id\|>)<\|[A-Za-z0-9_.\-]{1,40}\|>\n?)+)",
    re.DOTALL,
)

_END_MARKS = ("im_end", "eot_id", "endoftext", "end_of_text", "eos")


def esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def fold_template(text: str) -> str:
    """`text` as HTML: the chat template's boilerplate in `<details>` (folded), the rest escaped."""
    out, pos = [], 0
    for m in _TEMPLATE.finditer(text):
        out.append(esc(text[pos:m.start()]))
        raw = m.group(0)
        if m.group("system") is not None:
            label = "system prompt"
        elif m.group("role") is not None:
            label = m.group("r1") or m.group("r2")
        elif all(mark in _END_MARKS for mark in re.findall(r"<\|([^|]+)\|>", raw)):
            label = "end"
        else:
            label = "template"
        out.append(f'<details class="tpl"><summary>{esc(label)}</summary><code>{esc(raw)}</code></details>')
        pos = m.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a jsonl file; a bad line is one error naming the file and the line."""
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return store.read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows, read from a run directory (clear errors on a bad run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not (run_dir / REQUIRED).is_file():
        raise FileNotFoundError(f"{run_dir} has no {REQUIRED}: not a directory written by `stride-jax attribute`")
    run: dict[str, Any] = {"dir": run_dir, "notes": []}
    run["queries"] = _read_jsonl(run_dir / REQUIRED)
    if not run["queries"]:
        raise ValueError(f"{run_dir / REQUIRED} holds no query")
    for n, q in enumerate(run["queries"], 1):
        for key in ("helpful", "harmful"):
            if not isinstance(q.get(key, []), list):
                raise ValueError(f"{run_dir / REQUIRED} line {n}: {key!r} must be a list")
    run["config"] = _read_json(run_dir / "config.json")
    run["meta"] = _read_json(run_dir / "attribution.json")
    run["attribution"] = None
    if run["meta"] is not None and (run_dir / "scores.npz").is_file():
        from stride_jax.scores import Attribution

        try:
            run["attribution"] = Attribution.load(run_dir)
        except ValueError as e:
            log.warning("show: %s; the report has no stability", e)
            run["notes"].append(f"scores.npz could not be read ({e}): no stability shown")
    for name in ("per_token", "generations"):
        path = run_dir / f"{name}.jsonl"
        run[name] = _read_jsonl(path) if path.is_file() else None
    return run


def _lds_of(run: dict[str, Any]) -> Any:
    for source in (run["config"], run["meta"]):
        if isinstance(source, dict) and source.get("lds") is not None:
            return source["lds"]
    return None


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _run_section(run: dict[str, Any]) -> str:
    cfg = run["config"] or {}
    meta = run["meta"] or {}
    stride_cfg = cfg.get("stride", {}) if isinstance(cfg.get("stride"), dict) else {}
    design = stride_cfg.get("design", {})
    facts = [("method", meta.get("method")), ("preset", cfg.get("preset")), ("model", cfg.get("model")),
             ("train", cfg.get("train")), ("queries", cfg.get("queries")),
             ("training examples", meta.get("n_train")), ("queries scored", meta.get("n_query")),
             ("tokens per example", cfg.get("seq_len")), ("subsets K", design.get("n_subsets")),
             ("subsets per example d", design.get("per_example")),
             ("seconds", ", ".join(f"{k} {_fmt(v)}" for k, v in cfg.get("seconds", {}).items()) or None),
             ("fit identity", meta.get("fit_identity") if isinstance(meta.get("fit_identity"), str)
              else (json.dumps(meta["fit_identity"]) if meta.get("fit_identity") else None))]
    info = meta.get("confidence_info")
    if info:
        facts.append(("confidence", f"{info.get('n_boot')} draws of {info.get('fraction')} of the operators, "
                                    f"{info.get('level')} intervals, {info.get('seconds')} s"))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>" for k, v in facts if v not in (None, ""))
    parts = [f'<section class="run"><h2>Run</h2><table class="facts">{rows}</table>']
    lds = _lds_of(run)
    if lds is not None:
        if isinstance(lds, dict):
            text = ", ".join(f"{k} {_fmt(v)}" for k, v in lds.items() if not isinstance(v, (dict, list)))
        else:
            text = _fmt(lds)
        parts.append(f'<p class="lds"><b>LDS</b> {esc(text)} <span class="note">(Spearman between predicted and '
                     "retrained query losses over random subsets: higher is better, 0 is random; compare it with "
                     "the noise ceiling)</span></p>")
    else:
        parts.append('<p class="note">No LDS in this run (it needs retrained ground truth: see `stride-jax run`).</p>')
    for note in run["notes"]:
        parts.append(f'<p class="warn">{esc(note)}</p>')
    if cfg:
        parts.append(f"<details><summary>config.json</summary><pre>{esc(json.dumps(cfg, indent=2))}</pre></details>")
    parts.append("</section>")
    return "".join(parts)


def _stability(run: dict[str, Any], q: int, entry: dict[str, Any], harmful: bool) -> tuple[float, float, float] | None:
    if "stability" in entry:  # a top_k.jsonl that carries it
        lo, hi = entry.get("interval", (math.nan, math.nan))
        return float(entry["stability"]), float(lo), float(hi)
    attr = run["attribution"]
    if attr is None or attr.confidence_rows is None or q >= attr.n_query or "train_id" not in entry:
        return None
    rows = run.setdefault("_row_of", {int(t): i for i, t in enumerate(attr.train_ids.tolist())})
    row = rows.get(int(entry["train_id"]))
    return None if row is None else attr.confidence_of(q, row, harmful=harmful)


def _example(run: dict[str, Any], q: int, entry: dict[str, Any], harmful: bool, scale: float) -> str:
    score = float(entry.get("score", math.nan))
    width = 0.0 if not scale or math.isnan(score) else min(100.0, 100.0 * abs(score) / scale)
    conf = _stability(run, q, entry, harmful)
    if conf is None:
        stab = '<span class="stab none" title="no confidence computed for this run">stability n/a</span>'
    else:
        s, lo, hi = conf
        level = "none" if math.isnan(s) else ("high" if s >= 0.9 else "mid" if s >= 0.5 else "low")
        stab = (f'<span class="stab {level}" title="fraction of resampled solves keeping it in the top-k; score '
                f'interval [{lo:.3g}, {hi:.3g}]">stability {_fmt(s) if math.isnan(s) else f"{s:.2f}"}</span>')
    ident = entry.get("train_id", entry.get("row", "?"))
    return (f'<li class="ex"><div class="line"><span class="score">{score:+.4g}</span>'
            f'<span class="bar {"neg" if harmful else "pos"}"><i style="width:{width:.1f}%"></i></span>{stab}'
            f'<span class="id">train {esc(ident)}</span></div>'
            f'<div class="text">{fold_template(str(entry.get("text", "")))}</div></li>')


def _tokens_of(run: dict[str, Any], q: int, query_id: Any) -> list[dict[str, Any]] | None:
    """The per-token records of query q (per_token.jsonl: one record per token with `query_id`,
    or one per query with a `tokens` list), in position order; None when the run has none."""
    records = run["per_token"]
    if not records:
        return None
    if "tokens" in records[0]:
        matches = [r for r in records if r.get("query_id", None) == query_id] or (
            [records[q]] if q < len(records) else [])
        return list(matches[0]["tokens"]) if matches else []
    tokens = [r for r in records if r.get("query_id", r.get("owner_id")) == query_id]
    return sorted(tokens, key=lambda r: r.get("position", 0))


def _token_html(tokens: list[dict[str, Any]]) -> str:
    support = [sum(max(float(e.get("score", 0.0)), 0.0) for e in t.get("helpful", [])) for t in tokens]
    top = max(support, default=0.0)
    spans = []
    for t, s in zip(tokens, support):
        alpha = s / top if top > 0 else 0.0
        tip = "; ".join(f"train {e.get('train_id', e.get('row', '?'))}: {float(e.get('score', math.nan)):+.3g}"
                        for e in t.get("helpful", [])[:5])
        spans.append(f'<span class="tok" style="background:rgba(34,139,34,{alpha * 0.85:.3f})" '
                     f'title="support {s:.3g}: {esc(tip)}">{esc(t.get("token", t.get("text", "")))}</span>')
    return "".join(spans)


def _generation_of(run: dict[str, Any], q: int, query_id: Any) -> dict[str, Any] | None:
    records = run["generations"]
    if not records:
        return None
    by_id = [r for r in records if "query_id" in r and r["query_id"] == query_id]
    return by_id[0] if by_id else (records[q] if q < len(records) else None)


def _query_section(run: dict[str, Any], q: int, record: dict[str, Any]) -> str:
    query_id = record.get("query_id", q)
    status = "" if record.get("converged", True) else ' <span class="warn">recovery did not converge</span>'
    parts = [f'<section class="query" id="q{q}"><h2>Query {q} <span class="id">id {esc(query_id)}</span>'
             f"{status}</h2>"]
    gen = _generation_of(run, q, query_id)
    if gen is not None:
        prompt = gen.get("prompt", "")
        generated = gen.get("generated", gen.get("generation", gen.get("text", "")))
        parts.append(f'<div class="qtext"><span class="label">prompt</span>{fold_template(str(prompt))}</div>'
                     f'<div class="qtext gen"><span class="label">generated (attributed)</span>'
                     f'{fold_template(str(generated))}</div>')
    else:
        parts.append(f'<div class="qtext">{fold_template(str(record.get("query", "")))}</div>')
    tokens = _tokens_of(run, q, query_id)
    if tokens:
        parts.append('<div class="tokens"><span class="label">counted tokens, shaded by the support of their top '
                     f'training examples</span>{_token_html(tokens)}</div>')
    elif tokens is None:
        parts.append('<p class="note">No per-token scores in this run (`stride-jax attribute --per-token`): the '
                     "query is shown unshaded.</p>")
    entries = record.get("helpful", []) + record.get("harmful", [])
    scale = max((abs(float(e.get("score", 0.0))) for e in entries), default=0.0)
    scale = 0.0 if math.isnan(scale) else scale
    for key, title in (("helpful", "Most helpful"), ("harmful", "Most harmful")):
        items = "".join(_example(run, q, e, key == "harmful", scale) for e in record.get(key, []))
        parts.append(f'<div class="col {key}"><h3>{title}</h3><ol>{items or "<li>none</li>"}</ol></div>')
    parts.append("</section>")
    return "".join(parts)


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
main{max-width:1180px;margin:0 auto;padding:18px 22px}
h1{font-size:22px;margin:6px 0}h2{font-size:17px;margin:0 0 8px}h3{font-size:14px;margin:8px 0 4px;color:#445}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:14px 16px;margin:14px 0}
.note{color:#667;font-size:13px}.warn{color:#a3370f;font-weight:600;font-size:13px}
.facts th{text-align:left;font-weight:500;color:#556;padding:1px 14px 1px 0}
.facts td{font-family:ui-monospace,monospace;font-size:13px}
.query{display:grid;grid-template-columns:1fr 1fr;gap:4px 20px}
.query>h2,.query>.qtext,.query>.tokens,.query>.note{grid-column:1/3}
.qtext,.tokens{white-space:pre-wrap;background:#f3f5f8;border-radius:6px;padding:8px 10px;margin:2px 0}
.gen{background:#eef6ee}.label{display:block;font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:#778}
.tok{border-radius:3px;padding:0 1px}
ol{padding-left:22px;margin:0}.ex{margin:0 0 10px}
.line{display:flex;align-items:center;gap:8px;font-size:13px}
.score{font-family:ui-monospace,monospace;min-width:5.5em}
.bar{display:inline-block;width:70px;height:7px;background:#eceff3;border-radius:4px;overflow:hidden}
.bar i{display:block;height:100%}.bar.pos i{background:#2e8b57}.bar.neg i{background:#c0392b}
.stab{border-radius:9px;padding:0 7px;font-size:12px}.stab.high{background:#d5f0dc;color:#13612d}
.stab.mid{background:#fbefcf;color:#7a5200}.stab.low{background:#f7dada;color:#8a1f1f}
.stab.none{background:#eee;color:#777}
.id{color:#889;font-size:12px;font-weight:400}
.ex .text{white-space:pre-wrap;font-size:13px;max-height:11em;overflow:auto;border-left:3px solid #e3e6ea;
  padding:2px 8px;margin-top:3px}
details.tpl{display:inline-block;vertical-align:baseline;margin:0 2px}
details.tpl>summary{display:inline;cursor:pointer;font-size:11px;color:#5a6a85;background:#e6ebf3;
  border-radius:4px;padding:0 5px}
details.tpl[open]>code{display:block;white-space:pre-wrap;font-size:11px;color:#556;background:#f0f2f6;
  padding:4px}
pre{white-space:pre-wrap;font-size:12px}
"""


def render(run: dict[str, Any], *, max_queries: int | None = None) -> str:
    """The report of a `load_run` result as one HTML string (the first `max_queries` queries)."""
    if max_queries is not None and (not isinstance(max_queries, int) or isinstance(max_queries, bool)
                                    or max_queries < 1):
        raise ValueError(f"max_queries must be an integer >= 1, got {max_queries!r}")
    queries = run["queries"]
    shown = queries if max_queries is None else queries[:max_queries]
    sign = (run["meta"] or {}).get("sign", "positive = including the training example lowers the query's loss")
    head = (f"<header><h1>STRIDE attribution: {esc(run['dir'].name)}</h1>"
            f'<p class="note">Scores: {esc(sign)}. '
            "Stability: the fraction of resampled recoveries (subsets of the operators, no refit) that keep an "
            "example in the query's top-k; high (green, >= 0.9) is a finding, low (red, < 0.5) is noise. The chat "
            "template's boilerplate is folded: click a grey tag to see it.</p>")
    if len(shown) < len(queries):
        head += f'<p class="warn">Showing the first {len(shown)} of {len(queries)} queries (--max-queries).</p>'
    head += "</header>"
    body = head + _run_section(run) + "".join(_query_section(run, q, r) for q, r in enumerate(shown))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>stride-jax report: {esc(run['dir'].name)}</title><style>{_CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None, *, max_queries: int | None = None) -> Path:
    """Write the HTML report of `run_dir` to `out` (default RUN_DIR/report.html); returns its path."""
    run = load_run(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    page = render(run, max_queries=max_queries)
    out.parent.mkdir(parents=True, exist_ok=True)
    store.atomic_write(out, page)
    return out


__all__ = ["fold_template", "load_run", "render", "write_report"]
