"""Tasks: data, base model and LDS ground truth, each prepared once and resumed from disk.

`prepare(task, out)` returns a `Prepared`: the training pool, the queries (validation then
test), the frozen base model, and per alpha the ground-truth subsets and retrained query
losses. Every stage lives under `out` (base model checkpoint, one ground-truth store per
alpha) with the fingerprints of what it depends on, so a rerun reuses it and a killed run
resumes. `load(task, out)` gives what a method needs (pool, queries, model) without the
ground truth, for isolated method processes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np

from stride_jax import data as data_lib
from stride_jax import groundtruth as gt_lib
from stride_jax import lds as lds_lib
from stride_jax import models, store, tabular
from stride_jax import train as train_lib
from stride_jax.harness.config import ClassifierTask, LMTask, SFTTask, Task

log = logging.getLogger("stride_jax")


@dataclasses.dataclass
class Prepared:
    """Everything methods are scored against: pool, queries, model, ground truth per alpha."""

    task: Task
    train: data_lib.Examples
    queries: data_lib.Examples  # validation queries then test queries
    val_cols: np.ndarray
    test_cols: np.ndarray
    model: Any
    train_cfg: train_lib.TrainConfig  # the recipe of the base model (TracIn checkpoints, TRAK retrains)
    groundtruth: dict[float, tuple[np.ndarray, np.ndarray]]  # alpha -> (subsets [M, Ns], losses [M, R, Q])
    info: dict[str, Any]
    seconds: dict[str, float]
    targets: tuple[dict[str, data_lib.Examples], ...] = ()  # a data-selection task's `target_splits`

    def cols(self, split: str) -> np.ndarray:
        return self.test_cols if split == "test" else self.val_cols

    def lds(self, scores_NxQ: np.ndarray, split: str = "test", alpha: float | None = None,
            n_boot: int = 1000) -> dict[str, Any]:
        """LDS of the `split` query columns against the ground truth at `alpha`."""
        subsets, losses = self.groundtruth[self.alpha(alpha)]
        cols = self.cols(split)
        return lds_lib.lds(scores_NxQ[:, cols], subsets, losses.mean(axis=1)[:, cols], n_boot=n_boot).to_dict()

    def alpha(self, alpha: float | None) -> float:
        return next(iter(self.groundtruth)) if alpha is None else float(alpha)

    def noise_ceiling(self, split: str = "test", alpha: float | None = None, n_boot: int = 1000) -> dict[str, Any]:
        """Seed-vs-seed LDS of one seed, and its Spearman-Brown value for the R-seed average."""
        _, losses = self.groundtruth[self.alpha(alpha)]
        r = losses.shape[1]
        if r < 2:
            return {"note": "needs seeds_per_subset >= 2"}
        cols = self.cols(split)
        res = lds_lib.noise_ceiling(losses[:, 0][:, cols], losses[:, 1][:, cols], n_boot=n_boot)
        return {**res.to_dict(), "seeds_averaged": r,
                "ceiling_for_seed_average": float(lds_lib.spearman_brown(res.mean, r))}


def alphas(task: Task) -> list[float]:
    """The ground truth's alphas ([] for a task without ground truth)."""
    if task.groundtruth is None:
        return []
    return list(task.alphas) or [task.groundtruth.alpha]


def dataset_name(task: Task) -> str:
    """A short name of the task's training data, for result rows: "alpaca", "evals mix (24 tasks)",
    "digits", "corpus (austen, shakespeare, bible)", with "+ gsm exact" or "+ 3 targets" added."""
    if isinstance(task, SFTTask):
        d = task.data
        name = {"alpaca": "alpaca", "evals": f"evals mix ({len(d.evals_tasks)} tasks)"}.get(d.source, Path(d.source).name)
        if d.inject is not None:
            name += f" + {d.inject.source} {d.inject.kind}"
        if d.targets is not None:
            name += f" + {len(d.targets.tasks)} targets"
        return name
    if isinstance(task, ClassifierTask):
        return task.dataset
    return f"corpus ({', '.join(task.data.sources)})"


def groundtruth_config(task: Task, alpha: float) -> gt_lib.GroundTruthConfig:
    """The ground truth at `alpha`: as configured when the task lists no alphas, else with a
    subset seed of its own per alpha."""
    gt = task.groundtruth
    if not task.alphas:
        return gt
    return dataclasses.replace(gt, alpha=float(alpha), seed=gt.seed + int(round(1000 * alpha)))


# ----------------------------------------------------------------------------- data and models


@functools.lru_cache(maxsize=2)
def pretrained(path: str, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) of an sft task's model: an asset name ("smollm2") or a checkpoint path."""
    from stride_jax import downloads
    from stride_jax.harness.attribute import load_model

    if path in downloads.ASSETS:
        path = str(downloads.fetch(path))
    elif not Path(path).exists():
        raise FileNotFoundError(f"task.model.path: {path!r} is neither an asset ({sorted(downloads.ASSETS)}) "
                                "nor an existing GGUF file / HF folder / stride_jax checkpoint")
    return load_model(path, dtype=dtype)


def _is_path(name: str) -> bool:
    """A task name meant as a file or folder (an evals registry name is a bare folder name)."""
    return Path(name).suffix in (".json", ".jsonl") or "/" in name or Path(name).exists()


def _task_files(name: str, root: Path | None) -> list[Path]:
    """The record files of one task: a user's .json / .jsonl file or folder of them (see
    `_is_path`), else the OpenAI-evals registry task `name` under `root` (few-shot files left out)."""
    path = Path(name)
    if not _is_path(name):
        files = sorted(f for f in (root / name).rglob("*.jsonl") if "few_shot" not in f.name)
        if not files:
            raise ValueError(f"evals task {name!r} has no sample files under {root / name}")
        return files
    if not path.exists():
        raise ValueError(f"task {name!r}: no such file or folder")
    if not path.is_dir():
        return [path]
    files = sorted(f for f in path.rglob("*") if f.suffix in (".json", ".jsonl"))
    if not files:
        raise ValueError(f"task {name!r}: the folder has no .json / .jsonl files")
    return files


def _evals_pairs(tasks: Any, per_task: int, seed: int) -> list[list[tuple[str, str]]]:
    """Per task (an OpenAI-evals registry name, or a path to a .json / .jsonl file or a folder of
    them), `per_task` (0 = all) of its distinct records, shuffled with `seed`. The evals wheel is
    fetched only when a registry task is named."""
    from stride_jax import downloads

    registry = [t for t in tasks if not _is_path(t)]
    root = downloads.fetch("evals", only=registry) / "evals" / "registry" / "data" if registry else None
    out = []
    for i, name in enumerate(tasks):
        files = _task_files(name, root)
        task_pairs = list(dict.fromkeys(p for f in files for p in data_lib.read_instruction_pairs(f)))
        order = np.random.default_rng([seed, i]).permutation(len(task_pairs))
        out.append([task_pairs[j] for j in (order[:per_task] if per_task else order)])
    return out


def _sft_records(d: Any) -> list[tuple[str, str]]:
    """(prompt, response) pairs of the task's source, exact duplicates dropped."""
    from stride_jax import downloads

    if d.source != "evals":
        path = downloads.fetch("alpaca") if d.source == "alpaca" else Path(d.source)
        return list(dict.fromkeys(data_lib.read_instruction_pairs(path)))
    # a FLAN-like mix: per_task records of each task
    return list(dict.fromkeys(p for task in _evals_pairs(d.evals_tasks, d.per_task, d.seed) for p in task))


MIX_ID = 10**8  # ids of a targets task's mix records: MIX_ID + 10**4 * mix task + record
TARGET_ID = 2 * 10**9  # ids of target records: TARGET_ID + 10**6 * target + 10**5 * split + record


def target_of(ids: np.ndarray) -> np.ndarray:
    """Per example (by its id) the data-selection target it comes from, -1 for other records."""
    ids = np.asarray(ids, np.int64)
    return np.where(ids >= TARGET_ID, (ids - TARGET_ID) // 10**6, -1)


def target_splits(task: SFTTask) -> list[dict[str, data_lib.Examples]]:
    """Per target of `task.data.targets`: its "train", "val" and "test" Examples (see `Targets`)."""
    d, t = task.data, task.data.targets
    _, tok = pretrained(task.model.path, task.model.dtype)
    need = t.train + t.val + t.test
    out = []
    for i, (name, pairs) in enumerate(zip(t.tasks, _evals_pairs(t.tasks, 0, d.seed))):
        ex = data_lib.instruction_examples(pairs, tok, d.seq_len, min_response_tokens=d.min_response_tokens,
                                           seed=d.seed, chat_template=d.chat_template, limit=need)
        if len(ex) < need:
            raise ValueError(f"target {name!r}: {len(ex)} distinct records fit seq_len {d.seq_len}; "
                             f"train + val + test is {need}")
        splits = {}
        for j, (split, a, b) in enumerate((("train", 0, t.train), ("val", t.train, t.train + t.val),
                                           ("test", t.train + t.val, need))):
            part = ex[np.arange(a, b)]
            splits[split] = dataclasses.replace(part, ids=TARGET_ID + 10**6 * i + 10**5 * j + np.arange(b - a))
        out.append(splits)
    return out


def _targets_data(task: SFTTask, pool: data_lib.Examples, tok: Any,
                  splits: list[dict[str, data_lib.Examples]]) -> tuple[data_lib.Examples, ...]:
    """(pool + mix + targets' train records; targets' validation records; first test record of
    each), `splits` being `target_splits(task)`."""
    d, t = task.data, task.data.targets
    parts = [pool]
    if t.mix:
        for i, (name, pairs) in enumerate(zip(t.mix, _evals_pairs(t.mix, 0, d.seed))):
            try:
                ex = data_lib.instruction_examples(pairs, tok, d.seq_len, min_response_tokens=d.min_response_tokens,
                                                   seed=d.seed, chat_template=d.chat_template, limit=t.mix_per_task)
            except ValueError:  # no record of this task fits: the mix is "the records that fit"
                log.warning("targets.mix: no record of %r fits seq_len %d; it adds nothing", name, d.seq_len)
                continue
            parts.append(dataclasses.replace(ex, ids=MIX_ID + 10**4 * i + np.arange(len(ex))))
    train = data_lib.concat(*parts, *(s["train"] for s in splits))
    return (train, data_lib.concat(*(s["val"] for s in splits)),
            data_lib.concat(*(s["test"][np.arange(1)] for s in splits)))


INJECTED_ID = 10**9  # ids of injected examples: INJECTED_ID + 1000 * problem id + copy (999: the query)


def replica_problem(ids: np.ndarray) -> np.ndarray:
    """Per example (by its id) the benchmark problem it replicates, -1 for the pool's own records."""
    ids = np.asarray(ids, np.int64)
    return np.where(ids >= INJECTED_ID, (ids - INJECTED_ID) // 1000, -1)


def _problems(task: SFTTask, tok: Any) -> tuple[list[Any], list[tuple[str, str]]]:
    """(leaked + clean problems, in that order; the replicas of the leaked ones as pairs)."""
    from stride_jax import downloads
    from stride_jax.harness import contamination as cont

    d, inj = task.data, task.data.inject
    root = downloads.fetch("gsm")
    problems, lists = cont.read_gsm(root), cont.read_lists(root)
    texts = [t + p.answer for t, p in zip(data_lib.templated_prompts([p.question for p in problems], tok,
                                                                        d.chat_template), problems)]
    fits = [p for p, n in zip(problems, data_lib._encode(tok, texts)) if len(n) + 1 <= d.seq_len]
    rng = np.random.default_rng([inj.seed, 7])
    near = {p.id: cont.near_replica(p, rng, lists) for p in fits} if inj.kind == "near" else {}
    leakable = [p for p in fits if inj.kind == "exact" or near[p.id] is not None]
    order = np.random.default_rng(inj.seed).permutation(len(leakable))
    leaked = [leakable[i] for i in order[:inj.leaked]]
    rest = [p for p in fits if p.id not in {q.id for q in leaked}]
    clean = [rest[i] for i in np.random.default_rng([inj.seed, 1]).permutation(len(rest))[:inj.clean]]
    if len(leaked) < inj.leaked or len(clean) < inj.clean:
        raise ValueError(f"task.data.inject: {len(fits)} of {len(problems)} GSM problems fit seq_len {d.seq_len} "
                         f"({len(leakable)} leakable as {inj.kind!r}); asked for {inj.leaked} leaked + {inj.clean} clean")
    replicas = []
    for p in leaked:
        for c in range(inj.copies):
            if inj.kind == "exact":
                replicas.append(p.pair())
            else:  # a fresh near-replica per copy
                replicas.append(cont.near_replica(p, np.random.default_rng([inj.seed, p.id, c]), lists))
    return leaked + clean, replicas


def _inject(task: SFTTask, pool: data_lib.Examples, tok: Any) -> tuple[data_lib.Examples, ...]:
    """(pool + replicas of the leaked problems, shuffled; clean problems; leaked problems)."""
    d, inj = task.data, task.data.inject
    problems, replicas = _problems(task, tok)
    leaked, clean = problems[:inj.leaked], problems[inj.leaked:]
    encode = lambda pairs: data_lib.examples_from_pairs([a for a, _ in pairs], [b for _, b in pairs], tok, d.seq_len,
                                                        chat_template=d.chat_template, truncate=True)
    reps = encode(replicas)
    reps = dataclasses.replace(reps, ids=np.asarray([INJECTED_ID + 1000 * p.id + c for p in leaked
                                                     for c in range(inj.copies)]))
    both = data_lib.concat(pool, reps)
    both = both[np.random.default_rng([inj.seed, 3]).permutation(len(both))]
    query_ids = lambda ps: np.asarray([INJECTED_ID + 1000 * p.id + 999 for p in ps])
    val = dataclasses.replace(encode([p.pair() for p in clean]), ids=query_ids(clean))
    test = dataclasses.replace(encode([p.pair() for p in leaked]), ids=query_ids(leaked))
    return both, val, test


def _sft_data(task: SFTTask, splits: Any = None) -> tuple[data_lib.Examples, data_lib.Examples, data_lib.Examples]:
    d = task.data
    _, tok = pretrained(task.model.path, task.model.dtype)
    pairs = _sft_records(d)
    if d.inject is not None or d.targets is not None:  # the pool's own records only; other queries
        ex = data_lib.instruction_examples(pairs, tok, d.seq_len, min_response_tokens=d.min_response_tokens,
                                           seed=d.seed, chat_template=d.chat_template, limit=d.n_train)
        if len(ex) < d.n_train:
            raise ValueError(f"{d.source}: only {len(ex)} records fit seq_len {d.seq_len}; n_train is {d.n_train}")
        return _inject(task, ex, tok) if d.inject is not None else _targets_data(task, ex, tok, splits or target_splits(task))
    need = d.n_train + d.val_queries + d.test_queries
    ex = data_lib.instruction_examples(pairs, tok, d.seq_len, min_response_tokens=d.min_response_tokens, seed=d.seed,
                                       chat_template=d.chat_template, limit=need)  # ids: record indices
    if len(ex) < need:
        raise ValueError(f"{d.source}: {len(ex)} of {len(pairs)} distinct records leave >= {d.min_response_tokens} "
                         f"response tokens at seq_len {d.seq_len}; the task needs {need} "
                         f"(n_train + val_queries + test_queries)")
    a, b = d.n_train, d.n_train + d.val_queries
    return ex[np.arange(a)], ex[np.arange(a, b)], ex[np.arange(b, need)]


def load_data(task: Task, *, target_splits: Any = None) -> tuple[data_lib.Examples, data_lib.Examples,
                                                                 data_lib.Examples]:
    """(train pool, validation queries, test queries); `target_splits`: those of a data-selection
    task when already read (else read here)."""
    if isinstance(task, SFTTask):
        return _sft_data(task, target_splits)
    if isinstance(task, LMTask):
        d = task.data
        kw = dict(seq_len=d.seq_len, sources=d.sources, seed=d.seed)
        return (data_lib.load_examples("train", max_per_source=d.train_per_source, **kw),
                data_lib.load_examples("val", max_per_source=d.val_queries_per_source, **kw),
                data_lib.load_examples("test", max_per_source=d.test_queries_per_source, **kw))
    splits = tabular.load_splits(task.dataset, task.split)
    return splits.train, splits.val, splits.test


def model_config(task: Task, train: data_lib.Examples) -> Any:
    if isinstance(task, LMTask):
        m = task.model
        return models.GPTConfig(vocab_size=data_lib.VOCAB_SIZE, seq_len=task.data.seq_len, n_layers=m.n_layers,
                                d_model=m.d_model, n_heads=m.n_heads)
    m = task.model
    n_classes = len(tabular.load_splits(task.dataset, task.split).target_names)
    if m.kind == "mlp":
        return models.MLPConfig(in_dim=train.inputs.shape[1], hidden=m.hidden, n_classes=n_classes)
    return models.ConvConfig(image_shape=tabular.IMAGE_SHAPE[task.dataset], n_classes=n_classes,
                             channels=m.channels, pool=m.pool, dense=m.hidden)


def train_config(task: Task) -> train_lib.TrainConfig:
    """The base model's recipe (an sft task's: its fine-tuning recipe; the base model is loaded)."""
    if isinstance(task, SFTTask):
        return task.finetune
    return task.pretrain if isinstance(task, LMTask) else task.train


def retrain_config(task: Task) -> train_lib.TrainConfig:
    if isinstance(task, SFTTask):
        return task.finetune
    return task.retrain if isinstance(task, LMTask) else task.train


def base_model(task: Task, train: data_lib.Examples, out: Path, *, progress: bool = False) -> Any:
    """Load the cached base model of `task` from `out/base_model`, or train and save it (an sft
    task's base model is the pretrained model itself, or with base "finetuned" that model
    fine-tuned on the whole pool)."""
    if isinstance(task, SFTTask):
        start = pretrained(task.model.path, task.model.dtype)[0]
        if task.base == "pretrained":
            return start
        expected = {"data_hash": train.content_hash(), "finetune": task.finetune.to_dict(),
                    "tune": task.tune.to_dict(), "start": models.param_digest(start), "seed": task.model.seed}
        tune = lambda: train_lib.finetune_many(start, train, np.arange(len(train), dtype=np.int32)[None],
                                               np.array([task.model.seed]), task.finetune, task.tune,
                                               progress=progress, desc="fine-tune the base model").model(0)
        return _cached_model(out, expected, tune)
    expected = {"data_hash": train.content_hash(), "train_config": train_config(task).to_dict(),
                "seed": task.model.seed}
    if isinstance(task, LMTask):
        expected["tokenizer_hash"] = data_lib.tokenizer_hash()
    mcfg = model_config(task, train)
    model = _cached_model(out, expected, lambda: train_lib.pretrain(mcfg, train, train_config(task),
                                                                    seed=task.model.seed, progress=progress),
                          model_cfg=mcfg)
    return model


def _cached_model(out: Path, expected: dict[str, Any], make: Any, model_cfg: Any = None) -> Any:
    """The model in out/base_model (its metadata, and its architecture when `model_cfg` is given,
    checked against `expected`), else `make()` saved there."""
    path = out / "base_model"
    if path.exists():
        # the checkpoint records its architecture (model_config) itself: compared, never stored twice
        wanted = expected if model_cfg is None else {**expected, "model_config": model_cfg.to_dict()}
        try:
            return models.load_model(path, expected=wanted)[0]
        except store.IdentityError as e:
            raise store.IdentityError(
                f"the base model in {path} was made from other inputs ({str(e).split(': ', 1)[-1]}); use another "
                f"--out, or delete {path} to retrain it (the ground truth and method runs made from it then "
                "say to be deleted too)") from e
        except (OSError, ValueError) as e:
            raise ValueError(f"the base model in {path} is unreadable or corrupt ({e}); delete the directory "
                             f"{path} to retrain it") from e
    store.clean_leftovers(out)
    model = make()
    models.save_model(model, path, expected)
    return model


def warn_if_not_learned(task: Task, model: Any, loss: float) -> None:
    """Warn when a trained base model's training `loss` ends within 2% of ln V (V its classes or
    vocabulary) or above: the loss of a uniform guess, so the model learned nothing (a learning
    rate far too high collapses it there). An sft task's loaded model is not trained here."""
    chance = float(np.log(model.out_dim))
    if not isinstance(task, SFTTask) and not loss < 0.98 * chance:
        rc = train_config(task)
        warnings.warn(f"the base model's training loss {loss:.3f} is at or near ln V = ln({model.out_dim}) = "
                      f"{chance:.3f}, the loss of a uniform guess: its training (learning_rate {rc.learning_rate:g}, "
                      f"{rc.epochs:g} epochs) learned nothing; check the recipe", stacklevel=2)


def load(task: Task, out: str | Path, *, progress: bool = False) -> tuple[Any, Any, data_lib.Examples, np.ndarray]:
    """(model, train, queries, test_cols) for running a method (no ground truth)."""
    out = Path(out)
    train, val, test = load_data(task)
    queries = data_lib.concat(val, test)
    model = base_model(task, train, out, progress=progress)
    return model, train, queries, np.arange(len(val), len(queries))


class TaskData(NamedTuple):
    """A task's examples: pool, validation and test queries, and a data-selection task's targets."""

    train: data_lib.Examples
    val: data_lib.Examples
    test: data_lib.Examples
    targets: tuple[dict[str, data_lib.Examples], ...] = ()


def task_data(task: Task) -> TaskData:
    """The examples of `task` (`load_data`, with the target splits of a data-selection task)."""
    targets = tuple(target_splits(task)) if isinstance(task, SFTTask) and task.data.targets is not None else ()
    return TaskData(*load_data(task, target_splits=targets or None), targets=targets)


def check(task: Task, data: TaskData, stride_cfgs: Iterable[Any] = (), steerings: Iterable[Any] = ()) -> None:
    """Every check of `task` that needs its data and its model's shape but no training, so a bad
    setting fails in seconds, not after pretraining and the ground truth: the pool fits the model
    and each of `stride_cfgs` (K <= n d, the hook layer within the depth, the operator bank's
    memory, positions per example), the layer of each of `steerings` (other methods' hook layers,
    as `SteeringConfig`s) is a hook point, and the training batches fit the pool and the ground
    truth's subsets."""
    from flax import nnx

    from stride_jax.attribution import _check_pool

    n = len(data.train)
    if isinstance(task, SFTTask):
        model = pretrained(task.model.path, task.model.dtype)[0]
    else:
        model = nnx.eval_shape(lambda: models.build(model_config(task, data.train), task.model.seed))
    for cfg in stride_cfgs:
        _check_pool(model, data.train, cfg.resolve_subsets(len(data.train)))
    for steer in steerings:
        steer.resolve(model.n_layers)
    where = "task.finetune" if isinstance(task, SFTTask) else "task.pretrain" if isinstance(task, LMTask) else "task.train"
    if train_config(task).batch_size > n:
        raise ValueError(f"{where}.batch_size={train_config(task).batch_size} exceeds the pool's {n} examples")
    for alpha in alphas(task):
        size = int(round(alpha * n))
        batch = retrain_config(task).batch_size
        if size < max(1, batch):
            raise ValueError(f"the ground truth's subsets at alpha={alpha} hold round(alpha n) = {size} of the "
                             f"pool's {n} examples, fewer than the retraining batch_size={batch}")


def prepare(task: Task, out: str | Path, *, progress: bool = False, groundtruth: bool = True,
            data: TaskData | None = None) -> Prepared:
    """Data, base model and ground truth (at every alpha), each loaded from `out` when there
    (`data`: the task's examples when already loaded, by `task_data`)."""
    out = store.check_writable_dir(out, "run directory")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    train, val, test, targets = data if data is not None else task_data(task)
    queries = data_lib.concat(val, test)
    seconds["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with store.Lock(out):
        model = base_model(task, train, out, progress=progress)
    seconds["base_model"] = time.perf_counter() - t0
    gts: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    if groundtruth and task.groundtruth is not None:
        mcfg, rcfg = model.cfg, retrain_config(task)
        for alpha in alphas(task):
            t0 = time.perf_counter()
            gcfg = groundtruth_config(task, alpha)
            name = "groundtruth" if not task.alphas else f"groundtruth_a{alpha}"
            # an sft ground truth fine-tunes the loaded model on each subset (with base "finetuned" the
            # attributed model is that same fine-tune on the whole pool)
            tune = dict(start=pretrained(task.model.path, task.model.dtype)[0], tune=task.tune) \
                if isinstance(task, SFTTask) else {}
            gt_store = gt_lib.GroundTruthStore.create_or_open(out / name, gcfg, mcfg, rcfg, train, queries, **tune)
            gt_lib.run_groundtruth(gt_store, mcfg, rcfg, train, queries, progress=progress, **tune)
            gts[float(alpha)] = (gt_store.subsets(), gt_store.losses())
            seconds[f"groundtruth_a{alpha}"] = time.perf_counter() - t0
    val_cols, test_cols = np.arange(len(val)), np.arange(len(val), len(queries))
    eb = 16 if isinstance(task, SFTTask) else 256  # sequences of [T, V] logits at once (V = 49k for SmolLM2)
    info = {"n_train": len(train), "n_val": len(val), "n_test": len(test), "params": _n_params(model),
            "base_test_loss": float(train_lib.eval_loss(model, queries, batch_size=eb)[test_cols].mean()),
            # an sft pool's loss from its first 64 records (a forward of a 135M model over the whole pool is minutes)
            "base_train_loss": float(train_lib.eval_loss(model, train[np.arange(min(len(train), 64))] if
                                                         isinstance(task, SFTTask) else train, batch_size=eb).mean()),
            "logit_scale": logit_scale(model, train, n=32 if isinstance(task, SFTTask) else 256)}
    warn_if_not_learned(task, model, info["base_train_loss"])
    if isinstance(task, ClassifierTask):
        info["base_test_accuracy"] = float((np.asarray(model(test.inputs)).argmax(-1) == test.targets).mean())
    return Prepared(task=task, train=train, queries=queries, val_cols=val_cols, test_cols=test_cols, model=model,
                    train_cfg=train_config(task), groundtruth=gts, info=info, seconds=seconds, targets=targets)


def logit_scale(model: Any, examples: data_lib.Examples, n: int = 256) -> float:
    """RMS over (the first n) examples, positions and classes of the base model's logits, each
    centred over the classes: how large the operators' logit shifts must be to matter."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m))  # one compile, not op-by-op dispatch
    logits = np.asarray(forward(state, examples.inputs[:n], None if examples.mask is None else examples.mask[:n]))
    return float(np.sqrt(np.mean(np.square(logits - logits.mean(axis=-1, keepdims=True)))))


def _n_params(model: Any) -> int:
    import jax
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
