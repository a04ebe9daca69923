"""The harness's sft task: a pretrained checkpoint as the base model, instruction pairs as data,
ground truth by fine-tuning it on alpha-subsets (a tiny GGUF written here stands in for SmolLM2)."""

import json

import numpy as np
import pytest
import yaml
from test_convert import HP, make_weights, write_gguf

from stride_jax import cli, data, models
from stride_jax.attribution import Attribution
from stride_jax import groundtruth as gt_lib
from stride_jax.harness import load_config, tasks
from stride_jax.harness.config import ExperimentConfig, SFTTask

WORDS = ["the cat", "a hat", "then in", "the sea", "at tea", "in a nest", "the heat", "a net"]


def _pairs(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"prompt": f"say {WORDS[i % 8]} {i}", "response": " ".join(rng.choice(WORDS, 3)) + f" {i % 5}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    gguf = write_gguf(root / "tiny.gguf", HP(ctx=64), make_weights(HP(ctx=64)))
    records = _pairs(44) + _pairs(4)  # 4 exact duplicates, dropped
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return gguf, root / "pairs.jsonl"


def _config(gguf, pairs, **task):
    return {
        "name": "sft_tiny",
        "task": {"kind": "sft", "model": {"path": str(gguf)},
                 "data": {"source": str(pairs), "n_train": 28, "val_queries": 4, "test_queries": 8,
                          "seq_len": 40, "min_response_tokens": 4},
                 "finetune": {"learning_rate": 3e-3, "epochs": 2.0, "batch_size": 4, "scan_steps": 4},
                 "tune": {"mode": "top", "layers": 1},
                 "groundtruth": {"n_subsets": 8, "seeds_per_subset": 2, "models_per_chunk": 8}, **task},
        "stride": {"design": {"n_subsets": 16, "per_example": 4}, "steering": {"rank": 1},
                   "fit": {"steps": 20, "subsets_per_step": 8, "checkpoint_every": 10}},
        "methods": ["graddot", "bm25", "random"],
        "variants": {"lambda 0.05": {"recovery": {"lambda_frac": 0.05}}, "lambda 0.2": {"recovery": {"lambda_frac": 0.2}}},
        "select": {"n_boot": 20},
    }


def test_sft_data_split_dedup_and_masks(files):
    gguf, pairs = files
    task = ExperimentConfig.from_dict(_config(gguf, pairs)).task
    assert isinstance(task, SFTTask)
    train, val, test = tasks.load_data(task)
    assert (len(train), len(val), len(test)) == (28, 4, 8)
    ids = np.concatenate([train.ids, val.ids, test.ids])
    assert len(np.unique(ids)) == 40 and ids.max() < 44  # record indices after de-duplication
    # only response tokens count: the prompt (chat template included) is masked
    _, tok = tasks.pretrained(str(gguf))
    first = int(np.argmax(train.loss_mask[0] > 0))
    assert "<|im_start|>assistant" in tok.decode(train.inputs[0, : first + 1].tolist())
    assert 0 < train.loss_mask.sum(1).min() and train.loss_mask.sum() < 0.8 * train.targets.size


def test_sft_run_fine_tunes_the_pretrained_model_as_ground_truth(files, tmp_path):
    gguf, pairs = files
    cfg_path = tmp_path / "sft.yaml"
    cfg = _config(gguf, pairs)
    cfg["qualitative"] = {"methods": ["stride", "bm25"], "n_queries": 3, "k": 2, "note": "tiny GGUF"}
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "sft_tiny.json").read_text())
    # the qualitative report: per test query, each method's top-2 helpful and harmful pool examples
    qual = report["qualitative"]
    assert len(qual) == 3 and all(set(e["methods"]) == {"stride", "bm25"} for e in qual)
    bm25 = Attribution.load(tmp_path / "run" / "methods" / "bm25" / "scores").dense()
    train_texts = tasks.load_data(load_config(cfg_path).task)[0].texts
    for e in qual:
        col = bm25[:, e["query_index"]]
        top = e["methods"]["bm25"]["helpful"][0]
        assert col[top["index"]] == col.max() and top["text"] == train_texts[top["index"]]
        assert col[e["methods"]["bm25"]["harmful"][0]["index"]] == col.min()
    md = (tmp_path / "run" / "qualitative.md").read_text()
    assert md.count("| most helpful |") == 3 and md.count("| 2nd harmful |") == 3 and "tiny GGUF" in md
    assert "stride (LDS " in md
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"stride", "graddot", "bm25", "random"}
    assert all(r["lds"]["mean"] is not None and r["dataset"] == pairs.name for r in rows.values())
    # STRIDE chosen on validation from a sweep sharing one fit: its cost and memory are reported
    assert report["selection"][0]["chosen"] in ("lambda 0.05", "lambda 0.2")
    assert set(rows["stride"]["seconds"]) >= {"fit", "measure", "recover", "total"}
    assert rows["stride"]["peak_memory_bytes"] > rows["stride"]["load_memory_bytes"] > 0
    cell = report["cells"][0]
    assert cell["n_train"] == 28 and "mean" in cell["noise_ceiling"]["0.3"]
    store = gt_lib.GroundTruthStore.open(tmp_path / "run" / "groundtruth")
    assert store.is_complete()
    # the ground truth fine-tuned the loaded checkpoint (top block), not a freshly initialised model
    model, _ = tasks.pretrained(str(gguf))
    assert store.meta["tune"] == {"mode": "top", "layers": 1, "rank": 8}
    assert store.meta["start"] == models.param_digest(model)
    losses = store.losses().mean(axis=1)  # [M, Q]
    task = load_config(cfg_path).task
    _, val, test = tasks.load_data(task)
    from stride_jax import train as train_lib

    base = train_lib.eval_loss(model, data.concat(val, test))
    assert np.all(np.abs(losses - base[None]).mean(axis=1) > 1e-4)  # training moved the losses
    assert np.abs(losses - base[None]).max() < 0.5 * np.abs(base).mean()  # ... from the start model's


@pytest.mark.parametrize("change,match", [
    ({"methods": ["stride", "tracin"]}, "retrains the model from scratch"),
    ({"methods": [{"name": "trak4", "method": "trak", "params": {"n_retrain": 4}}]}, "retrains the model"),
    ({"task": {"data": {"min_response_tokens": 40}}}, "min_response_tokens"),
    ({"task": {"tune": {"mode": "sideways"}}}, "Tune.mode"),
    ({"qualitative": {"methods": ["stride", "logra"]}}, r"does not run: \['logra'\]"),
    ({"qualitative": {"k": 0}}, "k must be >= 1"),
])
def test_sft_bad_configs_fail_before_any_work(files, change, match):
    gguf, pairs = files
    cfg = _config(gguf, pairs)
    for k, v in change.items():
        if k == "task":
            for sk, sv in v.items():
                cfg["task"][sk] = {**cfg["task"].get(sk, {}), **sv}
        else:
            cfg[k] = v
    with pytest.raises((ValueError, TypeError), match=match):
        ExperimentConfig.from_dict(cfg)


def test_sft_missing_model_and_short_data_are_named(files, tmp_path):
    gguf, pairs = files
    task = ExperimentConfig.from_dict(_config(tmp_path / "nope.gguf", pairs)).task
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        tasks.load_data(task)
    cfg = _config(gguf, pairs)
    cfg["task"]["data"]["n_train"] = 60
    task = ExperimentConfig.from_dict(cfg).task
    with pytest.raises(ValueError, match="the task needs 72"):
        tasks.load_data(task)


def test_instruction_pairs_read_alpaca_and_prompt_response(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                  {"instruction": "Greet", "input": "", "output": " hi "}]))
    assert data.read_instruction_pairs(alpaca) == [("Add\n\n2 and 3", "5"), ("Greet", "hi")]
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="record 0 has neither"):
        data.read_instruction_pairs(bad)
    empty = tmp_path / "c.jsonl"
    empty.write_text(json.dumps({"prompt": "x", "response": "  "}) + "\n")
    with pytest.raises(ValueError, match="empty response"):
        data.read_instruction_pairs(empty)


def test_evals_records_and_a_mix_of_tasks(files, tmp_path, monkeypatch):
    """The OpenAI evals layout (chat `input` + `ideal`) and source "evals": per_task records of each
    task (the registry is a fixture here; the real one comes from the evals wheel)."""
    root = tmp_path / "evals_cache"
    for t, (system, answers) in {"yesno": ("Answer 1 or 0", ["1", "0"]), "ab": ("Pick A or B", [["A", "a"], "B"])}.items():
        d = root / "evals" / "registry" / "data" / t
        d.mkdir(parents=True)
        recs = [{"input": [{"role": "system", "content": system}, {"role": "user", "content": f"{t} q{i}"}],
                 "ideal": answers[i % 2]} for i in range(30)]
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "few_shot.jsonl").write_text(json.dumps({"sample": []}) + "\n")  # not data: skipped
    pairs = data.read_instruction_pairs(root / "evals" / "registry" / "data" / "ab" / "samples.jsonl")
    assert pairs[0] == ("Pick A or B\n\nab q0", "A") and pairs[1][1] == "B"  # first of a list of ideals
    from stride_jax import downloads

    asked = []
    monkeypatch.setattr(downloads, "fetch", lambda name, only=None, **kw: asked.append((name, only)) or root)
    gguf, pairs_file = files
    cfg = _config(gguf, pairs_file)
    cfg["task"]["data"] = {"source": "evals", "evals_tasks": ["yesno", "ab"], "per_task": 12, "n_train": 16,
                           "val_queries": 4, "test_queries": 4, "seq_len": 60, "min_response_tokens": 2}
    train, val, test = tasks.load_data(ExperimentConfig.from_dict(cfg).task)
    assert asked == [("evals", ["yesno", "ab"])]
    texts = train.texts + val.texts + test.texts
    assert len(texts) == 24 and sum("yesno q" in t for t in texts) == 12 and sum("ab q" in t for t in texts) == 12
    cfg["task"]["data"]["evals_tasks"] = []
    with pytest.raises(ValueError, match="evals_tasks"):
        ExperimentConfig.from_dict(cfg)


def _gsm_fixture(root):
    """A stand-in for the gsm asset: short problems in the GSM-Symbolic layout."""
    folder = root / "eng" / "symbolic"
    folder.mkdir(parents=True)
    for i in range(8):
        q = f"say {WORDS[i]} then {WORDS[(i + 3) % 8]} {i}"
        a = f"{WORDS[(i + 5) % 8]} at {i} {WORDS[i]}\\n#### {i + 1}"
        (folder / f"{i:04d}.toml").write_text(f'question = "{q}"\n\nanswer = """\n{a}\n"""\n')
    return root


def test_contamination_run_finds_exact_replicas(files, tmp_path, monkeypatch):
    """An sft task with leaked problems: the pool holds their replicas, the attributed model is the
    loaded one fine-tuned on that pool (cached), no LDS ground truth is run, and the report gives
    memorisation and each method's recall of the replicas (BM25 finds exact copies)."""
    from stride_jax import downloads
    from stride_jax.harness import report as report_lib

    gsm = _gsm_fixture(tmp_path / "gsm")
    real_fetch = downloads.fetch
    monkeypatch.setattr(downloads, "fetch", lambda name, *a, **kw: gsm if name == "gsm" else real_fetch(name, *a, **kw))
    gguf, pairs = files
    cfg = _config(gguf, pairs)
    cfg.pop("variants"), cfg.pop("select")
    cfg["name"] = "contamination_tiny"
    cfg["task"].update(groundtruth=None, base="finetuned")
    cfg["task"]["data"].update(seq_len=64, inject={"leaked": 3, "clean": 2, "copies": 2})
    cfg["methods"] = ["bm25", "graddot", "random"]
    cfg["contamination"] = {"buckets": [0.1, 0.25], "fuse": ["bm25", "graddot"]}
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "contamination_tiny.json").read_text())
    task = load_config(cfg_path).task
    train, val, test = tasks.load_data(task)
    replica_of = tasks.replica_problem(train.ids)
    assert len(train) == 28 + 6 and (replica_of >= 0).sum() == 6 and len(set(replica_of[replica_of >= 0])) == 3
    assert set(tasks.replica_problem(test.ids)) == set(replica_of[replica_of >= 0])
    assert not set(tasks.replica_problem(val.ids)) & set(replica_of)  # clean problems never in the pool
    for i in np.flatnonzero(replica_of >= 0):  # an exact replica is the leaked problem's pair, verbatim
        j = int(np.flatnonzero(tasks.replica_problem(test.ids) == replica_of[i])[0])
        assert train.texts[i] == test.texts[j]
    assert all(r["lds"] is None for r in report["rows"]) and not (tmp_path / "run" / "groundtruth").exists()
    model, _ = tasks.pretrained(str(gguf))
    tuned = models.load_model(tmp_path / "run" / "base_model")[0]
    assert models.param_digest(tuned) != models.param_digest(model)  # the attributed model was fine-tuned
    (ct,) = report["contamination"]
    assert ct["replicas"] == 6 and ct["leak_rate"] == pytest.approx(6 / 34)
    memo = ct["memorisation"]
    assert memo["attributed model"]["leaked"]["loss"] < memo["loaded model"]["leaked"]["loss"]
    rec = {(r["method"], r["bucket_fraction"]): r for r in ct["recall"]}
    assert rec[("bm25", 0.25)]["recall"] == 1.0 and rec[("bm25", 0.25)]["p_value"] < 1e-3
    assert {("bm25 + graddot (rank-mean)", 0.1), ("bm25 + graddot (min-rank)", 0.25)} <= set(rec)
    assert rec[("random", 0.1)]["chance"] == pytest.approx(3 / 34)
    md = (tmp_path / "run" / "contamination_tiny.md").read_text()
    assert "## Contamination" in md and "none (no LDS)" in md
    assert report_lib.markdown(report, "cmd")  # renders without ground truth
    # a --methods run without another row's stored scores recomputes the recall it can and keeps the
    # rest (that row's and its fusions') from the results file, which was made on the same model
    (tmp_path / "run" / "methods" / "graddot" / "run.json").unlink()
    run_bm25 = ["run", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress", "--methods", "bm25"]
    assert cli.main(run_bm25) == 0
    again = json.loads((tmp_path / "run" / "contamination_tiny.json").read_text())["contamination"][0]
    assert again["recall"] == ct["recall"] and again["memorisation"] == ct["memorisation"]  # in the same order
    assert again["recall_kept"] == ["graddot", "bm25 + graddot (rank-mean)", "bm25 + graddot (min-rank)"]
    assert "Recall of graddot, bm25 + graddot (rank-mean)" in (tmp_path / "run" / "contamination_tiny.md").read_text()
    # ... and keeps none when the earlier recall is of another attributed model
    path = tmp_path / "run" / "contamination_tiny.json"
    other = json.loads(path.read_text())
    other["contamination"][0]["memorisation"]["attributed model"]["leaked"]["loss"] += 0.5
    path.write_text(json.dumps(other))
    assert cli.main(run_bm25) == 0
    third = json.loads(path.read_text())["contamination"][0]
    assert {r["method"] for r in third["recall"]} == {"bm25", "random"} and third["recall_kept"] == []
    assert third["recall_missing"] == again["recall_kept"]


def _evals_fixture(root, tasks_):
    """An OpenAI-evals registry stand-in: per task 30 records of `prompt word` -> constant answer."""
    for t, (word, answer) in tasks_.items():
        d = root / "evals" / "registry" / "data" / t
        d.mkdir(parents=True)
        recs = [{"input": [{"role": "user", "content": f"{word} {word} {i}"}], "ideal": answer} for i in range(30)]
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_data_selection_run_picks_in_task_records_and_fine_tunes_them(files, tmp_path, monkeypatch):
    """task.data.targets adds the targets' train records (and a mix) to the pool and makes their
    validation records the queries; data_selection keeps each method's top k per target,
    fine-tunes fresh copies of the loaded model and scores held-out test records."""
    from stride_jax import downloads
    from stride_jax.harness import report as report_lib

    evals = _evals_fixture(tmp_path / "evals", {"zebra": ("zebra", "yes"), "quilt": ("quilt", "B"),
                                                "mixer": ("mixer", "0")})
    real_fetch = downloads.fetch
    monkeypatch.setattr(downloads, "fetch",
                        lambda name, *a, **kw: evals if name == "evals" else real_fetch(name, *a, **kw))
    gguf, pairs = files
    cfg = _config(gguf, pairs)
    cfg.pop("variants"), cfg.pop("select")
    cfg["name"] = "selection_tiny"
    cfg["task"].update(groundtruth=None)
    cfg["task"]["data"].update(n_train=16, test_queries=1, min_response_tokens=2,
                               targets={"tasks": ["zebra", "quilt"], "train": 8, "val": 3, "test": 10,
                                        "mix": ["mixer"], "mix_per_task": 6})
    cfg["task"]["finetune"].update(epochs=6.0)
    cfg["methods"] = ["bm25", "random"]
    cfg["data_selection"] = {"k": 8, "seeds": 2, "n_boot": 50,
                             "finetune": {"learning_rate": 1e-2, "epochs": 12.0, "batch_size": 4, "scan_steps": 4}}
    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    task = load_config(cfg_path).task
    train, val, test = tasks.load_data(task)
    target = tasks.target_of(train.ids)
    assert len(train) == 16 + 6 + 2 * 8 and (target == 0).sum() == 8 and (target == 1).sum() == 8
    assert sum("mixer" in t for t in train.texts) == 6
    assert list(tasks.target_of(val.ids)) == [0] * 3 + [1] * 3 and list(tasks.target_of(test.ids)) == [0, 1]
    assert not set(val.texts) & set(train.texts)  # the queries are not candidates
    held_out = tasks.target_splits(task)
    seen = set(train.texts) | set(val.texts)
    assert all(t not in seen for s in held_out for t in s["test"].texts)  # test records are never in the pool
    assert cli.main(["run", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "selection_tiny.json").read_text())
    zebra, quilt = report["data_selection"]
    for e in (zebra, quilt):
        assert e["in_task_fraction"]["bm25"] == 1.0 and e["in_task_fraction"]["in-task"] == 1.0
        assert e["in_task_fraction"]["random"] < 0.6
        assert set(e["exact_match"]) == {"bm25", "random", "in-task", "pretrained"}
        em = {m: r["mean"] for m, r in e["exact_match"].items()}
        assert em["pretrained"] == 0.0 and em["in-task"] == 1.0 and em["bm25"] == 1.0  # the constant answer learnt
        assert e["exact_match"]["bm25"]["vs_random"]["diff"] >= 0
        # each row is its own picks' fine-tunes: random's few in-task records leave a higher test loss
        assert e["loss"]["random"]["mean"] > e["loss"]["in-task"]["mean"] + 0.1
    md = (tmp_path / "run" / "selection_tiny.md").read_text()
    assert "## Data selection" in md and "all targets" in md and "test loss" in md
    assert zebra["loss"]["in-task"]["mean"] < zebra["loss"]["pretrained"]["mean"]
    # one store per target and row; a rerun with a method added fine-tunes only that method's picks
    cached = {f: f.stat().st_mtime_ns for f in (tmp_path / "run" / "data_selection").glob("*.npz")}
    assert len(cached) == 2 * 3  # bm25, random, in-task
    # (and a fusion of two methods' rankings selects as one more row)
    cfg["methods"] = ["bm25", "tfidf", "random"]
    cfg["data_selection"].update(fuse=["random", "bm25"], fusions=["rank-mean"])
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    now = {f: f.stat().st_mtime_ns for f in (tmp_path / "run" / "data_selection").glob("*.npz")}
    assert {f: now[f] for f in cached} == cached and len(now) == 2 * 5
    again = json.loads((tmp_path / "run" / "selection_tiny.json").read_text())["data_selection"]
    for before, after in zip((zebra, quilt), again):
        assert after["hits"]["bm25"] == before["hits"]["bm25"] and after["losses"]["random"] == before["losses"]["random"]
        assert "tfidf" in after["exact_match"]
        # random's scores alone pick few in-task records (8 of 38 in the pool); ranked with bm25's, most
        fused = after["in_task_fraction"]["random + bm25 (rank-mean)"]
        assert fused >= 0.5 and "random + bm25 (rank-mean)" in after["exact_match"]
    # a --methods run recomputes the selections from the other rows' stored scores (a lost store is
    # fine-tuned again), and keeps them from the results file when another row's scores are not stored
    lost = next(f for f in now if f.name.startswith("zebra-tfidf-"))
    lost.unlink()
    assert cli.main(["run", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress", "--methods", "tfidf"]) == 0
    third = json.loads((tmp_path / "run" / "selection_tiny.json").read_text())
    assert lost.exists() and [e["hits"] for e in third["data_selection"]] == [e["hits"] for e in again]
    assert third["earlier_rows"] and not any(e["derived"] for e in third["earlier_rows"])
    (tmp_path / "run" / "methods" / "bm25" / "run.json").unlink()
    lost.unlink()
    assert cli.main(["run", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress", "--methods", "tfidf"]) == 0
    fourth = json.loads((tmp_path / "run" / "selection_tiny.json").read_text())
    assert not lost.exists() and fourth["data_selection"] == third["data_selection"]
    assert all("data_selection" in e["derived"] for e in fourth["earlier_rows"])
    assert report_lib.markdown(report, "cmd")


def test_targets_may_be_a_user_s_own_files_without_the_evals_registry(files, tmp_path, monkeypatch):
    """A target or mix task given as a .jsonl file or a folder of them is read from there; the
    evals wheel is not fetched when no registry task is named; a name that is neither is a
    clear error."""
    from stride_jax import downloads

    own = _evals_fixture(tmp_path / "own", {"zebra": ("zebra", "yes"), "mixer": ("mixer", "0")}) / "evals/registry/data"
    real_fetch = downloads.fetch
    monkeypatch.setattr(downloads, "fetch", lambda name, *a, **kw: pytest.fail("fetched evals") if name == "evals"
                        else real_fetch(name, *a, **kw))
    gguf, pairs = files
    cfg = _config(gguf, pairs)
    cfg.pop("variants"), cfg.pop("select")
    cfg["task"].update(groundtruth=None)
    cfg["task"]["data"].update(n_train=16, test_queries=1, min_response_tokens=2,
                               targets={"tasks": [str(own / "zebra" / "samples.jsonl")], "train": 8, "val": 3,
                                        "test": 10, "mix": [str(own / "mixer")], "mix_per_task": 6})
    task = ExperimentConfig.from_dict(cfg).task
    train, val, test = tasks.load_data(task)
    assert (tasks.target_of(train.ids) == 0).sum() == 8 and sum("mixer" in t for t in train.texts) == 6
    assert all("zebra" in t for t in val.texts) and len(test) == 1
    cfg["task"]["data"]["targets"]["tasks"] = [str(tmp_path / "missing.jsonl")]
    with pytest.raises(ValueError, match="missing.jsonl': no such file or folder"):
        tasks.load_data(ExperimentConfig.from_dict(cfg).task)


def test_selection_helpers():
    from stride_jax.harness import selection as sel

    scores = np.array([[1.0, 0.0], [3.0, -5.0], [np.nan, 9.0], [2.0, 2.0]])
    assert list(sel.select_top_k(scores, [0], 2)) == [1, 3]  # NaN ranks last
    assert list(sel.select_top_k(scores, [0, 1], 2)) == [3, 0]
    with pytest.raises(ValueError, match="exceeds"):
        sel.select_top_k(scores, [0], 5)
    d = sel.draw(np.arange(10, 20), 4, 0)
    assert len(set(d)) == 4 and set(d) <= set(range(10, 20)) and list(d) == list(sel.draw(np.arange(10, 20), 4, 0))
    hits = {"random": np.zeros((2, 20)), "good": np.ones((2, 20)), "same": np.zeros((2, 20))}
    s = sel.bootstrap_means(hits, n_boot=100)
    assert s["good"]["mean"] == 1.0 and s["good"]["vs_random"]["p_not_above"] == 0.0
    assert s["same"]["vs_random"]["p_not_above"] == 1.0 and "vs_random" not in s["random"]
