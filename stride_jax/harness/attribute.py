"""`stride-jax attribute`: STRIDE on any model and any jsonl/text data, resumable, with top-k texts.

    stride-jax attribute --model SmolLM2-135M-Instruct.Q4_1.gguf --train t.jsonl --queries q.jsonl \
        --out runs/attr --preset llm-quick

`model` is a GGUF file, a Hugging Face safetensors folder or a stride_jax checkpoint directory;
`train` / `queries` are jsonl files with `text` or `prompt` + `response` records (only response
tokens count) or text files with one example per line. Writes `out/scores.npz` +
`out/attribution.json` (`Attribution.load(out)`: `scores` [N, Q], positive = helps the query,
`train_ids`, `query_ids`, per-query `converged` and duality `gap`), `out/top_k.jsonl` (per query its
most helpful and most harmful training examples with text and score), `out/config.json` (the
resolved StrideConfig) and the resumable fit in `out/fit`; a rerun after a kill resumes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from stride_jax import data, models, store
from stride_jax.attribution import Stride
from stride_jax.config import StrideConfig, load_config_file, to_dict

log = logging.getLogger("stride_jax")


def load_model(path: str | Path, *, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file, an HF folder or a stride_jax checkpoint."""
    from stride_jax.models.convert import load_pretrained

    pre = load_pretrained(path, dtype=dtype)
    tokenizer = pre.tokenizer
    if tokenizer is None and pre.metadata.get("tokenizer_hash") == data.tokenizer_hash():
        tokenizer = data.load_tokenizer()  # a model trained on the shipped corpus
    if tokenizer is None:
        raise ValueError(f"{path} carries no tokenizer (and is not a model of the shipped corpus); "
                         "use a GGUF file or an HF folder with tokenizer.json")
    from stride_jax.models.convert import check_tokenizer_vocab

    check_tokenizer_vocab(tokenizer, pre.model.out_dim, str(path))
    return pre.model, tokenizer


def _examples(path: str | Path, tokenizer: Any, seq_len: int | None, context: int, role: str) -> data.Examples:
    if seq_len is None:  # the longest example, capped at the context
        records = data.read_records(path)
        texts = [r.get("text") or (str(r.get("prompt", "")) + str(r.get("response", ""))) for r in records]
        longest = max(len(t) for t in data._encode(tokenizer, texts)) + 2  # + eos, + the chat template's few
        seq_len = min(max(longest, 2), context)
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's context of {context}")
    ex = data.load_jsonl(path, tokenizer, seq_len, truncate=True)
    log.info("%s: %d examples of %d tokens from %s", role, len(ex), ex.inputs.shape[1], path)
    return ex


def attribute(*, model: str, train: str, queries: str, out: str, preset: str = "lm", config: str | None = None,
              seq_len: int | None = None, top_k: int = 5, progress: bool = True) -> Path:
    """Run STRIDE end to end; returns `out`."""
    overrides = load_config_file(config) if config else {}
    cfg = StrideConfig.preset(preset, **overrides) if overrides else StrideConfig.preset(preset)
    for p in (train, queries):
        if not Path(p).is_file():
            raise FileNotFoundError(f"data file not found: {p}")
    if not Path(model).exists():
        raise FileNotFoundError(f"model not found: {model}")
    out_dir = store.check_writable_dir(out, "output directory")
    with store.Lock(out_dir):
        t0 = time.perf_counter()
        net, tokenizer = load_model(model)
        context = models.context_length(net.cfg) or 10**9
        log.info("model %s: %d layers, vocabulary %d (%.1f s)", model, net.n_layers, net.out_dim,
                 time.perf_counter() - t0)
        pool = _examples(train, tokenizer, seq_len, context, "train")
        qs = _examples(queries, tokenizer, pool.inputs.shape[1] if seq_len is None else seq_len, context, "queries")
        stride = Stride(cfg).fit(net, pool, workdir=out_dir / "fit", progress=progress)
        attr = stride.attribute(qs, progress=progress)
        attr.save(out_dir)  # scores.npz + attribution.json (Attribution.load reads them back)
        lines = []
        for q in range(attr.n_query):
            entry = {"query_id": int(qs.ids[q]), "query": qs.texts[q], "converged": bool(attr.converged[q])}
            for kind, harmful in (("helpful", False), ("harmful", True)):
                entry[kind] = [{"train_id": int(pool.ids[i]), "score": s, "text": pool.texts[i]}
                               for i, s in attr.top_k(q, k=top_k, harmful=harmful)]
            lines.append(entry)
        data.write_jsonl(out_dir / "top_k.jsonl", lines)
        store.write_json(out_dir / "config.json", {"stride": to_dict(stride.cfg), "preset": preset,
                                                   "model": str(model), "train": str(train), "queries": str(queries),
                                                   "seq_len": int(pool.inputs.shape[1]),
                                                   "seconds": {k: round(v, 2) for k, v in stride.timings.items()}})
    log.info("wrote %s (scores.npz, attribution.json, top_k.jsonl, config.json)", out_dir)
    return out_dir


__all__ = ["attribute", "load_model"]
