"""The command line: the quick demo end to end, and `stride-jax attribute` on a saved model."""

import json

import numpy as np
import pytest

from stride_jax import cli, data, models, train


@pytest.mark.slow  # minutes on 2 cores: run with -m slow (README)
def test_quick_demo_beats_random_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "quick.json").read_text())
    lds = {r["method"]: r["lds"] for r in report["rows"]}
    assert set(lds) == {"stride", "repr-sim", "random"}
    assert lds["stride"]["mean"] > lds["random"]["mean"] + 0.15, lds
    assert lds["stride"]["n_nan"] == 0 and lds["stride"]["ci95"][0] <= lds["stride"]["mean"] <= lds["stride"]["ci95"][1]
    assert "mean" in report["cells"][0]["noise_ceiling"]["0.3"]
    printed = capsys.readouterr().out
    assert "noise ceiling" in printed and "helpful" in printed
    # a rerun reuses the base model, the ground truth, the fit and the method results
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "quick.json").read_text())
    assert [r["lds"] for r in again["rows"]] == [r["lds"] for r in report["rows"]]
    assert again["wall_seconds_this_invocation"] < report["wall_seconds_this_invocation"]


def test_attribute_command_on_a_saved_model(tmp_path):
    pool = data.load_examples("train", seq_len=24, max_per_source=16)
    cfg = models.GPTConfig(vocab_size=data.VOCAB_SIZE, seq_len=32, n_layers=1, d_model=16, n_heads=2)
    model = train.pretrain(cfg, pool, train.TrainConfig(epochs=1, batch_size=16), seed=0, progress=False)
    models.save_model(model, tmp_path / "model", {"tokenizer_hash": data.tokenizer_hash()})
    data.write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in pool.texts[:40]])
    data.write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Emma said", "response": " nothing at all."},
                                             {"text": "And God said, Let there be light"}])
    args = ["attribute", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "t.jsonl"),
            "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "out"), "--preset", "quick",
            "--no-progress"]
    assert cli.main(args) == 0
    with np.load(tmp_path / "out" / "scores.npz") as z:
        scores = z["scores"]
        assert scores.shape == (40, 2) and np.isfinite(scores).all()
    top = [json.loads(line) for line in (tmp_path / "out" / "top_k.jsonl").read_text().splitlines()]
    assert len(top) == 2 and len(top[0]["helpful"]) == 5 and top[0]["helpful"][0]["text"]
    assert top[0]["helpful"][0]["score"] >= top[0]["helpful"][-1]["score"]
    resolved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert resolved["preset"] == "quick" and resolved["stride"]["design"]["n_subsets"] == 32
    assert cli.main(args) == 0  # a rerun resumes the fit and reproduces the scores
    with np.load(tmp_path / "out" / "scores.npz") as z:
        np.testing.assert_array_equal(z["scores"], scores)


@pytest.mark.parametrize("args, match", [
    (["attribute", "--model", "nowhere", "--train", "t.jsonl", "--queries", "q.jsonl", "--out", "o"], "not found"),
    (["run", "no-such-config.yaml"], "config file not found"),
    (["demo", "--config", "missing.yaml"], "config file not found"),
])
def test_expected_failures_are_one_line(tmp_path, capsys, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
