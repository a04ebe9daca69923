"""Notebooks only call the library: run their code cells top to bottom."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            exec(compile(source, f"{path.name}", "exec"), namespace)
    assert os.path.isdir(tmp_path / "runs")
    if path.name == "quickstart.ipynb":  # the library on one's own data: scores, top-k, a plot, saved
        scores = namespace["attr"].scores
        assert scores.shape == (len(namespace["texts"]), len(namespace["query_texts"]))
        assert np.isfinite(scores).all() and np.abs(scores).max() > 0
        assert (tmp_path / "runs" / "quickstart" / "scores.png").stat().st_size > 1000
        assert (tmp_path / "runs" / "quickstart" / "scores" / "attribution.json").exists()
