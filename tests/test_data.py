"""Tests for stride_jax.data: shipped corpus, tokenizer, splits and Examples."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from stride_jax import data
from stride_jax.data import (
    EOS_ID,
    EOS_TOKEN,
    ID_STRIDE,
    SOURCES,
    SPLITS,
    VOCAB_SIZE,
    Examples,
    check_vocab,
    count_by_source,
    examples_from_texts,
    load_examples,
    load_paragraphs,
    load_tokenizer,
    tokenizer_hash,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_assets_ship_every_source_within_budget():
    assert data.available_sources() == SOURCES
    sizes = {p.name: p.stat().st_size for p in data.ASSETS_DIR.iterdir()}
    assert {f"{s}.txt.gz" for s in SOURCES} | {"tokenizer.json", "SOURCES.md"} <= set(sizes)
    assert sum(sizes.values()) < 2_500_000


def test_chunk_shapes_and_shift():
    ex = load_examples("val", seq_len=32, max_per_source=20)
    assert len(ex) == 60
    assert ex.inputs.shape == ex.targets.shape == (60, 32)
    assert ex.inputs.dtype == ex.targets.dtype == np.int32
    assert ex.ids.dtype == np.int64 and ex.sources.dtype == np.int32
    np.testing.assert_array_equal(ex.inputs[:, 1:], ex.targets[:, :-1])
    assert 0 <= ex.inputs.min() and ex.targets.max() < VOCAB_SIZE
    assert len(ex.texts) == 60 and all(isinstance(t, str) and t for t in ex.texts)
    np.testing.assert_array_equal(ex.sources, (ex.ids % data.ID_SPLIT) // ID_STRIDE)
    assert (ex.ids // data.ID_SPLIT == SPLITS.index("val")).all()
    assert list(ex.sources) == sorted(ex.sources)  # sources in SOURCES order


def test_chunks_are_consecutive_pieces_of_the_token_stream():
    seq_len = 16
    ex = load_examples("test", seq_len=seq_len, sources=("bible",))
    stream = data._token_stream("bible", "test")
    chunk = np.concatenate([ex.inputs[3], ex.targets[3, -1:]])
    np.testing.assert_array_equal(chunk, stream[3 * (seq_len + 1) : 4 * (seq_len + 1)])
    assert (stream == EOS_ID).sum() == len(load_paragraphs("bible", "test")) - 1


def test_ids_stable_across_max_per_source_and_sources():
    full = load_examples("val", 64)
    by_id = {int(i): k for k, i in enumerate(full.ids)}
    sub = load_examples("val", 64, max_per_source=50)
    assert count_by_source(sub) == {s: 50 for s in SOURCES}
    rows = [by_id[int(i)] for i in sub.ids]
    np.testing.assert_array_equal(sub.inputs, full.inputs[rows])
    np.testing.assert_array_equal(sub.targets, full.targets[rows])
    assert sub.texts == tuple(full.texts[r] for r in rows)
    for s in range(len(SOURCES)):  # sorted by id within each source
        ids = sub.ids[sub.sources == s]
        assert np.all(np.diff(ids) > 0)
    # Nested: a smaller budget picks a subset of a larger one (same seed).
    assert set(load_examples("val", 64, max_per_source=20).ids) <= set(sub.ids)

    only_bible = load_examples("val", 64, sources=("bible",))
    mask = full.sources == SOURCES.index("bible")
    np.testing.assert_array_equal(only_bible.ids, full.ids[mask])
    np.testing.assert_array_equal(only_bible.inputs, full.inputs[mask])
    # Order of the requested sources does not matter; subsets do not depend on other sources.
    a = load_examples("val", 64, sources=("bible", "austen"), max_per_source=30)
    b = load_examples("val", 64, sources=("austen", "bible"), max_per_source=30)
    assert a.content_hash() == b.content_hash()
    bible_only = load_examples("val", 64, sources=("bible",), max_per_source=30)
    np.testing.assert_array_equal(a.ids[a.sources == SOURCES.index("bible")], bible_only.ids)


def test_seed_fixes_the_subset():
    a = load_examples("train", 64, max_per_source=40, seed=1)
    b = load_examples("train", 64, max_per_source=40, seed=1)
    c = load_examples("train", 64, max_per_source=40, seed=2)
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != c.content_hash()
    # A budget above the number of chunks keeps them all.
    n_val = len(load_examples("val", 64, ("austen",)))
    assert len(load_examples("val", 64, ("austen",), max_per_source=10**6)) == n_val


def test_splits_partition_each_passage():
    for source in SOURCES:
        parts = [load_paragraphs(source, split) for split in SPLITS]
        total = sum(len(p) for p in data._passages(source))
        assert sum(len(p) for p in parts) == total
        n_train, n_val, n_test = map(len, parts)
        assert 0.75 < n_train / total < 0.85 and n_val > 0 and 0.05 < n_test / total < 0.15


def test_held_out_text_never_in_train():
    for source in SOURCES:
        train_text = EOS_TOKEN.join(load_paragraphs(source, "train"))
        held_out = (
            load_examples("test", 64, (source,)).texts
            + load_examples("val", 64, (source,), max_per_source=100).texts
        )
        leaked = [t for t in held_out if t in train_text]
        assert not leaked, (source, leaked[:2])


def test_counts_per_source(capsys):
    counts = {split: count_by_source(load_examples(split, 64)) for split in SPLITS}
    with capsys.disabled():
        print(f"\nchunks per source at seq_len 64: {counts}")
    for split, per_source in counts.items():
        assert set(per_source) == set(SOURCES)
        floor = 3000 if split == "train" else 300
        assert min(per_source.values()) > floor, (split, per_source)


def test_tokenizer_round_trip_and_metadata(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == EOS_ID
    text = 'It is a truth universally acknowledged -- "£20,000", naïve — ☃ thee!\nAmen.'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(EOS_TOKEN, add_special_tokens=False)["input_ids"] == [EOS_ID]
    digest = hashlib.sha256(data.TOKENIZER_FILE.read_bytes()).hexdigest()
    assert tokenizer_hash() == digest
    check_vocab(tokenizer, VOCAB_SIZE)
    with pytest.raises(ValueError, match="vocab_size"):
        check_vocab(tokenizer, 512)


def test_examples_from_texts_pad_and_chunk(tokenizer):
    seq_len = 8
    short, long = "the cat", load_paragraphs("austen", "test")[0]
    ex = examples_from_texts([short, long], tokenizer, seq_len, mode="pad", truncate=True)
    assert ex.inputs.shape == ex.targets.shape == ex.mask.shape == ex.loss_mask.shape == (2, seq_len)
    n_short = len(tokenizer(short, add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert ex.mask[0].sum() == n_short - 1 and ex.mask[1].sum() == seq_len  # right padding, masked
    np.testing.assert_array_equal(ex.inputs[:, 1:] * ex.mask[:, 1:], ex.targets[:, :-1] * ex.mask[:, 1:])
    assert ex.texts[0] == short + EOS_TOKEN and long.startswith(ex.texts[1])  # derived from the tokens
    with pytest.raises(ValueError, match="truncate=True"):
        examples_from_texts([long], tokenizer, seq_len, mode="pad")
    texts = [long, short, "and so"]
    chunked = examples_from_texts(texts, tokenizer, seq_len, mode="chunk")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = ids[0] + [EOS_ID] + ids[1] + [EOS_ID] + ids[2]
    np.testing.assert_array_equal(chunked.inputs[0], stream[:seq_len])
    n_full, rest = divmod(len(stream), seq_len + 1)
    assert rest >= 2 and len(chunked) == n_full + 1
    assert chunked.mask[-1].sum() == rest - 1 and chunked.mask[0].sum() == seq_len  # the short last window is padded
    assert len(examples_from_texts(texts, tokenizer, seq_len, drop_last=True)) == n_full
    with pytest.raises(ValueError, match="non-empty sequence"):
        examples_from_texts("the the the", tokenizer, 2)


def test_examples_from_pairs_mask_the_prompt(tokenizer):
    ex = data.examples_from_pairs(["What is 2 + 2?"], ["Four."], tokenizer, 24, chat_template=False)
    p = len(tokenizer("What is 2 + 2?", add_special_tokens=False)["input_ids"])
    r = len(tokenizer("Four.", add_special_tokens=False)["input_ids"]) + 1  # + eos
    w = ex.loss_mask[0]
    assert w[: p - 1].sum() == 0 and w[p - 1 : p - 1 + r].sum() == r and w.sum() == r
    assert ex.texts[0] == "What is 2 + 2?Four." + EOS_TOKEN
    with pytest.raises(ValueError, match="response 0 is empty"):
        data.examples_from_pairs(["q"], ["  "], tokenizer, 24)
    with pytest.raises(ValueError, match="truncated away|more than"):
        data.examples_from_pairs(["word " * 40], ["answer"], tokenizer, 8, truncate=True)


def test_load_jsonl(tokenizer, tmp_path):
    data.write_jsonl(tmp_path / "t.jsonl", [{"text": "It is a truth"}, {"text": "universally acknowledged"}])
    ex = data.load_jsonl(tmp_path / "t.jsonl", tokenizer, 16)
    assert len(ex) == 2 and ex.texts[1] == "universally acknowledged" + EOS_TOKEN
    data.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi.", "response": "Hi!"}])
    assert data.load_jsonl(tmp_path / "p.jsonl", tokenizer, 16).loss_mask.sum() > 0
    data.write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"prompt": "only a prompt"}])
    with pytest.raises(ValueError, match="record 1 has neither"):
        data.load_jsonl(tmp_path / "bad.jsonl", tokenizer, 16)
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert len(data.load_jsonl(tmp_path / "lines.txt", tokenizer, 16)) == 2
    with pytest.raises(FileNotFoundError):
        data.load_jsonl(tmp_path / "missing.jsonl", tokenizer, 16)


def test_tokens_and_texts_cannot_drift(tokenizer):
    ex = examples_from_texts(["It is a truth universally acknowledged"], tokenizer, 6, mode="chunk")
    edited = ex.replace(inputs=np.where(ex.inputs == ex.inputs[0, 0], 0, ex.inputs))
    assert edited.texts != ex.texts  # re-derived from the new tokens
    with pytest.raises(ValueError):
        ex.inputs[0, 0] = 1  # arrays are read-only
    with pytest.raises(ValueError, match="texts do not match"):
        Examples(inputs=ex.inputs, targets=ex.targets, ids=ex.ids, texts=("something else",), tokenizer=tokenizer)


def test_getitem_and_content_hash():
    ex = load_examples("val", 16, max_per_source=10)
    one = ex[3]
    assert len(one) == 1 and one.ids[0] == ex.ids[3] and one.texts == (ex.texts[3],)
    assert one.inputs.shape == (1, 16)
    np.testing.assert_array_equal(ex[-1].ids, ex.ids[-1:])
    np.testing.assert_array_equal(ex[2:5].ids, ex.ids[2:5])
    mask = ex.sources == 1
    picked = ex[mask]
    assert len(picked) == 10 and set(picked.sources) == {1}
    idx = np.array([7, 0, 7])
    np.testing.assert_array_equal(ex[idx].inputs, ex.inputs[idx])
    assert ex[idx].texts == tuple(ex.texts[i] for i in idx)
    assert ex[np.arange(len(ex))].content_hash() == ex.content_hash()
    assert ex[:-1].content_hash() != ex.content_hash()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ex.ids = ex.ids  # type: ignore[misc]


def test_examples_validates_shapes():
    ok = dict(inputs=np.zeros((3, 4), np.int32), targets=np.zeros((3, 4), np.int32), ids=[0, 1, 2])
    assert len(Examples(**ok)) == 3
    with pytest.raises(ValueError, match="inputs"):
        Examples(**{**ok, "inputs": np.zeros((2, 4), np.int32)})
    with pytest.raises(ValueError, match="texts"):
        Examples(**ok, texts=("a", "b"))
    with pytest.raises(ValueError, match="sources"):
        Examples(**ok, sources=[0, 1])
    with pytest.raises(ValueError, match="integers"):
        Examples(**{**ok, "targets": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match="unique"):
        Examples(**{**ok, "ids": [0, 1, 1]})
    with pytest.raises(ValueError, match="right padding"):
        Examples(**ok, mask=np.array([[1, 0, 1, 1]] * 3))
    with pytest.raises(ValueError, match="all-zero loss_mask"):
        Examples(**ok, loss_mask=np.zeros((3, 4)))
    # A classifier-shaped pool is fine too.
    clf = Examples(inputs=np.zeros((5, 64), np.float32), targets=np.arange(5), ids=np.arange(5))
    assert len(clf[1:3]) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="dev"), "unknown split"),
        (dict(sources=("austen", "dickens")), "unknown source"),
        (dict(sources="austen"), "sequence of names"),
        (dict(sources=()), "empty"),
        (dict(sources=("bible", "bible")), "duplicate"),
        (dict(seq_len=1), "seq_len"),
        (dict(seq_len=8.0), "seq_len"),
        (dict(max_per_source=0), "max_per_source"),
        (dict(split="val", seq_len=10**6), "too short"),
    ],
)
def test_load_examples_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_examples(**kwargs)


def test_load_paragraphs_errors():
    with pytest.raises(ValueError, match="unknown split"):
        load_paragraphs("austen", "training")
    with pytest.raises(ValueError, match="unknown source"):
        load_paragraphs("kjv", "train")


def test_jsonl_mixing_texts_and_pairs(tokenizer, tmp_path):
    data.write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Say hi.", "response": "Hi!"}, {"text": "It is a truth"}])
    ex = data.load_jsonl(tmp_path / "m.jsonl", tokenizer, 24, chat_template=False)
    assert ex.texts[0] == "Say hi.Hi!" + EOS_TOKEN and ex.texts[1] == "It is a truth" + EOS_TOKEN
    p = len(tokenizer("Say hi.", add_special_tokens=False)["input_ids"])
    assert ex.loss_mask[0, : p - 1].sum() == 0 and ex.loss_mask[0].sum() > 0  # the prompt does not count
    assert ex.loss_mask[1].sum() == ex.mask[1].sum()  # every token of a text record counts
