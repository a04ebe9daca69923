"""Contamination: benchmark problems leaked into an instruction pool, and whether attribution finds them.

The paper's `tab:attribution_recall` / `tab:math_eval`: GSM8K test problems are injected into the
fine-tuning pool (exact copies, or near-replicas with other names and objects), the model is
fine-tuned on the contaminated pool, and each leaked problem is attributed as a query. A method
finds the leak when the problem's replicas land in its score-extreme bucket (the most helpful
`bucket` of the pool). This module holds the parts that are not the harness's: reading the
problems (`read_gsm`), making near-replicas (`near_replica`), score fusion, and the recall
statistics with their chance level and an exact significance test.

    problems = read_gsm(downloads.fetch("gsm"))
    rec = recall(scores_NxQ, replica_of_N, problem_of_Q, bucket=12)
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Problem:
    """One GSM8K problem: `question`, worked `answer` (ending in "#### N"), its `final` number,
    and the annotated template the GSM-Symbolic release pairs it with."""

    id: int
    question: str
    answer: str
    final: str
    annotated: str = ""

    def pair(self) -> tuple[str, str]:
        return self.question, self.answer


def read_gsm(root: str | Path, language: str = "eng") -> list[Problem]:
    """The problems of the `gsm` asset (templates/<language>/symbolic/*.toml), in file order."""
    folder = Path(root) / language / "symbolic"
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise FileNotFoundError(f"no GSM-Symbolic templates under {folder} (stride-jax data fetch gsm)")
    out = []
    for f in files:
        with open(f, "rb") as fh:
            d = tomllib.load(fh)
        answer = d["answer"].strip()
        m = re.search(r"####\s*(\S+)\s*$", answer)
        if m is None:
            raise ValueError(f"{f}: the answer does not end in '#### N'")
        out.append(Problem(id=int(f.stem), question=d["question"].strip(), answer=answer, final=m.group(1),
                           annotated=d.get("question_annotated", "")))
    return out


def read_lists(root: str | Path, language: str = "eng") -> dict[str, list[str]]:
    """The named value lists (names, names_male, fruits, ...) the templates sample from."""
    path = Path(root) / language / "replacements.json"
    return json.loads(path.read_text()) if path.exists() else {}


_SAMPLE = re.compile(r"^-\s*([A-Za-z_]\w*)\s*=\s*sample\((.+)\)\s*$")


def _options(arg: str, lists: dict[str, list[str]]) -> list[str] | None:
    arg = arg.strip()
    if arg in lists:
        return [str(x) for x in lists[arg]]
    if arg.startswith("[") and arg.endswith("]"):
        return re.findall(r"""["']([^"']+)["']""", arg)
    return None


def near_replica(problem: Problem, rng: np.random.Generator, lists: dict[str, list[str]]) -> tuple[str, str] | None:
    """(question, answer) with every word-valued template variable (a name, an object, ...; a
    single `x = sample(...)` in the template's #init) replaced, consistently in question and
    worked answer, by another value of its list; the numbers stay, so the answer stays correct.
    None when the problem has no such variable (a near-replica would be an exact copy)."""
    if "#init:" not in problem.annotated:
        return None
    body, init = problem.annotated.split("#init:", 1)
    init = init.split("#conditions:")[0].split("#answer:")[0]
    defaults = {m.group(1).strip(): m.group(2).strip() for m in re.finditer(r"\{([A-Za-z_]\w*)\s*,\s*([^{}]+?)\}", body)}
    question, answer, changed = problem.question, problem.answer, 0
    for line in init.splitlines():
        m = _SAMPLE.match(line.strip())
        if m is None or m.group(1) not in defaults:
            continue
        old = defaults[m.group(1)]
        options = [o for o in (_options(m.group(2), lists) or []) if o != old]
        if not options or not re.search(rf"\b{re.escape(old)}(s|es)?\b", question):
            continue
        new = options[int(rng.integers(len(options)))]
        for a, b in ((old, new), (old[:1].upper() + old[1:], new[:1].upper() + new[1:])):
            pattern = re.compile(rf"\b{re.escape(a)}(s|es)?\b")  # "pound" also in "pounds"
            sub = lambda m, b=b: b + (m.group(1) or "")
            question, answer = pattern.sub(sub, question), pattern.sub(sub, answer)
        changed += 1
    return (question, answer) if changed else None


# ----------------------------------------------------------------------------- fusion


def ranks(scores_NxQ: np.ndarray) -> np.ndarray:
    """Rank of each pool example per query, 0 = highest score (ties by index)."""
    order = np.argsort(-scores_NxQ, axis=0, kind="stable")
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(scores_NxQ.shape[0])[:, None].repeat(scores_NxQ.shape[1], 1), axis=0)
    return out


def fuse(a_NxQ: np.ndarray, b_NxQ: np.ndarray, how: str) -> np.ndarray:
    """Scores combining two methods' rankings (higher = more helpful):

    - "rank-mean": minus the mean of the two ranks (Borda count): an example must rank well in both;
    - "min-rank": minus the better of the two ranks (ties broken by the other): the top-B bucket is
      the union of each method's top ~B/2, so each method contributes what it alone finds.
    """
    ra, rb = ranks(a_NxQ).astype(np.float64), ranks(b_NxQ).astype(np.float64)
    n = a_NxQ.shape[0]
    if how == "rank-mean":
        return -(ra + rb) / 2.0
    if how == "min-rank":
        return -(np.minimum(ra, rb) + np.maximum(ra, rb) / (n + 1.0))
    raise ValueError(f"fusion must be 'rank-mean' or 'min-rank', got {how!r}")


FUSIONS = ("rank-mean", "min-rank")


# ----------------------------------------------------------------------------- recall


def _log_comb(n: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
    from math import lgamma

    f = np.vectorize(lambda a, b: lgamma(a + 1) - lgamma(b + 1) - lgamma(a - b + 1) if 0 <= b <= a else -np.inf)
    return f(n, k)


def hypergeom_pmf(n: int, r: int, b: int) -> np.ndarray:
    """P(h of the r marked items among b drawn from n), h = 0..r."""
    h = np.arange(r + 1)
    return np.exp(_log_comb(r, h) + _log_comb(n - r, b - h) - _log_comb(n, b))


def recall(scores_NxQ: np.ndarray, replica_of_N: np.ndarray, problem_of_Q: Sequence[int], bucket: int,
           *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Recall of each query's replicas in its top-`bucket` pool examples.

    replica_of_N: per pool example the problem it replicates (-1: none); problem_of_Q: the
    problem of each query column. Returns the mean recall, a 95% bootstrap interval over
    queries, the chance level (bucket / n), the hits, and the exact one-sided p-value of the total
    hits under random rankings (each query's hits hypergeometric, queries independent).
    """
    s = np.asarray(scores_NxQ, np.float64)
    n = s.shape[0]
    if not 1 <= bucket <= n:
        raise ValueError(f"bucket must be in [1, {n}], got {bucket}")
    if s.shape[1] != len(problem_of_Q):
        raise ValueError(f"{s.shape[1]} score columns for {len(problem_of_Q)} queries")
    r = ranks(s)
    hits, sizes = [], []
    for q, prob in enumerate(problem_of_Q):
        mine = np.flatnonzero(np.asarray(replica_of_N) == prob)
        if len(mine) == 0:
            raise ValueError(f"query {q} (problem {prob}) has no replica in the pool")
        hits.append(int((r[mine, q] < bucket).sum()))
        sizes.append(len(mine))
    hits_Q, sizes_Q = np.asarray(hits), np.asarray(sizes)
    rec_Q = hits_Q / sizes_Q
    dist = np.ones(1)
    for size in sizes_Q:  # the null distribution of the total hits
        dist = np.convolve(dist, hypergeom_pmf(n, int(size), bucket))
    p = float(dist[int(hits_Q.sum()):].sum())
    rng = np.random.default_rng(seed)
    boot = rec_Q[rng.integers(0, len(rec_Q), (n_boot, len(rec_Q)))].mean(axis=1)
    return {"recall": float(rec_Q.mean()), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "chance": bucket / n, "bucket": int(bucket), "hits": int(hits_Q.sum()), "replicas": int(sizes_Q.sum()),
            "p_value": min(1.0, p), "per_query": rec_Q.tolist()}


__all__ = ["FUSIONS", "Problem", "fuse", "hypergeom_pmf", "near_replica", "ranks", "read_gsm", "read_lists", "recall"]
