"""`stride-jax compare`: config handling, isolated per-method runs with measured memory, the report."""

import json
from pathlib import Path

import numpy as np
import pytest

from stride_jax import compare
from stride_jax.cli import main as cli_main
from stride_jax.config import load_config_file

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def smoke_config() -> compare.CompareConfig:
    return compare.CompareConfig.from_dict(load_config_file(CONFIGS / "pretrain_lds_smoke.yaml"))


def test_configs_load_and_bad_input_is_rejected():
    full = compare.CompareConfig.from_dict(load_config_file(CONFIGS / "pretrain_lds.yaml"))
    assert [s.d_model for s in full.sizes] == [64, 128, 192]
    assert full.experiment.groundtruth.n_subsets >= 64 and full.experiment.groundtruth.alpha == 0.3
    cfg = smoke_config()
    assert cfg.experiment.data.train_per_source == 24 and cfg.scaling.train_per_source == (12, 24)
    exp = cfg.experiment_for(cfg.sizes[1], train_per_source=12)
    assert exp.model.d_model == 32 and exp.data.train_per_source == 12 and exp.stride == cfg.experiment.stride
    with pytest.raises(ValueError, match="unknown method"):
        compare.CompareConfig(methods=("stride", "nope"))
    with pytest.raises(ValueError, match="unique"):
        compare.CompareConfig(sizes=(compare.SizeSpec("a"), compare.SizeSpec("a")))
    with pytest.raises(ValueError, match="scaling.size"):
        compare.CompareConfig(scaling=compare.ScalingConfig(size="zz"))
    with pytest.raises(ValueError, match="stride_tuned names size"):
        compare.CompareConfig(stride_tuned={"zz": {}})
    with pytest.raises(ValueError, match="unknown"):
        compare.CompareConfig(stride_tuned={"0.2M": {"fit": {"no_such_field": 1}}})
    tuned = compare.CompareConfig.from_dict({"stride_tuned": {"2.2M": {"fit": {"learning_rate": 0.01}}}})
    assert tuned.stride_tuned["2.2M"]["fit"]["learning_rate"] == 0.01
    with pytest.raises(ValueError, match="unknown CompareConfig"):
        compare.CompareConfig.from_dict({"sizez": []})


def _row(method, size, params, lds, total, peak, load):
    return {"method": method, "size": size, "params": params, "lds": {"mean": lds, "ci95": [lds - .1, lds + .1],
            "n_nan": 0}, "seconds": {"fit": total / 2, "total": total}, "peak_memory_bytes": peak,
            "load_peak_bytes": load, "memory_kind": "peak RSS while the method ran"}


def test_growth_ratios_markdown_and_plot(tmp_path):
    mib = 2**20
    rows = [_row("stride", "a", 100, 0.5, 10.0, 300 * mib, 200 * mib), _row("stride", "b", 1000, 0.6, 30.0, 500 * mib, 200 * mib),
            _row("graddot", "a", 100, 0.2, 5.0, 250 * mib, 200 * mib), _row("graddot", "b", 1000, 0.1, 50.0, 400 * mib, 200 * mib)]
    r = compare.growth_ratios(rows, "size", "a", "b")
    assert r["stride"]["seconds"] == pytest.approx(3.0) and r["graddot"]["seconds"] == pytest.approx(10.0)
    assert r["stride"]["method_memory"] == pytest.approx(3.0) and r["graddot"]["peak_memory"] == pytest.approx(1.6)
    cost_n = [{**_row(m, "a", 100, 0, t, 300 * mib, 200 * mib), "n": n, "n_queries": 5}
              for m, n, t in [("stride", 10, 4.0), ("stride", 40, 5.0), ("graddot", 10, 1.0), ("graddot", 40, 4.0)]]
    gt = {"n_subsets": 8, "seeds_per_subset": 2, "alpha": 0.3}
    report = {"rows": rows, "cost_n": cost_n, "machine": "test", "date": "2026-01-01",
              "config": {"name": "t", "sizes": [{"name": "a"}, {"name": "b"}]},
              "noise_ceiling": {s: {"mean": 0.7, "ci95": [0.6, 0.8], "ceiling_for_seed_average": 0.8} for s in "ab"},
              "models": {s: {"params": p, "n_train": 10, "test_query_loss": 1.0, "groundtruth": gt}
                         for s, p in [("a", 100), ("b", 1000)]}}
    md = compare.format_markdown(report)
    assert "| stride | 0.500 [0.400, 0.600] | 0.600 [0.500, 0.700] |" in md
    assert "| graddot | 1.0 | 4.0 | 4.00 |" in md  # cost in n: seconds at each n and the ratio
    assert "10.0x parameters" in md and "0.158" in md  # growth header and the paper's table
    compare.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_isolated_method_run_records_scores_time_and_memory(tmp_path):
    from stride_jax.attribution import Attribution
    from stride_jax.experiment import base_model, load_data

    cfg = smoke_config()
    exp = cfg.experiment_for(cfg.sizes[0], train_per_source=8)
    train, val, test = load_data(exp)
    base_model(exp, train, tmp_path, progress=False)
    rec = compare.run_method_isolated(exp, tmp_path, "graddot", tmp_path / "methods" / "graddot")
    assert rec["n_train"] == len(train) == 24 and rec["n_queries"] == len(val) + len(test)
    assert rec["peak_memory_bytes"] >= rec["load_peak_bytes"] > 50 * 2**20  # a real process's RSS
    assert rec["seconds"]["total"] >= rec["seconds"]["score"] > 0 and rec["backend"] == "cpu"
    attr = Attribution.load(tmp_path / "methods" / "graddot" / "scores")
    assert attr.scores.shape == (24, rec["n_queries"]) and np.isfinite(attr.scores).all()
    stamp = (tmp_path / "methods" / "graddot" / "run.json").stat().st_mtime_ns
    assert compare.run_method_isolated(exp, tmp_path, "graddot", tmp_path / "methods" / "graddot") == rec
    assert (tmp_path / "methods" / "graddot" / "run.json").stat().st_mtime_ns == stamp  # reused, not rerun


def test_isolated_method_failure_is_reported(tmp_path):
    cfg = smoke_config()
    exp = cfg.experiment_for(cfg.sizes[0], train_per_source=8)
    # no base model in tmp_path/elsewhere is fine (it is trained), but a corrupt one must fail loudly
    (tmp_path / "base_model").mkdir()
    (tmp_path / "base_model" / "metadata.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="method 'random' failed"):
        compare.run_method_isolated(exp, tmp_path, "random", tmp_path / "methods" / "random")
    assert (tmp_path / "methods" / "random" / "error.txt").exists()


def test_compare_cli_smoke(tmp_path):
    out, results = tmp_path / "run", tmp_path / "results"
    assert cli_main(["compare", "--config", str(CONFIGS / "pretrain_lds_smoke.yaml"), "--out", str(out),
                     "--results", str(results), "--no-progress"]) == 0
    rows = json.loads((results / "pretrain_lds_smoke.json").read_text())
    assert {(r["method"], r["size"]) for r in rows} == {(m, s) for m in ("stride", "random", "graddot")
                                                        for s in ("xs", "s")}
    for r in rows:
        assert set(r) >= {"method", "size", "params", "lds", "seconds", "peak_memory_bytes"}
        assert set(r["lds"]) == {"mean", "ci95", "n_nan"} and r["peak_memory_bytes"] > 0
    stride = [r for r in rows if r["method"] == "stride"][0]
    assert set(stride["seconds"]) >= {"fit", "measure", "recover", "total"}
    cost = json.loads((results / "pretrain_lds_smoke_cost_n.json").read_text())
    assert sorted({r["n"] for r in cost}) == [36, 72] and {r["method"] for r in cost} == {"random", "graddot"}
    report = json.loads((results / "pretrain_lds_smoke_report.json").read_text())
    assert report["models"]["s"]["params"] > report["models"]["xs"]["params"]
    assert set(report["noise_ceiling"]["s"]) >= {"mean", "ceiling_for_seed_average"}
    assert (results / "pretrain_lds_smoke.png").exists() and "noise ceiling" in (results / "pretrain_lds_smoke.md").read_text()
