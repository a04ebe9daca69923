"""A model written from docs/interfaces.md alone passes through `Stride`: the Protocol in code
asks for what the pipeline reads, no more and no less."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stride_jax import Examples, Stride, StrideConfig, models


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
    """What docs/interfaces.md asks of a token model's config: vocab_size and a context."""

    vocab_size: int = 16
    seq_len: int = 8
    width: int = 8
    n_layers: int = 2


class TinyLM(nnx.Module):
    """Embeddings, `n_layers` residual MLP blocks (one position at a time: causal), a head."""

    is_sequence_model = True

    def __init__(self, cfg: TinyLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_layers, self.out_dim = cfg.n_layers, cfg.vocab_size
        self.embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(cfg.width, cfg.width, rngs=rngs) for _ in range(cfg.n_layers)])
        self.head = nnx.Linear(cfg.width, cfg.vocab_size, rngs=rngs)

    def hidden_dim_at(self, layer: int) -> int:
        return self.cfg.width

    def trunk(self, inputs, *, layer: int, mask=None):
        h = self.embed(inputs)
        for block in self.blocks[:layer]:
            h = h + jnp.tanh(block(h))
        return h

    def rest(self, h, *, layer: int, mask=None):
        for block in self.blocks[layer:]:
            h = h + jnp.tanh(block(h))
        return self.head(h).astype(jnp.float32)

    def __call__(self, inputs, mask=None):
        return self.rest(self.trunk(inputs, layer=0, mask=mask), layer=0, mask=mask)


@dataclasses.dataclass(frozen=True)
class TinyClassifierConfig:
    in_dim: int = 3
    n_classes: int = 2


class TinyClassifier(nnx.Module):
    """A one-hidden-layer classifier: hook point 0 the features, 1 the hidden state."""

    def __init__(self, cfg: TinyClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.n_layers, self.out_dim = 1, cfg.n_classes
        self.hidden = nnx.Linear(cfg.in_dim, 6, rngs=rngs)
        self.head = nnx.Linear(6, cfg.n_classes, rngs=rngs)

    def hidden_dim_at(self, layer: int) -> int:
        return (self.cfg.in_dim, 6)[layer]

    def trunk(self, inputs, *, layer: int, mask=None):
        return jax.nn.relu(self.hidden(inputs)) if layer == 1 else inputs

    def rest(self, h, *, layer: int, mask=None):
        return self.head(h if layer == 1 else jax.nn.relu(self.hidden(h))).astype(jnp.float32)

    def __call__(self, inputs, mask=None):
        return self.rest(inputs, layer=0)


def lm_examples(n, seed=0):
    t = np.random.default_rng(seed).integers(0, 16, (n, 9)).astype(np.int32)
    return Examples(inputs=t[:, :-1], targets=t[:, 1:], ids=np.arange(n) + 100 * seed)


def test_a_user_written_lm_passes_through_stride():
    model = TinyLM(TinyLMConfig(), rngs=nnx.Rngs(0))
    assert isinstance(model, models.HookedModel)
    stride = Stride(StrideConfig.preset("quick")).fit(model, lm_examples(16), progress=False)
    attr = stride.attribute(lm_examples(3, seed=1), progress=False)
    assert attr.scores.shape == (16, 3) and np.isfinite(attr.dense()).all()
    assert len(attr.top_k(0, k=2)) == 2


def test_a_user_written_classifier_passes_through_stride():
    model = TinyClassifier(TinyClassifierConfig(), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    train = Examples(inputs=x, targets=(x[:, 0] > 0).astype(np.int32), ids=np.arange(16))
    cfg = StrideConfig.preset("quick", fit={"positions_per_example": None}, steering={"rank": 2})
    attr = Stride(cfg).fit(model, train, progress=False).attribute(train[np.arange(2)], progress=False)
    assert attr.scores.shape == (16, 2) and np.isfinite(attr.dense()).all()


@pytest.mark.parametrize("missing", ["cfg", "n_layers", "out_dim", "hidden_dim_at", "trunk", "rest", "__call__"])
def test_each_protocol_member_is_required(missing):
    """Every member the pipeline reads is in the Protocol: without it, a clear TypeError at fit."""
    members = {"cfg": TinyLMConfig(), "n_layers": 2, "out_dim": 16, "hidden_dim_at": lambda self, layer: 8,
               "trunk": lambda self, x, *, layer, mask=None: x, "rest": lambda self, h, *, layer, mask=None: h,
               "__call__": lambda self, x, mask=None: x}
    del members[missing]
    partial = type("Partial", (), members)()
    assert not isinstance(partial, models.HookedModel)
    with pytest.raises(TypeError, match="HookedModel protocol"):
        Stride(StrideConfig.preset("quick")).fit(partial, lm_examples(16), progress=False)
