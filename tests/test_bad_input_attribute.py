"""Bad input to `stride-jax attribute` and its data loading: one clear line each, before the model loads.

(To be merged into tests/test_bad_input.py.) Tiny models only: a 1-block GPT on the shipped
tokenizer and the tiny GGUF of tests/test_convert.py.
"""

import json
import logging

import numpy as np
import pytest

from stride_jax import Stride, StrideConfig, cli, data, models
from stride_jax.harness import attribute as attribute_mod
from stride_jax.models import convert

from test_convert import HP, make_weights, write_gguf

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

    assert choose_preset(models.build(TINY_GPT, 0), 5000)[0] == "lm"
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
