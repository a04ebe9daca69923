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


@pytest.mark.slow  # ~45 s on 2 cores (one fit compile); test_summary_lists_the_top_3 is its fast part
def test_attribute_chooses_the_preset_and_prints_the_top_examples(tmp_path, capsys):
    """No --preset: a stride_jax GPT (saved with its tokenizer, no tokenizer_hash) gets `lm` with K
    fitted to the pool; queries get their own length; the run ends with each query's top 3."""
    cfg = models.GPTConfig(vocab_size=data.VOCAB_SIZE, seq_len=48, n_layers=1, d_model=16, n_heads=2)
    models.save_model(models.build(cfg, 0), tmp_path / "model", tokenizer=data.load_tokenizer())
    pool = data.load_examples("train", seq_len=12, max_per_source=4)
    data.write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in pool.texts])
    data.write_jsonl(tmp_path / "q.jsonl", [{"text": "And God said, Let there be light, and there was light; "
                                             "and God saw the light, that it was good"}, {"text": "Emma"}])
    (tmp_path / "over.yaml").write_text("fit: {steps: 3, checkpoint_every: 3}\n")
    args = ["attribute", "--model", str(tmp_path / "model"), "--train", str(tmp_path / "t.jsonl"), "--queries",
            str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "over.yaml"),
            "--no-progress"]
    assert cli.main(args) == 0
    resolved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert resolved["preset"] == "lm" and "capped from 2048 to 12" in resolved["preset_reason"]
    assert resolved["stride"]["design"]["n_subsets"] == 12 and resolved["stride"]["fit"]["steps"] == 3
    assert resolved["query_seq_len"] > resolved["seq_len"]  # the long query is not cut to the pool's length
    printed = capsys.readouterr().out
    assert printed.count("\n  +") + printed.count("\n  -") == 6  # 3 scored lines for each of 2 queries
    assert "query 0: 'And God said" in printed and str(tmp_path / "out" / "scores.npz") in printed
    assert "top_k.jsonl" in printed


def test_only_deliberate_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """Issue 25: a bug (a KeyError, a TypeError of a wrong call) prints its traceback; an error the
    package raises on purpose (even a TypeError) is one line; STRIDE_JAX_DEBUG shows its traceback."""
    monkeypatch.delenv("STRIDE_JAX_DEBUG", raising=False)

    def bug(args):
        return {}["missing"]

    monkeypatch.setattr(cli, "cmd_config", bug)
    assert cli.main(["config", "quick"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "a bug" in err

    monkeypatch.setattr(cli, "cmd_config", lambda args: data.lm_examples(5, 4))  # len(5) inside stride_jax
    assert cli.main(["config", "quick"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.undo()

    (tmp_path / "bad.yaml").write_text("name: x\ntask: [1, 2]\n")  # a deliberate TypeError of the config loader
    assert cli.main(["config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "mapping" in err

    monkeypatch.setenv("STRIDE_JAX_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        cli.main(["run", str(tmp_path / "none.yaml")])


def test_no_pytorch_warning(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from stride_jax import cli; {main} import transformers; "
            "from stride_jax import data; data.load_tokenizer()")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    with_cli = subprocess.run([sys.executable, "-c", code.format(main="cli.main(['config', 'quick']);")],
                              capture_output=True, text=True, env=env, timeout=300)
    assert with_cli.returncode == 0, with_cli.stderr
    assert "PyTorch was not found" not in with_cli.stderr


def test_summary_lists_the_top_3(tmp_path):
    from stride_jax.harness.attribute import summary

    helpful = [{"train_id": i, "score": 0.5 - i / 10, "record": {"text": f"train text {i} " + "word " * 40}}
               for i in range(5)]
    data.write_jsonl(tmp_path / "top_k.jsonl", [
        {"query_id": 7, "record": {"prompt": "Who?", "response": "Emma."}, "converged": True, "helpful": helpful},
        {"query_id": 8, "record": {"text": "a text"}, "converged": False, "helpful": helpful}])
    text = summary(tmp_path, k=3, width=60)
    lines = text.splitlines()
    assert "query 7: 'Who? => Emma.'" in lines and any(l.startswith("query 8: 'a text'") and "not converged" in l
                                                       for l in lines)
    scored = [l for l in lines if l.startswith("  +")]
    assert len(scored) == 6 and scored[0].startswith("  +5.000e-01  train 0: 'train text 0 word")
    assert all(len(l.split(": ", 1)[1]) <= 60 - 10 + 2 for l in scored) and "..." in scored[0]  # shortened
    assert str(tmp_path / "scores.npz") in text and str(tmp_path / "top_k.jsonl") in text
