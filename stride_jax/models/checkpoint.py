"""Model checkpoints: orbax state + `metadata.json`, written atomically, checked on restore.

A checkpoint directory holds `params/` (orbax `StandardCheckpointer`) and `metadata.json`
({"model_type", "model_config", "format_version", "params_sha256", **metadata}). Both are
written under a temporary name and renamed into place together (`store.atomic_dir`), so a
killed save leaves no directory that looks finished. `load_model` checks `expected` metadata
before restoring (naming every differing field) and the restored parameters against the
recorded sha256, so a corrupted file is an error, never silently changed weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from stride_jax import store

METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 2
_RESERVED = ("model_config", "model_type", "format_version", "params_sha256")


def save_model(model: nnx.Module, directory: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `model`'s state and metadata into `directory`, which must not exist yet."""
    import orbax.checkpoint as ocp

    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(_RESERVED))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved")
    cfg = model.cfg
    state = nnx.state(model)
    meta = store.normalise({"model_type": cfg.model_type, "model_config": cfg.to_dict(),
                            "format_version": FORMAT_VERSION, "params_sha256": store.tree_digest(state),
                            **metadata, **store.provenance()})
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"{directory} already exists; pick a new directory for the checkpoint")
    with store.atomic_dir(directory) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, state)
        checkpointer.wait_until_finished()
        checkpointer.close()
        store.write_json(tmp / METADATA_FILE, meta)
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint (FileNotFoundError / ValueError when absent or corrupt)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no model checkpoint directory at {directory}")
    meta_path, params_dir = directory / METADATA_FILE, directory / PARAMS_DIR
    if not meta_path.is_file() or not params_dir.is_dir():
        raise FileNotFoundError(f"{directory} is not a stride_jax model checkpoint (needs {METADATA_FILE} "
                                f"and {PARAMS_DIR}/)")
    meta = store.read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported checkpoint format {meta.get('format_version')!r} "
                         f"(this code reads {FORMAT_VERSION}); re-save the model")
    return meta


def load_model(
    directory: str | os.PathLike,
    expected: Mapping[str, Any] | None = None,
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Rebuild the model saved by `save_model`.

    `expected` metadata is compared before anything is restored (`store.IdentityError` names
    every differing field). `sharding` places every parameter (default: the first device;
    pass a replicated `NamedSharding` to restore onto a mesh). Restored values are checked
    against the recorded sha256.
    """
    import orbax.checkpoint as ocp

    from stride_jax.models import _build_with_key, config_from_dict

    directory = Path(directory).absolute()
    meta = read_metadata(directory)
    if expected is not None:
        wanted = store.normalise(dict(expected))
        diff = store.differences({k: meta.get(k, "<absent>") for k in wanted}, wanted)
        if diff:
            raise store.IdentityError(f"checkpoint {directory} does not match: " + "; ".join(diff))
    try:
        cfg = config_from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupted checkpoint metadata {directory / METADATA_FILE}: {e!r}") from e
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _build_with_key(cfg, jax.random.key(0))))
    target = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target), abstract)
    checkpointer = ocp.StandardCheckpointer()
    try:
        state = checkpointer.restore(directory / PARAMS_DIR, abstract)
    except Exception as e:  # orbax raises many types; surface one clear error with the path
        raise ValueError(f"could not restore model parameters from {directory / PARAMS_DIR}: {e!r}") from e
    finally:
        checkpointer.close()
    if store.tree_digest(state) != meta.get("params_sha256"):
        raise ValueError(f"model parameters in {directory / PARAMS_DIR} do not match the sha256 recorded in "
                         f"{METADATA_FILE}: the checkpoint is corrupt; delete it to retrain")
    return nnx.merge(graphdef, state), meta
