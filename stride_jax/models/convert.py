"""Pretrained Llama-family checkpoints in and out: GGUF and HF safetensors -> `Llama` -> safetensors.

    load_gguf(path)        one .gguf file (llama.cpp): weights dequantised to float32, tokenizer and
                           chat template rebuilt from the metadata
    load_hf(folder)        config.json + model.safetensors (or sharded model-0000x-of-0000y with
                           model.safetensors.index.json) + tokenizer files, as HF writes them
    save_hf(model, folder) the inverse of load_hf (float32 weights, half-split RoPE layout)
    load_pretrained(path)  any of the above, or a stride_jax checkpoint directory (models.save_model)
    inspect_pretrained(path) the model config and tokenizer of any of these, without the weights
                           (seconds, where loading a GGUF takes minutes: check data first)

Every importer goes through one table of HF parameter names (`hf_param_map`), checks names and
shapes (listing the first few unknown / missing ones) and the tokenizer against the embedding
before any array reaches JAX. Supported: Llama, SmolLM (GGUF architecture / HF model_type
"llama") and Qwen2 ("qwen2", q/k/v biases). No RoPE scaling, sliding windows or o/MLP biases.

RoPE layout. llama.cpp's converter permutes the rows of every Llama Q and K projection head from
HF's half-split order (pairs i, i + H/2) into the interleaved order (pairs 2i, 2i + 1). A GGUF
"llama" model is therefore loaded as is, with `rope_layout="interleaved"` (no row shuffling,
exactly llama.cpp's function); GGUF "qwen2" is not permuted (llama.cpp runs it in NEOX = half
form). `save_hf` undoes the permutation so that any HF reader gets the half-split layout.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.models.llama import Llama, LlamaConfig

GGUF_ARCHITECTURES = {"llama": "interleaved", "qwen2": "half"}  # architecture -> RoPE layout of its Q/K rows
HF_MODEL_TYPES = ("llama", "qwen2")
_N_LISTED = 5  # how many unknown / missing names an error lists


class Pretrained(NamedTuple):
    """A loaded checkpoint: the model, its tokenizer (or None), chat template and provenance.

    metadata: {"format": "gguf" | "hf" | "stride_jax", "source": absolute path, "architecture",
    "quantisation": {tensor type: count} (GGUF), "notes": [str, ...], ...}.
    """

    model: Llama
    tokenizer: Any  # transformers.PreTrainedTokenizerFast | None
    chat_template: str | None
    metadata: dict[str, Any]


# ----------------------------------------------------------------------------- parameter names


def hf_param_map(cfg: LlamaConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """HF parameter name -> (path of the nnx Param in `Llama`, whether the HF array is its transpose)."""
    m: dict[str, tuple[tuple[Any, ...], bool]] = {
        "model.embed_tokens.weight": (("embed", "embedding"), False),
        "model.norm.weight": (("final_norm", "scale"), False),
    }
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        m[p + "input_layernorm.weight"] = (("blocks", i, "attn_norm", "scale"), False)
        m[p + "post_attention_layernorm.weight"] = (("blocks", i, "mlp_norm", "scale"), False)
        for n in ("q", "k", "v", "o"):
            m[p + f"self_attn.{n}_proj.weight"] = (("blocks", i, "attn", f"{n}_proj", "kernel"), True)
        if cfg.qkv_bias:
            for n in ("q", "k", "v"):
                m[p + f"self_attn.{n}_proj.bias"] = (("blocks", i, "attn", f"{n}_proj", "bias"), False)
        for n in ("gate", "up", "down"):
            m[p + f"mlp.{n}_proj.weight"] = (("blocks", i, "mlp", f"{n}_proj", "kernel"), True)
    return m


_GGUF_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


def gguf_to_hf_name(name: str) -> str | None:
    """The HF name of a llama.cpp tensor name (None when it has no counterpart here)."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _GGUF_BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK_NAMES[m.group(2)]}"
    return None


def hf_to_gguf_name(name: str) -> str:
    """Inverse of `gguf_to_hf_name`."""
    top = {v: k for k, v in _GGUF_TOP_NAMES.items()}
    if name in top:
        return top[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    block = {v: k for k, v in _GGUF_BLOCK_NAMES.items()}
    if m and m.group(2) in block:
        return f"blk.{m.group(1)}.{block[m.group(2)]}"
    raise KeyError(f"no GGUF name for {name}")


def _listed(names: list[str]) -> str:
    head = ", ".join(names[:_N_LISTED])
    return head + (f", ... ({len(names)} in all)" if len(names) > _N_LISTED else "")


def _check_names(found: set[str], expected: set[str], source: str, ignored: set[str] = frozenset()) -> None:
    unknown = sorted(found - expected - ignored)
    if unknown:
        raise ValueError(f"{source}: unknown tensor names {_listed(unknown)} (a Llama/Qwen2 model with this "
                         "config has none of them; unsupported architecture variant?)")
    missing = sorted(expected - found)
    if missing:
        raise ValueError(f"{source}: missing tensors {_listed(missing)}")


def _interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-split -> llama.cpp interleaved order of the rows within each head (Q/K weights, biases)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _half_split_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `_interleave_rows`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_from_hf_arrays(cfg: LlamaConfig, arrays: Mapping[str, np.ndarray], source: str = "checkpoint",
                         ignored: set[str] = frozenset()) -> Llama:
    """Build a `Llama` from HF-named arrays (HF shapes, [out, in]) without any random init.

    Q/K rows must already be in `cfg.rope_layout` order. Names and shapes are checked first.
    """
    pmap = hf_param_map(cfg)
    _check_names(set(arrays), set(pmap), source, ignored)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    variables = {}
    for name, (path, transpose) in pmap.items():
        var = model
        for p in path:
            var = var[p] if isinstance(p, int) else getattr(var, p)
        want = tuple(var.get_value().shape)
        got = np.shape(arrays[name])
        if (got[::-1] if transpose else got) != want:
            hf_want = want[::-1] if transpose else want
            raise ValueError(f"{source}: tensor {name} has shape {tuple(got)}, expected {hf_want} for {cfg}")
        variables[name] = (var, transpose)
    for name, (var, transpose) in variables.items():
        a = np.asarray(arrays[name], dtype=np.float32)
        var.set_value(jnp.asarray(np.ascontiguousarray(a.T) if transpose else a))
    return model


def hf_arrays_from_model(model: Llama) -> dict[str, np.ndarray]:
    """The model's parameters under HF names and shapes, Q/K rows in HF's half-split order (float32)."""
    cfg = model.cfg
    out = {}
    for name, (path, transpose) in hf_param_map(cfg).items():
        var = model
        for p in path:
            var = var[p] if isinstance(p, int) else getattr(var, p)
        a = np.asarray(var.get_value(), dtype=np.float32)
        a = a.T if transpose else a
        if cfg.rope_layout == "interleaved" and re.search(r"\.self_attn\.[qk]_proj\.", name):
            a = _half_split_rows(a, cfg.n_heads if ".q_proj." in name else cfg.n_kv_heads)
        out[name] = np.ascontiguousarray(a)
    return out


def check_tokenizer_vocab(tokenizer: Any, vocab_size: int, source: str, exact: bool = False) -> None:
    """Every token id of `tokenizer` must index the embedding (exactly its rows when `exact`)."""
    n = len(tokenizer)
    if n > vocab_size or (exact and n != vocab_size):
        raise ValueError(f"{source}: vocab mismatch: the tokenizer has {n} tokens but the embedding has "
                         f"{vocab_size} rows")


# ----------------------------------------------------------------------------- GGUF


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A GGUF metadata value as Python (str, int, float, bool or a list of them); `default` if absent.

    Decoded from `ReaderField.parts` / `data` / `types` (gguf >= 0.10; `contents()` is 0.16+).
    """
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        return default
    kind = f.types[0] if f.types else None
    if kind == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if kind == GGUFValueType.ARRAY:
        item = f.types[1] if len(f.types) > 1 else None
        if item == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        if item == GGUFValueType.ARRAY:
            raise ValueError(f"GGUF metadata {key}: nested arrays are not supported")
        return [f.parts[i][0].item() for i in f.data]
    return f.parts[f.data[0]][0].item()


def config_from_gguf(reader: Any, *, dtype: str = "float32", source: str = "gguf") -> LlamaConfig:
    """LlamaConfig from GGUF metadata (architecture, sizes, RoPE) and the embedding's shape."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported (supported: "
                         f"{sorted(GGUF_ARCHITECTURES)})")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ValueError(f"{source}: missing tensors token_embd.weight")
    vocab_size, d_model = int(emb.shape[1]), int(emb.shape[0])  # GGUF shapes are [ne0 = in, ne1 = out]
    meta_vocab = _field(reader, f"{arch}.vocab_size")
    if meta_vocab is not None and int(meta_vocab) != vocab_size:
        raise ValueError(f"{source}: vocab mismatch: {arch}.vocab_size={meta_vocab} but token_embd has "
                         f"{vocab_size} rows")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    n_heads = int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", 0) or 0)
    if head_dim and head_dim == d_model // n_heads:
        head_dim = 0
    names = {t.name for t in reader.tensors}
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        d_model=int(need("embedding_length")),
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        ffn_dim=int(need("feed_forward_length")),
        max_len=int(need("context_length")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_layout=GGUF_ARCHITECTURES[arch],
        rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        head_dim=head_dim,
        dtype=dtype,
    )
    if cfg.d_model != d_model:
        raise ValueError(f"{source}: {arch}.embedding_length={cfg.d_model} but token_embd is {d_model} wide")
    rope_dim = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != cfg.resolved_head_dim:
        raise ValueError(f"{source}: partial RoPE ({arch}.rope.dimension_count={rope_dim} of head dim "
                         f"{cfg.resolved_head_dim}) is not supported")
    return cfg


# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> how `tokenizers` splits words the same way
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt-2", "gpt2", "mpt", "olmo", "jais")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE_TOKENIZERS = _DIGITS_THEN_GPT2 + _GPT2 + ("qwen2", "stablelm2", "llama-bpe", "llama3")


def _pre_tokenizer(pre: str, source: str) -> tuple[Any, bool]:
    """(`tokenizers` pre-tokenizer, ignore_merges) equivalent to llama.cpp's pre-tokenizer `pre`."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in _GPT2:
        return byte_level, False
    if pre in ("qwen2", "stablelm2", "llama-bpe", "llama3"):
        regex = _QWEN2_REGEX if pre in ("qwen2", "stablelm2") else _LLAMA3_REGEX
        seq = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        return seq, pre in ("llama-bpe", "llama3")
    raise ValueError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: "
                     f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}); pass tokenizer=False to load the weights only")


def tokenizer_from_gguf(reader: Any, source: str = "gguf") -> Any:
    """`transformers.PreTrainedTokenizerFast` rebuilt from a GGUF's byte-level BPE metadata.

    Vocabulary, merges, pre-tokenizer (`tokenizer.ggml.pre`), control / user-defined tokens,
    bos / eos / pad / unk ids, whether to prepend bos, and `tokenizer.chat_template`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
                         "'gpt2'); pass tokenizer=False to load the weights only")
    tokens = list(_field(reader, "tokenizer.ggml.tokens") or [])
    merges = list(_field(reader, "tokenizer.ggml.merges") or [])
    if not tokens:
        raise ValueError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens")
    types = list(_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        dup = [t for t, c in Counter(tokens).items() if c > 1]
        raise ValueError(f"{source}: duplicate tokens in tokenizer.ggml.tokens: {_listed(dup)}")
    pre_tok, ignore_merges = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "gpt-2"), source)
    try:
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                         byte_fallback=False, ignore_merges=ignore_merges)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise ValueError(f"{source}: inconsistent GGUF tokenizer vocabulary / merges: {e}") from e
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == 3])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4])

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = {k: v for k, v in (("bos_token", bos), ("eos_token", token("eos")), ("pad_token", token("padding")),
                                  ("unk_token", token("unknown"))) if v is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **specials)
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", tokenizer: bool = True) -> Pretrained:
    """A Llama / SmolLM / Qwen2 GGUF file as a float32-parameter `Llama` (+ tokenizer, chat template).

    Quantised tensors (Q4_1, Q8_0, ...) are dequantised with `gguf.quants.dequantize`; the
    metadata records which types were found. numpy shapes are the reversed GGUF shapes.
    """
    import gguf

    path = Path(path).absolute()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    source = str(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError / struct errors on non-GGUF input
        raise ValueError(f"{source} is not a readable GGUF file: {e!r}") from e
    cfg = config_from_gguf(reader, dtype=dtype, source=source)
    expected = set(hf_param_map(cfg))
    by_hf = {gguf_to_hf_name(t.name): t for t in reader.tensors}
    unknown = sorted(t.name for t in reader.tensors if gguf_to_hf_name(t.name) not in expected)
    if unknown:
        raise ValueError(f"{source}: unknown tensor names {_listed(unknown)} (a {cfg.n_layers}-block "
                         f"{'Qwen2' if cfg.qkv_bias else 'Llama'} model has none of them; unsupported variant?)")
    missing = sorted(hf_to_gguf_name(n) for n in expected - set(by_hf))
    if missing:
        raise ValueError(f"{source}: missing tensors {_listed(missing)}")
    tok = None
    if tokenizer:
        field = reader.fields.get("tokenizer.ggml.tokens")
        n_tokens = len(field.data) if field is not None else 0
        if n_tokens != cfg.vocab_size:
            raise ValueError(f"{source}: vocab mismatch: the tokenizer has {n_tokens} tokens but the embedding "
                             f"has {cfg.vocab_size} rows")
        tok = tokenizer_from_gguf(reader, source)
        check_tokenizer_vocab(tok, cfg.vocab_size, source, exact=True)
    qtypes = Counter(t.tensor_type.name for t in reader.tensors)
    arrays = {}
    for hf, t in by_hf.items():
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        arrays[hf] = np.asarray(a, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    model = model_from_hf_arrays(cfg, arrays, source)
    lossy = sorted(q for q in qtypes if q not in ("F32", "F16", "BF16"))
    notes = []
    if lossy:
        notes.append(f"weights dequantised from {', '.join(lossy)} to float32: the quantised values are the "
                     "model (no higher-precision copy is in the file)")
    if cfg.rope_layout == "interleaved":
        notes.append("Q/K rows in llama.cpp's interleaved RoPE order (rope_layout='interleaved')")
    meta = {"format": "gguf", "source": source, "architecture": _field(reader, "general.architecture"),
            "name": _field(reader, "general.name"), "license": _field(reader, "general.license"),
            "quantisation": dict(sorted(qtypes.items())), "notes": notes, "model_config": cfg.to_dict()}
    template = _field(reader, "tokenizer.chat_template")
    _attach(model, tok)
    return Pretrained(model, tok, template or None, meta)


# ----------------------------------------------------------------------------- HF safetensors


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32", source: str = "config.json") -> LlamaConfig:
    """LlamaConfig from an HF config.json dict (Llama / SmolLM / Qwen2; transformers 4 or 5 layout)."""
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported (supported: {list(HF_MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    if hf.get("mlp_bias") or hf.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias / mlp_bias (o_proj or MLP biases) are not supported")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{source}: sliding-window attention is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"{source}: RoPE scaling {rope_type!r} is not supported")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_heads = int(hf["num_attention_heads"])
    d_model = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or 0)
    if head_dim == d_model // n_heads:
        head_dim = 0
    try:
        return LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            ffn_dim=int(hf["intermediate_size"]),
            max_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=float(theta),
            rope_layout="half",
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            head_dim=head_dim,
            dtype=dtype,
        )
    except KeyError as e:
        raise ValueError(f"{source}: lacks {e.args[0]!r}") from e


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not there: {_listed(absent)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                            "model-0000x-of-0000y.safetensors")


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    arrays = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                if name in arrays:
                    raise ValueError(f"tensor {name} appears in more than one shard ({f.name})")
                arrays[name] = st.get_tensor(name)
    return arrays


def _hf_tokenizer(folder: Path) -> Any:
    if not (folder / "tokenizer.json").is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def load_hf(folder: str | os.PathLike, *, dtype: str = "float32", tokenizer: bool = True) -> Pretrained:
    """An HF Llama / SmolLM / Qwen2 folder (config.json + safetensors [+ tokenizer]) as a `Llama`."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise FileNotFoundError(f"no HF model folder at {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not an HF model folder (it needs config.json "
                                "next to model.safetensors)")
    hf = json.loads(config_path.read_text())
    cfg = config_from_hf(hf, dtype=dtype, source=str(config_path))
    files = _safetensors_files(folder)
    tok = _hf_tokenizer(folder) if tokenizer else None
    if tok is not None:
        check_tokenizer_vocab(tok, cfg.vocab_size, str(folder))
    arrays = _read_safetensors(files)
    # tied checkpoints sometimes also store lm_head.weight (a copy of the embedding)
    ignored = {n for n in arrays if n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in arrays:
        if not np.array_equal(arrays["lm_head.weight"], arrays["model.embed_tokens.weight"]):
            raise ValueError(f"{folder}: tie_word_embeddings=true but lm_head.weight differs from the embedding")
        ignored.add("lm_head.weight")
    dtypes = Counter(str(a.dtype) for a in arrays.values())
    model = model_from_hf_arrays(cfg, {k: v for k, v in arrays.items() if k not in ignored}, str(folder))
    notes = [] if set(dtypes) <= {"float32"} else [f"weights converted from {', '.join(sorted(dtypes))} to float32"]
    meta = {"format": "hf", "source": str(folder), "architecture": hf.get("model_type"),
            "name": hf.get("_name_or_path"), "dtypes": dict(sorted(dtypes.items())),
            "files": [f.name for f in files], "notes": notes, "model_config": cfg.to_dict()}
    template = getattr(tok, "chat_template", None) if tok is not None else None
    _attach(model, tok)
    return Pretrained(model, tok, template or None, meta)


def hf_config_dict(cfg: LlamaConfig, tokenizer: Any = None) -> dict[str, Any]:
    """config.json for `cfg` in HF's layout (read by `load_hf` and by transformers 4.x / 5.x)."""
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    d = {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    else:
        d.update(use_sliding_window=False, sliding_window=None)
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                d[key] = int(value)
    return d


def save_hf(model: Llama, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write config.json + model.safetensors (float32, HF names, half-split Q/K) [+ tokenizer files].

    `folder` must not exist yet; it is written under a temporary name and renamed when complete.
    `load_hf(folder)` gives back parameters equal bit for bit (Q/K rows permuted back for a
    model loaded from GGUF, whose logits then agree to float32 rounding).
    """
    from safetensors.numpy import save_file

    from stride_jax import store

    if not isinstance(model, Llama):
        raise TypeError(f"save_hf writes Llama models, got {type(model).__name__}")
    if tokenizer is not None:
        check_tokenizer_vocab(tokenizer, model.cfg.vocab_size, "save_hf")
    folder = Path(folder).absolute()
    with store.atomic_dir(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model.cfg, tokenizer), indent=2) + "\n")
        save_file(hf_arrays_from_model(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return folder


# ----------------------------------------------------------------------------- dispatch


def _attach(model: Any, tokenizer: Any) -> None:
    from stride_jax.models.checkpoint import attach_tokenizer

    attach_tokenizer(model, tokenizer)


def _kind(path: Path) -> str:
    """"gguf", "stride_jax" or "hf": what is at `path` (FileNotFoundError / ValueError otherwise)."""
    from stride_jax.models import checkpoint

    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if path.suffix == ".gguf" or magic == b"GGUF":
            return "gguf"
        raise ValueError(f"{path} is a file but not GGUF; pass a .gguf file, an HF folder (config.json + "
                         "model.safetensors) or a stride_jax checkpoint directory")
    if not path.is_dir():
        raise FileNotFoundError(f"no model at {path}")
    if (path / checkpoint.METADATA_FILE).is_file() and (path / checkpoint.PARAMS_DIR).is_dir():
        return "stride_jax"
    if (path / "config.json").is_file():
        return "hf"
    if any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} holds safetensors but no config.json: an HF model folder needs "
                                "config.json next to model.safetensors")
    raise FileNotFoundError(f"{path} is neither an HF model folder (config.json + model.safetensors) nor a "
                            "stride_jax checkpoint (metadata.json + params/)")


class ModelInfo(NamedTuple):
    """What `inspect_pretrained` reads without the weights: the model config, the tokenizer (or
    None), the chat template and {"format", "source"}."""

    cfg: Any
    tokenizer: Any
    chat_template: str | None
    metadata: dict[str, Any]


def inspect_pretrained(path: str | os.PathLike) -> ModelInfo:
    """Config and tokenizer of a GGUF file, an HF folder or a stride_jax checkpoint, weights left
    unread (a GGUF's tensors are memory-mapped, never dequantised), so data can be tokenised and
    checked before the slow load."""
    from stride_jax.models import checkpoint
    from stride_jax.models.registry import config_from_dict

    path = Path(path).absolute()
    kind = _kind(path)
    if kind == "gguf":
        import gguf

        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # gguf raises ValueError / struct errors on non-GGUF input
            raise ValueError(f"{path} is not a readable GGUF file: {e!r}") from e
        cfg = config_from_gguf(reader, source=str(path))
        tok = tokenizer_from_gguf(reader, str(path)) if "tokenizer.ggml.tokens" in reader.fields else None
    elif kind == "hf":
        cfg = config_from_hf(json.loads((path / "config.json").read_text()), source=str(path / "config.json"))
        tok = _hf_tokenizer(path)
    else:
        meta = checkpoint.read_metadata(path)
        try:
            cfg = config_from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupted checkpoint metadata {path / checkpoint.METADATA_FILE}: {e!r}") from e
        tok = checkpoint.load_tokenizer(path, meta)
    template = getattr(tok, "chat_template", None) if tok is not None else None
    return ModelInfo(cfg, tok, template or None, {"format": kind, "source": str(path)})


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32") -> Pretrained:
    """A GGUF file, an HF safetensors folder or a stride_jax checkpoint directory, by what is there.

    A checkpoint's tokenizer is its `tokenizer/` folder (`save_model(..., tokenizer=)`), or the
    shipped one when its metadata names it (`tokenizer_hash`); the model records its tokenizer
    (`checkpoint.model_tokenizer`)."""
    from stride_jax.models import checkpoint
    from stride_jax.models.checkpoint import load_model

    path = Path(path).absolute()
    kind = _kind(path)
    if kind == "gguf":
        return load_gguf(path, dtype=dtype)
    if kind == "hf":
        return load_hf(path, dtype=dtype)
    model, meta = load_model(path)
    if dtype != "float32" and isinstance(model, Llama):
        from stride_jax.models.llama import with_dtype

        model = with_dtype(model, dtype)
    tok = checkpoint.load_tokenizer(path, meta)
    _attach(model, tok)
    template = getattr(tok, "chat_template", None) if tok is not None else None
    return Pretrained(model, tok, template or None, {"format": "stride_jax", "source": str(path), **meta})


__all__ = [
    "Pretrained",
    "load_gguf",
    "load_hf",
    "save_hf",
    "load_pretrained",
    "inspect_pretrained",
    "ModelInfo",
    "config_from_gguf",
    "config_from_hf",
    "tokenizer_from_gguf",
    "hf_param_map",
    "model_from_hf_arrays",
    "hf_arrays_from_model",
]
