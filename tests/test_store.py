"""store: identities name what differs, writes are atomic, digests catch corruption, locks exclude."""

import multiprocessing
import os

import numpy as np
import pytest

from stride_jax import store


def test_identity_mismatch_names_every_differing_field(tmp_path):
    ident = {"model": "abc", "config": {"fit": {"steps": 10, "learning_rate": 0.1}}}
    assert store.open_dir(tmp_path / "a", ident) is False
    assert store.open_dir(tmp_path / "a", ident) is True  # same inputs: reused
    changed = {"model": "xyz", "config": {"fit": {"steps": 10, "learning_rate": 0.2}}}
    before = sorted(os.listdir(tmp_path / "a"))
    with pytest.raises(store.IdentityError, match=r"config\.fit\.learning_rate: stored 0\.1, now 0\.2.*model"):
        store.open_dir(tmp_path / "a", changed)
    assert sorted(os.listdir(tmp_path / "a")) == before  # a rejected rerun changes nothing on disk


def test_provenance_is_recorded_but_not_compared(tmp_path):
    store.open_dir(tmp_path / "a", {"x": 1})
    stored = store.stored_identity(tmp_path / "a")
    assert "package_version" in stored and "git_commit" in stored
    stored["package_version"] = "0.0.0-other"
    store.write_json(tmp_path / "a" / store.IDENTITY_FILE, stored)
    assert store.open_dir(tmp_path / "a", {"x": 1}) is True


def test_directory_without_identity_is_not_taken_over(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "precious.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a stride_jax"):
        store.open_dir(tmp_path / "a", {"x": 1})
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        store.open_dir(tmp_path / "f", {"x": 1})


def test_npz_digest_detects_a_flipped_bit(tmp_path):
    path = tmp_path / "a.npz"
    store.save_npz(path, {"w": np.arange(1000, dtype=np.float32)})
    np.testing.assert_array_equal(store.load_npz(path)["w"], np.arange(1000, dtype=np.float32))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256|unreadable"):
        store.load_npz(path)


def test_atomic_dir_leaves_nothing_on_failure_and_leftovers_are_cleaned(tmp_path):
    with pytest.raises(RuntimeError):
        with store.atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("killed")
    assert not (tmp_path / "ckpt").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    (tmp_path / f"{store.TMP_PREFIX}stale.npz").write_text("x")
    assert store.clean_leftovers(tmp_path) == [f"{store.TMP_PREFIX}stale.npz"]


def _hold(path, ready, release):
    with store.Lock(path):
        ready.set()
        release.wait(30)


def test_second_process_is_refused_while_the_lock_is_held(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    proc.start()
    try:
        assert ready.wait(60)
        with pytest.raises(store.LockedError, match="in use by another process"):
            with store.Lock(tmp_path):
                pass
    finally:
        release.set()
        proc.join(30)
    with store.Lock(tmp_path, timeout=5):  # free again once the holder exits
        with store.Lock(tmp_path):  # re-entrant in one process
            pass


def test_differences_flattens_nested_fields():
    assert store.differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c: stored 2, now 3"]
    assert store.differences({"a": 1}, {"a": 1, "created": "x"}) == []


def test_a_corrupt_identity_says_to_delete_the_directory_and_that_works(tmp_path):
    store.open_dir(tmp_path / "a", {"x": 1})
    (tmp_path / "a" / "result.npz").write_bytes(b"data")
    (tmp_path / "a" / store.IDENTITY_FILE).write_text("{torn")
    with pytest.raises(ValueError, match=f"delete the directory {tmp_path / 'a'}"):
        store.open_dir(tmp_path / "a", {"x": 1})
    (tmp_path / "a" / store.IDENTITY_FILE).unlink()  # deleting the file alone is a dead end: refused, named
    with pytest.raises(ValueError, match="use another directory"):
        store.open_dir(tmp_path / "a", {"x": 1})
    import shutil

    shutil.rmtree(tmp_path / "a")  # what the message says
    assert store.open_dir(tmp_path / "a", {"x": 1}) is False


def test_taking_the_lock_removes_the_temporaries_of_killed_writes(tmp_path):
    (tmp_path / ".tmp-abc.npz").write_bytes(b"half")
    (tmp_path / ".tmp-dir-xyz").mkdir()
    (tmp_path / "kept.npz").write_bytes(b"done")
    with store.Lock(tmp_path):
        (tmp_path / ".tmp-mine.json").write_text("in flight")
        with store.Lock(tmp_path):  # re-entrant: never removes the holder's own writes
            pass
        assert (tmp_path / ".tmp-mine.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".tmp-mine.json", "kept.npz"]
