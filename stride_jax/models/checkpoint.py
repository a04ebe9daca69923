"""Model checkpoints: orbax state + `metadata.json`, written atomically, checked on restore.

A checkpoint directory holds `params/` (orbax `StandardCheckpointer`), `metadata.json`
({"model_type", "model_config", "format_version", "params_sha256", **metadata}) and, when the
model's tokenizer is known, `tokenizer/` (transformers files; its fingerprint is recorded as
"tokenizer_fingerprint", so `stride-jax attribute` can load the model with its tokenizer). All are
written under a temporary name and renamed into place together (`store.atomic_dir`), so a
killed save leaves no directory that looks finished. `load_model` checks `expected` metadata
before restoring (naming every differing field) and the restored parameters against the
recorded sha256, so a corrupted file is an error, never silently changed weights.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from stride_jax import store

METADATA_FILE = "metadata.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 2
_RESERVED = ("model_config", "model_type", "format_version", "params_sha256", "tokenizer_fingerprint")
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its tokenizer


def attach_tokenizer(model: nnx.Module, tokenizer: Any) -> None:
    """Record which tokenizer made `model`'s token ids (the loaders do it; `save_model` saves it and
    `Stride.fit` refuses a pool tokenised by another one)."""
    if tokenizer is not None:
        _TOKENIZERS[model] = tokenizer


def model_tokenizer(model: Any) -> Any:
    """The tokenizer recorded for `model` by `attach_tokenizer`, or None."""
    try:
        return _TOKENIZERS.get(model)
    except TypeError:  # not weak-referenceable: nothing was recorded
        return None


def check_tokenizer_of(model: Any, examples: Any, what: str) -> None:
    """ValueError when `examples` carry another tokenizer than the one recorded for `model` (the
    ids of one tokenizer are often in range for another's vocabulary, yet mean other words)."""
    from stride_jax import data

    tokenizer = model_tokenizer(model)
    if tokenizer is not None:
        data.check_same_tokenizer(examples, data.tokenizer_fingerprint(tokenizer), what)


def _savable_tokenizer(tokenizer: Any) -> Any:
    """A transformers fast tokenizer for `tokenizer` (the shipped one keeps its eos / pad tokens)."""
    from stride_jax import data

    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    fingerprint = data.tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        raise TypeError(f"cannot save a tokenizer of type {type(tokenizer).__name__}: pass a transformers fast "
                        "tokenizer or a tokenizers.Tokenizer")
    if fingerprint == data.tokenizer_fingerprint(data.corpus_tokenizer()):
        return data.load_tokenizer()
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def load_tokenizer(directory: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Any:
    """The tokenizer of a checkpoint: its `tokenizer/` folder (checked against the recorded
    fingerprint), the shipped tokenizer when `tokenizer_hash` names it, else None."""
    from stride_jax import data

    directory = Path(directory)
    meta = read_metadata(directory) if meta is None else meta
    folder = directory / TOKENIZER_DIR
    if (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        recorded, found = meta.get("tokenizer_fingerprint"), data.tokenizer_fingerprint(tok)
        if recorded is not None and recorded != found:
            raise ValueError(f"{folder} holds another tokenizer than the one the model was saved with "
                             f"(fingerprint {found[:12]} vs {recorded[:12]} in {METADATA_FILE})")
        return tok
    if meta.get("tokenizer_hash") == data.tokenizer_hash():
        return data.load_tokenizer()  # a model of the shipped corpus, saved with its tokenizer's hash
    return None


def save_model(model: nnx.Module, directory: str | os.PathLike, metadata: Mapping[str, Any] | None = None, *,
               tokenizer: Any = None) -> Path:
    """Write `model`'s state and metadata into `directory`, which must not exist yet.

    `tokenizer` (default: the one attached to the model, if any) is saved in `tokenizer/`, so
    `load_pretrained` and `stride-jax attribute` load the model with it.
    """
    import orbax.checkpoint as ocp

    from stride_jax import data

    metadata = dict(metadata or {})
    clash = sorted(set(metadata) & set(_RESERVED))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved")
    tokenizer = model_tokenizer(model) if tokenizer is None else tokenizer
    if tokenizer is not None:
        tokenizer = _savable_tokenizer(tokenizer)
        vocab = getattr(model.cfg, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}")
        metadata["tokenizer_fingerprint"] = data.tokenizer_fingerprint(tokenizer)
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
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
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

    from stride_jax.models.registry import _build_with_key, config_from_dict

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
