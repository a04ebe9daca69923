"""Contamination statistics and data: recall of leaked replicas in score-extreme buckets, its
chance level and exact test, fusion of two methods, GSM problems and their near-replicas."""

import numpy as np
import pytest
from scipy import stats

from stride_jax.harness import contamination as C

TEMPLATE = '''
question = "Benny saw a 10-foot shark with 2 6-inch remoras. Benny counted 3 pounds of sharks' food."

answer = """
Benny adds 6*2 = <<6*2=12>>12 inches. The shark eats 3 pounds.
#### 12
"""

question_annotated = """
{n, Benny} saw a {x,10}-foot {big_fish,shark} with {k,2} {y,6}-inch remoras. {n,Benny} counted {w,3} {unit,pound}s.

#init:
- n = sample(names)
- big_fish = sample(["dolphin", "whale", "shark"])
- unit = sample(weights)
- $x = range(10, 500, 10)

#conditions:
- k * y < x * 12

#answer: k*y
"""
'''


def _pool(n=200, q=6, copies=3, seed=0):
    """replica_of for n pool examples: query j's problem j has `copies` replicas at random rows."""
    rng = np.random.default_rng(seed)
    replica_of = np.full(n, -1)
    rows = rng.choice(n, q * copies, replace=False)
    replica_of[rows] = np.repeat(np.arange(q), copies)
    return replica_of


def test_recall_chance_and_exact_test():
    replica_of = _pool()
    oracle = (replica_of[:, None] == np.arange(6)[None]).astype(float)  # replicas score 1, the rest 0
    res = C.recall(oracle, replica_of, range(6), bucket=3)
    assert res["recall"] == 1.0 and res["hits"] == 18 and res["chance"] == 3 / 200
    # 18 of 18 replicas in buckets of 3 of 200: p = prod over queries of 1 / C(200, 3)
    assert res["p_value"] == pytest.approx(stats.hypergeom.pmf(3, 200, 3, 3) ** 6, rel=1e-6)
    assert C.recall(-oracle, replica_of, range(6), bucket=3)["recall"] == 0.0
    # random scores: recall near chance, p-values uniform-ish (never tiny)
    rng = np.random.default_rng(1)
    recs = [C.recall(rng.normal(size=(200, 6)), replica_of, range(6), bucket=20) for _ in range(200)]
    assert abs(np.mean([r["recall"] for r in recs]) - 0.1) < 0.01
    assert np.mean([r["p_value"] < 0.05 for r in recs]) < 0.1
    # the exact null of the total hits: convolution of the per-query hypergeometrics
    one = C.hypergeom_pmf(200, 3, 20)
    np.testing.assert_allclose(one, stats.hypergeom.pmf(np.arange(4), 200, 3, 20), rtol=1e-9)
    half = oracle.copy()
    half[:, 3:] = 0.0  # three queries found, three at chance (all tied: ranks by index)
    res = C.recall(half + 1e-9 * rng.normal(size=half.shape), replica_of, range(6), bucket=3)
    assert res["recall"] == pytest.approx(0.5, abs=0.1) and res["p_value"] < 1e-12
    with pytest.raises(ValueError, match="no replica"):
        C.recall(oracle[:, :2], replica_of, [0, 7], bucket=3)
    with pytest.raises(ValueError, match="bucket"):
        C.recall(oracle, replica_of, range(6), bucket=0)


def test_fusions_keep_what_either_method_finds():
    replica_of = _pool(q=4, copies=2)
    want = (replica_of[:, None] == np.arange(4)[None]).astype(float)
    rng = np.random.default_rng(0)
    a = want.copy()
    a[:, 2:] = rng.normal(size=(200, 2))  # method a finds queries 0, 1
    b = want.copy()
    b[:, :2] = rng.normal(size=(200, 2))  # method b finds queries 2, 3
    a += 1e-6 * rng.normal(size=a.shape)
    b += 1e-6 * rng.normal(size=b.shape)
    rec = lambda s, k: C.recall(s, replica_of, range(4), bucket=k)["recall"]
    assert rec(a, 4) == pytest.approx(0.5, abs=0.13) and rec(b, 4) == pytest.approx(0.5, abs=0.13)
    assert rec(C.fuse(a, b, "min-rank"), 4) == 1.0  # the union of each one's top 2
    r = C.ranks(a)
    assert sorted(r[:, 0].tolist()) == list(range(200)) and r[np.argmax(a[:, 0]), 0] == 0
    both = C.fuse(a, a, "rank-mean")
    np.testing.assert_array_equal(C.ranks(both), C.ranks(a))
    with pytest.raises(ValueError, match="fusion"):
        C.fuse(a, b, "max")


def test_gsm_problems_and_near_replicas(tmp_path):
    folder = tmp_path / "eng" / "symbolic"
    folder.mkdir(parents=True)
    (folder / "0003.toml").write_text(TEMPLATE)
    (tmp_path / "eng" / "replacements.json").write_text('{"names": ["Benny", "Sarah"], "weights": ["pound", "ounce"]}')
    (p,) = C.read_gsm(tmp_path)
    assert p.id == 3 and p.final == "12" and p.answer.endswith("#### 12")
    q, a = C.near_replica(p, np.random.default_rng(0), C.read_lists(tmp_path))
    assert "Benny" not in q + a and q.count("Sarah") == 2 and a.startswith("Sarah adds")
    assert "shark" not in q and ("whale" in q or "dolphin" in q)
    assert "3 ounces" in a and "ounces" in q  # plural kept; numbers unchanged
    assert a.endswith("#### 12") and "10-foot" in q
    bare = C.Problem(id=0, question="How many?", answer="#### 1", final="1")
    assert C.near_replica(bare, np.random.default_rng(0), {}) is None
    with pytest.raises(FileNotFoundError, match="data fetch gsm"):
        C.read_gsm(tmp_path / "none")
