"""`stride-jax attribute`: STRIDE on any model and any jsonl/text data, resumable, with top-k texts.

    stride-jax attribute --model SmolLM2-135M-Instruct.Q4_1.gguf --train t.jsonl --queries q.jsonl \
        --out runs/attr

`model` is a GGUF file, a Hugging Face safetensors folder or a stride_jax checkpoint directory
(saved with its tokenizer: `models.save_model(model, dir, tokenizer=tok)`); `train` / `queries`
are jsonl files with `text` or `prompt` + `response` records (only response tokens count), text
files with one example per line, parquet files or `save_to_disk` dataset folders (columns named
by `text_column` / `prompt_column` / `response_column`).

Order of work, so that a mistake costs seconds: the data files are read and checked, the model's
config and tokenizer are read without its weights, the preset is resolved against the pool, the
data are tokenised as the model will see them (chat template included; each file gets its own
length, capped at the model's context; every truncation is counted and reported), and only then
are the weights loaded. The preset, when not given, follows the model (`config.choose_preset`:
`lm` for a stride_jax GPT, `llm-quick` for a pretrained LM, K fitted to the pool).

Writes `out/scores.npz` + `out/attribution.json` (`Attribution.load(out)`: `scores` [N, Q],
positive = helps the query), `out/top_k.jsonl` (per query its most helpful and most harmful
training examples with text and score), `out/config.json` (the resolved StrideConfig, the preset
and why) and the resumable fit in `out/fit`; a rerun after a kill resumes.

`prompts` + `generate` N (instead of `queries`): the model continues each prompt (greedy, or
sampled with `temperature`, `top_p`, `seed`; `generate.generate`) and its own continuations are
the queries, only the generated tokens counting; `out/generations.jsonl` holds each prompt, the
generated text and token ids. `per_token`: every counted token is also scored on its own (the same
fit; `tokens.per_token_queries`): `out/per_token_scores.npz` (scores [N, P]; query_ids, positions,
token_ids, weights [P]) and `out/per_token.jsonl` (per token its text and top-3 helpful / harmful
training examples).
"""

from __future__ import annotations

import logging
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from stride_jax import data, models, store
from stride_jax.attribution import Stride
from stride_jax.config import (StrideConfig, check_design_fits, choose_preset, load_config_file, pool_preset,
                               to_dict)

log = logging.getLogger("stride_jax")

NO_TOKENIZER = ("{path} carries no tokenizer (and is not a model of the shipped corpus); save a stride_jax model "
                "with models.save_model(model, dir, tokenizer=tok), or use a GGUF file or an HF folder with "
                "tokenizer.json")


def load_model(path: str | Path, *, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file, an HF folder or a stride_jax checkpoint."""
    from stride_jax.models.convert import check_tokenizer_vocab, load_pretrained

    pre = load_pretrained(path, dtype=dtype)
    if pre.tokenizer is None:
        raise ValueError(NO_TOKENIZER.format(path=path))
    check_tokenizer_vocab(pre.tokenizer, pre.model.out_dim, str(path))
    return pre.model, pre.tokenizer


def resolve_config(model_cfg: Any, n_train: int, preset: str | None,
                   overrides: dict[str, Any] | None = None) -> tuple[StrideConfig, str, str]:
    """(StrideConfig, preset name, why) for a model of config `model_cfg` and `n_train` examples:
    the given preset, or the one `choose_preset` picks with K fitted to the pool (`pool_preset`);
    `overrides` on top; K resolved for the pool (`resolve_subsets`). K too large for the pool is a
    ValueError that names the fix."""
    overrides = overrides or {}
    if preset is None:
        preset, why = choose_preset(model_cfg, n_train)
        cfg, _ = pool_preset(preset, n_train)
        what = f"the chosen preset {preset!r}"
    else:
        cfg, why, what = StrideConfig.preset(preset), "given by --preset", f"--preset {preset}"
    if overrides:
        cfg, what = cfg.replace(**overrides), what + " with --config"
    cfg = cfg.resolve_subsets(n_train)  # design.n_subsets "auto" (presets lm-auto, llm) -> K for this pool
    check_design_fits(cfg, n_train, what)
    return cfg, preset, why


def attribute(*, model: str, train: str, queries: str | None, out: str, preset: str | None = None,
              config: str | None = None, seq_len: int | None = None, top_k: int = 5, progress: bool = True,
              text_column: str = "text", prompt_column: str = "prompt", response_column: str = "response",
              prompts: str | None = None, generate: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
              seed: int = 0, per_token: bool = False, confidence: int = 0) -> Path:
    """Run STRIDE end to end; returns `out` (`summary(out)` formats its top examples).

    `confidence` > 0: that many bootstrap draws over the operators (re-solves, no refit) give each
    top-k entry a stability and an interval (`confidence.attach`; saved with the scores)."""
    if isinstance(confidence, bool) or not isinstance(confidence, int) or confidence < 0:
        raise ValueError(f"--confidence must be an integer >= 0 (bootstrap draws; 0 = off), got {confidence!r}")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(f"--seq-len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"--top-k must be an integer >= 1, got {top_k!r}")
    overrides = load_config_file(config) if config else {}
    columns = {"text_column": text_column, "prompt_column": prompt_column, "response_column": response_column}
    train_records = data.read_lm_records(train, **columns)  # every data check that needs no tokenizer
    prompt_rows = _read_prompts(queries, prompts, generate, temperature, top_p, prompt_column, text_column)
    query_records = data.read_lm_records(queries, **columns) if prompt_rows is None else None
    if not Path(model).exists():
        raise FileNotFoundError(f"model not found: {model}")
    from stride_jax.models.convert import check_tokenizer_vocab, inspect_pretrained

    info = inspect_pretrained(model)  # config and tokenizer, weights left unread
    if info.tokenizer is None:
        raise ValueError(NO_TOKENIZER.format(path=model))
    check_tokenizer_vocab(info.tokenizer, info.cfg.vocab_size, str(model))
    cfg, preset, why = resolve_config(info.cfg, len(train_records), preset, overrides)
    if confidence and cfg.recovery.solver == "ridge":
        raise ValueError("--confidence resamples the Lasso's operators: it needs recovery.solver 'working_set' or "
                         "'fista', not 'ridge'")
    log.info("preset %s (%s): K=%d subsets, d=%d, %d fit steps", preset, why, cfg.design.n_subsets,
             cfg.design.per_example, cfg.fit.resolve_steps(cfg.design.n_subsets))
    context = models.context_length(info.cfg)
    pool = data.examples_from_records(train_records, info.tokenizer, seq_len, context=context, what=f"--train {train}")
    qs = data.examples_from_records(query_records, info.tokenizer, seq_len, context=context,
                                    what=f"--queries {queries}") if prompt_rows is None else None
    prompt_ids = None if prompt_rows is None else _encode_prompts(prompt_rows, info.tokenizer, generate, context, prompts)
    for path, role in ((train, "train"), (queries, "queries"))[: 1 if qs is None else 2]:
        ex = pool if role == "train" else qs
        log.info("%s: %d examples of up to %d tokens from %s", role, len(ex), ex.inputs.shape[1], path)
    out_dir = store.check_writable_dir(out, "output directory")
    with store.Lock(out_dir):
        t0 = time.perf_counter()
        net, tokenizer = load_model(model)
        fingerprint = data.tokenizer_fingerprint(tokenizer)
        for ex, what in ((pool, f"the examples of --train {train}"), (qs, f"the examples of --queries {queries}")):
            data.check_same_tokenizer(ex, fingerprint, what, model=str(model))
        log.info("model %s: %d layers, vocabulary %d (%.1f s)", model, net.n_layers, net.out_dim,
                 time.perf_counter() - t0)
        if prompt_rows is not None:  # the model's own continuations are the queries
            qs, query_records = _generation_queries(net, tokenizer, prompt_rows, prompt_ids, generate, temperature,
                                                    top_p, seed, out_dir)
        stride = Stride(cfg).fit(net, pool, workdir=out_dir / "fit", progress=progress)
        attr = stride.attribute(qs, progress=progress, confidence=confidence, k=top_k)  # one measurement
        if confidence:
            log.info("confidence: %d bootstrap draws in %.1f s", confidence, attr.confidence_info.get("seconds", 0.0))
        attr.save(out_dir)  # scores.npz + attribution.json (Attribution.load reads them back)
        lines = []
        for q in range(attr.n_query):
            entry = {"query_id": int(qs.ids[q]), "query": qs.texts[q], "record": _record(query_records[q]),
                     "converged": bool(attr.converged[q])}
            for kind, harmful in (("helpful", False), ("harmful", True)):
                entry[kind] = [{"train_id": int(pool.ids[i]), "score": s, "text": pool.texts[i],
                                "record": _record(train_records[i]),
                                **_stability(attr, q, i, harmful)}
                               for i, s in attr.top_k(q, k=min(top_k, attr.n_train), harmful=harmful)]
            lines.append(entry)
        data.write_jsonl(out_dir / "top_k.jsonl", lines)
        if per_token:
            _write_per_token(stride, qs, pool, tokenizer, out_dir, progress=progress)
        store.write_json(out_dir / "config.json", {"stride": to_dict(stride.cfg), "preset": preset,
                                                   "preset_reason": why, "model": str(model), "train": str(train),
                                                   "queries": str(queries), "seq_len": int(pool.inputs.shape[1]),
                                                   "query_seq_len": int(qs.inputs.shape[1]),
                                                   "seconds": {k: round(v, 2) for k, v in stride.timings.items()}})
    log.info("wrote %s (scores.npz, attribution.json, top_k.jsonl, config.json)", out_dir)
    return out_dir


def _stability(attr: Any, q: int, row: int, harmful: bool) -> dict[str, Any]:
    """{"stability", "interval"} of a top-k entry when the attribution carries confidence."""
    if attr.stability is None:
        return {}
    found = attr.confidence_of(q, row, harmful=harmful)
    if found is None:
        return {}
    stability, low, high = found
    return {"stability": stability, "interval": [low, high]}


def _record(r: data.LMRecord) -> dict[str, str]:
    """The record as the user wrote it (no chat template): {"text"} or {"prompt", "response"}."""
    return {"text": r.text} if r.text is not None else {"prompt": r.prompt, "response": r.response}


def _short(record: dict[str, str], width: int) -> str:
    text = record["text"] if "text" in record else f"{record['prompt']} => {record['response']}"
    return repr(textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ..."))


def summary(out: str | Path, k: int = 3, width: int = 72) -> str:
    """The top-`k` helpful training examples of each query of a finished run (short texts with
    scores) and where its files are."""
    out = Path(out)
    lines = ["top training examples per query (score > 0: including the example lowers the query's loss):"]
    entries = _read_jsonl(out / "top_k.jsonl")
    for entry in entries:
        flag = "" if entry["converged"] else "  (recovery not converged: approximate)"
        lines.append(f"query {entry['query_id']}: {_short(entry['record'], width)}{flag}")
        for h in entry["helpful"][:k]:
            stab = f"  stability {h['stability']:.2f}" if "stability" in h else ""
            lines.append(f"  {h['score']:+.3e}{stab}  train {h['train_id']}: {_short(h['record'], width - 10)}")
    lines.append(f"scores: {out / 'scores.npz'} (stride_jax.Attribution.load({str(out)!r}))")
    lines.append(f"a page to look at: stride-jax show {out}")
    lines.append(f"top {len(entries[0]['helpful'])} helpful and harmful per query, with texts: {out / 'top_k.jsonl'}")
    lines.append(f"settings (preset and why): {out / 'config.json'}")
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- generation queries (--prompts, --generate) and per-token outputs (--per-token) -----------


def _read_prompts(queries: str | None, prompts: str | None, generate: int | None, temperature: float,
                  top_p: float, prompt_column: str, text_column: str) -> list[tuple[str, str]] | None:
    """(where, prompt) of every record of `prompts` (its `prompt_column`, else `text_column`; a .txt
    file: one prompt per line), after checking the generation flags; None without --prompts."""
    if prompts is None:
        if generate is not None:
            raise ValueError("--generate needs --prompts (a file of prompts to continue)")
        if queries is None:
            raise ValueError("give --queries (examples to attribute) or --prompts with --generate N")
        return None
    if queries is not None:
        raise ValueError("give --queries or --prompts, not both")
    if generate is None or isinstance(generate, bool) or not isinstance(generate, int) or generate < 1:
        raise ValueError(f"--prompts needs --generate N (new tokens per prompt, an integer >= 1), got {generate!r}")
    if not 0.0 <= float(temperature) < float("inf"):
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"--top-p must lie in (0, 1], got {top_p}")
    rows = data._read_rows(prompts)
    if not rows:
        raise ValueError(f"{prompts} is empty: it holds no prompts")
    out = []
    for where, r in rows:
        text = r.get(prompt_column, r.get(text_column)) if isinstance(r, dict) else None
        if not isinstance(text, str) or not text.strip():
            fields = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise ValueError(f"{where} has no non-empty '{prompt_column}' (or '{text_column}') field (fields: {fields})")
        out.append((where, text))
    return out


def _encode_prompts(prompt_rows: list[tuple[str, str]], tokenizer: Any, generate: int, context: int | None,
                    path: str) -> list[list[int]]:
    """The prompts' token ids as the model will see them (chat template included); each plus
    `generate` new tokens must fit the context (checked before the weights load)."""
    from stride_jax.generate import encode_prompts

    ids = encode_prompts(tokenizer, [p for _, p in prompt_rows])
    for (where, _), t in zip(prompt_rows, ids):
        if context is not None and len(t) + generate > context:
            raise ValueError(f"{where}: the prompt is {len(t)} tokens (chat template included); with --generate "
                             f"{generate} that exceeds the model's context of {context}")
    log.info("prompts: %d from %s, up to %d tokens, %d new tokens each", len(ids), path, max(map(len, ids)), generate)
    return ids


def _generation_queries(net: Any, tokenizer: Any, prompt_rows: list[tuple[str, str]], prompt_ids: list[list[int]],
                        generate: int, temperature: float, top_p: float, seed: int,
                        out_dir: Path) -> tuple[data.Examples, list[data.LMRecord]]:
    """The model's continuations of the prompts as queries (only generated tokens count) and as
    records for top_k.jsonl; writes `generations.jsonl` (prompt, generated text, token ids)."""
    from stride_jax import generate as gen_lib

    t0 = time.perf_counter()
    eos = data._eos_id(tokenizer)
    gen = gen_lib.generate(net, prompt_ids, generate, temperature=temperature, top_p=top_p, seed=seed, eos_id=eos,
                           pad_id=data._pad_id(tokenizer))
    qs = gen_lib.generation_examples(tokenizer, gen.prompts(), gen.continuations())
    texts = gen_lib.decode(tokenizer, gen.continuations())
    settings = {"n_new": generate, "temperature": float(temperature), "top_p": float(top_p), "seed": int(seed)}
    lines, records = [], []
    for q, ((where, prompt), text) in enumerate(zip(prompt_rows, texts)):
        lines.append({"query_id": int(qs.ids[q]), "prompt": prompt, "generated": text,
                      "prompt_ids": gen.prompts()[q], "generated_ids": gen.continuations()[q],
                      "stopped_at_eos": bool(gen.stopped_B[q]), **settings})
        records.append(data.LMRecord(None, prompt, text, where))
    data.write_jsonl(out_dir / "generations.jsonl", lines)
    log.info("generated %d tokens for %d prompts (%.1f s; generations.jsonl)", int(gen.n_generated_B.sum()),
             len(lines), time.perf_counter() - t0)
    return qs, records


def _write_per_token(stride: Stride, qs: data.Examples, pool: data.Examples, tokenizer: Any, out_dir: Path, *,
                     k: int = 3, progress: bool = True) -> None:
    """Scores of every counted token of every query (the same fit; `tokens.per_token_queries`):
    `per_token_scores.npz` (scores [N, P], train_ids, query_ids and positions [P] of each token,
    token_ids, weights) and `per_token.jsonl` (one line per token: its text and top-`k` helpful
    and harmful training examples)."""
    from stride_jax import tokens

    tq = tokens.per_token_queries(qs)
    log.info("per-token scores: %d tokens of %d queries", len(tq.examples), len(qs))
    attr = stride.attribute(tq.examples, progress=progress)
    token_ids = tq.examples.targets[np.arange(len(tq.positions)), tq.positions]
    rows = {int(i): r for r, i in enumerate(qs.ids)}
    w_P = tokens._weights(qs)[[rows[int(i)] for i in tq.owner_ids], tq.positions]
    store.save_npz(out_dir / "per_token_scores.npz", {
        "scores": attr.dense(), "train_ids": attr.train_ids, "query_ids": tq.owner_ids, "positions": tq.positions,
        "token_ids": token_ids, "weights": w_P, "converged": np.asarray(attr.converged)})
    lines = []
    for p, text in enumerate(tokens.token_texts(tokenizer, tq)):
        entry = {"query_id": int(tq.owner_ids[p]), "position": int(tq.positions[p]), "token": text,
                 "token_id": int(token_ids[p]), "converged": bool(attr.converged[p])}
        for kind, harmful in (("helpful", False), ("harmful", True)):
            entry[kind] = [{"train_id": int(pool.ids[i]), "score": s, "text": pool.texts[i]}
                           for i, s in attr.top_k(p, k=min(k, attr.n_train), harmful=harmful)]
        lines.append(entry)
    data.write_jsonl(out_dir / "per_token.jsonl", lines)


__all__ = ["attribute", "load_model", "resolve_config", "summary"]
