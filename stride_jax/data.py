"""Shipped text corpus, its tokenizer, and the `Examples` container every model consumes.

The corpus mixes three public-domain domains (`SOURCES`; provenance in `assets/SOURCES.md`,
rebuilt by `experiments/build_data.py`). Each source file holds one paragraph per line and
passages separated by an empty line. Every passage is cut into contiguous regions: the first
80% of its paragraphs are `train`, the next 10% `val`, the last 10% `test`, so queries drawn from
`val`/`test` are text the training pool never contains.

An LM example is a chunk of `seq_len + 1` tokens from one source's split (paragraphs joined by
`EOS_TOKEN`): inputs `chunk[:-1]`, targets `chunk[1:]`. Its id is
`source_index * ID_STRIDE + chunk_index`, independent of which other sources or how many chunks
are loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS_DIR / "tokenizer.json"
SOURCES: tuple[str, ...] = ("austen", "shakespeare", "bible")
SPLITS: tuple[str, ...] = ("train", "val", "test")
TRAIN_FRACTION, VAL_FRACTION = 0.8, 0.1
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0
VOCAB_SIZE = 1024
ID_STRIDE = 10**7


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """N examples as host numpy arrays; see docs/interfaces.md.

    inputs `[N, ...]` (LM: int32 `[N, T]`), targets `[N, ...]` int (LM: int32 `[N, T]`),
    ids `[N]` int64 stable ids, texts optional N display strings, sources optional `[N]` int32
    index into `SOURCES`.
    """

    inputs: np.ndarray
    targets: np.ndarray
    ids: np.ndarray
    texts: tuple[str, ...] | None = None
    sources: np.ndarray | None = None

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("inputs", np.asarray(self.inputs))
        set_("targets", np.asarray(self.targets))
        set_("ids", np.asarray(self.ids, dtype=np.int64))
        if self.ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {self.ids.shape}")
        n = self.ids.shape[0]
        for name in ("inputs", "targets"):
            arr = getattr(self, name)
            if arr.ndim == 0 or arr.shape[0] != n:
                raise ValueError(f"{name} has shape {arr.shape}; expected leading axis {n}")
        if not np.issubdtype(self.targets.dtype, np.integer):
            raise ValueError(f"targets must be integers, got {self.targets.dtype}")
        if self.texts is not None:
            set_("texts", tuple(self.texts))
            if len(self.texts) != n:
                raise ValueError(f"got {len(self.texts)} texts for {n} examples")
        if self.sources is not None:
            set_("sources", np.asarray(self.sources, dtype=np.int32))
            if self.sources.shape != (n,):
                raise ValueError(f"sources has shape {self.sources.shape}; expected ({n},)")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, idx: Any) -> Examples:
        """Numpy indexing (int, slice, int array, bool mask) on every field; always an Examples."""
        pos = np.atleast_1d(np.arange(len(self))[idx])
        return Examples(
            inputs=self.inputs[pos],
            targets=self.targets[pos],
            ids=self.ids[pos],
            texts=None if self.texts is None else tuple(self.texts[i] for i in pos),
            sources=None if self.sources is None else self.sources[pos],
        )

    def content_hash(self) -> str:
        """sha256 over dtype, shape and bytes of inputs, targets and ids."""
        h = hashlib.sha256()
        for name in ("inputs", "targets", "ids"):
            arr = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
            h.update(arr.tobytes())
        return h.hexdigest()


# --- Tokenizer -------------------------------------------------------------------------------


def load_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped byte-level BPE as a transformers fast tokenizer (eos = pad = `EOS_TOKEN`)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_FILE), eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def tokenizer_hash() -> str:
    """sha256 of the shipped tokenizer.json (for checkpoint metadata)."""
    return hashlib.sha256(TOKENIZER_FILE.read_bytes()).hexdigest()


def check_vocab(tokenizer: Any, vocab_size: int) -> None:
    """Raise ValueError unless the tokenizer's vocabulary (with added tokens) has `vocab_size`."""
    if hasattr(tokenizer, "get_vocab_size"):
        n = tokenizer.get_vocab_size(with_added_tokens=True)
    else:
        n = len(tokenizer)
    if n != vocab_size:
        raise ValueError(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")


@functools.lru_cache(maxsize=1)
def _raw_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_FILE))
    if tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise ValueError(f"{TOKENIZER_FILE}: {EOS_TOKEN} is not id {EOS_ID}")
    return tok


# --- Text ------------------------------------------------------------------------------------


def available_sources() -> tuple[str, ...]:
    """Sources whose text file ships in `ASSETS_DIR`, in `SOURCES` order."""
    return tuple(s for s in SOURCES if (ASSETS_DIR / f"{s}.txt.gz").is_file())


def split_bounds(n_paragraphs: int) -> tuple[int, int]:
    """(end of train, end of val) paragraph indices of a passage of `n_paragraphs`."""
    return int(n_paragraphs * TRAIN_FRACTION), int(n_paragraphs * (TRAIN_FRACTION + VAL_FRACTION))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if source not in available_sources():
        raise ValueError(f"source {source!r} is missing from {ASSETS_DIR}")


@functools.cache
def _passages(source: str) -> tuple[tuple[str, ...], ...]:
    """The source's passages (lists of paragraphs), read offline through `datasets`."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    path = ASSETS_DIR / f"{source}.txt.gz"
    # Cached under the user's datasets cache (HF_DATASETS_CACHE), never in the package.
    lines = list(datasets.load_dataset("text", data_files=str(path), split="train")["text"])
    passages, cur = [], []
    for line in [*lines, ""]:
        if line:
            cur.append(line)
        elif cur:
            passages.append(tuple(cur))
            cur = []
    return tuple(passages)


def load_paragraphs(source: str, split: str) -> tuple[str, ...]:
    """The paragraphs of one source's split, passages in file order."""
    _check_source(source)
    _check_split(split)
    out: list[str] = []
    for passage in _passages(source):
        a, b = split_bounds(len(passage))
        region = {"train": slice(0, a), "val": slice(a, b), "test": slice(b, None)}[split]
        out.extend(passage[region])
    return tuple(out)


@functools.cache
def _token_stream(source: str, split: str) -> np.ndarray:
    """int32 tokens of a split: the paragraphs' tokens with EOS_ID between them (read-only)."""
    paragraphs = load_paragraphs(source, split)
    encodings = _raw_tokenizer().encode_batch_fast(list(paragraphs), add_special_tokens=False)
    pieces: list[np.ndarray] = []
    eos = np.array([EOS_ID], dtype=np.int32)
    for i, enc in enumerate(encodings):
        if i:
            pieces.append(eos)
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    stream.setflags(write=False)
    return stream


def _chunks(source: str, split: str, seq_len: int) -> np.ndarray:
    """`[C, seq_len + 1]` non-overlapping chunks of the split's token stream (a view)."""
    stream = _token_stream(source, split)
    n = len(stream) // (seq_len + 1)
    if n == 0:
        raise ValueError(
            f"{source}/{split} has {len(stream)} tokens: too short for one chunk of "
            f"seq_len + 1 = {seq_len + 1}"
        )
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


# --- Examples --------------------------------------------------------------------------------


def load_examples(
    split: str = "train",
    seq_len: int = 64,
    sources: Sequence[str] = SOURCES,
    max_per_source: int | None = None,
    seed: int = 0,
) -> Examples:
    """LM examples of `split`, sources concatenated in `SOURCES` order.

    With `max_per_source`, each source contributes a random subset (fixed by `seed`, the split
    and the source; nested as `max_per_source` grows) of that many chunks, or all of them if it
    has fewer, sorted by id.
    """
    _check_split(split)
    if isinstance(sources, str):
        raise ValueError(f"sources must be a sequence of names, got the string {sources!r}")
    if not sources:
        raise ValueError("sources is empty")
    if len(set(sources)) != len(sources):
        raise ValueError(f"duplicate sources in {tuple(sources)}")
    for source in sources:
        _check_source(source)
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if max_per_source is not None and max_per_source < 1:
        raise ValueError(f"max_per_source must be >= 1 or None, got {max_per_source}")
    seq_len = int(seq_len)

    chunk_list, id_list, src_list = [], [], []
    for source in sorted(sources, key=SOURCES.index):
        s = SOURCES.index(source)
        chunks = _chunks(source, split, seq_len)
        idx = np.arange(len(chunks))
        if max_per_source is not None and max_per_source < len(chunks):
            rng = np.random.default_rng([seed, SPLITS.index(split), s])
            idx = np.sort(rng.permutation(len(chunks))[:max_per_source])
        chunk_list.append(chunks[idx])
        id_list.append(s * ID_STRIDE + idx)
        src_list.append(np.full(len(idx), s, dtype=np.int32))
    chunks_NxT1 = np.concatenate(chunk_list)
    texts = _raw_tokenizer().decode_batch(chunks_NxT1.tolist(), skip_special_tokens=False)
    return Examples(
        inputs=np.ascontiguousarray(chunks_NxT1[:, :-1]),
        targets=np.ascontiguousarray(chunks_NxT1[:, 1:]),
        ids=np.concatenate(id_list).astype(np.int64),
        texts=tuple(texts),
        sources=np.concatenate(src_list),
    )


def examples_from_texts(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerFast,
    seq_len: int,
    *,
    truncate: bool = False,
) -> Examples:
    """One LM example per text, each exactly `seq_len + 1` tokens (no padding).

    A text shorter than that raises ValueError; a longer one raises too unless `truncate`, which
    keeps its first `seq_len + 1` tokens. ids are positions 0..len(texts)-1; `texts` holds the
    decoded chunks; `sources` is None.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, not one string")
    if not texts:
        raise ValueError("texts is empty")
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    need = int(seq_len) + 1
    token_lists = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    rows = []
    for i, ids in enumerate(token_lists):
        if len(ids) < need or (len(ids) > need and not truncate):
            hint = "" if len(ids) < need else " (pass truncate=True to keep the first ones)"
            raise ValueError(
                f"text {i} has {len(ids)} tokens; need exactly seq_len + 1 = {need}{hint}"
            )
        rows.append(ids[:need])
    chunks = np.asarray(rows, dtype=np.int32)
    return Examples(
        inputs=chunks[:, :-1],
        targets=chunks[:, 1:],
        ids=np.arange(len(rows), dtype=np.int64),
        texts=tuple(tokenizer.batch_decode(rows, skip_special_tokens=False)),
    )


def count_by_source(examples: Examples) -> dict[str, int]:
    """Number of examples per source name (empty when `examples.sources` is None)."""
    if examples.sources is None:
        return {}
    counts = np.bincount(examples.sources, minlength=len(SOURCES))
    return {name: int(c) for name, c in zip(SOURCES, counts, strict=True) if c}
