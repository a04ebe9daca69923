"""Smoke run of the small-model experiment and its ablation (tiny size), plus config plumbing."""

import json
from pathlib import Path

import numpy as np
import pytest

from stride_jax import small_models as sm

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("small_models")
    cfg = sm.SmallModelsConfig.load(CONFIGS / "small_models_smoke.yaml")
    report = sm.run(cfg, out / "run", out / "results")
    return cfg, out, report


def test_smoke_report_structure(smoke):
    cfg, out, report = smoke
    methods = {"stride-logits", "stride-residual", *cfg.baselines}
    rows = report["rows"]
    assert {(r["method"], r["alpha"]) for r in rows} == {(m, a) for m in methods for a in cfg.alphas}
    for r in rows:
        assert r["dataset"] == "wine" and r["model"] == "mlp"
        assert set(r["lds"]) == {"mean", "ci95", "n_nan"} and len(r["lds"]["ci95"]) == 2
        assert isinstance(r["seconds"], dict) and r["seconds"]
    assert {c["alpha"] for c in report["noise_ceiling"]} == set(cfg.alphas)
    assert all("mean" in c for c in report["noise_ceiling"])
    task = report["tasks"][0]
    assert set(task["selection"]) == {"logits", "residual"}
    assert task["selection"]["residual"]["settings"]["steering"]["placement"] == "residual"
    assert task["selection"]["residual"]["settings"]["steering"]["layer"] == 1
    c = task["counterfactual"]
    assert c["ks"] == [3, 10] and "random" in c["methods"] and "stride-logits" in c["methods"]
    results = out / "results"
    on_disk = json.loads((results / "small_models_smoke.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(rows))
    md = (results / "small_models_smoke.md").read_text()
    assert "stride-logits" in md and "noise ceiling" in md and "MNIST MLP" in md
    assert (results / c["png"]).read_bytes()[:4] == b"\x89PNG"


def test_smoke_resumes_with_identical_numbers(smoke):
    cfg, out, report = smoke
    again = sm.run(cfg, out / "run", out / "results")
    assert [r["lds"] for r in again["rows"]] == [r["lds"] for r in report["rows"]]
    assert again["tasks"][0]["counterfactual"]["summary"] == report["tasks"][0]["counterfactual"]["summary"]


@pytest.mark.slow
def test_ablation_smoke(smoke):
    _, out, _ = smoke
    cfg = sm.AblationConfig.load(CONFIGS / "small_models_ablation_smoke.yaml")
    report = sm.run_ablation(cfg, out / "run", out / "results")  # reuses the smoke run's ground truth
    assert {(r["K"], r["d"]) for r in report["rows"]} == {(12, 1), (12, 2), (24, 1), (24, 2)}
    assert np.isfinite(report["cs_bound"]["logra_k50"])
    assert (out / "results" / "small_models_ablation_smoke.md").exists()


def test_config_round_trip_and_errors():
    cfg = sm.SmallModelsConfig.load(CONFIGS / "small_models_smoke.yaml")
    assert sm.SmallModelsConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        sm.SmallModelsConfig.from_dict({"variants": {"bad": {"fit": {"stepz": 1}}}})
    with pytest.raises(ValueError, match="unknown"):
        sm.SmallModelsConfig.from_dict({"tasks": [{"datasett": "wine"}]})
    with pytest.raises(ValueError, match="kind"):
        sm.ModelSpec(kind="resnet")


def test_default_ks_and_sparsity_helpers():
    ks = sm.default_ks(1200, 32)
    assert ks[0] == 12 and ks[-1] == 400 and list(ks) == sorted(ks)
    s = np.zeros((10, 2))
    s[0, 0], s[1, 0] = 9.0, 1.0
    s[:, 1] = 1.0
    np.testing.assert_array_equal(sm.effective_sparsity(s), [1, 9])
    assert sm.cs_bound(10, 1000) == pytest.approx(10 * np.log(100))


def test_conv_needs_images():
    from stride_jax import tabular
    task = sm.TaskConfig(dataset="wine", model=sm.ModelSpec(kind="conv"))
    with pytest.raises(ValueError, match="image data"):
        sm.model_config(task, tabular.load_splits("wine"))


def test_format_ablation_table():
    lds = {"mean": 0.5, "ci95": [0.4, 0.6], "n_nan": 0}
    report = {"task": "t", "n_train": 100, "alpha": 0.3,
              "rows": [{"K": 10, "d": 1, "subset_size": 10.0, "lds": lds},
                       {"K": 20, "d": 2, "subset_size": 10.0, "lds": lds}],
              "noise_ceiling": {"mean": 0.7, "seeds_averaged": 4, "ceiling_for_seed_average": 0.9},
              "logra_lds": lds, "sparsity": {"logra_k50": 10.0}, "cs_bound": {"logra_k50": sm.cs_bound(10, 100)}}
    md = sm.format_ablation(report)
    assert "| 10 | 0.500 [0.400, 0.600] | - |" in md and "| logra_k50 | 10 | 23 |" in md
