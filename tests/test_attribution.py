"""The Stride facade and the Attribution result; the quick demo end to end."""

import json

import numpy as np
import pytest

from stride_jax import Attribution, Stride, StrideConfig, cli, models
from stride_jax.baselines import RandomAttributor, RepresentationSimilarity
from stride_jax.data import Examples

CFG = models.GPTConfig(vocab_size=40, seq_len=8, n_layers=2, d_model=16, n_heads=2)


def toy_examples(n, seed):
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, CFG.seq_len + 1)).astype(np.int32)
    return Examples(inputs=tokens[:, :-1], targets=tokens[:, 1:], ids=np.arange(n, dtype=np.int64) + 100 * seed)


def test_stride_end_to_end_shapes_and_top_k(tmp_path):
    model = models.build(CFG, seed=0)
    train, queries = toy_examples(30, 1), toy_examples(5, 2)
    cfg = StrideConfig().replace(design={"n_subsets": 12, "per_example": 3}, steering={"layer": 1, "rank": 2},
                                 fit={"steps": 5, "subsets_per_step": 4, "positions_per_example": 4})
    stride = Stride(cfg).fit(model, train, progress=False)
    attr = stride.attribute(queries, progress=False)
    assert attr.scores.shape == (30, 5)
    assert np.isfinite(attr.scores).all()
    np.testing.assert_array_equal(attr.query_ids, queries.ids)
    top = attr.top_k(0, k=3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    worst = attr.top_k(0, k=2, harmful=True)
    assert worst[0][1] <= worst[1][1]
    attr.save(tmp_path / "attr")
    back = Attribution.load(tmp_path / "attr")
    np.testing.assert_array_equal(back.scores, attr.scores)
    with pytest.raises(IndexError):
        attr.top_k(5)


def test_unfitted_stride_and_corrupted_attribution(tmp_path):
    with pytest.raises(RuntimeError, match="fit"):
        Stride().attribute(toy_examples(3, 0))
    with pytest.raises(ValueError, match="training examples"):
        Stride().fit(models.build(CFG, 0), toy_examples(1, 0), progress=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "attribution.json").write_text(json.dumps({"method": "x", "n_train": 3, "n_query": 2}))
    (tmp_path / "a" / "scores.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        Attribution.load(tmp_path / "a")


def test_lambda_must_be_nonnegative():
    with pytest.raises(ValueError, match="lambda"):
        StrideConfig().replace(recovery={"lambda_frac": -0.1})


def test_baselines_share_the_interface():
    model = models.build(CFG, seed=0)
    train, queries = toy_examples(10, 1), toy_examples(3, 2)
    sim = RepresentationSimilarity(layer=1).fit(model, train).attribute(queries)
    assert sim.scores.shape == (10, 3) and np.all(np.abs(sim.scores) <= 1 + 1e-5)
    rnd = RandomAttributor(seed=0).fit(model, train).attribute(queries)
    assert rnd.scores.shape == (10, 3) and rnd.method == "random"
    with pytest.raises(ValueError, match="layer"):
        RepresentationSimilarity(layer=9).fit(model, train)


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    for method in ("stride", "repr-sim", "random"):
        r = report["lds"][method]
        assert -1 <= r["mean"] <= 1 and r["ci95"][0] <= r["mean"] <= r["ci95"][1]
        assert isinstance(r["n_nan"], int)
    assert "mean" in report["noise_ceiling"]
    assert {"pretrain", "groundtruth", "stride_fit", "stride_attribute", "lds"} <= set(report["seconds"])
    printed = capsys.readouterr().out
    assert "seed-vs-seed" in printed and "helpful" in printed
    # A rerun reuses the base model, the ground truth and the fit.
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["lds"] == report["lds"]
    assert again["seconds"]["groundtruth"] < report["seconds"]["groundtruth"]


def test_cli_reports_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stride": {"design": {"n_subsets": 4, "per_example": 9}}}))
    assert cli.main(["config", "--config", str(bad)]) == 2
    assert "per_example" in capsys.readouterr().err


def test_quick_yaml_matches_quick_config():
    from pathlib import Path

    from stride_jax.config import load_config_file
    from stride_jax.experiment import ExperimentConfig, quick_config

    path = Path(__file__).parent.parent / "experiments" / "configs" / "quick.yaml"
    assert ExperimentConfig.from_dict(load_config_file(path)) == quick_config()
