"""stride_jax: STRIDE training-data attribution (arXiv 2606.05165) in JAX.

    from stride_jax import Stride, StrideConfig
    attr = Stride(StrideConfig.preset("lm")).fit(model, train).attribute(queries)
    attr.scores  # [n_train, n_query]; positive = the example lowers the query's loss
"""

from stride_jax.version import __version__  # noqa: F401

import os as _os

# transformers (tokenizers and configs only here) announces at import that PyTorch is absent: not
# news for a JAX library. A user's own setting of the variable wins.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from stride_jax.attribution import Attribution, Stride
from stride_jax import confidence  # the module: confidence.attach(stride, attr, y)
from stride_jax.config import (
    PRESETS,
    DesignConfig,
    FitConfig,
    MeasureConfig,
    RecoveryConfig,
    SteeringConfig,
    StrideConfig,
)
from stride_jax.confidence import Confidence
from stride_jax.data import Examples, examples_from_pairs, examples_from_texts, load_jsonl
from stride_jax.design import Design, alpha_subsets, left_regular_design
from stride_jax import generate  # the module: generate.generate(model, prompt_ids, n_new)
from stride_jax.generate import Generation, generation_examples
from stride_jax.fit import Fitter, fit_operators
from stride_jax import lds  # the module: stride_jax.lds.lds(scores, subsets, losses)
from stride_jax.lds import LDSResult, noise_ceiling, spearman
from stride_jax.measure import Measurement, responses
from stride_jax.models import HookedModel
from stride_jax import prior  # the module: pool features and the ridge / features-prior recovery
from stride_jax.prior import RidgeConfig, RidgeResult, pool_features, ridge_prior_solve, select_prior
from stride_jax.recovery import (FistaConfig, FistaResult, LassoConfig, LassoResult, SparseScores, fista_lasso,
                                 lambda_max, solve_lasso)
from stride_jax.steering import OperatorBank, SteeringOperator, init_bank
from stride_jax import tokens  # the module: per-token queries
from stride_jax.tokens import TokenQueries, per_token_queries

__all__ = [
    "PRESETS",
    "Attribution",
    "Confidence",
    "Design",
    "DesignConfig",
    "Examples",
    "FistaConfig",
    "FistaResult",
    "FitConfig",
    "Generation",
    "Fitter",
    "HookedModel",
    "LDSResult",
    "LassoConfig",
    "LassoResult",
    "MeasureConfig",
    "Measurement",
    "OperatorBank",
    "RecoveryConfig",
    "RidgeConfig",
    "RidgeResult",
    "SparseScores",
    "SteeringConfig",
    "SteeringOperator",
    "Stride",
    "StrideConfig",
    "TokenQueries",
    "alpha_subsets",
    "confidence",
    "examples_from_pairs",
    "examples_from_texts",
    "fista_lasso",
    "fit_operators",
    "generate",
    "generation_examples",
    "init_bank",
    "lambda_max",
    "lds",
    "left_regular_design",
    "load_jsonl",
    "noise_ceiling",
    "per_token_queries",
    "pool_features",
    "prior",
    "responses",
    "ridge_prior_solve",
    "select_prior",
    "solve_lasso",
    "spearman",
    "tokens",
]
