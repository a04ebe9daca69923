"""Counterfactual removal check: drop each query's top-k attributed examples and retrain.

For query q, method a and removal size k, the k training examples with the largest scores
(most helpful to q under the project's sign convention) are removed, R fresh models are
trained on the remaining N - k examples, and

    drop_a(q, k) = mean_r [ p_r(q | full data) - p_r(q | data minus top-k of a) ]

is recorded, where p_r(q | D) is the probability that the model trained on D with seed r gives
q's true class (exp(-loss); for a language model the geometric-mean token probability). Full and
reduced models share seeds (same initialisation), which pairs the comparison and lowers its
noise. The random control removes k uniformly random examples instead (STRIDE, arXiv 2606.05165,
"counterfactual" figure: a good attribution makes the probability fall faster than random).

Ties in a method's scores (a sparse Lasso solution is mostly zeros) are broken by a seeded
random order, so removing tied examples behaves like removing random ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from stride_jax import train as train_lib

RANDOM = "random"


class CounterfactualResult(NamedTuple):
    """Query probabilities of the true class before and after removals.

    ks [G] removal sizes; methods [A] names (the random control last, if run); query_ids [Q];
    prob_full_QxR [Q, R] (seed r trained on all examples); prob_AxQxGxR [A, Q, G, R].
    """

    ks: np.ndarray
    methods: tuple[str, ...]
    query_ids: np.ndarray
    prob_full_QxR: np.ndarray
    prob_AxQxGxR: np.ndarray

    @property
    def drop_AxQxG(self) -> np.ndarray:
        """Seed-averaged drop of each query's true-class probability (positive = it fell)."""
        return (self.prob_full_QxR[None, :, None, :] - self.prob_AxQxGxR).mean(axis=-1)

    def summary(self) -> dict[str, dict[str, list[float]]]:
        """Per method: mean drop over queries and its standard error, one value per k."""
        drop = self.drop_AxQxG
        q = drop.shape[1]
        out = {}
        for a, name in enumerate(self.methods):
            sem = drop[a].std(axis=0, ddof=1) / np.sqrt(q) if q > 1 else np.zeros(len(self.ks))
            out[name] = {"mean_drop": drop[a].mean(axis=0).tolist(), "sem": sem.tolist()}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ks": self.ks.tolist(),
            "methods": list(self.methods),
            "query_ids": self.query_ids.tolist(),
            "prob_full_mean": float(self.prob_full_QxR.mean()),
            "summary": self.summary(),
        }

    def save(self, path: str | Path) -> None:
        """All arrays as one npz (no pickle)."""
        np.savez_compressed(Path(path), ks=self.ks, methods=np.asarray(self.methods),
                            query_ids=self.query_ids, prob_full_QxR=self.prob_full_QxR,
                            prob_AxQxGxR=self.prob_AxQxGxR)

    @classmethod
    def load(cls, path: str | Path) -> "CounterfactualResult":
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(ks=z["ks"], methods=tuple(map(str, z["methods"])), query_ids=z["query_ids"],
                       prob_full_QxR=z["prob_full_QxR"], prob_AxQxGxR=z["prob_AxQxGxR"])


def removal_order(scores_N: np.ndarray, seed: int | Sequence[int]) -> np.ndarray:
    """Training rows from most to least helpful; ties in a seeded random order."""
    scores_N = np.asarray(scores_N)
    tiebreak = np.random.default_rng(seed).permutation(scores_N.shape[0])
    return np.lexsort((tiebreak, -scores_N))


def _training_seeds(seed: int, n_seeds: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0F]))
    return rng.choice(2**31 - 1, size=n_seeds, replace=False).astype(np.int64)


def _true_class_prob(graphdef, state_M, queries, query_of_model_M: np.ndarray) -> np.ndarray:
    """p(true class) of query query_of_model_M[m] under model m: [M]."""
    losses_MxQ = train_lib.eval_losses(graphdef, state_M, queries)
    return np.exp(-losses_MxQ[np.arange(len(query_of_model_M)), query_of_model_M])


def counterfactual_removal(
    model_cfg: Any,
    train_cfg: train_lib.TrainConfig,
    train: Any,
    queries: Any,
    scores: Mapping[str, np.ndarray],
    ks: Sequence[int],
    *,
    n_seeds: int = 3,
    seed: int = 0,
    random_control: bool = True,
    models_per_chunk: int = 64,
    progress: bool = False,
) -> CounterfactualResult:
    """Retrain without each query's top-k examples of every method (and k random ones).

    Args:
      model_cfg, train_cfg: the architecture and recipe of every retrained model.
      train: the training pool the scores index (N rows); queries: Q query examples.
      scores: {method: [N, Q] scores}, positive = helps the query.
      ks: removal sizes, each in [1, N - batch_size].
      n_seeds: R models per (method, query, k), seeds shared with the full-data models.
      seed: seeds the training seeds, the random removals and the tie-breaking.
      random_control: add the "random" method (k uniformly random examples per query and k).
      models_per_chunk: models trained at once by one vmapped `train.train_many` call.
    Returns:
      CounterfactualResult; `.drop_AxQxG` and `.summary()` give the curves.
    """
    n, q = len(train.inputs), len(queries.inputs)
    ks_G = np.asarray(sorted({int(k) for k in ks}), dtype=np.int64)
    if ks_G.size == 0 or ks_G[0] < 1 or ks_G[-1] > n - train_cfg.batch_size:
        raise ValueError(f"ks must lie in [1, N - batch_size] = [1, {n - train_cfg.batch_size}], got {list(ks)}")
    if n_seeds < 1 or models_per_chunk < 1:
        raise ValueError("n_seeds and models_per_chunk must be >= 1")
    names = list(scores)
    if RANDOM in names:
        raise ValueError(f"method name {RANDOM!r} is reserved for the random control")
    orders = {}
    for a, name in enumerate(names):
        s_NxQ = np.asarray(scores[name])
        if s_NxQ.shape != (n, q):
            raise ValueError(f"scores[{name!r}] has shape {s_NxQ.shape}, expected (N, Q) = ({n}, {q})")
        if not np.isfinite(s_NxQ).all():
            raise ValueError(f"scores[{name!r}] holds NaN or inf")
        orders[name] = np.stack([removal_order(s_NxQ[:, j], seed=[seed, a, j]) for j in range(q)])
    if random_control:
        names.append(RANDOM)
    seeds_R = _training_seeds(seed, n_seeds)
    query_rows = np.arange(q)

    # Full-data models: one per seed, scored on every query.
    full_idx = np.broadcast_to(np.arange(n), (n_seeds, n))
    graphdef, state = train_lib.train_many(model_cfg, train, full_idx, seeds_R, train_cfg, progress=False)
    prob_full_QxR = np.exp(-train_lib.eval_losses(graphdef, state, queries)).T

    prob_AxQxGxR = np.full((len(names), q, len(ks_G), n_seeds), np.nan, np.float32)
    jobs = [(a, j, g, r) for g in range(len(ks_G)) for a in range(len(names)) for j in query_rows
            for r in range(n_seeds)]
    bar = tqdm(total=len(jobs), desc="counterfactual retrains", disable=not progress, unit="model")
    for g, k in enumerate(ks_G):
        rows, meta = [], []
        for a, name in enumerate(names):
            for j in query_rows:
                if name == RANDOM:
                    rng = np.random.default_rng(np.random.SeedSequence([seed, int(k), int(j), 0xAB]))
                    removed = rng.choice(n, size=int(k), replace=False)
                else:
                    removed = orders[name][j, :k]
                keep = np.setdiff1d(np.arange(n), removed, assume_unique=True)
                for r in range(n_seeds):
                    rows.append(keep)
                    meta.append((a, j, r))
        rows_MxNs, meta_Mx3 = np.stack(rows).astype(np.int32), np.asarray(meta)
        for lo in range(0, len(rows_MxNs), models_per_chunk):
            sl = slice(lo, lo + models_per_chunk)
            a_C, j_C, r_C = meta_Mx3[sl].T
            graphdef, state = train_lib.train_many(model_cfg, train, rows_MxNs[sl], seeds_R[r_C], train_cfg,
                                                   progress=False)
            prob_AxQxGxR[a_C, j_C, g, r_C] = _true_class_prob(graphdef, state, queries, j_C)
            bar.update(len(a_C))
    bar.close()
    return CounterfactualResult(ks=ks_G, methods=tuple(names), query_ids=np.asarray(queries.ids),
                                prob_full_QxR=prob_full_QxR.astype(np.float32), prob_AxQxGxR=prob_AxQxGxR)


def plot_counterfactual(result: CounterfactualResult, path: str | Path, title: str | None = None) -> Path:
    """PNG of mean drop in true-class probability vs k (band: +-1.96 standard errors)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    summary = result.summary()
    for name in result.methods:
        mean, sem = np.asarray(summary[name]["mean_drop"]), np.asarray(summary[name]["sem"])
        style = dict(color="0.4", linestyle="--") if name == RANDOM else {}
        (line,) = ax.plot(result.ks, mean, marker="o", markersize=3, label=name, **style)
        ax.fill_between(result.ks, mean - 1.96 * sem, mean + 1.96 * sem, color=line.get_color(), alpha=0.15)
    ax.axhline(0.0, color="0.7", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xticks(list(result.ks), [str(k) for k in result.ks])  # the grid itself, no minor labels
    ax.minorticks_off()
    ax.set_xlabel("k (top-attributed training examples removed)")
    ax.set_ylabel("drop in p(true class) of the query")
    ax.set_title(title or f"counterfactual removal ({len(result.query_ids)} queries)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


__all__ = ["CounterfactualResult", "RANDOM", "counterfactual_removal", "plot_counterfactual", "removal_order"]
