"""Per-token queries: one query per counted token, and in space="diff" the whole query's responses
are the loss-weighted mean of its tokens' responses (the issue's "sum token by token" check)."""

import numpy as np
import pytest

from stride_jax import Examples, Stride, StrideConfig, data, models, tokens

V, T = 32, 10
GPT = models.GPTConfig(vocab_size=V, seq_len=T, n_layers=1, d_model=16, n_heads=2)


def _queries() -> Examples:
    """Three queries: a prompt/response pair (padded), plain text, and one with fractional weights."""
    rng = np.random.default_rng(1)
    ex = data.lm_examples([rng.integers(0, V, 7).tolist(), rng.integers(0, V, T + 1).tolist(),
                           rng.integers(0, V, 9).tolist()], T, mode="pad", loss_from=[3, 0, 2])
    w = np.array(ex.loss_mask)
    w[2, w[2] > 0] = np.linspace(0.2, 1.0, int((w[2] > 0).sum()))
    return ex.replace(loss_mask=w, ids=np.array([5, 6, 9]))


def test_per_token_queries_one_hot_masks():
    qs = _queries()
    tq = tokens.per_token_queries(qs)
    counted = (qs.loss_mask > 0).sum(axis=1)
    assert len(tq.examples) == counted.sum() == len(tq.owner_ids) == len(tq.positions)
    np.testing.assert_array_equal(tq.owner_ids, np.repeat(qs.ids, counted))
    np.testing.assert_array_equal(tq.examples.loss_mask.sum(axis=1), 1.0)
    for p, (owner, t) in enumerate(zip(tq.owner_ids, tq.positions)):
        q = int(np.flatnonzero(qs.ids == owner)[0])
        assert tq.examples.loss_mask[p, t] == 1.0 and qs.loss_mask[q, t] > 0
        np.testing.assert_array_equal(tq.examples.inputs[p], qs.inputs[q])
        np.testing.assert_array_equal(tq.examples.mask[p], qs.mask[q])
    assert len(np.unique(tq.examples.ids)) == len(tq.examples)
    # no loss mask: every real position counts
    plain = Examples(inputs=qs.inputs[:1], targets=qs.targets[:1], ids=[0])
    assert len(tokens.per_token_queries(plain).examples) == T
    with pytest.raises(ValueError, match="per-token values"):
        tokens.combine(np.zeros(3), qs, tq)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, V, (24, T + 1))
    pool = Examples(inputs=seqs[:, :-1].astype(np.int32), targets=seqs[:, 1:].astype(np.int32), ids=np.arange(24))
    cfg = StrideConfig.preset("quick", measure={"space": "diff", "n_reference": 8})
    return Stride(cfg).fit(models.build(GPT, 0), pool, progress=False)


def test_whole_query_responses_are_the_weighted_mean_of_token_responses(fitted):
    """space="diff", fit-time operator centring and query centring (all linear): combine(y tokens)
    equals y of the whole queries to 1e-5 of y's scale (measured: 6.7e-7 at a scale of 1.05, the
    float32 rounding of losses of ~log V = 3.5)."""
    qs = _queries()
    tq = tokens.per_token_queries(qs)
    m_tok, m_whole = fitted.measure(tq.examples, progress=False), fitted.measure(qs, progress=False)
    np.testing.assert_allclose(tokens.combine(m_tok.base_loss_Q, qs, tq), m_whole.base_loss_Q, rtol=1e-5)
    y_tok, y_whole = fitted.responses(m_tok), fitted.responses(m_whole)
    scale = np.abs(y_whole).max()
    assert scale > 1e-4  # the operators do move the losses
    err = np.abs(tokens.combine(y_tok, qs, tq) - y_whole).max()
    assert err <= 1e-5 * scale + 1e-7, (err, scale)
    # the same fit scores every token, batched: [N, P]
    attr = fitted.attribute(tq.examples, progress=False)
    assert attr.scores.shape == (24, len(tq.examples)) and np.isfinite(attr.dense()).all()
    np.testing.assert_array_equal(attr.query_ids, tq.examples.ids)
