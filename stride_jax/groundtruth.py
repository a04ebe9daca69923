"""Ground truth for the Linear Datamodeling Score: retrain on random alpha-subsets.

For LDS (STRIDE.md section 3) we draw m random alpha-subsets S_1..S_m of the training pool,
train R fresh models from scratch on each (different seeds), and record every query's loss
f_j(S) under each model. This module runs that sweep and keeps its results in a resumable,
validated on-disk store:

```
<dir>/meta.json                  format version, configs, data hashes, fingerprint
<dir>/subsets.npy                [m, Ns] int32 sorted training-example indices per subset
<dir>/seeds.npy                  [m, R] int64 training seed of model (subset j, seed r)
<dir>/chunk_<start>_<end>.npz    one per finished chunk of models: subset_idx [C], seed_idx [C],
                                 losses [C, Q] float32, the store fingerprint and a sha256
```

A model is named by (subset j, seed r), flat id j * R + r; `start`/`end` in a chunk's name are
the first flat id and the last flat id + 1 it holds. Chunks are written atomically, so a run
killed in the middle resumes from the chunks already on disk. A sweep holds `<dir>/.lock`; the
processes of a cooperative sweep (`run_groundtruth(process_index=, process_count=)`) each hold
`<dir>/.shares/<index>-of-<count>/.lock` instead and write disjoint chunks.

A fine-tuning store (`create_or_open(..., start=model, tune=train.Tune(...))`) records the start
model's parameter digest and the Tune settings in meta.json and its fingerprint.

Axis letters (local to this module): M subsets (the paper's m), R seeds per subset, Q queries,
Ns examples per subset, C models in a chunk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from stride_jax import design, models
from stride_jax import sharding as sharding_lib
from stride_jax import store as store_lib
from stride_jax import train as train_lib

FORMAT_VERSION = 2
_META = "meta.json"
_SUBSETS = "subsets.npy"
_SEEDS = "seeds.npy"
_CHUNK_RE = re.compile(r"^chunk_(\d+)_(\d+)\.npz$")
_TMP_PREFIX = store_lib.TMP_PREFIX
# models_per_chunk is part of the fingerprint: vmapping P models at once changes float32 results
# (by up to ~5e-7 in the losses), so a store is resumed with the chunk size it was made with.
_EXECUTION_ONLY_FIELDS: tuple[str, ...] = ()
_FINE_TUNING_FIELDS = ("start", "tune")  # in the identity of fine-tuning stores only
_SHARES = ".shares"  # per-process claims of cooperative sweeps: <dir>/.shares/<index>-of-<count>/.lock


@dataclasses.dataclass(frozen=True)
class GroundTruthConfig:
    """Which retrains make up the LDS ground truth.

    Attributes:
        n_subsets: m, the number of random alpha-subsets (paper: 256).
        alpha: subset size as a fraction of the training pool; each subset holds round(alpha n).
        seeds_per_subset: R, fresh models trained per subset (their losses are averaged).
        seed: base seed of the subsets and of the per-model training seeds; keep it different from
            the STRIDE design seed so the LDS subsets are independent of the fitting subsets.
        models_per_chunk: models trained at once by one vmapped `train.train_many` call.
    """

    n_subsets: int = 64
    alpha: float = 0.3
    seeds_per_subset: int = 2
    seed: int = 1234
    models_per_chunk: int = 8

    def __post_init__(self):
        for name in ("n_subsets", "seeds_per_subset", "models_per_chunk", "seed"):
            value, low = getattr(self, name), 0 if name == "seed" else 1
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"groundtruth.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0.0 < self.alpha < 1.0:
            raise ValueError(f"groundtruth.alpha must be in (0, 1), got {self.alpha!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroundTruthConfig:
        return cls(**d)


# ----------------------------------------------------------------------------- helpers


def _config_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    raise TypeError(f"cannot record config of type {type(cfg).__name__}: no to_dict()")


def _fine_tuning(model_cfg: Any, start: Any, tune: Any) -> Any:
    """The Tune of a fine-tuning store (Tune() when only a start model is given), else None."""
    if start is None:
        if tune is not None:
            raise ValueError("tune= needs start=: a ground truth fine-tunes a given start model")
        return None
    if getattr(start, "cfg", None) != model_cfg:
        raise ValueError(f"the start model has config {getattr(start, 'cfg', None)}, not model_cfg {model_cfg}")
    return train_lib.Tune() if tune is None else tune


def _identity(
    cfg: GroundTruthConfig, model_cfg: Any, train_cfg: Any, train_examples: Any,
    query_examples: Any, start: Any = None, tune: Any = None,
) -> dict[str, Any]:
    """What decides the store's results; its canonical JSON is hashed into the fingerprint.

    A fine-tuning store also records the start model's parameter digest and the Tune settings
    (absent for retraining from scratch, so older stores keep their fingerprint).
    """
    gt = {k: v for k, v in cfg.to_dict().items() if k not in _EXECUTION_ONLY_FIELDS}
    tune = _fine_tuning(model_cfg, start, tune)
    extra = {} if tune is None else {"start": models.param_digest(start), "tune": tune.to_dict()}
    return store_lib.normalise({
        **extra,
        "format_version": FORMAT_VERSION,
        "groundtruth": gt,
        "model_type": type(model_cfg).__name__,
        "model": _config_dict(model_cfg),
        "train": _config_dict(train_cfg),
        "train_data_hash": train_examples.content_hash(),
        "query_data_hash": query_examples.content_hash(),
        "n_train": len(train_examples),
        "n_query": len(query_examples),
    })


def _fingerprint(identity: dict[str, Any]) -> str:
    return store_lib.fingerprint(identity)


def _identity_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    gt = {k: v for k, v in meta["groundtruth"].items() if k not in _EXECUTION_ONLY_FIELDS}
    keys = ("format_version", "model_type", "model", "train", "train_data_hash",
            "query_data_hash", "n_train", "n_query")
    extra = {k: meta[k] for k in _FINE_TUNING_FIELDS if k in meta}
    return {**extra, "groundtruth": gt, **{k: meta[k] for k in keys}}


def _describe_difference(path: Path, stored: dict[str, Any], asked: dict[str, Any]) -> str:
    a, b = store_lib.flatten(stored), store_lib.flatten(asked)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    made = ", ".join(f"{k}={store_lib._short(a.get(k, '<absent>'))}" for k in keys)
    wants = ", ".join(f"{k}={store_lib._short(b.get(k, '<absent>'))}" for k in keys)
    return (f"ground-truth store at {path} was made with {made}; this run asks {wants}; "
            "use another directory (or delete this one to start over)")


def _model_seeds(cfg: GroundTruthConfig) -> np.ndarray:
    """[M, R] distinct training seeds, from a stream independent of the subset draw."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED]))
    m, r = cfg.n_subsets, cfg.seeds_per_subset
    return rng.choice(2**31 - 1, size=m * r, replace=False).astype(np.int64).reshape(m, r)


# ----------------------------------------------------------------------------- the store


class GroundTruthStore:
    """Resumable on-disk store of retrained-model query losses; see the module docstring.

    Build with `create_or_open` (to write) or `open` (read-only, validated).
    """

    def __init__(self, path: Path, meta: dict[str, Any], cfg: GroundTruthConfig,
                 subset_idx_MxNs: np.ndarray, seeds_MxR: np.ndarray, *, read_only: bool):
        self.path = path
        self.meta = meta
        self.cfg = cfg
        self.read_only = read_only
        self.fingerprint: str = meta["fingerprint"]
        self.n_train: int = meta["n_train"]
        self.n_query: int = meta["n_query"]
        self._subset_idx_MxNs = subset_idx_MxNs
        self._seeds_MxR = seeds_MxR
        m, r = cfg.n_subsets, cfg.seeds_per_subset
        self._losses_MxRxQ = np.full((m, r, self.n_query), np.nan, np.float32)
        self._done_MxR = np.zeros((m, r), bool)
        self._chunk_of: dict[tuple[int, int], str] = {}

    # -- construction

    @classmethod
    def create_or_open(
        cls, path: str | os.PathLike, cfg: GroundTruthConfig, model_cfg: Any, train_cfg: Any,
        train_examples: Any, query_examples: Any, *, start: Any = None, tune: Any = None,
    ) -> "GroundTruthStore":
        """Opens the store at `path` for writing, creating it if needed.

        With `start` (a model of config `model_cfg`) the store holds fine-tunes of that model
        (`tune`: a `train.Tune`, default full fine-tuning); its parameter digest and the Tune
        are part of the store's identity. Raises ValueError (`store.IdentityError`, naming the
        fields) if the directory holds a store made with other configs, data or start model.
        """
        path = Path(path)
        identity = _identity(cfg, model_cfg, train_cfg, train_examples, query_examples, start, tune)
        fingerprint = _fingerprint(identity)
        if (path / _META).exists():
            meta = cls._read_meta(path)
            if meta["fingerprint"] != fingerprint:
                raise store_lib.IdentityError(_describe_difference(path, _identity_from_meta(meta), identity))
            return cls._load(path, meta, cfg=cfg, read_only=False)

        if path.exists():
            leftovers = sorted(p.name for p in path.iterdir()
                               if p.name not in (_SUBSETS, _SEEDS)
                               and not p.name.startswith((_TMP_PREFIX, _SHARES)))
            if leftovers:
                raise ValueError(
                    f"{path} exists but is not a ground-truth store (no {_META}; it holds "
                    f"{leftovers[:5]}); use another directory, or restore its {_META}")
        path.mkdir(parents=True, exist_ok=True)

        n_train = len(train_examples)
        subset_idx_MxNs = np.asarray(
            design.alpha_subsets(n_train, cfg.n_subsets, cfg.alpha, cfg.seed), dtype=np.int32)
        n_s = int(round(cfg.alpha * n_train))
        if subset_idx_MxNs.shape != (cfg.n_subsets, n_s) or n_s < 1:
            raise ValueError(f"alpha_subsets gave shape {subset_idx_MxNs.shape}, expected "
                             f"({cfg.n_subsets}, {n_s}) (n_train={n_train}, alpha={cfg.alpha})")
        seeds_MxR = _model_seeds(cfg)
        store_lib.atomic_write(path / _SUBSETS, lambda f: np.save(f, subset_idx_MxNs))
        store_lib.atomic_write(path / _SEEDS, lambda f: np.save(f, seeds_MxR))
        meta = {
            **identity,
            "groundtruth": store_lib.normalise(cfg.to_dict()),
            "fingerprint": fingerprint,
            "subsets_sha256": store_lib.digest({"subsets": subset_idx_MxNs}),
            "seeds_sha256": store_lib.digest({"seeds": seeds_MxR}),
        }
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        store_lib.atomic_write(path / _META, text)
        return cls(path, meta, cfg, subset_idx_MxNs, seeds_MxR, read_only=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "GroundTruthStore":
        """Loads a store read-only, validating meta, shapes, checksums and chunk indices."""
        path = Path(path)
        return cls._load(path, cls._read_meta(path), cfg=None, read_only=True)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        meta_path = path / _META
        if not meta_path.exists():
            raise ValueError(f"{meta_path} is missing: {path} is not a ground-truth store (or its "
                             "metadata was deleted)")
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("top level is not an object")
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"format_version {version!r}; this code reads {FORMAT_VERSION}")
            identity = _identity_from_meta(meta)
            GroundTruthConfig(**meta["groundtruth"])
            for key in ("fingerprint", "subsets_sha256", "seeds_sha256"):
                if not isinstance(meta[key], str):
                    raise ValueError(f"{key} is not a string")
            for key in ("n_train", "n_query"):
                if not isinstance(meta[key], int) or meta[key] < 1:
                    raise ValueError(f"{key}={meta[key]!r} is not a positive integer")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{meta_path} is malformed ({type(e).__name__}: {e})") from e
        if _fingerprint(identity) != meta["fingerprint"]:
            raise ValueError(f"{meta_path} is malformed: its fingerprint does not match its "
                             "fields (was it edited by hand?)")
        return meta

    @classmethod
    def _load(cls, path: Path, meta: dict[str, Any], *, cfg: GroundTruthConfig | None,
              read_only: bool) -> "GroundTruthStore":
        stored_cfg = GroundTruthConfig(**meta["groundtruth"])
        cfg = stored_cfg if cfg is None else cfg
        m, r = cfg.n_subsets, cfg.seeds_per_subset
        n_s = int(round(cfg.alpha * meta["n_train"]))
        subset_idx_MxNs = cls._load_npy(path / _SUBSETS, meta["subsets_sha256"], "subsets")
        seeds_MxR = cls._load_npy(path / _SEEDS, meta["seeds_sha256"], "seeds")
        if subset_idx_MxNs.shape != (m, n_s) or subset_idx_MxNs.dtype != np.int32:
            raise ValueError(f"{path / _SUBSETS} has shape {subset_idx_MxNs.shape} "
                             f"{subset_idx_MxNs.dtype}, expected ({m}, {n_s}) int32")
        if subset_idx_MxNs.min() < 0 or subset_idx_MxNs.max() >= meta["n_train"]:
            raise ValueError(f"{path / _SUBSETS} holds indices outside [0, {meta['n_train']})")
        if seeds_MxR.shape != (m, r):
            raise ValueError(f"{path / _SEEDS} has shape {seeds_MxR.shape}, expected ({m}, {r})")
        store = cls(path, meta, cfg, subset_idx_MxNs, seeds_MxR, read_only=read_only)
        for chunk_path in store._chunk_paths():
            store._ingest_chunk(chunk_path)
        return store

    @staticmethod
    def _load_npy(p: Path, sha: str, name: str) -> np.ndarray:
        try:
            a = np.load(p, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{p} is missing or unreadable ({type(e).__name__}: {e})") from e
        if store_lib.digest({name: a}) != sha:
            raise ValueError(f"{p} does not match the checksum in {_META}: the store is corrupt")
        return a

    # -- chunks

    def refresh(self) -> None:
        """Ingest chunk files written (by another process) since this store was opened."""
        seen = set(self._chunk_of.values())
        for chunk_path in self._chunk_paths():
            if str(chunk_path) not in seen:
                self._ingest_chunk(chunk_path)

    def _chunk_paths(self) -> list[Path]:
        found = []
        for p in self.path.iterdir():
            match = _CHUNK_RE.match(p.name)
            if match:
                found.append((int(match.group(1)), p))
        return [p for _, p in sorted(found)]

    def _ingest_chunk(self, p: Path) -> None:
        hint = "delete it and rerun to retrain its models"
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("subset_idx", "seed_idx", "losses", "fingerprint")}
                sha = str(z["sha256"])
        except Exception as e:
            raise ValueError(
                f"chunk file {p} is unreadable ({type(e).__name__}: {e}); {hint}") from e
        if store_lib.digest(arrays) != sha:
            raise ValueError(f"chunk file {p} fails its sha256 check (corrupt); {hint}")
        if str(arrays["fingerprint"]) != self.fingerprint:
            raise ValueError(
                f"chunk file {p} belongs to another store (fingerprint differs); {hint}")
        j_C, r_C, losses_CxQ = arrays["subset_idx"], arrays["seed_idx"], arrays["losses"]
        c = j_C.shape[0] if j_C.ndim == 1 else -1
        if (c < 1 or r_C.shape != (c,) or losses_CxQ.shape != (c, self.n_query)
                or losses_CxQ.dtype != np.float32):
            raise ValueError(f"chunk file {p} has inconsistent shapes subset_idx {j_C.shape}, "
                             f"seed_idx {r_C.shape}, losses {losses_CxQ.shape} "
                             f"{losses_CxQ.dtype} (Q={self.n_query}); {hint}")
        m, r = self.cfg.n_subsets, self.cfg.seeds_per_subset
        if j_C.min() < 0 or j_C.max() >= m or r_C.min() < 0 or r_C.max() >= r:
            raise ValueError(f"chunk file {p} holds model indices outside {m} subsets x {r} "
                             f"seeds; {hint}")
        flat_C = j_C.astype(np.int64) * r + r_C
        match = _CHUNK_RE.match(p.name)
        if (int(match.group(1)), int(match.group(2))) != (flat_C.min(), flat_C.max() + 1):
            raise ValueError(f"chunk file {p} holds models {flat_C.min()}..{flat_C.max()}, not "
                             f"what its name says; {hint}")
        if len(np.unique(flat_C)) != c:
            raise ValueError(f"chunk file {p} lists a model twice; {hint}")
        for j, s in zip(j_C.tolist(), r_C.tolist()):
            if (j, s) in self._chunk_of:
                raise ValueError(f"model (subset {j}, seed {s}) appears in both "
                                 f"{self._chunk_of[(j, s)]} and {p}; delete one of them")
        for j, s in zip(j_C.tolist(), r_C.tolist()):
            self._chunk_of[(j, s)] = str(p)
        self._losses_MxRxQ[j_C, r_C] = losses_CxQ
        self._done_MxR[j_C, r_C] = True

    def write_chunk(self, subset_idx_C: Iterable[int], seed_idx_C: Iterable[int],
                    losses_CxQ: np.ndarray) -> Path:
        """Atomically records the query losses of models (subset_idx_C[i], seed_idx_C[i])."""
        if self.read_only:
            raise ValueError(f"ground-truth store at {self.path} was opened read-only")
        j_C = np.asarray(list(subset_idx_C), np.int32)
        r_C = np.asarray(list(seed_idx_C), np.int32)
        losses_CxQ = np.asarray(losses_CxQ, np.float32)
        if losses_CxQ.shape != (len(j_C), self.n_query) or r_C.shape != j_C.shape or not len(j_C):
            raise ValueError(f"write_chunk got {len(j_C)} subsets, {len(r_C)} seeds and losses "
                             f"{losses_CxQ.shape}; expected losses ({len(j_C)}, {self.n_query})")
        for j, s in zip(j_C.tolist(), r_C.tolist()):
            if (j, s) in self._chunk_of:
                raise ValueError(f"model (subset {j}, seed {s}) is already in "
                                 f"{self._chunk_of[(j, s)]}")
        flat_C = j_C.astype(np.int64) * self.cfg.seeds_per_subset + r_C
        arrays = {"subset_idx": j_C, "seed_idx": r_C, "losses": losses_CxQ,
                  "fingerprint": np.asarray(self.fingerprint)}
        sha = store_lib.digest(arrays)
        p = self.path / f"chunk_{flat_C.min()}_{flat_C.max() + 1}.npz"
        store_lib.atomic_write(p, lambda f: np.savez(f, sha256=np.asarray(sha), **arrays))
        self._ingest_chunk(p)  # reads back what hit the disk
        return p

    # -- queries

    def subsets(self) -> np.ndarray:
        """[M, Ns] int32 sorted training-example indices of each subset."""
        return self._subset_idx_MxNs.copy()

    def seeds(self) -> np.ndarray:
        """[M, R] training seed of model (subset j, seed r)."""
        return self._seeds_MxR.copy()

    def pending(self) -> list[tuple[int, int]]:
        """(subset, seed) of every model not yet recorded, in flat-id order."""
        j, r = np.nonzero(~self._done_MxR)
        return list(zip(j.tolist(), r.tolist()))

    def n_done(self) -> int:
        return int(self._done_MxR.sum())

    def is_complete(self) -> bool:
        return bool(self._done_MxR.all())

    def losses(self, *, partial: bool = False) -> np.ndarray:
        """[M, R, Q] float32 query losses; missing models raise, or are NaN with partial=True."""
        if not partial and not self.is_complete():
            raise ValueError(f"ground-truth store at {self.path} is incomplete: "
                             f"{len(self.pending())} of {self._done_MxR.size} models missing; "
                             "run run_groundtruth to finish it, or pass partial=True")
        return self._losses_MxRxQ.copy()

    def mean_losses(self, *, partial: bool = False) -> np.ndarray:
        """[M, Q] query losses averaged over the R seeds (the recorded ones, with partial=True)."""
        losses_MxRxQ = self.losses(partial=partial)
        if not partial:
            return losses_MxRxQ.mean(axis=1)
        n_Mx1 = self._done_MxR.sum(axis=1, keepdims=True)
        total_MxQ = np.where(self._done_MxR[:, :, None], losses_MxRxQ, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_Mx1 > 0, total_MxQ / n_Mx1, np.nan).astype(np.float32)

    def __repr__(self) -> str:
        return (f"GroundTruthStore({str(self.path)!r}, m={self.cfg.n_subsets}, "
                f"R={self.cfg.seeds_per_subset}, Q={self.n_query}, "
                f"done={self.n_done()}/{self._done_MxR.size})")


# ----------------------------------------------------------------------------- the sweep


def run_groundtruth(
    store: GroundTruthStore, model_cfg: Any, train_cfg: Any, train_examples: Any,
    query_examples: Any, *, progress: bool = True, max_models: int | None = None,
    eval_batch_size: int = 256, start: Any = None, tune: Any = None, mesh: Any = None,
    process_index: int | None = None, process_count: int | None = None, wait: bool = True,
) -> GroundTruthStore:
    """Trains every pending model of `store` and records its query losses.

    Models are trained `store.cfg.models_per_chunk` (P) at a time by one vmapped
    `train.train_many` call, on a fixed grid of flat ids (chunk c holds ids c*P .. c*P+P-1), so a
    chunk holds the same models whether or not the sweep was interrupted before it. Each chunk is
    written as soon as it is done. `max_models` stops after that many models (to split the work,
    or in tests to simulate a crash).

    - `start`, `tune`: fine-tune `start` on each subset (`train.finetune_many`) instead of
      training fresh models; they must be those the store was made with.
    - `mesh`: split each chunk's models over the mesh's "models" axis (or its only axis); with
      several processes, a mesh of this process's devices (`jax.local_devices()`).
    - `process_index`, `process_count` (default: `jax.process_index()`, `jax.process_count()`):
      cooperative writers. Process i trains the chunks c with c % process_count == i; each
      holds a lock on its own share (a second process claiming the same share is refused)
      instead of the store-wide lock, and writes only its own chunks (atomically). With
      `wait` and a `jax.distributed` run of process_count processes, it then waits for the
      others (`multihost_utils.sync_global_devices`) and reads their chunks, so every process
      returns the complete store.
    """
    asked = _identity(store.cfg, model_cfg, train_cfg, train_examples, query_examples, start, tune)
    if _fingerprint(asked) != store.fingerprint:
        raise store_lib.IdentityError(_describe_difference(store.path, _identity_from_meta(store.meta), asked))
    if store.read_only:
        raise ValueError(f"ground-truth store at {store.path} was opened read-only; use "
                         "GroundTruthStore.create_or_open to run it")
    tune = _fine_tuning(model_cfg, start, tune)
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")
    if mesh is not None and process_count > 1:
        sharding_lib.check_local(mesh, "a cooperative ground-truth sweep")
    run = dict(progress=progress, max_models=max_models, eval_batch_size=eval_batch_size, start=start,
               tune=tune, mesh=mesh, share=(process_index, process_count))
    if process_count == 1:
        with store_lib.Lock(store.path):
            store_lib.clean_leftovers(store.path)  # temporary files of a killed write (the lock is ours)
            return _run_pending(store, model_cfg, train_cfg, train_examples, query_examples, **run)
    with store_lib.Lock(store.path / _SHARES / f"{process_index}-of-{process_count}"):
        # Other writers may be mid-write: only temporary files an hour old are a killed write's.
        store_lib.clean_leftovers(store.path, older_than_s=3600.0)
        _run_pending(store, model_cfg, train_cfg, train_examples, query_examples, **run)
    if wait:
        if jax.process_count() == process_count:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"stride_jax ground truth {store.fingerprint[:16]}")
        store.refresh()
    return store


def _run_pending(store: GroundTruthStore, model_cfg: Any, train_cfg: Any, train_examples: Any,
                 query_examples: Any, *, progress: bool, max_models: int | None,
                 eval_batch_size: int, start: Any, tune: Any, mesh: Any,
                 share: tuple[int, int]) -> GroundTruthStore:
    store.refresh()  # chunks another process finished while this one waited
    index, count = share
    r, p = store.cfg.seeds_per_subset, store.cfg.models_per_chunk
    todo = [(j, s) for j, s in store.pending() if ((j * r + s) // p) % count == index]
    if max_models is not None:
        todo = todo[:max(0, max_models)]
    groups: dict[int, list[tuple[int, int]]] = {}
    for j, s in todo:
        groups.setdefault((j * r + s) // p, []).append((j, s))

    subset_idx_MxNs, seeds_MxR = store.subsets(), store.seeds()
    hooks = hooks_q = None
    if start is not None and groups:  # the frozen trunk of pool and queries, once for every chunk
        hooks = train_lib.hook_states(start, tune, train_examples)
        hooks_q = train_lib.hook_states(start, tune, query_examples, like=hooks)
    with tqdm(total=store.cfg.n_subsets * r, initial=store.n_done(), disable=not progress,
              unit="model", desc="ground-truth retrains") as bar:
        for group in groups.values():
            j_C = np.asarray([j for j, _ in group])
            r_C = np.asarray([s for _, s in group])
            if start is None:
                graphdef, state_C = train_lib.train_many(
                    model_cfg, train_examples, subset_idx_MxNs[j_C], seeds_MxR[j_C, r_C], train_cfg,
                    progress=False, mesh=mesh)
                losses_CxQ = train_lib.eval_losses(graphdef, state_C, query_examples,
                                                   batch_size=eval_batch_size)
            else:
                tuned = train_lib.finetune_many(start, train_examples, subset_idx_MxNs[j_C], seeds_MxR[j_C, r_C],
                                                train_cfg, tune, progress=False, mesh=mesh, hooks=hooks)
                losses_CxQ = tuned.eval_losses(query_examples, batch_size=eval_batch_size, hooks=hooks_q)
            store.write_chunk(j_C, r_C, np.asarray(losses_CxQ))
            bar.update(len(group))
    return store


def noise_ceiling_losses(store: GroundTruthStore) -> tuple[np.ndarray, np.ndarray]:
    """([M, Q] losses of seed 0, [M, Q] losses of seed 1) for `lds.noise_ceiling`."""
    if store.cfg.seeds_per_subset < 2:
        raise ValueError(f"the noise ceiling needs two seeds per subset; the store at "
                         f"{store.path} has seeds_per_subset={store.cfg.seeds_per_subset} "
                         "(make one with seeds_per_subset >= 2)")
    losses_MxRxQ = store.losses()
    return losses_MxRxQ[:, 0].copy(), losses_MxRxQ[:, 1].copy()
