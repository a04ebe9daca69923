"""Steering operators: a shared rank-R basis read at layer l and one R x O matrix per subset.

One `SteeringOperator` is written for one subset and one example (STYLE.md rule 5); the K
operators share the basis and differ only in `coef`, so the bank is a single operator whose
`Coef` leaves carry a leading K axis and the subset axis comes from `jax.vmap` over them.

Placements (STRIDE, arXiv 2606.05165, section 3):
- logits:   o~_k = o + B(h_l) a_k,             a_k in R^{R x V};
- residual: z~_l = z_l + B(z_l) a_k, then the rest of the frozen network, a_k in R^{R x D}.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from stride_jax.config import SteeringConfig


class Basis(nnx.Param):
    """The shared basis B (D x R)."""


class Coef(nnx.Param):
    """A subset's matrix a_k (R x O); stacked as K x R x O in a bank."""


class SteeringOperator(nnx.Module):
    """delta(h) = norm(h) B a for one subset; `h` is any [..., D] array."""

    def __init__(self, in_dim: int, out_dim: int, cfg: SteeringConfig, *, rngs: nnx.Rngs):
        # float32 parameters, also under jax_enable_x64 (float64 ones would promote the model's states)
        std = cfg.basis_init_std / jnp.sqrt(jnp.float32(in_dim))
        self.basis = Basis(std * jax.random.normal(rngs.params(), (in_dim, cfg.rank), jnp.float32))
        # Zero init: every operator starts as the identity (the frozen model itself).
        self.coef = Coef(jnp.zeros((cfg.rank, out_dim), jnp.float32))
        self.normalize_input = cfg.normalize_input

    def features(self, h: jax.Array) -> jax.Array:
        """B(h): the R numbers the basis reads off each position."""
        if self.normalize_input:
            h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-6)
        return h @ self.basis[...]

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.features(h) @ self.coef[...]


class OperatorBank(NamedTuple):
    """K operators as pure pytrees: `graphdef` (static), shared `basis`, stacked `coef` (K x R x O)."""

    graphdef: nnx.GraphDef
    basis: nnx.State
    coef: nnx.State

    @property
    def n_subsets(self) -> int:
        return int(jax.tree_util.tree_leaves(self.coef)[0].shape[0])

    def operator(self, k: int) -> SteeringOperator:
        """Subset k's operator as a module (for inspection)."""
        coef_k = jax.tree.map(lambda x: x[k], self.coef)
        return nnx.merge(self.graphdef, self.basis, coef_k)


def steered_dim(model: nnx.Module, cfg: SteeringConfig) -> tuple[int, int]:
    """(in_dim, out_dim) of the operators for `model` under `cfg`; validates the layer."""
    if not 0 <= cfg.layer <= model.n_layers:
        raise ValueError(f"steering layer {cfg.layer} is beyond this model's depth: hook points are "
                         f"0..{model.n_layers}")
    in_dim = model.hidden_dim_at(cfg.layer)
    out_dim = model.out_dim if cfg.placement == "logits" else in_dim
    return in_dim, out_dim


def init_bank(model: nnx.Module, n_subsets: int, cfg: SteeringConfig, seed: int) -> OperatorBank:
    """A bank of K zero operators with a random shared basis."""
    if n_subsets < 1:
        raise ValueError(f"n_subsets (K) must be >= 1, got {n_subsets}")
    in_dim, out_dim = steered_dim(model, cfg)
    op = SteeringOperator(in_dim, out_dim, cfg, rngs=nnx.Rngs(seed))
    graphdef, basis, coef = nnx.split(op, Basis, Coef)
    coef_K = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_subsets, *x.shape)), coef)
    return OperatorBank(graphdef, basis, coef_K)


def apply_operator(
    graphdef: nnx.GraphDef,
    basis: nnx.State,
    coef: nnx.State,
    model: nnx.Module,
    h: jax.Array,
    base_logits: jax.Array | None,
    cfg: SteeringConfig,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Steered logits of one subset's operator given the layer-l activations `h`.

    logits placement: base_logits + B(h) a_k (the frozen model's logits `base_logits`, at the
    same positions as `h`); residual placement: rest(h + B(h) a_k) with the padding `mask`
    (`base_logits` unused, may be None). Vmap over `coef` (and over `h` when subsets see
    different examples) for the K axis.
    """
    op = nnx.merge(graphdef, basis, coef)
    if cfg.placement == "logits":
        return base_logits + op(h)
    return model.rest(h + op(h), layer=cfg.layer, mask=mask)
