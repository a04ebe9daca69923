"""One experiment schema for every paper artefact (YAML/JSON, strictly checked).

    name: pretrain_lds                 # results file stem
    task: {kind: lm, ...}              # what to prepare: data, base model, ground truth (tasks.py)
    cells:                             # optional named variations of the task (sizes, recipes)
      - {name: 0.2M, task: {model: {d_model: 64}}}
    stride: {...}                      # StrideConfig shared by every STRIDE method and variant
    methods: [stride, graddot, {name: stride-tuned, method: stride, stride: {...}, cells: [2.2M]}]
    variants: {name: stride overrides} # a sweep sharing fits; LDS on validation (and test) queries
    grid: {design.n_subsets: [...]}    # more variants: the Cartesian product of dotted overrides
    select: {...}                      # choose STRIDE per group by validation LDS -> stride-<group>
    isolate: false                     # each method in its own process (its own peak memory)
    cost_n: {...}                      # time the methods at other pool sizes
    counterfactual: {...}              # remove top-k, retrain (classifier tasks)

Every section is a frozen dataclass; `ExperimentConfig.from_dict` rejects unknown keys and
wrongly typed values before anything runs, and `validate` checks what can be checked from the
config alone (method names, cells, STRIDE overrides) so a bad config fails in seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Literal

from stride_jax import groundtruth as gt_lib
from stride_jax import tabular
from stride_jax import train as train_lib
from stride_jax.config import StrideConfig, from_dict, merge, to_dict
from stride_jax.harness.report import group_row


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class LMData:
    """The shipped corpus: chunks of `seq_len` tokens per source and split."""

    sources: tuple[str, ...] = ("austen", "shakespeare", "bible")
    seq_len: int = 64
    train_per_source: int = 256
    val_queries_per_source: int = 20
    test_queries_per_source: int = 40
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LMModel:
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class LMTask:
    """Pretraining pool: a nanochat-style GPT trained from scratch on the pool; ground truth
    retrains from scratch on alpha-subsets."""

    kind: Literal["lm"] = "lm"
    data: LMData = LMData()
    model: LMModel = LMModel()
    pretrain: train_lib.TrainConfig = train_lib.TrainConfig(epochs=4.0)
    retrain: train_lib.TrainConfig = train_lib.TrainConfig(epochs=3.0)
    groundtruth: gt_lib.GroundTruthConfig = gt_lib.GroundTruthConfig()
    alphas: tuple[float, ...] = ()  # () = the single groundtruth.alpha, its seed as given


@dataclasses.dataclass(frozen=True)
class ClassifierModel:
    """"mlp" (ReLU MLP, `hidden` widths) or "conv" (`channels` conv stages with `pool` flags,
    then `hidden` dense widths; image data only)."""

    kind: Literal["mlp", "conv"] = "mlp"
    hidden: tuple[int, ...] = (128, 128)
    channels: tuple[int, ...] = (8, 16)
    pool: tuple[bool, ...] = (True, False)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ClassifierTask:
    """A bundled data set x classifier, one training recipe for the base model and every retrain."""

    kind: Literal["classifier"] = "classifier"
    dataset: str = "digits"
    model: ClassifierModel = ClassifierModel()
    split: tabular.SplitConfig = tabular.SplitConfig()
    train: train_lib.TrainConfig = train_lib.TrainConfig(learning_rate=3e-3, epochs=20.0, batch_size=32,
                                                         weight_decay=1.0, scan_steps=64)
    groundtruth: gt_lib.GroundTruthConfig = gt_lib.GroundTruthConfig(n_subsets=256, seeds_per_subset=4,
                                                                     models_per_chunk=64)
    alphas: tuple[float, ...] = (0.3,)  # each with its own subset seed (groundtruth.seed + 1000 alpha)

    def __post_init__(self) -> None:
        if self.dataset not in tabular.DATASETS:
            raise ValueError(f"task.dataset must be one of {tabular.DATASETS}, got {self.dataset!r}")
        if self.model.kind == "conv" and self.dataset not in tabular.IMAGE_SHAPE:
            raise ValueError(f"a conv model needs image data; {self.dataset!r} is not an image data set")


@dataclasses.dataclass(frozen=True)
class Inject:
    """Benchmark problems leaked into an sft pool (contamination experiments).

    `leaked` problems of `source` ("gsm": the GSM8K test problems of the `gsm` asset) each get
    `copies` replicas in the pool, shuffled among its records: exact copies of (question, worked
    answer), or with `kind` "near" name- and object-changed instances of the problem's template
    (`contamination.near_replica`; problems without such a variable are not drawn). The leaked
    problems, as they appear in the benchmark, are the test queries; `clean` problems that are
    never in the pool are the validation queries (the memorisation control). Problems whose
    templated question + answer exceed seq_len are not drawn (an answer is never cut).
    """

    source: str = "gsm"
    leaked: int = 8
    clean: int = 8
    copies: int = 2
    kind: Literal["exact", "near"] = "exact"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source != "gsm":
            raise ValueError(f"task.data.inject.source must be 'gsm', got {self.source!r}")
        if min(self.leaked, self.clean, self.copies) < 1 or self.copies >= 1000:
            raise ValueError("task.data.inject: leaked, clean and copies must be >= 1 (copies < 1000)")


@dataclasses.dataclass(frozen=True)
class Targets:
    """Data-selection targets (the `data_selection` section): tasks (OpenAI-evals registry
    names, or paths to a .json / .jsonl file or folder of records in any layout
    `data.read_instruction_pairs` reads), each split
    (exact duplicates and records that do not fit dropped, shuffled with the data seed) into
    `train` records added to the pool (the in-task candidates), `val` records (the validation
    queries methods score the pool against) and `test` records (held out, never attributed:
    the exact match of the fine-tunes on a selection). `mix`: further tasks, `mix_per_task`
    records each, added to the pool (a FLAN-like mix). The pool is `n_train` records of the
    task's `source`, then the mix, then the targets' train records. The harness's test queries
    are the first test record of each target (attributed, read by no selection)."""

    tasks: tuple[str, ...] = ()
    train: int = 32
    val: int = 8
    test: int = 64
    mix: tuple[str, ...] = ()
    mix_per_task: int = 8

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("task.data.targets.tasks names at least one evals task")
        if min(self.train, self.val, self.test) < 1 or self.mix_per_task < 0:
            raise ValueError("task.data.targets: train, val and test must be >= 1, mix_per_task >= 0")
        both = sorted(set(self.tasks) & set(self.mix))
        if both or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task.data.targets: a target is also in the mix or listed twice: {both or self.tasks}")


@dataclasses.dataclass(frozen=True)
class SFTData:
    """Instruction (prompt, response) records; only response tokens count in every loss.

    `source`: "alpaca" (LLaMA-Factory's alpaca_en_demo.json, fetched by `stride-jax data fetch
    alpaca`), "evals" (`per_task` records of each of `evals_tasks` from the OpenAI evals registry,
    fetched from the `evals` wheel: chat `input` -> prompt, `ideal` -> response) or a .jsonl /
    .json file of `prompt` + `response` or `instruction` [+ `input`] + `output` records. Exact duplicate records are dropped, records whose chat-templated prompt
    leaves fewer than `min_response_tokens` of `seq_len` are skipped, the rest shuffled with
    `seed` and split into pool, validation and test queries.
    """

    source: str = "alpaca"
    evals_tasks: tuple[str, ...] = ()  # with source "evals": OpenAI evals registry tasks, a FLAN-like mix
    per_task: int = 0  # with source "evals": records drawn from each task (0 = all)
    n_train: int = 256
    val_queries: int = 16
    test_queries: int = 32
    seq_len: int = 128
    min_response_tokens: int = 8
    chat_template: bool = True
    seed: int = 0
    inject: Inject | None = None  # leaked benchmark problems: they replace val / test queries
    targets: Targets | None = None  # data-selection targets: their records are added and are the queries

    def __post_init__(self) -> None:
        if min(self.n_train, self.val_queries, self.test_queries) < 1:
            raise ValueError("task.data.n_train, val_queries and test_queries must be >= 1")
        if self.inject is not None and self.targets is not None:
            raise ValueError("task.data: inject and targets do not combine")
        if (self.source == "evals") != bool(self.evals_tasks):
            raise ValueError("task.data.evals_tasks lists the tasks of source 'evals' (and only of it)")
        if self.per_task < 0:
            raise ValueError(f"task.data.per_task must be >= 0, got {self.per_task}")
        if not 2 <= self.min_response_tokens < self.seq_len:
            raise ValueError(f"task.data.min_response_tokens must be in [2, seq_len={self.seq_len}), "
                             f"got {self.min_response_tokens}")


@dataclasses.dataclass(frozen=True)
class SFTModel:
    """`path`: "smollm2" (the fetched SmolLM2-135M-Instruct GGUF) or a GGUF file / HF safetensors
    folder / stride_jax checkpoint; `dtype` of the loaded weights."""

    path: str = "smollm2"
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0  # of the methods that draw (TRAK's projection, LoRA adapters use the ground truth's)


@dataclasses.dataclass(frozen=True)
class SFTTask:
    """Instruction tuning of a pretrained LM: the loaded model is the base model (nothing is
    trained for it); ground truth fine-tunes it on alpha-subsets (`finetune` recipe, `tune`
    picks full / top-layers / LoRA) and records the queries' response losses.

    `base: finetuned` attributes the model fine-tuned on the whole pool (same recipe) instead
    of the loaded one (a contaminated model: it has seen the leaked replicas); `groundtruth:
    null` runs no LDS ground truth (the methods' scores are still computed and reported)."""

    kind: Literal["sft"] = "sft"
    data: SFTData = SFTData()
    model: SFTModel = SFTModel()
    finetune: train_lib.TrainConfig = train_lib.TrainConfig(learning_rate=1e-4, epochs=1.0, batch_size=8,
                                                            warmup_frac=0.1, scan_steps=8)
    tune: train_lib.Tune = train_lib.Tune("top", layers=4)
    groundtruth: gt_lib.GroundTruthConfig | None = gt_lib.GroundTruthConfig(n_subsets=64, seeds_per_subset=2,
                                                                            models_per_chunk=2)
    alphas: tuple[float, ...] = ()
    base: Literal["pretrained", "finetuned"] = "pretrained"

    def __post_init__(self) -> None:
        if self.groundtruth is None and self.alphas:
            raise ValueError("task.alphas needs a ground truth (task.groundtruth is null)")


TASKS = {"lm": LMTask, "classifier": ClassifierTask, "sft": SFTTask}
Task = LMTask | ClassifierTask | SFTTask


def task_from_dict(d: Any) -> Task:
    if isinstance(d, (LMTask, ClassifierTask, SFTTask)):
        return d
    if not isinstance(d, dict):
        raise TypeError(f"task must be a mapping, got {type(d).__name__}")
    kind = d.get("kind", "lm")
    if kind not in TASKS:
        raise ValueError(f"task.kind must be one of {sorted(TASKS)}, got {kind!r}")
    return from_dict(TASKS[kind], d, "task")


# ----------------------------------------------------------------------------- experiment sections


@dataclasses.dataclass(frozen=True)
class Cell:
    """A named variation of the task (a model size, a training recipe)."""

    name: str
    task: dict[str, Any] = dataclasses.field(default_factory=dict)
    stride: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the base STRIDE config
    groups: dict[str, Any] = dataclasses.field(default_factory=dict)  # per select group, more overrides (None: skip it)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method row: `method` names a registry entry (default: `name`); `params` go to its
    constructor; `stride` overrides the experiment's STRIDE config (with `preset: <name>` it
    starts from that preset instead, e.g. `{preset: llm}`); `cells` limits where it runs."""

    name: str
    method: str = ""
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    stride: dict[str, Any] = dataclasses.field(default_factory=dict)
    cells: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.method or self.name


@dataclasses.dataclass(frozen=True)
class Select:
    """Choose STRIDE per group by validation LDS at `alpha`: each group's overrides are applied to
    every variant (`only` limits a group to some variants); the winner becomes `stride-<group>`."""

    groups: dict[str, Any] = dataclasses.field(default_factory=lambda: {"": {}})
    only: dict[str, Any] = dataclasses.field(default_factory=dict)  # group -> [variant names]
    alpha: float | None = None  # None: the task's first alpha
    n_boot: int = 20


@dataclasses.dataclass(frozen=True)
class CostN:
    """Seconds and peak memory of each method at other pool sizes (no ground truth needed)."""

    cell: str = ""  # "" = the first cell
    train_per_source: tuple[int, ...] = (128, 256, 512)
    methods: tuple[str, ...] = ()  # () = every method of the experiment


@dataclasses.dataclass(frozen=True)
class Counterfactual:
    """Removal check: `n_queries` test queries, `n_seeds` retrains per (method, query, k)."""

    ks: tuple[int, ...] = ()  # () = log-spaced up to a third of the pool
    n_queries: int = 12
    n_seeds: int = 2
    methods: tuple[str, ...] = ()
    seed: int = 0


def _check_fusion(section: str, fuse: tuple[str, ...], fusions: tuple[str, ...]) -> None:
    """`<section>.fuse` names the two methods whose rankings each of `<section>.fusions` combines."""
    from stride_jax.harness.contamination import FUSIONS

    if fusions and len(fuse) != 2:
        raise ValueError(f"{section}.fuse names the two methods to fuse, got {list(fuse)}")
    bad = sorted(set(fusions) - set(FUSIONS))
    if bad:
        raise ValueError(f"{section}.fusions: unknown {bad}; known: {list(FUSIONS)}")


@dataclasses.dataclass(frozen=True)
class Contamination:
    """Recall of the leaked replicas (task.data.inject) in each method's top `buckets` of the
    pool (fractions of the pool size), for every method and for each `fusions` of the two
    methods `fuse` (`contamination.fuse`), and the memorisation of the leaked problems by the
    attributed model (greedy exact match and response loss, leaked vs clean problems, before
    and after fine-tuning)."""

    buckets: tuple[float, ...] = (0.01, 0.02, 0.05)
    fuse: tuple[str, ...] = ("stride", "logra")
    fusions: tuple[str, ...] = ("rank-mean", "min-rank")
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if not self.buckets or any(not 0 < b < 1 for b in self.buckets):
            raise ValueError(f"contamination.buckets must be fractions in (0, 1), got {self.buckets}")
        _check_fusion("contamination", self.fuse, self.fusions)


@dataclasses.dataclass(frozen=True)
class DataSelection:
    """Data selection (the paper's tab:selection_results), on a task with `task.data.targets`.

    For each target, every method in `methods` (default: every method the experiment runs but
    random) ranks the pool by its scores summed over the target's validation queries and keeps
    the top `k`; references: "random" (k pool records drawn per seed), "in-task" (k of the
    target's own train records, drawn per seed: what a perfect selector could reach),
    "pretrained" (the loaded model, no fine-tune). Each selection fine-tunes a fresh copy of the
    loaded model (`finetune`, the task's `tune`) with `seeds` data-order seeds (seed s shared
    by every method: paired) and is scored by greedy exact match and token accuracy on the
    target's held-out test records; intervals resample seeds and test records. Each of `fusions`
    of the two methods `fuse` (as in `contamination`) selects as one more method."""

    k: int = 32
    seeds: int = 2
    methods: tuple[str, ...] = ()
    fuse: tuple[str, ...] = ()
    fusions: tuple[str, ...] = ()
    references: tuple[str, ...] = ("random", "in-task", "pretrained")
    finetune: train_lib.TrainConfig = train_lib.TrainConfig(learning_rate=1e-4, epochs=3.0, batch_size=8,
                                                            warmup_frac=0.1, scan_steps=8)
    seed: int = 0
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if self.k < 1 or self.seeds < 1 or self.n_boot < 1:
            raise ValueError("data_selection: k, seeds and n_boot must be >= 1")
        _check_fusion("data_selection", self.fuse, self.fusions)
        bad = sorted(set(self.references) - {"random", "in-task", "pretrained"})
        if bad:
            raise ValueError(f"data_selection.references: unknown {bad}; known: random, in-task, pretrained")


@dataclasses.dataclass(frozen=True)
class Qualitative:
    """Side-by-side top training examples (the paper's supplementary examples): for the first
    `n_queries` test queries of each cell, the `k` most helpful and `k` most harmful pool
    examples of each of `methods`, with their text and score, in `<results>/<name>.md`."""

    name: str = "qualitative"
    n_queries: int = 12
    k: int = 2
    methods: tuple[str, ...] = ("stride", "logra")
    max_chars: int = 400  # each example's text is clipped to this many characters
    note: str = ""  # printed under the title (model provenance, recipe)

    def __post_init__(self) -> None:
        if self.n_queries < 1 or self.k < 1 or self.max_chars < 20:
            raise ValueError("qualitative: n_queries and k must be >= 1 and max_chars >= 20")
        if not self.methods or not self.name or "/" in self.name:
            raise ValueError("qualitative: methods must be non-empty and name a plain file stem")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    task: Any = LMTask()
    cells: tuple[Cell, ...] = ()
    stride: StrideConfig = StrideConfig.preset("lm")
    methods: tuple[MethodSpec, ...] = ()
    variants: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, Any] = dataclasses.field(default_factory=dict)
    select: Select | None = None
    isolate: bool = False
    n_boot: int = 1000
    split: Literal["test", "val"] = "test"  # which queries the method table reports
    show_examples: int = 0  # queries whose top training examples the report prints
    cost_n: CostN | None = None
    counterfactual: Counterfactual | None = None
    qualitative: Qualitative | None = None
    contamination: Contamination | None = None
    data_selection: DataSelection | None = None
    paper: str = ""  # "pretrain" | "small_models": the paper's table beside ours

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        if not isinstance(d, dict):
            raise TypeError(f"an experiment config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        task = task_from_dict(d.pop("task", {}))
        methods = tuple(_method(m) for m in d.pop("methods", ()))
        cells = tuple(from_dict(Cell, c, f"cells[{i}]") for i, c in enumerate(d.pop("cells", ())))
        cfg = from_dict(cls, {**d, "methods": [], "cells": []})
        cfg = dataclasses.replace(cfg, task=task, methods=methods, cells=cells)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    # -- derived -----------------------------------------------------------------------------
    def cell_names(self) -> list[str]:
        return [c.name for c in self.cells] or [""]

    def task_for(self, cell: str, **data_overrides: Any) -> Task:
        """The task of one cell (its overrides applied), optionally with other data settings."""
        base = to_dict(self.task)
        c = next((c for c in self.cells if c.name == cell), None)
        if c is not None:
            base = merge(base, c.task)
        if data_overrides:
            base = merge(base, {"data": data_overrides})
        return task_from_dict(base)

    def stride_for(self, cell: str, spec: MethodSpec | None = None) -> StrideConfig:
        """The STRIDE config of `spec` (or of the variants) in `cell`: the experiment's `stride`
        section, or the preset the spec names (`stride: {preset: llm}`), then the cell's
        overrides, then the spec's."""
        over = dict(spec.stride) if spec is not None else {}
        preset = over.pop("preset", None)
        cfg = StrideConfig.preset(preset) if preset is not None else self.stride
        c = next((c for c in self.cells if c.name == cell), None)
        if c is not None and c.stride:
            cfg = cfg.replace(**c.stride)
        return cfg.replace(**over) if over else cfg

    def methods_in(self, cell: str) -> list[MethodSpec]:
        """The method rows that run in `cell` (a row's `cells`, when given, names the cells it runs in)."""
        return [m for m in self.methods if not m.cells or cell in m.cells]

    def all_variants(self) -> dict[str, dict[str, Any]]:
        """`variants` plus the grid's Cartesian product (invalid combinations are dropped later).

        A grid key "section.field" takes a list of values; "a.x,b.y" takes a list of [x, y]
        pairs that vary together (e.g. K and subsets_per_step = K).
        """
        out = dict(self.variants)
        if self.grid:
            keys = list(self.grid)
            for values in itertools.product(*(self.grid[k] for k in keys)):
                override: dict[str, Any] = {}
                names = []
                for key, v in zip(keys, values):
                    fields = key.split(",")
                    vals = list(v) if len(fields) > 1 else [v]
                    if len(vals) != len(fields):
                        raise ValueError(f"grid key {key!r} needs lists of {len(fields)} values, got {v!r}")
                    for field_path, val in zip(fields, vals):
                        section, _, field = field_path.strip().partition(".")
                        override = merge(override, {section: {field: val}})
                    names.append(f"{fields[0].split('.')[-1]}={vals[0]}")
                out[" ".join(names)] = override
        return out

    def validate(self) -> None:
        """Everything checkable from the config alone (before data, models or compiles)."""
        from stride_jax.harness.methods import REGISTRY

        names = [c.name for c in self.cells]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise ValueError(f"cell names must be unique and non-empty, got {names}")
        _check_plain_name("name", self.name)
        for i, c in enumerate(self.cells):
            _check_plain_name(f"cells[{i}].name", c.name)
        for m in self.methods:
            _check_plain_name("method name", m.name)
        if self.select is not None:
            for group in self.select.groups:
                if group:
                    _check_plain_name("select.groups key", group, nested=True)
        for c in self.cells:
            unknown = sorted(set(c.groups) - set(self.select.groups if self.select is not None else {"": {}}))
            if unknown:
                raise ValueError(f"cells[{c.name!r}].groups names unknown select groups {unknown}")
            for group, override in c.groups.items():
                if override is not None and not isinstance(override, dict):
                    raise TypeError(f"cells[{c.name!r}].groups[{group!r}] must map sections to overrides, or be "
                                    f"null to leave the group out of this cell; got {override!r}")
        if self.show_examples < 0:
            raise ValueError(f"show_examples (queries whose top examples the report prints) must be >= 0, "
                             f"got {self.show_examples}")
        for where, n_boot in (("n_boot", self.n_boot),
                              ("select.n_boot", self.select.n_boot if self.select else 1),
                              ("contamination.n_boot", self.contamination.n_boot if self.contamination else 1)):
            if n_boot < 1:
                raise ValueError(f"{where} (bootstrap resamples) must be >= 1, got {n_boot}")
        if self.counterfactual is not None and min(self.counterfactual.n_queries, self.counterfactual.n_seeds) < 1:
            raise ValueError("counterfactual.n_queries and counterfactual.n_seeds must be >= 1")
        tasks = [self.task_for(c) for c in self.cell_names()]
        for cell, t in zip(self.cell_names(), tasks):
            where = f"cells[{cell!r}].task" if cell else "task"
            _check_seeds(to_dict(t), where)
            if t.groundtruth is not None and t.groundtruth.n_subsets < 3:
                raise ValueError(f"{where}.groundtruth.n_subsets={t.groundtruth.n_subsets}: LDS (a Spearman "
                                 "correlation over the retrained subsets) needs at least 3 subsets")
        _check_seeds({k: to_dict(getattr(self, k)) for k in ("counterfactual", "data_selection")}, "")
        for c in self.cells:
            self.stride_for(c.name)
        seen = set()
        for m in self.methods:
            if m.kind not in REGISTRY:
                raise ValueError(f"unknown method {m.kind!r} (row {m.name!r}); known: {sorted(REGISTRY)}")
            if m.name in seen:
                raise ValueError(f"method name {m.name!r} appears twice")
            seen.add(m.name)
            bad = sorted(set(m.cells) - set(names))
            if bad:
                raise ValueError(f"method {m.name!r} names unknown cells {bad}; cells: {names}")
            for cell in m.cells or self.cell_names():
                try:
                    self.stride_for(cell, m)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"method {m.name!r}: {e}") from None
        for name, override in self.all_variants().items():
            if not isinstance(override, dict):
                raise TypeError(f"variant {name!r} must map sections to overrides, got {override!r}")
            try:
                self.stride.replace(**override)
            except ValueError as e:
                if "must be <=" not in str(e) and "too large" not in str(e):  # grid corners are skipped
                    raise ValueError(f"variant {name!r}: {e}") from e
        if self.select is not None:
            if not self.all_variants():
                raise ValueError("select needs variants (or a grid) to choose from")
            for group, names_ in self.select.only.items():
                if group not in self.select.groups:
                    raise ValueError(f"select.only names unknown group {group!r}")
                unknown = sorted(set(names_) - set(self.all_variants()))
                if unknown:
                    raise ValueError(f"select.only[{group!r}] names unknown variants {unknown}")
        if any(isinstance(t, SFTTask) for t in tasks):
            for m in self.methods:
                if m.kind == "tracin" or (m.kind == "trak" and m.params.get("n_retrain")):
                    raise ValueError(f"method {m.name!r} retrains the model from scratch along its training run; "
                                     "on an sft task (a pretrained model) that is not available: use graddot, "
                                     "trak (n_retrain 0), logra, ekfac, the text methods or random")
            if self.cost_n is not None:
                raise ValueError("cost_n varies train_per_source of the shipped corpus; an sft task has none")
        if self.cost_n is not None:
            if self.cost_n.cell and self.cost_n.cell not in names:
                raise ValueError(f"cost_n.cell {self.cost_n.cell!r} is not one of the cells {names}")
            unknown = sorted(set(self.cost_n.methods) - {m.name for m in self.methods})
            if unknown:
                raise ValueError(f"cost_n.methods names unknown methods {unknown}")
        if self.select is not None and any(t.groundtruth is None for t in tasks):
            raise ValueError("select chooses STRIDE by validation LDS: it needs a ground truth (task.groundtruth)")
        if self.contamination is not None:
            if any(not isinstance(t, SFTTask) or t.data.inject is None for t in tasks):
                raise ValueError("contamination needs an sft task with task.data.inject (the leaked problems)")
        if self.data_selection is not None:
            c = self.data_selection
            if any(not isinstance(t, SFTTask) or t.data.targets is None for t in tasks):
                raise ValueError("data_selection needs an sft task with task.data.targets (the target tasks)")
            for t in tasks:
                if c.k > t.data.targets.train and "in-task" in c.references:
                    raise ValueError(f"data_selection.k = {c.k} exceeds the targets' {t.data.targets.train} train "
                                     "records (the in-task reference draws k of them)")
                if c.k < c.finetune.batch_size:
                    raise ValueError(f"data_selection.k = {c.k} is below the fine-tune's batch size "
                                     f"{c.finetune.batch_size}")
        named: dict[str, tuple[str, ...]] = {}  # config key -> the method rows it names
        if self.contamination is not None and self.contamination.fusions:
            named["contamination.fuse"] = self.contamination.fuse
        if self.data_selection is not None:
            named["data_selection.methods"] = self.data_selection.methods
            if self.data_selection.fusions:
                named["data_selection.fuse"] = self.data_selection.fuse
        for section, names_ in named.items():
            unknown = sorted(set(names_) - {m.name for m in self.methods})
            if unknown:
                raise ValueError(f"{section} names methods the experiment does not run: {unknown}")
        if self.qualitative is not None:
            rows = {m.name for m in self.methods}
            if self.select is not None:
                rows |= {group_row(g) for g in self.select.groups}
            unknown = sorted(set(self.qualitative.methods) - rows)
            if unknown:
                raise ValueError(f"qualitative.methods names methods the experiment does not run: {unknown}; "
                                 f"its rows: {sorted(rows)}")
            if self.qualitative.name == self.name:
                raise ValueError(f"qualitative.name must differ from the experiment's name {self.name!r}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")


def _check_plain_name(where: str, name: Any, *, nested: bool = False) -> None:
    """Names that become file or folder names must keep the outputs inside their folder: a plain
    name (no '/', '\\', not '.' or '..'), or with `nested` (select groups: folders of the sweep)
    a relative path of such names."""
    parts = name.split("/") if nested and isinstance(name, str) else [name]
    if not isinstance(name, str) or any(not p or p in (".", "..") or any(c in p for c in "/\\\0") for p in parts):
        kind = "a relative path of plain names" if nested else "a plain name"
        raise ValueError(f"{where} {name!r} names files or folders inside the output folder: it must be {kind} "
                         "(no '\\', no empty, '.' or '..' part" + ("" if nested else ", no '/'") + ")")


def _check_seeds(d: Any, where: str) -> None:
    """Every `seed` field in the nested dict `d` is an integer in [0, 2**32)."""
    if not isinstance(d, dict):
        return
    for k, v in d.items():
        path = f"{where}.{k}" if where else k
        if k == "seed" and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**32):
            raise ValueError(f"{path} must be an integer in [0, 2**32), got {v!r}")
        _check_seeds(v, path)


def _method(m: Any) -> MethodSpec:
    if isinstance(m, str):
        return MethodSpec(name=m)
    if isinstance(m, dict):
        return from_dict(MethodSpec, m, f"method {m.get('name', '?')!r}")
    raise TypeError(f"a method is a name or a mapping, got {m!r}")
