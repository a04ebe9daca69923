"""Tests for the LDS ground-truth store and its resumable retraining sweep."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from stride_jax import data, design, groundtruth, models, train
from stride_jax import store as store_lib
from stride_jax.groundtruth import GroundTruthConfig, GroundTruthStore
from stride_jax.lds import noise_ceiling

N_TRAIN, N_QUERY, SEQ = 40, 6, 16
MODEL_CFG = models.GPTConfig(vocab_size=64, seq_len=SEQ, n_layers=1, d_model=32, n_heads=2)
TRAIN_CFG = train.TrainConfig(batch_size=8, epochs=2.0, learning_rate=1e-2)


def _lm_examples(n: int, seed: int) -> data.Examples:
    tokens = np.random.default_rng(seed).integers(0, 64, size=(n, SEQ + 1), dtype=np.int32)
    return data.Examples(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                         ids=np.arange(n, dtype=np.int64))


TRAIN_EX = _lm_examples(N_TRAIN, 0)
QUERY_EX = _lm_examples(N_QUERY, 1)


def _cfg(**kw) -> GroundTruthConfig:
    return GroundTruthConfig(**{"n_subsets": 4, "alpha": 0.5, "seeds_per_subset": 2,
                                "models_per_chunk": 2, **kw})


def _create(path, cfg=None, model_cfg=MODEL_CFG, train_cfg=TRAIN_CFG, train_ex=TRAIN_EX,
            query_ex=QUERY_EX, tune_only=False) -> GroundTruthStore:
    kw = {"tune": train.Tune()} if tune_only else {}
    return GroundTruthStore.create_or_open(path, cfg or _cfg(), model_cfg, train_cfg, train_ex,
                                           query_ex, **kw)


def _fake_losses(j: int, r: int) -> np.ndarray:
    return np.random.default_rng([j, r]).normal(size=N_QUERY).astype(np.float32)


def _fill(store: GroundTruthStore, models_jr) -> None:
    models_jr = list(models_jr)
    store.write_chunk([j for j, _ in models_jr], [r for _, r in models_jr],
                      np.stack([_fake_losses(j, r) for j, r in models_jr]))


ALL_MODELS = [(j, r) for j in range(4) for r in range(2)]


# ----------------------------------------------------------------------------- the store


def test_create_records_meta_subsets_and_seeds(tmp_path):
    store = _create(tmp_path / "gt")
    meta = json.loads((tmp_path / "gt" / "meta.json").read_text())
    assert meta["format_version"] == groundtruth.FORMAT_VERSION
    assert meta["groundtruth"] == _cfg().to_dict()
    assert meta["model"] == MODEL_CFG.to_dict() and meta["model_type"] == "GPTConfig"
    assert meta["train"] == TRAIN_CFG.to_dict()
    assert meta["train_data_hash"] == TRAIN_EX.content_hash()
    assert meta["query_data_hash"] == QUERY_EX.content_hash()
    assert (meta["n_train"], meta["n_query"]) == (N_TRAIN, N_QUERY)
    assert len(meta["fingerprint"]) == 64

    subsets = store.subsets()
    assert subsets.shape == (4, 20) and subsets.dtype == np.int32
    np.testing.assert_array_equal(subsets, design.alpha_subsets(N_TRAIN, 4, 0.5, 1234))
    seeds = store.seeds()
    assert seeds.shape == (4, 2) and len(np.unique(seeds)) == 8
    assert store.pending() == ALL_MODELS and not store.is_complete()


def test_round_trip_is_identical(tmp_path):
    store = _create(tmp_path / "gt")
    _fill(store, ALL_MODELS[:3])
    _fill(store, ALL_MODELS[3:])
    assert store.is_complete() and store.pending() == []
    expected = np.stack([np.stack([_fake_losses(j, r) for r in range(2)]) for j in range(4)])
    np.testing.assert_array_equal(store.losses(), expected)

    for reopened in (GroundTruthStore.open(tmp_path / "gt"), _create(tmp_path / "gt")):
        assert reopened.is_complete()
        np.testing.assert_array_equal(reopened.losses(), expected)
        np.testing.assert_array_equal(reopened.mean_losses(), expected.mean(axis=1))
        np.testing.assert_array_equal(reopened.subsets(), store.subsets())
        np.testing.assert_array_equal(reopened.seeds(), store.seeds())
    a, b = groundtruth.noise_ceiling_losses(GroundTruthStore.open(tmp_path / "gt"))
    np.testing.assert_array_equal(a, expected[:, 0])
    np.testing.assert_array_equal(b, expected[:, 1])


def test_partial_store_reports_pending(tmp_path):
    store = _create(tmp_path / "gt")
    _fill(store, [(0, 0), (0, 1), (2, 1)])
    reopened = GroundTruthStore.open(tmp_path / "gt")
    missing = [(1, 0), (1, 1), (2, 0), (3, 0), (3, 1)]
    assert reopened.pending() == missing and reopened.n_done() == 3
    assert not reopened.is_complete()
    with pytest.raises(ValueError, match="incomplete"):
        reopened.losses()
    with pytest.raises(ValueError, match="incomplete"):
        groundtruth.noise_ceiling_losses(reopened)
    part = reopened.losses(partial=True)
    for j, r in missing:
        assert np.isnan(part[j, r]).all()
    np.testing.assert_array_equal(part[2, 1], _fake_losses(2, 1))
    mean = reopened.mean_losses(partial=True)
    np.testing.assert_allclose(mean[0], (_fake_losses(0, 0) + _fake_losses(0, 1)) / 2, rtol=1e-6)
    np.testing.assert_array_equal(mean[2], _fake_losses(2, 1))
    assert np.isnan(mean[1]).all() and np.isnan(mean[3]).all()


def test_write_guards(tmp_path):
    store = _create(tmp_path / "gt")
    _fill(store, [(0, 0)])
    with pytest.raises(ValueError, match="already in"):
        _fill(store, [(0, 0), (0, 1)])
    with pytest.raises(ValueError, match="expected losses"):
        store.write_chunk([1], [0], np.zeros((1, N_QUERY + 1), np.float32))
    with pytest.raises(ValueError, match="read-only"):
        _fill(GroundTruthStore.open(tmp_path / "gt"), [(1, 0)])


@pytest.mark.parametrize(
    "change, fields",
    [
        (dict(cfg=_cfg(alpha=0.3)), ["groundtruth.alpha=0.5", "groundtruth.alpha=0.3"]),
        (dict(cfg=_cfg(seed=7)), ["groundtruth.seed=1234", "groundtruth.seed=7"]),
        (dict(model_cfg=models.GPTConfig(vocab_size=64, seq_len=SEQ, n_layers=2, d_model=32,
                                         n_heads=2)), ["model.n_layers=1", "model.n_layers=2"]),
        (dict(train_cfg=train.TrainConfig(batch_size=4)), ["train.batch_size=8"]),
        (dict(train_ex=_lm_examples(N_TRAIN, 5)), ["train_data_hash="]),
        (dict(query_ex=_lm_examples(N_QUERY + 1, 1)), ["query_data_hash=", "n_query=6"]),
    ],
)
def test_mismatching_store_names_the_field(tmp_path, change, fields):
    _create(tmp_path / "gt")
    with pytest.raises(ValueError, match="use another directory") as err:
        _create(tmp_path / "gt", **change)
    for field in fields:
        assert field in str(err.value)
    assert str(tmp_path / "gt") in str(err.value)


def test_chunk_size_is_part_of_the_identity(tmp_path):
    """Vmapping another number of models at once changes float32 losses (by ~5e-7), so a store
    resumes only with the chunk size it was made with; the error names the field."""
    _fill(_create(tmp_path / "gt"), ALL_MODELS[:2])
    with pytest.raises(ValueError, match="models_per_chunk"):
        _create(tmp_path / "gt", cfg=_cfg(models_per_chunk=3))


def test_sweep_holds_a_lock_and_cleans_leftovers(tmp_path):
    from stride_jax import store as store_lib

    gt = _create(tmp_path / "gt")
    (tmp_path / "gt" / f"{store_lib.TMP_PREFIX}killed.npz").write_bytes(b"half a chunk")
    with store_lib.Lock(tmp_path / "gt"):  # held here: run_groundtruth in this process re-enters it
        groundtruth.run_groundtruth(gt, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, progress=False, max_models=0)
    assert not list((tmp_path / "gt").glob(f"{store_lib.TMP_PREFIX}*"))


def _only_chunk(path):
    (chunk,) = sorted(path.glob("chunk_*.npz"))
    return chunk


def test_truncated_chunk_is_reported(tmp_path):
    _fill(_create(tmp_path / "gt"), ALL_MODELS[:2])
    chunk = _only_chunk(tmp_path / "gt")
    raw = chunk.read_bytes()
    chunk.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=f"{chunk.name}.*delete it"):
        GroundTruthStore.open(tmp_path / "gt")
    with pytest.raises(ValueError, match=f"{chunk.name}.*delete it"):
        _create(tmp_path / "gt")


def test_flipped_bytes_in_chunk_are_reported(tmp_path):
    _fill(_create(tmp_path / "gt"), ALL_MODELS[:2])
    chunk = _only_chunk(tmp_path / "gt")
    raw = bytearray(chunk.read_bytes())
    at = raw.find(np.stack([_fake_losses(0, 0), _fake_losses(0, 1)]).tobytes())
    assert at > 0
    raw[at + 5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{chunk.name}.*delete it"):
        GroundTruthStore.open(tmp_path / "gt")


def _rewrite_chunk(chunk, *, fix_sha: bool, **replace):
    with np.load(chunk) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(replace)
    if fix_sha:
        arrays["sha256"] = np.asarray(__import__("stride_jax.store", fromlist=["digest"]).digest(
            {k: arrays[k] for k in ("subset_idx", "seed_idx", "losses", "fingerprint")}))
    with open(chunk, "wb") as f:
        np.savez(f, **arrays)


def test_chunk_checksum_and_indices_are_checked(tmp_path):
    _fill(_create(tmp_path / "gt"), ALL_MODELS[:2])
    chunk = _only_chunk(tmp_path / "gt")
    backup = chunk.read_bytes()

    _rewrite_chunk(chunk, fix_sha=False, losses=np.zeros((2, N_QUERY), np.float32))
    with pytest.raises(ValueError, match=f"{chunk.name} fails its sha256 check"):
        GroundTruthStore.open(tmp_path / "gt")

    chunk.write_bytes(backup)
    _rewrite_chunk(chunk, fix_sha=True, seed_idx=np.array([0, 2], np.int32))
    with pytest.raises(ValueError, match=f"{chunk.name} holds model indices outside"):
        GroundTruthStore.open(tmp_path / "gt")

    chunk.write_bytes(backup)
    _rewrite_chunk(chunk, fix_sha=True, fingerprint=np.asarray("0" * 64))
    with pytest.raises(ValueError, match="belongs to another store"):
        GroundTruthStore.open(tmp_path / "gt")

    chunk.write_bytes(backup)
    shutil.copy(chunk, tmp_path / "gt" / "chunk_0_2.npz.bak")  # ignored: not a chunk name
    GroundTruthStore.open(tmp_path / "gt")
    _fill(_create(tmp_path / "gt"), [(1, 0)])
    dup = tmp_path / "gt" / "chunk_2_3.npz"
    _rewrite_chunk(dup, fix_sha=True, subset_idx=np.array([0], np.int32))
    with pytest.raises(ValueError, match="not what its name says"):
        GroundTruthStore.open(tmp_path / "gt")
    dup.rename(tmp_path / "gt" / "chunk_0_1.npz")
    with pytest.raises(ValueError, match="appears in both"):
        GroundTruthStore.open(tmp_path / "gt")


def test_missing_or_malformed_meta(tmp_path):
    path = tmp_path / "gt"
    _fill(_create(path), ALL_MODELS[:2])
    meta_path = path / "meta.json"
    good = meta_path.read_text()

    meta_path.unlink()
    with pytest.raises(ValueError, match="meta.json is missing"):
        GroundTruthStore.open(path)
    with pytest.raises(ValueError, match="not a ground-truth store"):
        _create(path)  # chunks without meta.json: refuse to overwrite

    meta_path.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="meta.json is malformed"):
        GroundTruthStore.open(path)
    with pytest.raises(ValueError, match="meta.json is malformed"):
        _create(path)

    edited = json.loads(good)
    edited["groundtruth"]["alpha"] = 0.25
    meta_path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="fingerprint does not match"):
        GroundTruthStore.open(path)

    edited = json.loads(good)
    del edited["subsets_sha256"]
    meta_path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="malformed.*subsets_sha256"):
        GroundTruthStore.open(path)

    meta_path.write_text(good)
    np.save(path / "subsets.npy", np.zeros((4, 20), np.int32))
    with pytest.raises(ValueError, match="subsets.npy does not match the checksum"):
        GroundTruthStore.open(path)

    with pytest.raises(ValueError, match="is missing"):
        GroundTruthStore.open(tmp_path / "nowhere")


def test_noise_ceiling_needs_two_seeds(tmp_path):
    store = _create(tmp_path / "gt", cfg=_cfg(seeds_per_subset=1))
    _fill(store, [(j, 0) for j in range(4)])
    with pytest.raises(ValueError, match="seeds_per_subset=1"):
        groundtruth.noise_ceiling_losses(store)


def test_config_validation():
    cfg = _cfg(seed=9)
    assert GroundTruthConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (dict(n_subsets=0), dict(alpha=0.0), dict(alpha=1.0), dict(seeds_per_subset=0),
                dict(models_per_chunk=0)):
        with pytest.raises(ValueError):
            GroundTruthConfig(**bad)


# ----------------------------------------------------------------------------- the sweep


class _CountingTrainer:
    """Wraps train.train_many / eval_losses; records which models each call trained."""

    def __init__(self, monkeypatch, fake: bool):
        self.calls: list[list[int]] = []
        self._fake = fake
        self._train_many, self._eval = train.train_many, train.eval_losses
        monkeypatch.setattr(train, "train_many", self.train_many)
        monkeypatch.setattr(train, "eval_losses", self.eval_losses)

    def train_many(self, model_cfg, examples, subset_idx_MxNs, seeds_M, cfg, **kw):
        self.calls.append([int(s) for s in seeds_M])
        if self._fake:  # losses a deterministic function of (subset, seed)
            return None, (np.asarray(subset_idx_MxNs), np.asarray(seeds_M))
        return self._train_many(model_cfg, examples, subset_idx_MxNs, seeds_M, cfg, **kw)

    def eval_losses(self, graphdef, state_M, examples, **kw):
        if self._fake:
            idx_MxNs, seeds_M = state_M
            base_M = idx_MxNs.sum(axis=1) + (seeds_M % 1000) / 1000.0
            return (base_M[:, None] + np.arange(len(examples))[None]).astype(np.float32)
        return self._eval(graphdef, state_M, examples, **kw)

    @property
    def n_trained(self) -> int:
        return sum(len(c) for c in self.calls)


def _run(path, monkeypatch, *, fake, cfg=None, **kw):
    trainer = _CountingTrainer(monkeypatch, fake)
    store = _create(path, cfg=cfg)
    groundtruth.run_groundtruth(store, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, progress=False,
                                **kw)
    monkeypatch.undo()
    return store, trainer


def test_run_chunks_on_a_fixed_grid(tmp_path, monkeypatch):
    cfg = _cfg(n_subsets=5, models_per_chunk=4)  # 10 models: grid cells [0,4) [4,8) [8,10)
    full, _ = _run(tmp_path / "full", monkeypatch, fake=True, cfg=cfg)
    assert sorted(p.name for p in (tmp_path / "full").glob("chunk_*.npz")) == [
        "chunk_0_4.npz", "chunk_4_8.npz", "chunk_8_10.npz"]

    part, t1 = _run(tmp_path / "part", monkeypatch, fake=True, cfg=cfg, max_models=3)
    assert t1.n_trained == 3 and part.n_done() == 3
    part, t2 = _run(tmp_path / "part", monkeypatch, fake=True, cfg=cfg, max_models=0)
    assert t2.n_trained == 0
    part, t3 = _run(tmp_path / "part", monkeypatch, fake=True, cfg=cfg)
    assert [len(c) for c in t3.calls] == [1, 4, 2] and part.is_complete()
    assert sorted(p.name for p in (tmp_path / "part").glob("chunk_*.npz")) == [
        "chunk_0_3.npz", "chunk_3_4.npz", "chunk_4_8.npz", "chunk_8_10.npz"]
    np.testing.assert_array_equal(part.losses(), full.losses())
    seeds = full.seeds()
    expected = (full.subsets().sum(axis=1)[:, None] + (seeds % 1000) / 1000.0)
    np.testing.assert_allclose(full.losses()[:, :, 0], expected, rtol=1e-6)


def test_run_rejects_other_inputs(tmp_path):
    store = _create(tmp_path / "gt")
    with pytest.raises(ValueError, match="query_data_hash"):
        groundtruth.run_groundtruth(store, MODEL_CFG, TRAIN_CFG, TRAIN_EX,
                                    _lm_examples(N_QUERY, 9), progress=False)
    with pytest.raises(ValueError, match="read-only"):
        groundtruth.run_groundtruth(GroundTruthStore.open(tmp_path / "gt"), MODEL_CFG,
                                    TRAIN_CFG, TRAIN_EX, QUERY_EX, progress=False)


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch):
    full, t_full = _run(tmp_path / "full", monkeypatch, fake=False)
    assert t_full.n_trained == 8 and len(list((tmp_path / "full").glob("chunk_*.npz"))) == 4

    _, t1 = _run(tmp_path / "resumed", monkeypatch, fake=False, max_models=4)  # "crash" at half
    assert t1.n_trained == 4
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes())
             for p in (tmp_path / "resumed").glob("chunk_*.npz")}
    assert sorted(first) == ["chunk_0_2.npz", "chunk_2_4.npz"]

    resumed, t2 = _run(tmp_path / "resumed", monkeypatch, fake=False)
    assert t2.n_trained == 4  # only the missing models
    for name, (mtime, raw) in first.items():
        p = tmp_path / "resumed" / name
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == raw
    assert len(list((tmp_path / "resumed").glob("chunk_*.npz"))) == 4

    losses = GroundTruthStore.open(tmp_path / "resumed").losses()
    assert losses.shape == (4, 2, N_QUERY) and np.isfinite(losses).all()
    np.testing.assert_allclose(losses, full.losses(), rtol=0, atol=1e-6)
    assert not np.allclose(losses[:, 0], losses[:, 1])  # seeds give different models
    assert not np.allclose(losses[0], losses[1])  # so do subsets
    ceiling = noise_ceiling(*groundtruth.noise_ceiling_losses(resumed), n_boot=50)
    assert -1.0 <= ceiling.mean <= 1.0


# ----------------------------------------------------------------------------- fine-tuning stores


START = models.build(MODEL_CFG, 0)
LORA = train.Tune("lora", rank=2)


def test_fine_tuning_store_records_and_checks_its_start_model(tmp_path):
    store = _create_ft(tmp_path / "gt")
    meta = json.loads((tmp_path / "gt" / "meta.json").read_text())
    assert meta["start"] == models.param_digest(START) and meta["tune"] == LORA.to_dict()
    assert GroundTruthStore.open(tmp_path / "gt").fingerprint == store.fingerprint
    other = models.build(MODEL_CFG, 1)
    with pytest.raises(store_lib.IdentityError, match="start=") as err:
        _create_ft(tmp_path / "gt", start=other)
    assert models.param_digest(other)[:20] in str(err.value)
    with pytest.raises(store_lib.IdentityError, match="tune.mode"):
        _create_ft(tmp_path / "gt", tune=train.Tune("top", layers=1))
    with pytest.raises(store_lib.IdentityError, match="start="):  # a retraining run on a fine-tuning store
        _create(tmp_path / "gt")
    with pytest.raises(store_lib.IdentityError, match="start="):
        groundtruth.run_groundtruth(store, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, start=other, tune=LORA,
                                    progress=False)
    with pytest.raises(ValueError, match="needs start"):
        _create(tmp_path / "other", cfg=None, tune_only=True)


def _create_ft(path, start=START, tune=LORA, cfg=None):
    return GroundTruthStore.create_or_open(path, cfg or _cfg(), MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX,
                                           start=start, tune=tune)


def test_retraining_store_identity_is_unchanged_by_fine_tuning_fields(tmp_path):
    """Stores that retrain from scratch keep the fingerprint they had before fine-tuning existed."""
    store = _create(tmp_path / "gt")
    meta = json.loads((tmp_path / "gt" / "meta.json").read_text())
    assert "start" not in meta and "tune" not in meta
    assert store.fingerprint == store_lib.fingerprint(groundtruth._identity(
        _cfg(), MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX))


@pytest.mark.slow
def test_fine_tuning_sweep_records_finetune_losses(tmp_path):
    """run_groundtruth(start=, tune=) stores exactly the query losses of train.finetune_many on
    the store's subsets and seeds (the same program: bitwise)."""
    cfg = _cfg(n_subsets=2, seeds_per_subset=1, models_per_chunk=2)
    store = _create_ft(tmp_path / "gt", cfg=cfg)
    groundtruth.run_groundtruth(store, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, start=START, tune=LORA,
                                progress=False)
    tuned = train.finetune_many(START, TRAIN_EX, store.subsets(), store.seeds()[:, 0], TRAIN_CFG, LORA,
                                progress=False)
    np.testing.assert_array_equal(store.losses()[:, 0], tuned.eval_losses(QUERY_EX))
    base = train.eval_loss(START, QUERY_EX)
    assert not np.allclose(store.losses()[0, 0], base)  # the models moved away from the start


def test_sweep_passes_start_tune_and_mesh_through(tmp_path, monkeypatch):
    """A fine-tuning sweep calls finetune_many (never train_many) with the store's start model,
    Tune and the mesh; a retraining sweep hands the mesh to train_many."""
    calls = []

    class FakeTuned:
        def __init__(self, seeds_M):
            self.seeds_M = seeds_M

        def eval_losses(self, examples, **kw):
            return np.tile(self.seeds_M[:, None] % 97, (1, len(examples))).astype(np.float32)

    def finetune_many(start, examples, subset_idx_MxNs, seeds_M, cfg, tune, **kw):
        calls.append(("finetune", start is START, tune, kw["mesh"]))
        return FakeTuned(np.asarray(seeds_M))

    def train_many(*args, **kw):
        raise AssertionError("a fine-tuning sweep must not train from scratch")

    monkeypatch.setattr(train, "finetune_many", finetune_many)
    monkeypatch.setattr(train, "train_many", train_many)
    mesh = object()  # passed through untouched
    store = _create_ft(tmp_path / "gt")
    groundtruth.run_groundtruth(store, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, start=START, tune=LORA,
                                mesh=mesh, progress=False)
    assert calls == [("finetune", True, LORA, mesh)] * 4 and store.is_complete()
    np.testing.assert_array_equal(store.losses()[..., 0], store.seeds() % 97)
    monkeypatch.undo()
    trainer = _CountingTrainer(monkeypatch, fake=True)
    seen = []
    fake_train = trainer.train_many
    monkeypatch.setattr(train, "train_many", lambda *a, **kw: (seen.append(kw.get("mesh")), fake_train(*a, **kw))[1])
    groundtruth.run_groundtruth(_create(tmp_path / "scratch"), MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, mesh=mesh,
                                progress=False)
    assert seen == [mesh] * 4


# ----------------------------------------------------------------------------- cooperative writers


def test_cooperative_shares_split_the_chunks(tmp_path, monkeypatch):
    """process i of n trains the chunks c with c % n == i; together they make the full store."""
    cfg = _cfg(n_subsets=5, models_per_chunk=2)  # 10 models, chunks 0..4
    full, _ = _run(tmp_path / "full", monkeypatch, fake=True, cfg=cfg)
    _, t0 = _run(tmp_path / "coop", monkeypatch, fake=True, cfg=cfg, process_index=0, process_count=2)
    names = sorted(p.name for p in (tmp_path / "coop").glob("chunk_*.npz"))
    assert names == ["chunk_0_2.npz", "chunk_4_6.npz", "chunk_8_10.npz"] and t0.n_trained == 6
    coop, t1 = _run(tmp_path / "coop", monkeypatch, fake=True, cfg=cfg, process_index=1, process_count=2)
    assert t1.n_trained == 4 and coop.is_complete()
    np.testing.assert_array_equal(GroundTruthStore.open(tmp_path / "coop").losses(), full.losses())
    assert not (tmp_path / "coop" / store_lib.LOCK_FILE).exists()  # no store-wide lock was taken


def test_a_share_is_claimed_by_one_process(tmp_path):
    gt = _create(tmp_path / "gt")
    held = tmp_path / "gt" / groundtruth._SHARES / "1-of-2"
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)")
    held.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", code, str(held / store_lib.LOCK_FILE)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(store_lib.LockedError, match="in use"):
            groundtruth.run_groundtruth(gt, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, progress=False,
                                        max_models=0, process_index=1, process_count=2)
        groundtruth.run_groundtruth(gt, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, progress=False, max_models=0,
                                    process_index=0, process_count=2)  # another share is free
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(ValueError, match="process_index=2"):
        groundtruth.run_groundtruth(gt, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, progress=False,
                                    process_index=2, process_count=2)


def test_fine_tuning_sweep_runs_the_frozen_trunk_once(tmp_path, monkeypatch):
    """A top-layers fine-tuning sweep computes the frozen trunk of the pool and of the queries
    once for all its chunks (not once per chunk), and stores the losses that finetune_many
    without cached hook states gives (the same program: bitwise)."""
    top = train.Tune("top", layers=1)
    cfg = _cfg(n_subsets=2, seeds_per_subset=2, models_per_chunk=2)  # two chunks
    store = _create_ft(tmp_path / "gt", tune=top, cfg=cfg)
    calls = []
    real = train._hook_data
    monkeypatch.setattr(train, "_hook_data", lambda *a, **kw: (calls.append(len(a[2].inputs)), real(*a, **kw))[1])
    groundtruth.run_groundtruth(store, MODEL_CFG, TRAIN_CFG, TRAIN_EX, QUERY_EX, start=START, tune=top,
                                progress=False)
    assert sorted(calls) == sorted([N_TRAIN, N_QUERY]), calls
    monkeypatch.undo()
    tuned = train.finetune_many(START, TRAIN_EX, store.subsets()[:1].repeat(2, 0), store.seeds()[0], TRAIN_CFG, top,
                                progress=False)
    np.testing.assert_array_equal(store.losses()[0], tuned.eval_losses(QUERY_EX))
    with pytest.raises(ValueError, match="hooks were computed for"):
        train.finetune_many(START, TRAIN_EX, store.subsets()[:1], store.seeds()[0, :1], TRAIN_CFG, top,
                            hooks=train.hook_states(START, top, QUERY_EX), progress=False)
