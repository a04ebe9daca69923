"""Bad input, one table: every public entry rejects it before any compile, naming the argument."""

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from stride_jax import Examples, Stride, StrideConfig, data, lds, models, recovery, store, train
from stride_jax.attribution import Attribution
from stride_jax.config import (DesignConfig, FitConfig, MeasureConfig, RecoveryConfig, SteeringConfig, load_config_file)
from stride_jax.harness.config import ExperimentConfig
from stride_jax.design import Design, alpha_subsets, indices_to_mask, left_regular_design
from stride_jax.groundtruth import GroundTruthConfig
from stride_jax import cli
from stride_jax.harness import attribute as attribute_mod
from stride_jax.models import convert

from test_convert import HP, make_weights, write_gguf

GPT = models.GPTConfig(vocab_size=16, seq_len=6, n_layers=2, d_model=8, n_heads=2)
MLP = models.MLPConfig(in_dim=3, hidden=(4,), n_classes=2)
QUICK = StrideConfig.preset("quick", design={"n_subsets": 8, "per_example": 2},
                            fit={"steps": 2, "subsets_per_step": 4})


def lm(n=10, seq=6, lo=0, hi=16, **kw):
    t = np.random.default_rng(0).integers(lo, hi, (n, seq + 1)).astype(np.int32)
    return Examples(inputs=t[:, :-1], targets=t[:, 1:], ids=np.arange(n), **kw)


def clf(n=10, f=3):
    x = np.random.default_rng(0).normal(size=(n, f)).astype(np.float32)
    return Examples(inputs=x, targets=(x[:, 0] > 0).astype(np.int32), ids=np.arange(n))


class Tok:
    """A minimal tokenizer: one id per character."""

    eos_token_id, pad_token_id, chat_template = 0, 0, None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 15 for c in t] for t in texts]}

    def batch_decode(self, rows, skip_special_tokens=False):
        return ["".join(chr(96 + i) for i in r) for r in rows]


GPT_MODEL = models.build(GPT, 0)
MLP_MODEL = models.build(MLP, 0)


def fit(model, examples, cfg=QUICK):
    return Stride(cfg).fit(model, examples, progress=False)


def experiment(d):
    return ExperimentConfig.from_dict(d)


def config_file(text, suffix=".yaml"):
    path = Path(tempfile.mkdtemp()) / f"c{suffix}"
    path.write_text(text)
    return path


def attribute_cmd(**kw):
    from stride_jax.harness.attribute import attribute

    return attribute(model="model.gguf", train="t.jsonl", queries="q.jsonl", out=tempfile.mkdtemp(), **kw)


def bad_ids():
    t = lm()
    return Examples(inputs=t.inputs - 3, targets=t.targets, ids=t.ids)


def jsonl(tmp_path, text):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    return p


CASES = [
    # --- configs
    ("K <= 0", lambda: DesignConfig(n_subsets=0), ValueError, "design.n_subsets must be an integer >= 1"),
    ("K negative", lambda: DesignConfig(n_subsets=-5), ValueError, "design.n_subsets"),
    ("per_example > K", lambda: DesignConfig(n_subsets=4, per_example=5), ValueError, "design.per_example"),
    ("per_example <= 0", lambda: DesignConfig(per_example=0), ValueError, "design.per_example"),
    ("rank 0", lambda: SteeringConfig(rank=0), ValueError, "steering.rank"),
    ("rank negative", lambda: SteeringConfig(rank=-1), ValueError, "steering.rank"),
    ("lambda < 0", lambda: RecoveryConfig(lambda_frac=-0.1), ValueError, "lambda"),
    ("lambda NaN", lambda: RecoveryConfig(lambda_frac=float("nan")), ValueError, "lambda"),
    ("lambda inf", lambda: RecoveryConfig(lambda_frac=float("inf")), ValueError, "lambda"),
    ("lambda a word", lambda: RecoveryConfig(lambda_frac="big"), ValueError, "lambda"),
    ("solver unknown", lambda: RecoveryConfig(solver="cd"), ValueError, "solver"),
    ("sparse with fista", lambda: RecoveryConfig(solver="fista", sparse=True), ValueError, "sparse"),
    ("nonneg in a sub-config", lambda: StrideConfig.from_dict({"recovery": {"fista": {"nonneg": True}}}), ValueError,
     "set recovery.nonneg"),
    ("unknown placement", lambda: SteeringConfig(placement="attention"), ValueError, "steering.placement"),
    ("layer a float", lambda: SteeringConfig(layer=1.5), ValueError, "steering.layer"),
    ("learning rate 0", lambda: FitConfig(learning_rate=0.0), ValueError, "fit.learning_rate"),
    ("learning rate negative", lambda: FitConfig(learning_rate=-1e-3), ValueError, "fit.learning_rate"),
    ("learning rate inf", lambda: FitConfig(learning_rate=float("inf")), ValueError, "fit.learning_rate"),
    ("steps 0", lambda: FitConfig(steps=0), ValueError, "fit.steps"),
    ("subsets_per_step > K", lambda: StrideConfig().replace(fit={"subsets_per_step": 600}), ValueError,
     "subsets_per_step"),
    ("stability weight negative", lambda: FitConfig(stability_weight=-1.0), ValueError, "fit.stability_weight"),
    ("positions 0", lambda: FitConfig(positions_per_example=0), ValueError, "positions_per_example"),
    ("cache dtype", lambda: FitConfig(cache_dtype="float16"), ValueError, "fit.cache_dtype"),
    ("measure space", lambda: MeasureConfig(space="sqrt"), ValueError, "measure.space"),
    ("loss floor 0", lambda: MeasureConfig(loss_floor=0.0), ValueError, "measure.loss_floor"),
    ("loss floor 2", lambda: MeasureConfig(loss_floor=2.0), ValueError, "measure.loss_floor"),
    ("operator chunk 0", lambda: MeasureConfig(operator_chunk=0), ValueError, "measure.operator_chunk"),
    ("reference", lambda: MeasureConfig(reference="pool"), ValueError, "measure.reference"),
    ("unknown key", lambda: StrideConfig.from_dict({"fit": {"stepz": 3}}), ValueError, r"unknown field.*stepz"),
    ("unknown section", lambda: StrideConfig.from_dict({"fitting": {}}), ValueError, "unknown field"),
    ("mistyped int", lambda: StrideConfig.from_dict({"fit": {"steps": "10"}}), TypeError, "fit.steps must be an integer"),
    ("mistyped bool", lambda: StrideConfig.from_dict({"steering": {"normalize_input": "yes"}}), TypeError,
     "normalize_input must be true or false"),
    ("mistyped float", lambda: StrideConfig.from_dict({"fit": {"learning_rate": "fast"}}), TypeError,
     "learning_rate must be a number"),
    ("section not a mapping", lambda: StrideConfig.from_dict({"fit": 3}), TypeError, "fit must be a mapping"),
    ("top level not a mapping", lambda: StrideConfig.from_dict([1]), TypeError, "must be a mapping"),
    ("unknown preset", lambda: StrideConfig.preset("huge"), ValueError, "unknown preset"),
    ("train epochs 0", lambda: train.TrainConfig(epochs=0), ValueError, "epochs"),
    ("gt alpha 1.5", lambda: GroundTruthConfig(alpha=1.5), ValueError, "alpha"),
    ("gt subsets 0", lambda: GroundTruthConfig(n_subsets=0), ValueError, "n_subsets"),
    ("gt seeds 0", lambda: GroundTruthConfig(seeds_per_subset=0), ValueError, "seeds_per_subset"),
    # --- Examples
    ("duplicate ids", lambda: Examples(inputs=np.zeros((3, 2)), targets=np.zeros(3, int), ids=[0, 0, 1]), ValueError,
     "ids must be unique"),
    ("2-D ids", lambda: Examples(inputs=np.zeros((3, 2)), targets=np.zeros(3, int), ids=np.zeros((3, 1))), ValueError,
     "ids must be 1-D"),
    ("inputs length", lambda: Examples(inputs=np.zeros((2, 2)), targets=np.zeros(3, int), ids=[0, 1, 2]), ValueError,
     "inputs has shape"),
    ("float targets", lambda: Examples(inputs=np.zeros((3, 2)), targets=np.zeros(3), ids=[0, 1, 2]), ValueError,
     "targets must be integers"),
    ("left padding", lambda: lm(mask=np.array([[0, 1, 1, 1, 1, 1]] * 10)), ValueError, "right padding"),
    ("empty loss mask", lambda: lm(loss_mask=np.zeros((10, 6))), ValueError, "all-zero loss_mask"),
    ("mask shape", lambda: lm(mask=np.ones((10, 5))), ValueError, "mask must be"),
    ("loss mask > 1", lambda: lm(loss_mask=np.full((10, 6), 2.0)), ValueError, r"\[0, 1\]"),
    ("texts count", lambda: lm(texts=("a",)), ValueError, "1 texts for 10 examples"),
    ("texts vs tokens", lambda: lm(texts=tuple("x" * 10), tokenizer=Tok()), ValueError, "texts do not match"),
    # --- building examples
    ("one string", lambda: data.examples_from_texts("abc", Tok(), 4), ValueError, "non-empty sequence"),
    ("no texts", lambda: data.examples_from_texts([], Tok(), 4), ValueError, "non-empty sequence"),
    ("seq_len 1", lambda: data.examples_from_texts(["abcdef"], Tok(), 1), ValueError, "seq_len"),
    ("seq_len float", lambda: data.examples_from_texts(["abcdef"], Tok(), 4.0), ValueError, "seq_len"),
    ("unknown mode", lambda: data.examples_from_texts(["abcdef"], Tok(), 4, mode="window"), ValueError, "mode"),
    ("too long", lambda: data.examples_from_texts(["abcdefghij"], Tok(), 4, mode="pad"), ValueError, "truncate=True"),
    ("empty response", lambda: data.examples_from_pairs(["q"], [""], Tok(), 8), ValueError, "response 0 is empty"),
    ("pairs mismatch", lambda: data.examples_from_pairs(["a", "b"], ["c"], Tok(), 8), ValueError, "as many prompts"),
    ("corpus too short", lambda: data.examples_from_texts(["a"], Tok(), 8, add_eos=False), ValueError, "too few"),
    # --- the facade, before any compile
    ("empty training set", lambda: fit(GPT_MODEL, lm()[np.arange(0)]), ValueError, "at least 2 examples"),
    ("one training example", lambda: fit(GPT_MODEL, lm(1)), ValueError, "at least 2 examples"),
    ("sequence too long", lambda: fit(GPT_MODEL, lm(seq=9)), ValueError, "longer than the model's context"),
    ("negative token id", lambda: fit(GPT_MODEL, bad_ids()), ValueError, r"outside the model's vocabulary"),
    ("token id >= V", lambda: fit(GPT_MODEL, lm(lo=10, hi=20)), ValueError, "outside the model's vocabulary"),
    ("float tokens", lambda: fit(GPT_MODEL, Examples(inputs=np.zeros((4, 6)), targets=np.zeros((4, 6), int),
                                                     ids=np.arange(4))), ValueError, "integer token ids"),
    ("feature width", lambda: fit(MLP_MODEL, clf(f=4)), ValueError, r"\[N, 3\] features"),
    ("NaN features", lambda: fit(MLP_MODEL, Examples(inputs=np.full((6, 3), np.nan, np.float32),
                                                     targets=np.zeros(6, int), ids=np.arange(6))), ValueError, "NaN"),
    ("label out of range", lambda: fit(MLP_MODEL, Examples(inputs=np.zeros((6, 3), np.float32),
                                                           targets=np.full(6, 5), ids=np.arange(6))), ValueError,
     "labels in"),
    ("layer beyond depth", lambda: fit(GPT_MODEL, lm(), QUICK.replace(steering={"layer": 3})), ValueError,
     "beyond the model's depth"),
    ("negative layer beyond depth", lambda: fit(GPT_MODEL, lm(), QUICK.replace(steering={"layer": -4})), ValueError,
     "beyond the model's depth"),
    ("K > n d", lambda: fit(GPT_MODEL, lm(3), QUICK), ValueError, "too large for 3 training examples"),
    ("not a hooked model", lambda: fit(object(), lm()), TypeError, "HookedModel protocol"),
    ("attribute before fit", lambda: Stride().attribute(lm()), RuntimeError, "call Stride.fit"),
    ("direct model call with bad ids", lambda: GPT_MODEL(jnp.asarray(bad_ids().inputs)), ValueError,
     r"token ids must lie in \[0, 16\)"),
    ("model context", lambda: GPT_MODEL(jnp.zeros((1, 9), jnp.int32)), ValueError, "context of 6"),
    # --- designs
    ("design n 0", lambda: left_regular_design(0, 4, 2, 0), ValueError, "n"),
    ("design K 0", lambda: left_regular_design(10, 0, 2, 0), ValueError, "n_subsets"),
    ("design d > K", lambda: left_regular_design(10, 4, 5, 0), ValueError, "per_example"),
    ("design n d < K", lambda: left_regular_design(2, 10, 2, 0), ValueError, "cannot fill"),
    ("alpha 0", lambda: alpha_subsets(10, 3, 0.0, 0), ValueError, "alpha"),
    ("alpha 1", lambda: alpha_subsets(10, 3, 1.0, 0), ValueError, "alpha"),
    ("no subsets", lambda: alpha_subsets(10, 0, 0.5, 0), ValueError, "m"),
    ("design ids out of range", lambda: Design(np.array([[0, 5]]), 4), ValueError, "subset ids must lie"),
    ("design duplicate ids", lambda: Design(np.array([[1, 1]]), 4), ValueError, "distinct"),
    ("mask indices out of range", lambda: indices_to_mask(np.array([[0, 9]]), 5), ValueError, "indices"),
    # --- LDS
    ("scores NaN", lambda: lds.lds(np.full((5, 2), np.nan), np.array([[0, 1]] * 3), np.zeros((3, 2))), ValueError,
     "scores_NxQ holds"),
    ("losses NaN", lambda: lds.lds(np.zeros((5, 2)), np.array([[0, 1]] * 3), np.full((3, 2), np.nan)), ValueError,
     "losses_MxQ holds"),
    ("LDS M < 3", lambda: lds.lds(np.zeros((5, 2)), np.array([[0, 1]] * 2), np.zeros((2, 2))), ValueError,
     "at least 3 subsets"),
    ("LDS subset out of range", lambda: lds.lds(np.zeros((5, 2)), np.array([[0, 9]] * 3), np.zeros((3, 2))),
     ValueError, "subset indices"),
    ("LDS query count", lambda: lds.lds(np.zeros((5, 2)), np.array([[0, 1]] * 3), np.zeros((3, 4))), ValueError,
     "queries"),
    ("ceiling shapes", lambda: lds.noise_ceiling(np.zeros((3, 2)), np.zeros((3, 3))), ValueError, "one shape"),
    ("spearman shapes", lambda: lds.spearman(np.zeros(3), np.zeros(4)), ValueError, "one shape"),
    # --- recovery
    ("y NaN", lambda: recovery.fista_lasso(np.full(8, np.nan), left_regular_design(10, 8, 2, 0), 0.1), ValueError,
     "NaN"),
    ("y wrong K", lambda: recovery.fista_lasso(np.zeros(7), left_regular_design(10, 8, 2, 0), 0.1), ValueError,
     "K=8"),
    ("lambda negative (solver)", lambda: recovery.fista_lasso(np.zeros(8), left_regular_design(10, 8, 2, 0), -1.0),
     ValueError, "lambda"),
    ("lambda NaN (solver)", lambda: recovery.fista_lasso(np.zeros(8), left_regular_design(10, 8, 2, 0), np.nan),
     ValueError, "lambda"),
    ("max_iter 0", lambda: recovery.FistaConfig(max_iter=0), ValueError, "max_iter"),
    ("tol negative", lambda: recovery.FistaConfig(tol=-1.0), ValueError, "tol"),
    # --- training and output directories
    ("batch larger than subset", lambda: train.train_many(MLP, clf(), np.arange(4)[None], np.array([0]),
                                                          train.TrainConfig(batch_size=8)), ValueError, "batch_size"),
    ("seeds shape", lambda: train.train_many(MLP, clf(), np.arange(8)[None], np.array([0, 1]),
                                             train.TrainConfig(batch_size=4)), ValueError, "seeds"),
    # --- issue 25: inputs that used to run silently
    ("grad_clip -1", lambda: train.TrainConfig(grad_clip=-1.0), ValueError, "grad_clip"),
    ("rank 10^7", lambda: fit(GPT_MODEL, lm(), QUICK.replace(steering={"rank": 10**7})), ValueError,
     r"steering.rank=10000000 makes an operator bank of .* GiB"),
    ("positions 10^6", lambda: fit(GPT_MODEL, lm(), QUICK.replace(fit={"positions_per_example": 10**6})), ValueError,
     "fit.positions_per_example=1000000 exceeds the sequence length T=6"),
    ("gt subsets 8.5", lambda: GroundTruthConfig(n_subsets=8.5), ValueError, "groundtruth.n_subsets must be an integer"),
    ("gt seed -1", lambda: GroundTruthConfig(seed=-1), ValueError, "groundtruth.seed"),
    ("top_k k=-1", lambda: Attribution(np.zeros((3, 2)), np.arange(3), np.arange(2)).top_k(0, k=-1), ValueError,
     "k .* must be an integer >= 1"),
    ("top_k k=0", lambda: Attribution(np.zeros((3, 2)), np.arange(3), np.arange(2)).top_k(0, k=0), ValueError, "k"),
    ("--top-k -1", lambda: attribute_cmd(top_k=-1), ValueError, "--top-k"),
    ("design K 2.7 (library)", lambda: left_regular_design(10, 2.7, 2, 0), ValueError, "n_subsets must be an integer"),
    ("design K '8' (library)", lambda: left_regular_design(10, "8", 2, 0), ValueError, "n_subsets must be an integer"),
    ("design K 2.7 (dataclass)", lambda: DesignConfig(n_subsets=2.7), ValueError, "design.n_subsets"),
    ("design K 2.7 (YAML)", lambda: StrideConfig.from_dict({"design": {"n_subsets": 2.7}}), TypeError,
     "design.n_subsets.*must be an integer"),
    ("design K '8' (YAML)", lambda: StrideConfig.from_dict({"design": {"n_subsets": "8"}}), TypeError,
     "design.n_subsets.*must be an integer"),
    ("design K '8' (harness)", lambda: experiment({"stride": {"design": {"n_subsets": "8"}}}), TypeError,
     "design.n_subsets.*must be an integer"),
    ("design K 2.7 (harness variant)", lambda: experiment({"variants": {"v": {"design": {"n_subsets": 2.7}}}}),
     TypeError, "design.n_subsets.*must be an integer"),
    ("design seed -1", lambda: DesignConfig(seed=-1), ValueError, "design.seed"),
    ("fit seed -1", lambda: FitConfig(seed=-1), ValueError, "fit.seed"),
    ("LDS duplicate indices", lambda: lds.lds(np.zeros((5, 2)), np.array([[0, 1], [2, 2], [3, 4]]), np.zeros((3, 2))),
     ValueError, "subset 1 lists example 2 twice"),
    ("LDS n_boot 0", lambda: lds.lds(np.zeros((5, 2)), np.array([[0, 1]] * 3), np.zeros((3, 2)), n_boot=0),
     ValueError, "n_boot"),
    ("ceiling n_boot 0", lambda: lds.noise_ceiling(np.zeros((3, 2)), np.zeros((3, 2)), n_boot=0), ValueError, "n_boot"),
    ("harness n_boot 0", lambda: experiment({"n_boot": 0}), ValueError, "n_boot"),
    ("harness select.n_boot 0", lambda: experiment({"variants": {"a": {}}, "select": {"n_boot": 0}}), ValueError,
     "select.n_boot"),
    ("show_examples -1", lambda: experiment({"show_examples": -1}), ValueError, "show_examples"),
    ("duplicate YAML keys", lambda: load_config_file(config_file("fit:\n  steps: 3\n  lr: 1\n  steps: 4\n")),
     ValueError, r"key 'steps' appears twice in one mapping \(lines 2 and 4\)"),
    ("duplicate JSON keys", lambda: load_config_file(config_file('{"a": 1, "a": 2}', ".json")), ValueError,
     "key 'a' twice"),
    ("name ../../escape", lambda: experiment({"name": "../../escape"}), ValueError, "name '../../escape'"),
    ("cell name ..", lambda: experiment({"cells": [{"name": ".."}]}), ValueError, "cells"),
    ("method name a/../../b", lambda: experiment({"methods": [{"name": "a/../../b", "method": "random"}]}),
     ValueError, "method name"),
    ("harness ground truth < 3 subsets", lambda: experiment({"task": {"groundtruth": {"n_subsets": 2}}}), ValueError,
     "at least 3 subsets"),
    ("harness seed -1", lambda: experiment({"task": {"model": {"seed": -1}}}), ValueError, "task.model.seed"),
    ("harness split seed -1", lambda: experiment({"task": {"kind": "classifier", "split": {"seed": -1}}}), ValueError,
     "task.split.seed"),
]


@pytest.mark.parametrize("name, call, exc, match", CASES, ids=[c[0] for c in CASES])
def test_rejected_with_a_clear_message(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_the_table_is_large():
    assert len(CASES) >= 95


def test_out_dir_that_is_a_file_or_cannot_be_created(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        store.check_writable_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="cannot create"):
        store.check_writable_dir(tmp_path / "f" / "sub")
    with pytest.raises(ValueError, match="is a file"):
        Stride(QUICK).fit(GPT_MODEL, lm(), workdir=tmp_path / "f", progress=False)


def test_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_jsonl(tmp_path / "none.jsonl", Tok(), 8)
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(ValueError, match="expected a .jsonl"):
        data.load_jsonl(tmp_path / "d.csv", Tok(), 8)
    with pytest.raises(ValueError, match="neither a 'text' field"):
        data.load_jsonl(jsonl(tmp_path, json.dumps({"title": "x"}) + "\n"), Tok(), 8)
    with pytest.raises(ValueError, match="cannot read"):
        data.load_jsonl(jsonl(tmp_path, "{not json\n"), Tok(), 8)


def test_queries_are_checked_at_attribute(tmp_path):
    stride = fit(GPT_MODEL, lm())
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        stride.attribute(lm(lo=10, hi=20), progress=False)
    with pytest.raises(ValueError, match="context"):
        stride.attribute(lm(seq=8), progress=False)
    with pytest.raises(ValueError, match="no queries"):
        stride.attribute(lm()[np.arange(0)], progress=False)


# --- issue 25: legal but surely a mistake -> a warning naming the numbers


def test_a_tiny_fit_learning_rate_warns():
    with pytest.warns(UserWarning, match=r"fit.learning_rate=1e-30 is below 1e-06.*20 steps"):
        StrideConfig.preset("quick", fit={"learning_rate": 1e-30})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StrideConfig.preset("quick")  # the defaults stay silent


def test_a_pretraining_that_collapses_to_ln_v_warns():
    from stride_jax.harness import tasks
    from stride_jax.harness.config import LMTask

    task = LMTask(pretrain=train.TrainConfig(learning_rate=1e8, epochs=2.0, batch_size=5))
    model = train.pretrain(GPT, lm(), task.pretrain, seed=0, progress=False)
    loss = float(train.eval_loss(model, lm()).mean())
    with pytest.warns(UserWarning, match=r"training loss 2.77\d is at or near ln V = ln\(16\) = 2.773.*learning_rate 1e\+08"):
        tasks.warn_if_not_learned(task, model, loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks.warn_if_not_learned(task, model, 0.5 * np.log(16))  # a model that learned: silent


def test_with_config_measures_a_new_reference_size():
    stride = fit(GPT_MODEL, lm())
    assert stride.with_config(QUICK.replace(recovery={"lambda_frac": 0.1})).reference is stride.reference
    other = stride.with_config(QUICK.replace(measure={"n_reference": 4}))  # not silently the old 64-row one
    fresh = fit(GPT_MODEL, lm(), QUICK.replace(measure={"n_reference": 4}))
    assert other.reference.member_PxK.shape[0] == 4
    np.testing.assert_array_equal(other.reference.member_PxK, fresh.reference.member_PxK)
    np.testing.assert_allclose(other.reference.measurement.steered_loss_QxK,
                               fresh.reference.measurement.steered_loss_QxK, rtol=1e-6)
    assert stride.with_config(QUICK.replace(measure={"n_reference": 4, "reference": "queries"})).reference \
        is stride.reference  # no reference used: kept


# --- issue 25: every check the harness can do without training comes before it


TINY_LM = {"name": "tiny", "task": {"kind": "lm", "data": {"train_per_source": 4, "val_queries_per_source": 1,
                                                           "test_queries_per_source": 1, "seq_len": 16},
                                    "model": {"n_layers": 1, "d_model": 16, "n_heads": 2},
                                    "pretrain": {"epochs": 1.0, "batch_size": 4},
                                    "retrain": {"epochs": 1.0, "batch_size": 2},
                                    "groundtruth": {"n_subsets": 3, "seeds_per_subset": 1, "alpha": 0.5}},
           "stride": {"design": {"n_subsets": 8, "per_example": 2}, "steering": {"rank": 1},
                      "fit": {"steps": 2, "subsets_per_step": 4}},
           "methods": ["stride", "random"], "n_boot": 10}


@pytest.mark.parametrize("override, match", [
    ({"stride": {"design": {"n_subsets": 64, "per_example": 2}}}, "too large for 12 training examples"),
    ({"stride": {"steering": {"layer": 3}}}, "steering.layer 3 is beyond the model's depth"),
    ({"methods": [{"name": "sim", "method": "repr-sim", "params": {"layer": 5}}]}, "beyond the model's depth"),
    ({"stride": {"fit": {"positions_per_example": 1000}}}, "positions_per_example=1000 exceeds"),
    ({"task": {"retrain": {"batch_size": 8}}}, "fewer than the retraining batch_size=8"),
])
def test_the_harness_checks_before_pretraining(tmp_path, monkeypatch, override, match):
    from stride_jax.config import merge
    from stride_jax.harness import experiment as experiment_lib

    monkeypatch.setattr(experiment_lib.tasks_lib, "prepare", lambda *a, **k: pytest.fail("prepared before the check"))
    with pytest.raises(ValueError, match=match):
        experiment_lib.run(experiment(merge(TINY_LM, override)), tmp_path / "out", progress=False)


# --- issue 25: no dead ends; a message that says "delete X" is true when followed


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_corrupt_method_result_is_recomputed_and_stale_temporaries_go(tmp_path):
    from stride_jax.harness import runner
    from stride_jax.harness.config import MethodSpec, task_from_dict

    task, spec = task_from_dict(TINY_LM["task"]), MethodSpec(name="random")
    first, _ = runner.run_method(task, tmp_path, spec, QUICK)
    scores = tmp_path / "methods" / "random" / "scores"
    (scores / ".tmp-killed.npz").write_bytes(b"half")  # a killed save beside a finished result
    runner.run_method(task, tmp_path, spec, QUICK)
    assert not list(scores.glob(".tmp-*"))
    for damage in (lambda: _flip_a_byte(scores / "scores.npz"), lambda: (scores / "scores.npz").unlink(),
                   lambda: (tmp_path / "methods" / "random" / "run.json").write_text("{torn")):
        damage()
        (scores / ".tmp-killed.npz").write_bytes(b"half")
        again, record = runner.run_method(task, tmp_path, spec, QUICK)
        np.testing.assert_array_equal(again.dense(), first.dense())
        assert record["method"] == "random" and not list(scores.glob(".tmp-*"))


def test_a_corrupt_fit_checkpoint_names_what_to_delete(tmp_path):
    cfg = QUICK.replace(fit={"steps": 2, "checkpoint_every": 1})
    Stride(cfg).fit(GPT_MODEL, lm(), workdir=tmp_path, progress=False)
    last = sorted((tmp_path / "checkpoints").glob("step_*"))[-1]
    _flip_a_byte(last / "state.npz")
    with pytest.raises(ValueError, match=f"delete the directory {last}") as e:
        Stride(cfg).fit(GPT_MODEL, lm(), workdir=tmp_path, progress=False)
    (last / "state.npz").unlink()  # what the old message said: the same error again, never a traceback
    with pytest.raises(ValueError, match=f"delete the directory {last}"):
        Stride(cfg).fit(GPT_MODEL, lm(), workdir=tmp_path, progress=False)
    shutil.rmtree(last)  # what the message says: the fit resumes from the checkpoint before it
    Stride(cfg).fit(GPT_MODEL, lm(), workdir=tmp_path, progress=False)
    assert "corrupt" in str(e.value)


def test_a_changed_architecture_is_a_new_base_model_not_a_stale_one(tmp_path):
    from stride_jax.harness import tasks
    from stride_jax.harness.config import task_from_dict

    task = task_from_dict(TINY_LM["task"])
    wider = task_from_dict({**TINY_LM["task"], "model": {**TINY_LM["task"]["model"], "d_model": 24}})
    train_ = tasks.load_data(task)[0]
    assert tasks.base_model(task, train_, tmp_path).cfg.d_model == 16
    with pytest.raises(store.IdentityError, match=r"model_config.d_model: stored 16, now 24.*delete (\S+)") as e:
        tasks.base_model(wider, train_, tmp_path)
    shutil.rmtree(tmp_path / "base_model")  # as the message says
    assert str(tmp_path / "base_model") in str(e.value)
    assert tasks.base_model(wider, train_, tmp_path).cfg.d_model == 24
    _flip_a_byte(tmp_path / "base_model" / "metadata.json")
    with pytest.raises(ValueError, match=f"delete the directory {tmp_path / 'base_model'}"):
        tasks.base_model(wider, train_, tmp_path)


# --- `stride-jax attribute` and its data loading (issue 24): one clear line each, before the model loads

TINY_GPT = models.GPTConfig(vocab_size=data.VOCAB_SIZE, seq_len=32, n_layers=1, d_model=16, n_heads=2)


@pytest.fixture(scope="module")
def shipped():
    return data.load_tokenizer()


@pytest.fixture
def warnings_log(caplog, monkeypatch):
    """caplog sees the "stride_jax" logger even after cli.main stopped its propagation."""
    monkeypatch.setattr(logging.getLogger("stride_jax"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="stride_jax")
    return caplog


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything reads the model: data must be checked first."""
    def touched(*a, **k):
        raise AssertionError("the model was read before the data were checked")
    for mod, name in ((attribute_mod, "load_model"), (convert, "inspect_pretrained"), (convert, "load_pretrained")):
        monkeypatch.setattr(mod, name, touched)


def run_cli(tmp_path, train, queries="q.jsonl", extra=()):
    (tmp_path / "model.gguf").write_bytes(b"GGUF not really")  # never read when the data are bad
    if not (tmp_path / "q.jsonl").exists():
        data.write_jsonl(tmp_path / "q.jsonl", [{"text": "a query"}])
    return cli.main(["attribute", "--model", str(tmp_path / "model.gguf"), "--train", str(train), "--queries",
                     str(tmp_path / queries), "--out", str(tmp_path / "out"), "--no-progress", *extra])


@pytest.mark.parametrize("content, match", [
    ("", r"t.jsonl is empty"),
    ("\n  \n", r"t.jsonl is empty"),
    ('{"text": "fine"}\n{"text": "broken\n', r"cannot read .*t.jsonl: line 2 is not valid JSON"),
    ('{"text": "fine"}\n["a", "list"]\n', r"t.jsonl line 2 is a JSON list, not an object"),
    ('{"text": "fine"}\n{"title": "x"}\n', r"t.jsonl line 2: record 1 has neither a 'text' field nor 'prompt' and 'response'"),
    ('{"prompt": "q", "response": "  "}\n', r"t.jsonl line 1: the 'response' is empty"),
])
def test_bad_data_is_one_line_before_the_model_loads(tmp_path, capsys, no_model_load, content, match):
    (tmp_path / "t.jsonl").write_text(content)
    assert run_cli(tmp_path, tmp_path / "t.jsonl") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stride-jax: error:"), err
    import re
    assert re.search(match, err), err


def test_queries_are_checked_before_the_model_loads(tmp_path, capsys, no_model_load):
    data.write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    (tmp_path / "bad_q.jsonl").write_text('{"prompt": "p"}\n')
    assert run_cli(tmp_path, tmp_path / "t.jsonl", queries="bad_q.jsonl") == 2
    assert "bad_q.jsonl line 1: record 0 has neither" in capsys.readouterr().err


def test_truncation_is_counted_and_warned(tmp_path, shipped, warnings_log):
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
             "Emma Woodhouse", "And God said, Let there be light: and there was light."]
    data.write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    records = data.read_lm_records(tmp_path / "t.jsonl")
    lengths = [len(t) for t in data.tokenize_records(records, shipped)[0]]
    seq_len = 8
    ex = data.examples_from_records(records, shipped, seq_len, what="t.jsonl")
    assert ex.inputs.shape == (3, seq_len)
    cut = [n for n in lengths if n > seq_len + 1]
    lost = sum(n - seq_len - 1 for n in cut)
    msg = f"t.jsonl: {len(cut)} of 3 examples cut to seq_len + 1 = 9 tokens, {lost} of {sum(lengths)} tokens lost"
    assert [r.getMessage() for r in warnings_log.records if msg in r.getMessage()], warnings_log.text
    warnings_log.clear()
    full = data.examples_from_records(records, shipped, None, what="t.jsonl")  # its own length: nothing cut
    assert full.inputs.shape[1] == max(lengths) - 1 and not warnings_log.records
    capped = data.examples_from_records(records, shipped, None, context=10, what="t.jsonl")
    assert capped.inputs.shape[1] == 10 and "examples cut" in warnings_log.text
    with pytest.raises(ValueError, match="raise seq_len or pass truncate=True"):
        data.load_jsonl(tmp_path / "t.jsonl", shipped, seq_len)  # no silent truncation without truncate=True


def test_response_cut_away_entirely_names_file_and_line(tmp_path, shipped):
    data.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "response": "there"},
                                            {"prompt": "word " * 30, "response": "answer"}])
    records = data.read_lm_records(tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl line 2: the response starts at token \d+ .* cut away entirely"):
        data.examples_from_records(records, shipped, 8)


def test_seq_len_includes_the_chat_template(tmp_path):
    pre = convert.load_gguf(write_gguf(tmp_path / "tiny.gguf", HP(), make_weights(HP())))
    tok = pre.tokenizer
    data.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the", "response": "in the end"}, {"text": "a thin ant"}])
    records = data.read_lm_records(tmp_path / "p.jsonl")
    ex = data.examples_from_records(records, tok, None)
    prompt = tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    n_response = len(tok("in the end", add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert ex.inputs.shape[1] == n_prompt + n_response - 1  # the longest as the model sees it, template included
    assert ex.texts[0].startswith("<|im_start|>user\nthe<|im_end|>")
    assert ex.loss_mask[0].sum() == n_response and ex.loss_mask[1].sum() == ex.mask[1].sum()


def test_parquet_and_save_to_disk_with_named_columns(tmp_path, shipped):
    import datasets

    ds = datasets.Dataset.from_dict({"question": ["What is it?", "Who?"], "answer": ["A truth.", "Emma."],
                                     "body": ["x", "y"]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    for path in (tmp_path / "d.parquet", tmp_path / "folder"):
        pairs = data.read_lm_records(path, prompt_column="question", response_column="answer")
        assert [(r.prompt, r.response) for r in pairs] == [("What is it?", "A truth."), ("Who?", "Emma.")]
        texts = data.read_lm_records(path, text_column="body", prompt_column="none")
        assert [r.text for r in texts] == ["x", "y"]
        with pytest.raises(ValueError, match=r"row 0: record 0 has neither a 'text' field .*--text-column"):
            data.read_lm_records(path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face dataset"):
        data.read_lm_records(tmp_path / "plain")


def test_tokenizer_mismatch_is_refused(tmp_path, shipped):
    """A model saved with its tokenizer remembers it: examples of another tokenizer (ids in range) are refused."""
    models.save_model(models.build(TINY_GPT, 0), tmp_path / "gpt", tokenizer=shipped)
    pre = convert.load_pretrained(tmp_path / "gpt")
    assert data.tokenizer_fingerprint(pre.tokenizer) == data.tokenizer_fingerprint(data.corpus_tokenizer())
    other = convert.load_gguf(write_gguf(tmp_path / "tiny.gguf", HP(), make_weights(HP()))).tokenizer
    texts = ["the thin ant", "in the end", "a thin ant in the end"]
    foreign = data.examples_from_texts(texts, other, 8, mode="pad", truncate=True)
    assert foreign.inputs.max() < TINY_GPT.vocab_size  # in range: only the tokenizer tells them apart
    quick = StrideConfig.preset("quick", design={"n_subsets": 4, "per_example": 2}, fit={"steps": 1,
                                                                                         "subsets_per_step": 4})
    with pytest.raises(ValueError, match="the training pool were tokenised by another tokenizer"):
        Stride(quick).fit(pre.model, foreign, progress=False)
    # the tokenizer files of a checkpoint swapped for another tokenizer's
    import shutil
    shutil.rmtree(tmp_path / "gpt" / "tokenizer")
    other.save_pretrained(str(tmp_path / "gpt" / "tokenizer"))
    with pytest.raises(ValueError, match="holds another tokenizer than the one the model was saved with"):
        convert.load_pretrained(tmp_path / "gpt")


def test_preset_k_too_large_names_the_fix(tmp_path, capsys):
    models.save_model(models.build(TINY_GPT, 0), tmp_path / "gpt", tokenizer=data.load_tokenizer())
    data.write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(10)])
    data.write_jsonl(tmp_path / "q.jsonl", [{"text": "a query"}])
    args = ["attribute", "--model", str(tmp_path / "gpt"), "--train", str(tmp_path / "t.jsonl"), "--queries",
            str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "out"), "--no-progress", "--preset", "lm"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--preset lm has design.n_subsets K=2048, more than n * d = 10 * 8 = 80" in err
    assert "design: {n_subsets: 10}" in err and "leave the preset out" in err
    assert not (tmp_path / "out" / "fit").exists()


def test_a_model_without_tokenizer_says_how_to_save_one(tmp_path, capsys):
    models.save_model(models.build(TINY_GPT, 0), tmp_path / "gpt")
    data.write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    data.write_jsonl(tmp_path / "q.jsonl", [{"text": "c"}])
    assert cli.main(["attribute", "--model", str(tmp_path / "gpt"), "--train", str(tmp_path / "t.jsonl"),
                     "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "save_model(model, dir, tokenizer=tok)" in capsys.readouterr().err


def test_choose_preset_follows_the_model():
    from stride_jax.config import choose_preset, pool_preset

    assert choose_preset(models.build(TINY_GPT, 0), 1000)[0] == "lm"
    name, why = choose_preset(models.build(TINY_GPT, 0), 5000)  # a pool beyond lm's K / 2: the n >> K law
    assert name == "lm-auto" and "K = 2n" in why
    cfg, _ = pool_preset("lm-auto", 5000)
    assert cfg.design.n_subsets == 10000 and cfg.recovery.prior == "features" and cfg.fit.sparse_updates
    assert choose_preset(models.LlamaConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                                            ffn_dim=8, max_len=8), 100)[0] == "llm-quick"
    assert choose_preset("mlp", 1000)[0] == "classifier"
    name, why = choose_preset("gpt", 255)
    assert name == "lm" and "capped from 2048 to 255" in why
    cfg, _ = pool_preset("lm", 255)
    assert cfg.design.n_subsets == 255 <= 255 * cfg.design.per_example and cfg.fit.subsets_per_step <= 255
    assert pool_preset("lm", 5000)[0] == StrideConfig.preset("lm")  # a pool large enough: the preset unchanged
    with pytest.warns(UserWarning, match="choose_preset"):
        Stride()


def test_a_given_preset_with_auto_k_resolves_to_the_pool():
    """--preset llm / lm-auto (design.n_subsets "auto") through the CLI's config resolution: K from
    the pool, checked as a number (it crashed comparing "auto" with n d)."""
    from stride_jax.harness.attribute import resolve_config

    llama = models.LlamaConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, max_len=8)
    cfg, name, why = resolve_config(llama, 24, "llm")
    assert (name, why, cfg.design.n_subsets) == ("llm", "given by --preset", 24)
    assert cfg.fit.resolve_steps(24) * cfg.fit.subsets_per_step >= 25 * 24
    assert resolve_config(TINY_GPT, 300, "lm-auto")[0].design.n_subsets == 600
    with pytest.raises(ValueError, match="n_subsets"):  # a fixed K too large still names the fix
        resolve_config(TINY_GPT, 10, "lm")


def test_saved_model_keeps_its_tokenizer(tmp_path):
    pre = convert.load_gguf(write_gguf(tmp_path / "tiny.gguf", HP(), make_weights(HP())))
    models.save_model(pre.model, tmp_path / "ck")  # the tokenizer attached by the loader is saved with it
    back = convert.load_pretrained(tmp_path / "ck")
    text = "the thin ant in the end"
    assert back.tokenizer(text)["input_ids"] == pre.tokenizer(text)["input_ids"]
    assert back.chat_template == pre.chat_template
    meta = json.loads((tmp_path / "ck" / "metadata.json").read_text())
    assert meta["tokenizer_fingerprint"] == data.tokenizer_fingerprint(pre.tokenizer)
    info = convert.inspect_pretrained(tmp_path / "ck")
    assert info.cfg == pre.model.cfg and data.tokenizer_fingerprint(info.tokenizer) == meta["tokenizer_fingerprint"]
    assert np.all(np.asarray(back.model.embed.embedding[...]) == np.asarray(pre.model.embed.embedding[...]))
