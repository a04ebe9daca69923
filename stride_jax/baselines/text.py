"""Lexical baselines on raw text (`Examples.texts`): TF-IDF cosine similarity and Okapi BM25.

Pure numpy: a vocabulary dict over a simple word tokenizer (lower-cased runs of letters and
digits, `\\w+`), the training passages as a CSR matrix built by hand, and queries scored in
blocks against it, so memory stays O(nnz x block).

TF-IDF (sklearn's defaults): w_td = tf_td * idf_t, idf_t = ln((1 + N) / (1 + df_t)) + 1, each
passage and query L2-normalised; score = cosine. BM25 (Robertson / Lucene form):

    score(q, d) = sum_{t in q} qtf_t * idf_t * tf_td (k1 + 1) / (tf_td + k1 (1 - b + b |d| / avgdl))

with idf_t = ln(1 + (N - df_t + 0.5) / (df_t + 0.5)) (never negative). Words of a query that
never occur in the training passages contribute nothing. A higher score = "more similar" = helps.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import numpy as np
from flax import nnx

from stride_jax.scores import Attribution
from stride_jax.data import Examples
from stride_jax.baselines.base import make_attribution

__all__ = ["TfidfSimilarity", "BM25", "tokenize", "Vocabulary"]

_WORD = re.compile(r"\w+", re.UNICODE)
_BLOCK_ELEMENTS = 1 << 24  # nnz x query block per scoring step


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (`\\w+`)."""
    return _WORD.findall(text.lower())


def _texts_of(examples: Examples, role: str) -> tuple[str, ...]:
    texts = getattr(examples, "texts", None)
    if texts is None:
        raise ValueError(f"{role} examples have no texts: text baselines need Examples.texts "
                         "(load_examples and examples_from_texts fill them)")
    if len(texts) != len(examples.ids):
        raise ValueError(f"{role}: {len(texts)} texts for {len(examples.ids)} examples")
    return tuple(texts)


class Vocabulary:
    """Word -> column index, built from the training passages."""

    def __init__(self, docs: Sequence[Sequence[str]]):
        self.index: dict[str, int] = {}
        for doc in docs:
            for w in doc:
                self.index.setdefault(w, len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    def counts(self, docs: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR (indptr, indices, counts) of in-vocabulary term counts; column indices sorted."""
        indptr, indices, counts = [0], [], []
        for doc in docs:
            ids = np.fromiter((self.index[w] for w in doc if w in self.index), np.int64)
            cols, cnt = np.unique(ids, return_counts=True)
            indices.append(cols)
            counts.append(cnt)
            indptr.append(indptr[-1] + len(cols))
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
        return np.asarray(indptr, np.int64), cat(indices, np.int64), cat(counts, np.float64)


def _row_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-row sums of CSR-ordered `values` [nnz, ...] -> [N, ...] (empty rows give 0)."""
    out = np.zeros((len(indptr) - 1, *values.shape[1:]), np.float64)
    nonempty = np.diff(indptr) > 0
    if nonempty.any():  # reduceat over the non-empty rows' starts: each sums exactly its row
        out[nonempty] = np.add.reduceat(values, indptr[:-1][nonempty], axis=0)
    return out


def _csr_times_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, dense_VxQ: np.ndarray) -> np.ndarray:
    """[N, Q] = CSR [N, V] @ dense [V, Q], in blocks of queries."""
    n, q = len(indptr) - 1, dense_VxQ.shape[1]
    out_NxQ = np.zeros((n, q), np.float64)
    block = max(1, _BLOCK_ELEMENTS // max(1, len(data)))
    for q0 in range(0, q, block):
        out_NxQ[:, q0 : q0 + block] = _row_sums(data[:, None] * dense_VxQ[indices, q0 : q0 + block], indptr)
    return out_NxQ


def _query_matrix(vocab: Vocabulary, docs: Sequence[Sequence[str]], weights: np.ndarray | None) -> np.ndarray:
    """Dense [V, Q] query term weights: counts (times `weights` per term if given)."""
    indptr, indices, counts = vocab.counts(docs)
    out_VxQ = np.zeros((len(vocab), len(docs)), np.float64)
    cols = np.repeat(np.arange(len(docs)), np.diff(indptr))
    out_VxQ[indices, cols] = counts if weights is None else counts * weights[indices]
    return out_VxQ


class _TextAttributor:
    name = "text"

    def __init__(self) -> None:
        self._train: Examples | None = None
        self._vocab: Vocabulary | None = None
        self.timings: dict[str, float] = {}

    def fit(self, model: nnx.Module | None, train: Examples) -> "_TextAttributor":
        """Index the training passages (`model` is unused: lexical methods ignore the model)."""
        t0 = time.perf_counter()
        docs = [tokenize(t) for t in _texts_of(train, "training")]
        if not docs:
            raise ValueError("training set is empty")
        self._vocab = Vocabulary(docs)
        self._index(docs)
        self._train = train
        self.timings["fit"] = time.perf_counter() - t0
        return self

    def attribute(self, queries: Examples) -> Attribution:
        if self._vocab is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(model, train) before attribute")
        t0 = time.perf_counter()
        docs = [tokenize(t) for t in _texts_of(queries, "query")]
        if not docs:
            raise ValueError("queries is empty")
        scores = self._score(docs)
        self.timings["score"] = time.perf_counter() - t0
        return make_attribution(scores, self._train, queries, self.name)

    def _index(self, docs: list[list[str]]) -> None:
        raise NotImplementedError

    def _score(self, docs: list[list[str]]) -> np.ndarray:
        raise NotImplementedError


class TfidfSimilarity(_TextAttributor):
    """Cosine similarity of TF-IDF vectors (raw counts x smooth idf, L2-normalised)."""

    name = "tfidf"

    def _index(self, docs: list[list[str]]) -> None:
        indptr, indices, counts = self._vocab.counts(docs)
        n = len(docs)
        df = np.bincount(indices, minlength=len(self._vocab))
        self.idf_V = np.log((1.0 + n) / (1.0 + df)) + 1.0
        data = counts * self.idf_V[indices]
        norms = np.sqrt(_row_sums(data**2, indptr))
        norms[norms == 0] = 1.0  # a passage with no words scores 0
        self._csr = (indptr, indices, data / np.repeat(norms, np.diff(indptr)))

    def _score(self, docs: list[list[str]]) -> np.ndarray:
        q_VxQ = _query_matrix(self._vocab, docs, self.idf_V)
        norm_Q = np.linalg.norm(q_VxQ, axis=0)
        q_VxQ /= np.where(norm_Q > 0, norm_Q, 1.0)
        return _csr_times_dense(*self._csr, q_VxQ)


class BM25(_TextAttributor):
    """Okapi BM25 score of each training passage for the query text."""

    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        super().__init__()
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b = float(k1), float(b)

    def _index(self, docs: list[list[str]]) -> None:
        indptr, indices, tf = self._vocab.counts(docs)
        n = len(docs)
        df = np.bincount(indices, minlength=len(self._vocab))
        self.idf_V = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
        length_N = np.array([len(d) for d in docs], np.float64)
        avgdl = max(length_N.mean(), 1e-12)
        norm = np.repeat(self.k1 * (1 - self.b + self.b * length_N / avgdl), np.diff(indptr))
        data = self.idf_V[indices] * tf * (self.k1 + 1) / (tf + norm)
        self._csr = (indptr, indices, data)

    def _score(self, docs: list[list[str]]) -> np.ndarray:
        return _csr_times_dense(*self._csr, _query_matrix(self._vocab, docs, None))
