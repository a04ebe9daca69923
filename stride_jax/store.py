"""One mechanism for everything stride_jax keeps on disk: identities, atomic writes, digests, locks.

Every stored artefact (a model checkpoint, an operator fit, a ground-truth store, a method run)
is a directory with an `identity.json` that records what the artefact depends on: the
fingerprints of the model parameters and the data, the config, and, for information, the
package version and git commit. `open_dir(path, identity)` creates the directory or checks an
existing one; a mismatch raises `IdentityError` naming every differing field. The package
version and git commit are recorded but not compared: a resume after an unrelated commit works.

Writes are atomic: files go to a temporary name in the same directory and are renamed into
place (`atomic_write`); whole directories are built under a temporary name and renamed
(`atomic_dir`), so a half-written artefact is never taken for a finished one. Arrays carry a
sha256 `digest` that is checked when they are read back. `Lock` holds an exclusive advisory
lock (fcntl) on a directory while a run uses it; a second process refuses (or waits).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("stride_jax")

IDENTITY_FILE = "identity.json"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
# Recorded in every identity for provenance, never compared.
INFORMATIONAL = ("package_version", "git_commit", "created")


class IdentityError(ValueError):
    """A stored artefact was made from other inputs than the ones given now."""


class LockedError(RuntimeError):
    """Another process holds the lock on a run directory."""


# ----------------------------------------------------------------------------- fingerprints


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces, no NaN); tuples become lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot fingerprint an object of type {type(obj).__name__}")


def normalise(obj: Any) -> Any:
    """What `obj` reads back as after a JSON round trip."""
    return json.loads(canonical_json(obj))


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def digest(arrays: Mapping[str, Any] | list | tuple) -> str:
    """sha256 over names, dtypes, shapes and bytes of arrays (a mapping, or a list of leaves)."""
    items = arrays.items() if isinstance(arrays, Mapping) else enumerate(arrays)
    h = hashlib.sha256()
    for name, a in sorted(((str(k), v) for k, v in items), key=lambda kv: kv[0]):
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def tree_digest(tree: Any) -> str:
    """digest of a pytree's leaves, keyed by their paths (device arrays are copied to host)."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return digest({jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})


def provenance() -> dict[str, Any]:
    """Package version and git commit (when the package runs from a git checkout)."""
    from stride_jax.version import __version__

    commit = None
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=5, check=True).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"package_version": __version__, "git_commit": commit}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'field: stored X, now Y' for every flattened field that differs (informational ones skipped)."""
    a = flatten({k: v for k, v in normalise(stored).items() if k not in INFORMATIONAL})
    b = flatten({k: v for k, v in normalise(wanted).items() if k not in INFORMATIONAL})
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: stored {_short(a.get(key, '<absent>'))}, now {_short(b.get(key, '<absent>'))}")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


# ----------------------------------------------------------------------------- atomic files


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Any], None]) -> Path:
    """Write bytes, text or `data(file)` to a temporary file beside `path`, then rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(normalise(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is corrupt: delete it to start over") from e


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it to `path` when the block succeeds.

    `path` must not exist yet; on an exception the temporary directory is removed.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-"))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> str:
    """Atomically write arrays with their digest (checked by `load_npz`); returns the digest."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sha = digest(arrays)
    atomic_write(path, lambda f: np.savez(f, __digest__=np.asarray(sha), **arrays))
    return sha


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays written by `save_npz`, after checking their digest."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); delete it to recompute it") from e
    sha = str(arrays.pop("__digest__", ""))
    if digest(arrays) != sha:
        raise ValueError(f"{path} fails its sha256 check (corrupt); delete it to recompute it")
    return arrays


def clean_leftovers(directory: str | os.PathLike, older_than_s: float = 0.0) -> list[str]:
    """Remove temporary files and directories that a killed write left in `directory`."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    now = time.time()
    for p in directory.iterdir():
        if p.name.startswith(TMP_PREFIX) and now - p.stat().st_mtime >= older_than_s:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.info("removed %d leftover temporary file(s) in %s", len(removed), directory)
    return removed


# ----------------------------------------------------------------------------- identity


def check_writable_dir(path: str | os.PathLike, role: str = "output directory") -> Path:
    """`path` as a directory that exists (created) and is writable; clear errors otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{role} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {role} {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{role} {path} is not writable")
    return path


def stored_identity(path: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(path) / IDENTITY_FILE
    if not p.exists():
        return None
    try:
        stored = read_json(p)
    except (OSError, ValueError) as e:  # without its identity the directory cannot be reused: it must go whole
        raise ValueError(f"{p} is unreadable or corrupt; delete the directory {path} to recompute it") from e
    if not isinstance(stored, dict):
        raise ValueError(f"{p} does not hold an identity; delete the directory {path} to recompute it")
    return stored


def check_identity(path: str | os.PathLike, identity: Mapping[str, Any], what: str = "artefact") -> None:
    """Raise `IdentityError` naming the fields where `path`'s stored identity differs."""
    stored = stored_identity(path)
    if stored is None:
        raise IdentityError(f"{path} holds no {IDENTITY_FILE}: it is not a stride_jax {what}")
    diff = differences(stored, identity)
    if diff:
        raise IdentityError(
            f"{what} at {path} was made from other inputs; differing fields: " + "; ".join(diff)
            + f". Use another directory, or delete {path} to recompute it."
        )


def open_dir(path: str | os.PathLike, identity: Mapping[str, Any], what: str = "artefact") -> bool:
    """Create `path` with `identity`, or check an existing one. True when it already existed.

    Checking happens before anything is written, so a rejected rerun changes nothing on disk.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} path {path} is a file, not a directory")
    if (path / IDENTITY_FILE).exists():
        check_identity(path, identity, what)
        clean_leftovers(path)
        return True
    if path.exists() and any(not p.name.startswith((TMP_PREFIX, LOCK_FILE)) for p in path.iterdir()):
        raise ValueError(f"{path} exists and holds files but no {IDENTITY_FILE}: not a stride_jax "
                         f"{what}; use another directory")
    check_writable_dir(path, what + " directory")
    clean_leftovers(path)
    write_json(path / IDENTITY_FILE, {**normalise(identity), **provenance(),
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return False


# ----------------------------------------------------------------------------- lock


class Lock:
    """Exclusive advisory lock on a directory (`<dir>/.lock`), held by one process at a time.

    `Lock(dir)` as a context manager refuses at once with `LockedError` when another process
    holds it, or waits up to `timeout` seconds. The lock dies with the process (fcntl), so a
    killed run never leaves a stale lock behind. Re-entrant within one process. Taking it
    removes the temporary files of killed writes in `dir` (`clean_leftovers`): while the lock
    is held no other process writes there.
    """

    _held: dict[str, int] = {}

    def __init__(self, directory: str | os.PathLike, timeout: float = 0.0):
        self.directory = Path(directory)
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> Lock:
        key = str(self.directory.resolve())
        if key in Lock._held:
            Lock._held[key] += 1
            return self
        check_writable_dir(self.directory, "run directory")
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise LockedError(
                        f"{self.directory} is in use by another process (pid {holder}); wait for it "
                        "to finish or use another directory") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        Lock._held[key] = 1
        clean_leftovers(self.directory)  # no one else writes here while we hold the lock: any .tmp-* is a dead write's
        return self

    def __exit__(self, *exc: Any) -> None:
        key = str(self.directory.resolve())
        Lock._held[key] -= 1
        if Lock._held[key] == 0:
            del Lock._held[key]
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
