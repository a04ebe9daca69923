"""`Examples`, the container every model and method consumes, and ways to build them.

- `Examples`: inputs, targets, ids, and for token data a padding mask and a loss mask; texts are
  derived from the tokens whenever a tokenizer is attached, so the two cannot drift apart
  (docs/interfaces.md states the contract).
- From your own data: `examples_from_texts` (chunk a corpus into fixed windows, or one padded
  example per text), `examples_from_pairs` (prompt + response; the loss counts response tokens
  only, the prompt optionally wrapped by the tokenizer's chat template), `load_jsonl` (a jsonl
  file with `text`, or `prompt` + `response` fields, read with `datasets`; a `.txt` file is one
  example per line).
- The shipped corpus: three public-domain sources (`SOURCES`; provenance in
  `assets/SOURCES.md`, rebuilt by `experiments/build_data.py`), one paragraph per line and
  passages separated by an empty line. Each passage is cut into contiguous regions: the first
  80% of its paragraphs are `train`, the next 10% `val`, the last 10% `test`, so queries from
  `val`/`test` are text the training pool never contains. `load_examples` cuts a split into
  chunks of `seq_len + 1` tokens (paragraphs joined by `EOS_TOKEN`) with stable ids
  `split_index * ID_SPLIT + source_index * ID_STRIDE + chunk_index` (train: split_index 0).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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
ID_SPLIT = 10**8  # ids of val / test chunks are offset by their split, so they never collide


def _readonly(a: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """`a` as a read-only array; a writeable caller's array is copied first, so that editing
    it afterwards cannot change the Examples."""
    if a.flags.writeable and copy:
        a = a.copy()
    a.setflags(write=False)
    return a


def _decode(tokenizer: Any, rows: list[list[int]]) -> tuple[str, ...]:
    if hasattr(tokenizer, "batch_decode"):  # transformers
        return tuple(tokenizer.batch_decode(rows, skip_special_tokens=False))
    return tuple(tokenizer.decode_batch(rows, skip_special_tokens=False))  # tokenizers.Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """N examples as read-only host numpy arrays (docs/interfaces.md).

    inputs `[N, ...]` (LM: int token ids `[N, T]`; classifier: float features `[N, F]`),
    targets `[N, ...]` int (LM: next tokens `[N, T]`; classifier: labels `[N]`), ids `[N]` unique
    int64. Token data may carry `mask` `[N, T]` (1 = real input token, 0 = padding; None = all
    real) and `loss_mask` `[N, T]` (weight in [0, 1] of each target in the example's loss; None =
    every real position). `texts` are N display strings; with a `tokenizer` attached they are
    decoded from the tokens (giving both raises unless they agree), so editing tokens (with
    `replace`) re-derives them. `sources` optional `[N]` int index into `SOURCES`.
    """

    inputs: np.ndarray
    targets: np.ndarray
    ids: np.ndarray
    mask: np.ndarray | None = None
    loss_mask: np.ndarray | None = None
    texts: tuple[str, ...] | None = None
    sources: np.ndarray | None = None
    tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("inputs", _readonly(np.asarray(self.inputs)))
        set_("targets", _readonly(np.asarray(self.targets)))
        set_("ids", _readonly(np.asarray(self.ids, dtype=np.int64)))
        if self.ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {self.ids.shape}")
        n = self.ids.shape[0]
        for name in ("inputs", "targets"):
            arr = getattr(self, name)
            if arr.ndim == 0 or arr.shape[0] != n:
                raise ValueError(f"{name} has shape {arr.shape}; expected leading axis {n} (one per id)")
        if not np.issubdtype(self.targets.dtype, np.integer):
            raise ValueError(f"targets must be integers, got {self.targets.dtype}")
        if n and len(np.unique(self.ids)) != n:
            _, counts = np.unique(self.ids, return_counts=True)
            raise ValueError(f"ids must be unique: {int((counts > 1).sum())} ids appear more than once")
        for name in ("mask", "loss_mask"):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.asarray(arr, dtype=np.float32)
            if arr.shape != self.targets.shape or self.targets.ndim != 2:
                raise ValueError(f"{name} must be [N, T] like the targets {self.targets.shape}, got {arr.shape}")
            if not np.all((arr >= 0) & (arr <= 1)):
                raise ValueError(f"{name} values must lie in [0, 1]")
            set_(name, _readonly(arr))
        if self.mask is not None:
            if np.any(np.diff(self.mask, axis=1) > 0) or np.any(self.mask[:, 0] == 0):
                raise ValueError("mask must mark right padding: each row is ones (real tokens) then zeros")
            if self.loss_mask is not None and np.any(self.loss_mask > self.mask):
                raise ValueError("loss_mask is nonzero at padded positions (where mask is 0)")
        if self.loss_mask is not None and n and not np.all(self.loss_mask.sum(axis=1) > 0):
            empty = np.flatnonzero(self.loss_mask.sum(axis=1) == 0)
            raise ValueError(f"{empty.size} examples have an all-zero loss_mask (no target counts; "
                             f"first: id {int(self.ids[empty[0]])}): an empty response?")
        if self.sources is not None:
            set_("sources", _readonly(np.asarray(self.sources, dtype=np.int32)))
            if self.sources.shape != (n,):
                raise ValueError(f"sources has shape {self.sources.shape}; expected ({n},)")
        if self.tokenizer is not None:
            derived = _decode(self.tokenizer, self.token_rows())
            if self.texts is not None and tuple(self.texts) != derived:
                raise ValueError("texts do not match the tokens decoded by the tokenizer; pass one or the "
                                 "other (with a tokenizer, texts are derived from the tokens)")
            set_("texts", derived)
        elif self.texts is not None:
            set_("texts", tuple(self.texts))
            if len(self.texts) != n:
                raise ValueError(f"got {len(self.texts)} texts for {n} examples")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def loss_weights(self) -> np.ndarray | None:
        """[N, T] weight of each position in every loss: `loss_mask`, else the padding `mask`, else
        None (every position counts). The one place this rule lives."""
        return self.loss_mask if self.loss_mask is not None else self.mask

    def device_batch(self, idx: np.ndarray | None = None) -> tuple[Any, Any, Any, Any]:
        """(inputs, targets, padding mask or None, loss weights or None) as device arrays, of rows
        `idx` (all rows when None): the one batching helper of training, measurement and baselines."""
        import jax.numpy as jnp

        pick = (lambda a: a) if idx is None else (lambda a: np.asarray(a)[idx])
        put = lambda a: None if a is None else jnp.asarray(pick(a))  # noqa: E731
        return put(self.inputs), put(self.targets), put(self.mask), put(self.loss_weights)

    @property
    def is_tokens(self) -> bool:
        return self.targets.ndim == 2

    def token_rows(self) -> list[list[int]]:
        """Each LM example's real tokens (first input, then every target), padding removed."""
        full = np.concatenate([self.inputs[:, :1], self.targets], axis=1)
        if self.mask is None:
            return full.tolist()
        lengths = self.mask.sum(axis=1).astype(int) + 1
        return [row[:length].tolist() for row, length in zip(full, lengths)]

    def replace(self, **changes: Any) -> Examples:
        """A copy with fields replaced (texts re-derived from new tokens when a tokenizer is attached)."""
        if self.tokenizer is not None and "texts" not in changes:
            changes["texts"] = None
        return dataclasses.replace(self, **changes)

    def __getitem__(self, idx: Any) -> Examples:
        """Numpy indexing (int, slice, int array, bool mask) on every field; always an Examples."""
        pos = np.atleast_1d(np.arange(len(self))[idx])
        sub = object.__new__(Examples)
        take = lambda a: None if a is None else _readonly(a[pos], copy=False)
        for f in ("inputs", "targets", "ids", "mask", "loss_mask", "sources"):
            object.__setattr__(sub, f, take(getattr(self, f)))
        object.__setattr__(sub, "texts", None if self.texts is None else tuple(self.texts[i] for i in pos))
        object.__setattr__(sub, "tokenizer", self.tokenizer)
        return sub

    def content_hash(self) -> str:
        """sha256 over dtype, shape and bytes of inputs, targets, ids and the masks."""
        h = hashlib.sha256()
        for name in ("inputs", "targets", "ids", "mask", "loss_mask"):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.ascontiguousarray(arr)
            h.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
            h.update(arr.tobytes())
        return h.hexdigest()


def concat(*parts: Examples) -> Examples:
    """Rows of each part in order (ids must stay unique)."""
    if not parts:
        raise ValueError("concat needs at least one Examples")
    fields: dict[str, Any] = {}
    for name in ("inputs", "targets", "ids", "mask", "loss_mask", "sources"):
        arrays = [getattr(p, name) for p in parts]
        if any(a is None for a in arrays):
            if name in ("mask", "loss_mask") and not all(a is None for a in arrays):
                arrays = [np.ones(p.targets.shape, np.float32) if a is None else a for p, a in zip(parts, arrays)]
            else:
                fields[name] = None
                continue
        fields[name] = np.concatenate(arrays)
    tokenizer = parts[0].tokenizer if all(p.tokenizer is parts[0].tokenizer for p in parts) else None
    if tokenizer is None:
        fields["texts"] = None if any(p.texts is None for p in parts) else sum((p.texts for p in parts), ())
    return Examples(**fields, tokenizer=tokenizer)


# --- Building LM examples from token lists, texts, pairs, files ------------------------------


def _check_seq_len(seq_len: Any) -> int:
    if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    return int(seq_len)


def lm_examples(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    *,
    mode: str = "chunk",
    pad_id: int = 0,
    eos_id: int | None = None,
    loss_from: Sequence[int] | None = None,
    truncate: bool = False,
    drop_last: bool = False,
    ids: Sequence[int] | None = None,
    tokenizer: Any = None,
) -> Examples:
    """LM examples of `seq_len` inputs from token lists.

    mode="chunk": the lists joined (with `eos_id` between them when given) and cut into
      consecutive windows of `seq_len + 1` tokens; a short last window is right-padded and
      masked, or dropped with `drop_last`. ids are window indices.
    mode="pad": one example per list, right-padded with `pad_id` (masked out); a list longer
      than `seq_len + 1` raises unless `truncate` keeps its first tokens. `loss_from[i]` is the
      position in list i of the first token whose prediction counts (prompt/response data: the
      first response token); earlier targets get loss weight 0. ids default to 0..N-1.
    """
    seq_len = _check_seq_len(seq_len)
    if mode not in ("chunk", "pad"):
        raise ValueError(f"mode must be 'chunk' or 'pad', got {mode!r}")
    if isinstance(token_lists, (str, bytes)) or not len(token_lists):
        raise ValueError("token_lists must be a non-empty sequence of token lists")
    width = seq_len + 1
    if mode == "chunk":
        if loss_from is not None:
            raise ValueError("loss_from needs mode='pad' (one example per prompt/response pair)")
        pieces = []
        for i, t in enumerate(token_lists):
            if i and eos_id is not None:
                pieces.append(np.asarray([eos_id], np.int64))
            pieces.append(np.asarray(t, np.int64))
        stream = np.concatenate(pieces)
        n_full, rest = divmod(len(stream), width)
        rows = [stream[i * width:(i + 1) * width] for i in range(n_full)]
        if rest >= 2 and not drop_last:
            rows.append(stream[n_full * width:])
        if not rows:
            raise ValueError(f"the texts hold {len(stream)} tokens: too few for one example of seq_len + 1 = "
                             f"{width} (use mode='pad' for short texts)")
        starts = None
    else:
        rows, starts = [], []
        for i, t in enumerate(token_lists):
            t = np.asarray(t, np.int64)
            if len(t) < 2:
                raise ValueError(f"example {i} has {len(t)} tokens: need at least 2 (one input, one target)")
            if len(t) > width:
                if not truncate:
                    raise ValueError(f"example {i} has {len(t)} tokens, more than seq_len + 1 = {width}; "
                                     "raise seq_len or pass truncate=True")
                t = t[:width]
            rows.append(t)
            starts.append(0 if loss_from is None else int(loss_from[i]))
    n = len(rows)
    full = np.full((n, width), pad_id, np.int64)
    real = np.zeros((n, width), bool)
    for i, r in enumerate(rows):
        full[i, :len(r)] = r
        real[i, :len(r)] = True
    lo, hi = int(full.min()), int(full.max())
    if lo < 0 or hi >= 2**31:
        raise ValueError(f"token ids must be non-negative int32, got range [{lo}, {hi}]")
    mask = real[:, 1:].astype(np.float32)  # input t is real iff target t is real (right padding)
    loss = mask.copy()
    if starts is not None:
        for i, s in enumerate(starts):
            s = max(s, 1)  # the first token is never predicted
            if s >= len(rows[i]):
                raise ValueError(f"example {i}: its response starts at token {s} of {len(rows[i])}; the "
                                 "response is empty or was truncated away")
            loss[i, : s - 1] = 0.0
    padded = not real.all()
    return Examples(
        inputs=full[:, :-1].astype(np.int32), targets=full[:, 1:].astype(np.int32),
        ids=np.arange(n) if ids is None else np.asarray(ids),
        mask=mask if padded else None, loss_mask=loss if (padded or starts is not None and any(starts)) else None,
        tokenizer=tokenizer,
    )


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _eos_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "eos_token_id", None)


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else (_eos_id(tokenizer) or 0))


def examples_from_texts(
    texts: Sequence[str], tokenizer: Any, seq_len: int, *, mode: str = "chunk", truncate: bool = False,
    drop_last: bool = False, add_eos: bool = True,
) -> Examples:
    """LM examples from any texts: chunked windows of a corpus, or one padded example per text.

    See `lm_examples` for the modes; texts are separated by (chunk) or end with (pad) the
    tokenizer's eos token when it has one and `add_eos`. Texts are derived from the tokens.
    """
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    token_lists = _encode(tokenizer, texts)
    eos = _eos_id(tokenizer) if add_eos else None
    if mode == "pad" and eos is not None:
        token_lists = [list(t) + [eos] for t in token_lists]
    return lm_examples(token_lists, seq_len, mode=mode, pad_id=_pad_id(tokenizer),
                       eos_id=eos if mode == "chunk" else None, truncate=truncate, drop_last=drop_last,
                       tokenizer=tokenizer)


def examples_from_pairs(
    prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, seq_len: int, *,
    chat_template: bool = True, truncate: bool = False,
) -> Examples:
    """One example per (prompt, response); only the response tokens count in the loss.

    With `chat_template` (and a tokenizer that has one) the prompt is wrapped as a user turn
    with the assistant prefix (`apply_chat_template(..., add_generation_prompt=True)`) and the
    response ends with the eos token. Prompt and response are tokenised separately, so the
    boundary is exact.
    """
    if len(prompts) != len(responses) or not len(prompts):
        raise ValueError(f"need as many prompts as responses (> 0), got {len(prompts)} and {len(responses)}")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"response {i} is empty: nothing to attribute")
    prompts = templated_prompts(prompts, tokenizer, chat_template)
    eos = _eos_id(tokenizer)
    p_tok, r_tok = _encode(tokenizer, prompts), _encode(tokenizer, responses)
    if eos is not None:
        r_tok = [list(r) + [eos] for r in r_tok]
    return lm_examples([list(p) + list(r) for p, r in zip(p_tok, r_tok)], seq_len, mode="pad",
                       pad_id=_pad_id(tokenizer), loss_from=[len(p) for p in p_tok], truncate=truncate,
                       tokenizer=tokenizer)


def instruction_examples(
    pairs: Sequence[tuple[str, str]], tokenizer: Any, seq_len: int, *, min_response_tokens: int = 8,
    seed: int = 0, chat_template: bool = True, limit: int | None = None,
) -> Examples:
    """Examples of the (prompt, response) pairs whose templated prompt leaves at least
    `min_response_tokens` of `seq_len` for the response (longer responses are truncated), in a
    shuffled order (`seed`), at most `limit` of them; ids are the pairs' indices. Only response
    tokens count in the loss (`examples_from_pairs`)."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    prompts = templated_prompts([pairs[i][0] for i in order], tokenizer, chat_template)
    keep = [int(i) for i, t in zip(order, _encode(tokenizer, prompts)) if len(t) <= seq_len - min_response_tokens]
    keep = keep[:limit] if limit is not None else keep
    if not keep:
        raise ValueError(f"none of {len(pairs)} pairs leaves >= {min_response_tokens} response tokens at "
                         f"seq_len {seq_len}")
    ex = examples_from_pairs([pairs[i][0] for i in keep], [pairs[i][1] for i in keep], tokenizer, seq_len,
                             chat_template=chat_template, truncate=True)
    return dataclasses.replace(ex, ids=np.asarray(keep))


def templated_prompts(prompts: Sequence[str], tokenizer: Any, chat_template: bool = True) -> list[str]:
    """Each prompt as a user turn + the assistant prefix under the tokenizer's chat template (as
    `examples_from_pairs` wraps them); unchanged without a template or with chat_template=False."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return list(prompts)


def read_instruction_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) of every record of a .json list or .jsonl file: `prompt` + `response`
    fields, the alpaca layout `instruction` [+ `input`, joined by a blank line] + `output`, or the
    OpenAI evals layout `input` (chat messages; their contents joined by blank lines) + `ideal`
    (the first of a list)."""
    path = Path(path)
    if path.suffix == ".json":
        import json

        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} as a JSON list of records: {e}") from e
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    else:
        records = read_records(path)
    out = []
    for i, r in enumerate(records):
        text = lambda k: r.get(k) if isinstance(r, dict) and isinstance(r.get(k), str) else None
        if text("prompt") is not None and text("response") is not None:
            prompt, response = text("prompt"), text("response")
        elif text("instruction") is not None and text("output") is not None:
            prompt = text("instruction").strip()
            if (text("input") or "").strip():
                prompt += "\n\n" + text("input").strip()
            response = text("output")
        elif isinstance(r, dict) and r.get("input") is not None and r.get("ideal") is not None:
            prompt, response = _evals_pair(r, f"{path}: record {i}")
        else:
            fields = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise ValueError(f"{path}: record {i} has neither 'prompt' + 'response', 'instruction' + 'output' "
                             f"nor 'input' + 'ideal' (fields: {fields})")
        if not response.strip():
            raise ValueError(f"{path}: record {i} has an empty response: nothing to attribute")
        out.append((prompt, response.strip()))
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def _evals_pair(r: dict[str, Any], where: str) -> tuple[str, str]:
    messages, ideal = r["input"], r["ideal"]
    if isinstance(messages, str):
        prompt = messages
    elif isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                            for m in messages):
        prompt = "\n\n".join(m["content"].strip() for m in messages)
    else:
        raise ValueError(f"{where}: 'input' must be a string or a list of chat messages with 'content'")
    if isinstance(ideal, list):
        ideal = ideal[0] if ideal else ""
    if not isinstance(ideal, str):
        raise ValueError(f"{where}: 'ideal' must be a string or a list of strings, got {type(ideal).__name__}")
    return prompt, ideal


DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".text", ".parquet")


def _where(path: Path, kind: str, i: int) -> str:
    return f"{path} {kind} {i}"


def _read_rows(path: str | Path) -> list[tuple[str, Any]]:
    """(where, raw record) of every record of a data file or `save_to_disk` folder, in order.

    jsonl (and JSON-lines .json): parsed line by line, so a bad line is named by its number; a
    .json holding one JSON list is read whole; .txt: one {"text": line} per non-blank line;
    .parquet and a folder written by `datasets.Dataset.save_to_disk`: read with `datasets`.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise ValueError(f"{path} is a folder but not a Hugging Face dataset written by save_to_disk "
                             "(it has no dataset_info.json)")
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises several types for a damaged folder
            raise ValueError(f"cannot read {path} as a Hugging Face dataset: {type(e).__name__}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path} holds the splits {sorted(ds)} and no 'train' split; save one split")
            ds = ds["train"]
        return [(_where(path, "row", i), dict(r)) for i, r in enumerate(ds)]
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix not in DATA_SUFFIXES:
        raise ValueError(f"{path}: expected a .jsonl (or .json) file, a .txt file (one example per line), a "
                         ".parquet file or a Hugging Face dataset folder (save_to_disk)")
    if path.suffix == ".parquet":
        import datasets

        try:
            ds = datasets.Dataset.from_parquet(str(path))
        except Exception as e:  # pyarrow / datasets errors of several types
            raise ValueError(f"cannot read {path} as parquet: {type(e).__name__}: {e}") from e
        return [(_where(path, "row", i), dict(r)) for i, r in enumerate(ds)]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    lines = text.splitlines()
    if path.suffix in (".txt", ".text"):
        return [(_where(path, "line", i + 1), {"text": line}) for i, line in enumerate(lines) if line.strip()]
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except ValueError as e:
            raise ValueError(f"cannot read {path} as a JSON list of records: {e}") from e
        return [(_where(path, "record", i), r) for i, r in enumerate(records)]
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append((_where(path, "line", i + 1), json.loads(line)))
        except ValueError as e:
            raise ValueError(f"cannot read {path}: line {i + 1} is not valid JSON ({e})") from None
    return rows


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records (JSON objects) of a data file or dataset folder (see `_read_rows` for the formats).

    An empty file, a line that is not valid JSON and a record that is not an object (a list, a
    number) are each one ValueError naming the file and the line or row.
    """
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} is empty: it holds no records")
    for where, r in rows:
        if not isinstance(r, dict):
            raise ValueError(f"{where} is a JSON {type(r).__name__}, not an object of named fields "
                             "(e.g. {\"text\": ...} or {\"prompt\": ..., \"response\": ...})")
    return [r for _, r in rows]


class LMRecord(NamedTuple):
    """One LM example as read from a file: a `text` (every token counts) or `prompt` + `response`
    (only the response counts); `where` names the file and line / row for messages."""

    text: str | None
    prompt: str | None
    response: str | None
    where: str


def read_lm_records(path: str | Path, *, text_column: str = "text", prompt_column: str = "prompt",
                    response_column: str = "response") -> list[LMRecord]:
    """Every record of `path` as an `LMRecord`, checked (no tokenizer, no model needed).

    A record needs a string `text_column`, or string `prompt_column` and `response_column` (a
    non-blank response); anything else is one ValueError naming the file and the line or row.
    """
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} is empty: it holds no records")
    out = []
    is_str = lambda r, k: isinstance(r.get(k), str)  # datasets fills a field absent from a row with None
    for i, (where, r) in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{where} is a JSON {type(r).__name__}, not an object with a '{text_column}' field "
                             f"or '{prompt_column}' + '{response_column}' fields")
        if is_str(r, prompt_column) and is_str(r, response_column):
            if not r[response_column].strip():
                raise ValueError(f"{where}: the '{response_column}' is empty: nothing to attribute")
            out.append(LMRecord(None, r[prompt_column], r[response_column], where))
        elif is_str(r, text_column):
            if not r[text_column].strip():
                raise ValueError(f"{where}: the '{text_column}' is empty")
            out.append(LMRecord(r[text_column], None, None, where))
        else:
            fields = sorted(k for k, v in r.items() if v is not None)
            raise ValueError(f"{where}: record {i} has neither a '{text_column}' field nor '{prompt_column}' and "
                             f"'{response_column}' (fields: {fields}); name the columns with --text-column, "
                             "--prompt-column and --response-column")
    return out


def tokenize_records(records: Sequence[LMRecord], tokenizer: Any, *,
                     chat_template: bool = True) -> tuple[list[list[int]], list[int]]:
    """(tokens, loss start) of each record exactly as the model will see it: a text + eos, or the
    prompt under the chat template (when the tokenizer has one) + the response + eos; the loss
    start is the position of the first counted token (0 for a text)."""
    eos = _eos_id(tokenizer)
    tail = [eos] if eos is not None else []
    texts = [r for r in records if r.text is not None]
    pairs = [r for r in records if r.text is None]
    text_tok = iter(_encode(tokenizer, [r.text for r in texts]) if texts else [])
    prompt_tok = iter(_encode(tokenizer, templated_prompts([r.prompt for r in pairs], tokenizer, chat_template))
                      if pairs else [])
    response_tok = iter(_encode(tokenizer, [r.response for r in pairs]) if pairs else [])
    token_lists, starts = [], []
    for r in records:
        if r.text is not None:
            token_lists.append(list(next(text_tok)) + tail)
            starts.append(0)
        else:
            p = list(next(prompt_tok))
            token_lists.append(p + list(next(response_tok)) + tail)
            starts.append(len(p))
    return token_lists, starts


class Truncation(NamedTuple):
    """What cutting token lists to `seq_len + 1` tokens loses."""

    n_examples: int
    n_cut: int  # examples longer than seq_len + 1 tokens
    tokens_total: int
    tokens_lost: int
    longest: int  # tokens of the longest example (seq_len = longest - 1 keeps everything)

    def message(self, what: str, seq_len: int) -> str:
        return (f"{what}: {self.n_cut} of {self.n_examples} examples cut to seq_len + 1 = {seq_len + 1} tokens, "
                f"{self.tokens_lost} of {self.tokens_total} tokens lost ({self.tokens_lost / self.tokens_total:.0%}); "
                f"the longest has {self.longest} tokens (seq_len {self.longest - 1} keeps all)")


def count_truncation(token_lists: Sequence[Sequence[int]], seq_len: int, *, loss_from: Sequence[int] | None = None,
                     where: Sequence[str] | None = None) -> Truncation:
    """Count what cutting each list to `seq_len + 1` tokens loses; a ValueError (naming `where[i]`)
    when an example's counted tokens (from `loss_from[i]` on, the response) would be cut away entirely."""
    width = _check_seq_len(seq_len) + 1
    lengths = np.asarray([len(t) for t in token_lists], np.int64)
    if loss_from is not None:
        for i, (n, s) in enumerate(zip(lengths, loss_from)):
            if n > width and max(int(s), 1) >= width:
                name = where[i] if where is not None else f"example {i}"
                raise ValueError(f"{name}: the response starts at token {max(int(s), 1)} (chat template included) "
                                 f"of {n}, beyond seq_len + 1 = {width}: it would be cut away entirely; raise "
                                 "seq_len or shorten the prompt")
    lost = np.maximum(lengths - width, 0)
    return Truncation(len(lengths), int((lost > 0).sum()), int(lengths.sum()), int(lost.sum()),
                      int(lengths.max(initial=0)))


def examples_from_records(records: Sequence[LMRecord], tokenizer: Any, seq_len: int | None = None, *,
                          context: int | None = None, chat_template: bool = True, what: str = "examples",
                          ids: Sequence[int] | None = None) -> Examples:
    """One padded example per record (see `tokenize_records`), every truncation counted.

    `seq_len` None: the longest record's length as the model sees it (chat template and eos
    included), capped at `context`. Examples longer than `seq_len + 1` tokens are cut, and a
    warning (on the "stride_jax" logger) gives the counts; a response cut away entirely is a
    ValueError naming its file and line. ids default to the record indices.
    """
    if not records:
        raise ValueError(f"{what}: no records")
    token_lists, starts = tokenize_records(records, tokenizer, chat_template=chat_template)
    longest = max(len(t) for t in token_lists)
    if seq_len is None:
        seq_len = max(longest - 1, 2) if context is None else min(max(longest - 1, 2), context)
    elif context is not None and seq_len > context:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context of {context}")
    cut = count_truncation(token_lists, seq_len, loss_from=starts, where=[r.where for r in records])
    if cut.n_cut:
        logging.getLogger("stride_jax").warning(cut.message(what, seq_len))
    return lm_examples(token_lists, seq_len, mode="pad", pad_id=_pad_id(tokenizer), loss_from=starts, truncate=True,
                       ids=ids, tokenizer=tokenizer)


def load_jsonl(path: str | Path, tokenizer: Any, seq_len: int, *, mode: str | None = None,
               truncate: bool = False, chat_template: bool = True) -> Examples:
    """Examples from a jsonl file of `text` records and/or `prompt` + `response` records (or a
    .txt / .parquet file or a `save_to_disk` folder; see `read_lm_records`).

    A `text` record is one padded example (every token counts; or chunked windows of all the
    texts with mode="chunk"); a prompt/response record counts only its response tokens (see
    `examples_from_pairs`). ids are the record (or window) index. An example longer than
    `seq_len + 1` tokens raises, or with `truncate` is cut with a warning giving the counts.
    """
    records = read_lm_records(path)
    if mode == "chunk":
        if any(r.text is None for r in records):
            raise ValueError(f"{path}: mode='chunk' takes text records only")
        return examples_from_texts([r.text for r in records], tokenizer, seq_len, mode="chunk", truncate=truncate)
    if not truncate:
        token_lists, _ = tokenize_records(records, tokenizer, chat_template=chat_template)
        width = _check_seq_len(seq_len) + 1
        for r, t in zip(records, token_lists):
            if len(t) > width:
                raise ValueError(f"{r.where} has {len(t)} tokens, more than seq_len + 1 = {width}; raise seq_len "
                                 "or pass truncate=True")
    return examples_from_records(records, tokenizer, seq_len, chat_template=chat_template, what=str(path))


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of what fixes a tokenizer's ids (vocabulary, merges, normalizer, pre-tokenizer, added
    tokens) for a `tokenizers.Tokenizer` or a transformers fast tokenizer; None for other objects.
    Equal for the same tokenizer however it was loaded (file, GGUF metadata, saved folder)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        return None
    spec = json.loads(backend.to_str())
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])
    ident = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer")}
    return hashlib.sha256(json.dumps([ident, added], sort_keys=True).encode()).hexdigest()


def check_same_tokenizer(examples: Any, fingerprint: str | None, what: str, *, model: str = "the model") -> None:
    """ValueError unless `examples` were tokenised by the tokenizer of `fingerprint` (skipped when
    either side is unknown): ids of another tokenizer are in range yet mean other words."""
    if fingerprint is None:
        return
    theirs = tokenizer_fingerprint(getattr(examples, "tokenizer", None))
    if theirs is not None and theirs != fingerprint:
        raise ValueError(f"{what} were tokenised by another tokenizer than {model}'s (tokenizer sha256 "
                         f"{theirs[:12]} vs {fingerprint[:12]}): rebuild them with the model's tokenizer")


# --- The shipped tokenizer -------------------------------------------------------------------


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
def corpus_tokenizer() -> Tokenizer:
    """The shipped tokenizer as a `tokenizers.Tokenizer` (what `load_examples` decodes with)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_FILE))
    if tok.token_to_id(EOS_TOKEN) != EOS_ID:
        raise ValueError(f"{TOKENIZER_FILE}: {EOS_TOKEN} is not id {EOS_ID}")
    return tok


# --- The shipped corpus ----------------------------------------------------------------------


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
    """The source's passages (tuples of paragraphs)."""
    with gzip.open(ASSETS_DIR / f"{source}.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
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
    encodings = corpus_tokenizer().encode_batch_fast(list(paragraphs), add_special_tokens=False)
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


def load_examples(
    split: str = "train",
    seq_len: int = 64,
    sources: Sequence[str] = SOURCES,
    max_per_source: int | None = None,
    seed: int = 0,
) -> Examples:
    """LM examples of the shipped corpus's `split`, sources concatenated in `SOURCES` order.

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
    seq_len = _check_seq_len(seq_len)
    if max_per_source is not None and max_per_source < 1:
        raise ValueError(f"max_per_source must be >= 1 or None, got {max_per_source}")

    chunk_list, id_list, src_list = [], [], []
    for source in sorted(sources, key=SOURCES.index):
        s = SOURCES.index(source)
        chunks = _chunks(source, split, seq_len)
        idx = np.arange(len(chunks))
        if max_per_source is not None and max_per_source < len(chunks):
            rng = np.random.default_rng([seed, SPLITS.index(split), s])
            idx = np.sort(rng.permutation(len(chunks))[:max_per_source])
        chunk_list.append(chunks[idx])
        id_list.append(SPLITS.index(split) * ID_SPLIT + s * ID_STRIDE + idx)
        src_list.append(np.full(len(idx), s, dtype=np.int32))
    chunks_NxT1 = np.concatenate(chunk_list)
    return Examples(
        inputs=np.ascontiguousarray(chunks_NxT1[:, :-1]),
        targets=np.ascontiguousarray(chunks_NxT1[:, 1:]),
        ids=np.concatenate(id_list).astype(np.int64),
        sources=np.concatenate(src_list),
        tokenizer=corpus_tokenizer(),
    )


def count_by_source(examples: Examples) -> dict[str, int]:
    """Number of examples per source name (empty when `examples.sources` is None)."""
    if examples.sources is None:
        return {}
    counts = np.bincount(examples.sources, minlength=len(SOURCES))
    return {name: int(c) for name, c in zip(SOURCES, counts, strict=True) if c}


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write records as json lines (a helper for fixtures and exports)."""
    from stride_jax import store

    return store.atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
