"""Configuration: small frozen dataclasses that reach `jit`, and the experiment config around them.

Two layers (STYLE.md rule 4): `SteeringConfig`, `FitConfig`, `MeasureConfig` and
`recovery.FistaConfig` are frozen and hashable, so they can be static arguments of jitted
functions. `StrideConfig` groups them with the design and is what a user edits, loads from YAML
or JSON, and what every run writes back as `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from stride_jax.recovery import FistaConfig

Placement = Literal["logits", "residual"]


@dataclasses.dataclass(frozen=True)
class DesignConfig:
    """Subset design: every training example lands in `per_example` of `n_subsets` subsets."""

    n_subsets: int = 512  # K
    per_example: int = 8  # the paper's d (S in shape names)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_subsets < 1:
            raise ValueError(f"n_subsets (K) must be >= 1, got {self.n_subsets}")
        if not 1 <= self.per_example <= self.n_subsets:
            raise ValueError(
                f"per_example (d={self.per_example}) must be in [1, n_subsets (K={self.n_subsets})]"
            )


@dataclasses.dataclass(frozen=True)
class SteeringConfig:
    """Where and how operators steer the frozen model.

    placement="logits": o~ = o + B(h_l) a_k (paper text); "residual": z~_l = z_l + B(z_l) a_k, then
    the rest of the frozen network (paper figure). B is a linear map of the RMS-normalised
    layer-`layer` activation to `rank` numbers (the paper does not publish B's form).
    """

    layer: int = 1
    rank: int = 16
    placement: Placement = "logits"
    normalize_input: bool = True
    basis_init_std: float = 1.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.placement not in ("logits", "residual"):
            raise ValueError(f"placement must be 'logits' or 'residual', got {self.placement!r}")


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Joint fit of the basis and all per-subset matrices (paper section 3, our defaults).

    Loss = fidelity + stability_weight * KL(base || steered) + linearity_weight * ridge residual.
    """

    steps: int = 300
    learning_rate: float = 3e-2
    subsets_per_step: int = 32
    fidelity_batch: int = 8
    stability_batch: int = 8
    probe_batch: int = 8
    positions_per_example: int | None = 16  # LM logits placement: positions sampled per sequence
    stability_weight: float = 1.0
    linearity_weight: float = 0.0
    sketch_dim: int = 8  # q of the JL sketch M R, R in R^{N x q}
    ridge_gamma: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "subsets_per_step", "fidelity_batch", "stability_batch", "probe_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stability_weight", "linearity_weight", "ridge_gamma", "learning_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.positions_per_example is not None and self.positions_per_example < 1:
            raise ValueError(f"positions_per_example must be >= 1 or None, got {self.positions_per_example}")
        if self.sketch_dim < 1:
            raise ValueError(f"sketch_dim must be >= 1, got {self.sketch_dim}")


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """How y[q, k] is formed and centred before recovery.

    space="log": y = log loss_base - log loss_k (losses are heavy-tailed); "diff": loss_base - loss_k.
    center_operators: subtract each operator's mean effect over the queries (an operator that
    lowers every query's loss carries no information about any one of them).
    center_queries: subtract each query's mean over operators (an intercept).
    """

    space: Literal["log", "diff"] = "log"
    center_operators: bool = True
    center_queries: bool = True
    operator_chunk: int = 128
    query_chunk: int = 64

    def __post_init__(self) -> None:
        if self.space not in ("log", "diff"):
            raise ValueError(f"space must be 'log' or 'diff', got {self.space!r}")
        if self.operator_chunk < 1 or self.query_chunk < 1:
            raise ValueError("operator_chunk and query_chunk must be >= 1")


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    """Lasso recovery. lambda = lambda_frac * ||M^T y||_inf per query, or chosen on held-out subsets."""

    lambda_frac: float | Literal["auto"] = 0.05
    auto_fractions: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
    fista: FistaConfig = FistaConfig()

    def __post_init__(self) -> None:
        if self.lambda_frac != "auto" and not (isinstance(self.lambda_frac, (int, float)) and self.lambda_frac >= 0):
            raise ValueError(f"lambda_frac must be >= 0 or 'auto', got {self.lambda_frac!r}")


@dataclasses.dataclass(frozen=True)
class StrideConfig:
    """Everything a STRIDE run needs besides the model and the data."""

    design: DesignConfig = DesignConfig()
    steering: SteeringConfig = SteeringConfig()
    fit: FitConfig = FitConfig()
    measure: MeasureConfig = MeasureConfig()
    recovery: RecoveryConfig = RecoveryConfig()

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StrideConfig":
        return from_dict(cls, d)

    def replace(self, **sections: dict[str, Any]) -> "StrideConfig":
        """Copy with fields of sections overridden: `cfg.replace(fit={"steps": 10})`."""
        return from_dict(StrideConfig, _merge(self.to_dict(), sections))


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(x) for x in obj]
    return obj


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(d, dict):
        raise TypeError(f"expected a mapping for {cls.__name__}, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name) if _has_defaults(cls) else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON experiment config into a dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping at top level")
    return data
