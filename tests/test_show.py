"""`stride-jax show`: a self-contained, escaped HTML report of a run directory, checked as text
and (slow) as rendered by a real headless browser."""

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stride_jax import Attribution, cli, data, show, store

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n"
QUERIES = [SYSTEM + "<|im_start|>user\nWho is Emma Woodhouse?<|im_end|>\n<|im_start|>assistant\nA lady of Highbury.",
           "Is 3 < 5 && \"x\" > 'y'? <script>alert(1)</script>"]
TRAIN = ["Emma Woodhouse, handsome, clever, and rich.", "The LORD spake unto Moses.", "Highbury, the large village.",
         "<b>bold</b> & markup in a training text", "Mr. Knightley was a sensible man."]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def make_run(path: Path, *, per_token: bool = False, generations: bool = False, confidence: bool = True,
             lds: float | None = 0.4123) -> Path:
    """A run directory in the formats `stride-jax attribute` writes (scores, top_k, config)."""
    scores = np.array([[0.9, -0.05], [-0.4, 0.2], [0.5, 0.0], [0.01, -0.3], [-0.02, 0.1]], np.float32)
    attr = Attribution(scores=scores, train_ids=np.arange(5) + 100, query_ids=np.arange(2),
                       lambdas=np.ones(2, np.float32), converged=np.array([True, False]),
                       fit_identity="f00d" * 16)
    if confidence:
        rows = np.array([[attr_rows(attr, 0, False), attr_rows(attr, 0, True)],
                         [attr_rows(attr, 1, False), attr_rows(attr, 1, True)]])
        stab = np.array([[[0.97, 0.55, 0.2], [0.93, 0.1, 0.0]], [[0.8, 0.6, 0.1], [0.95, 0.3, np.nan]]], np.float32)
        interval = np.stack([np.full(rows.shape, -0.1), np.full(rows.shape, 1.0)], axis=-1)
        attr = dataclasses.replace(attr, confidence_rows=rows, stability=stab, interval=interval,
                                   confidence_info={"n_boot": 50, "fraction": 0.5, "level": 0.95, "seconds": 1.5})
    attr.save(path)
    lines = []
    for q in range(2):
        entry = {"query_id": q, "query": QUERIES[q], "converged": bool(attr.converged[q])}
        for kind, harmful in (("helpful", False), ("harmful", True)):
            entry[kind] = [{"train_id": int(attr.train_ids[i]), "score": s, "text": TRAIN[i]}
                           for i, s in attr.top_k(q, k=3, harmful=harmful)]
        lines.append(entry)
    data.write_jsonl(path / "top_k.jsonl", lines)
    config = {"stride": {"design": {"n_subsets": 13, "per_example": 8}}, "preset": "lm", "model": "m.gguf",
              "train": "t.jsonl", "queries": "q.jsonl", "seq_len": 10, "seconds": {"fit": 2.5}}
    if lds is not None:
        config["lds"] = {"mean": lds, "low": 0.3, "high": 0.5}
    store.write_json(path / "config.json", config)
    if per_token:
        data.write_jsonl(path / "per_token.jsonl", [
            {"query_id": 0, "position": 1, "token": " Hig", "helpful": [{"train_id": 102, "score": 0.6}]},
            {"query_id": 0, "position": 0, "token": "A lady", "helpful": [{"train_id": 100, "score": 0.1}]},
            {"query_id": 0, "position": 2, "token": "hbury<&>", "helpful": [{"train_id": 101, "score": -0.2}]},
            {"query_id": 1, "position": 0, "token": "Is", "helpful": []}])
    if generations:
        data.write_jsonl(path / "generations.jsonl", [
            {"query_id": 0, "prompt": "Who is Emma?", "generated": "A lady of Highbury & more", "token_ids": [1, 2]}])
    return path


def attr_rows(attr, q, harmful):
    return [i for i, _ in attr.top_k(q, k=3, harmful=harmful)]


def visible_text(page: str) -> str:
    return re.sub(r"<[^>]+>", "", page)


def test_report_holds_queries_examples_scores_and_stability_escaped(tmp_path):
    run = make_run(tmp_path / "run")
    out = show.write_report(run)
    assert out == run / "report.html"
    page = out.read_text()
    assert "Who is Emma Woodhouse?" in page and "A lady of Highbury." in page
    # every text escaped: no markup of the data reaches the page
    assert "<script>" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;bold&lt;/b&gt; &amp; markup" in page
    assert "3 &lt; 5 &amp;&amp; &quot;x&quot; &gt; &#x27;y&#x27;" in page
    for text in TRAIN[:3]:
        assert show.esc(text) in page
    assert "+0.9" in page and "-0.4" in page  # helpful and harmful scores
    assert "stability 0.97" in page and "stability 0.93" in page and "stability nan" in page
    assert "LDS" in page and "0.4123" in page and "higher is better" in page
    assert "f00d" * 16 in page and "did not converge" in page
    assert "No per-token scores" in page  # said, not silently unshaded
    # the chat template's system turn is folded, its text still there to unfold
    assert re.search(r'<details class="tpl"><summary>system prompt</summary><code>&lt;\|im_start\|&gt;system', page)
    assert "<summary>assistant</summary>" in page
    # self-contained: no script, no external resource
    assert not re.search(r"<script|<link|<img|<iframe|src=|href=|@import|url\(|https?://", page, re.I)


def test_per_token_shading_and_generations(tmp_path):
    run = make_run(tmp_path / "run", per_token=True, generations=True, confidence=False, lds=None)
    page = show.render(show.load_run(run))
    tokens = re.findall(r'<span class="tok" style="background:rgba\(34,139,34,([0-9.]+)\)"[^>]*>([^<]*)</span>', page)
    assert [t for _, t in tokens[:3]] == ["A lady", " Hig", "hbury&lt;&amp;&gt;"]  # position order, escaped
    alphas = [float(a) for a, _ in tokens[:3]]
    assert alphas[1] == max(alphas) > alphas[0] > alphas[2] == 0  # shaded by support; negative gives none
    assert "generated (attributed)" in page and "A lady of Highbury &amp; more" in page
    assert "stability n/a" in page and "No LDS in this run" in page


def test_fold_template_folds_only_the_markers():
    html = show.fold_template("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                              "<|start_header_id|>user<|end_header_id|>\n\nHi <there><|eot_id|>")
    assert visible_text(html).count("Be brief.") == 1 and "Hi &lt;there&gt;" in html
    assert html.count("<details") == 3  # the system turn, the user header, the final marker
    assert show.fold_template("no template here & there") == "no template here &amp; there"


def test_bad_run_directories_give_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        show.load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="top_k.jsonl"):
        show.load_run(tmp_path / "empty")
    run = make_run(tmp_path / "run")
    with open(run / "top_k.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"top_k.jsonl line 3"):
        show.load_run(run)
    with pytest.raises(ValueError, match="max_queries"):
        show.write_report(make_run(tmp_path / "run2"), max_queries=0)


def test_cli_show_writes_the_report(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert cli.main(["show", str(run), "--out", str(tmp_path / "r.html"), "--max-queries", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "Showing the first 1 of 2 queries" in page and "Who is Emma Woodhouse?" in page
    assert "alert(1)" not in page
    assert cli.main(["show", str(tmp_path / "nowhere")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def _chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium) "
                    "to render the report in a real headless browser")
def test_report_renders_in_a_headless_browser(tmp_path):
    run = make_run(tmp_path / "run", per_token=True)
    page = show.write_report(run)
    dom = _chromium("--dump-dom", page.resolve().as_uri(), tmp_path=tmp_path).stdout
    assert "Who is Emma Woodhouse?" in dom and "Highbury, the large village." in dom
    assert "stability 0.97" in dom and "<script>alert" not in dom and "&lt;script&gt;alert(1)" in dom
    assert dom.count('class="query"') == 2
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,900", page.resolve().as_uri(), tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
