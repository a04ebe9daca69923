"""stride_jax: STRIDE training-data attribution (arXiv 2606.05165) in JAX.

    from stride_jax import Stride, StrideConfig
    attr = Stride(StrideConfig.preset("lm")).fit(model, train).attribute(queries)
    attr.scores  # [n_train, n_query]; positive = the example lowers the query's loss
"""

__version__ = "0.2.0"

from stride_jax.attribution import Attribution, Stride
from stride_jax.config import (
    PRESETS,
    DesignConfig,
    FitConfig,
    MeasureConfig,
    RecoveryConfig,
    SteeringConfig,
    StrideConfig,
)
from stride_jax.data import Examples, examples_from_pairs, examples_from_texts, load_jsonl
from stride_jax.design import Design, alpha_subsets, left_regular_design
from stride_jax.fit import Fitter, fit_operators
from stride_jax import lds  # the module: stride_jax.lds.lds(scores, subsets, losses)
from stride_jax.lds import LDSResult, noise_ceiling, spearman
from stride_jax.measure import Measurement, responses
from stride_jax.models import HookedModel
from stride_jax.recovery import (FistaConfig, FistaResult, LassoConfig, LassoResult, SparseScores, fista_lasso,
                                 lambda_max, solve_lasso)
from stride_jax.steering import OperatorBank, SteeringOperator, init_bank

__all__ = [
    "PRESETS",
    "Attribution",
    "Design",
    "DesignConfig",
    "Examples",
    "FistaConfig",
    "FistaResult",
    "FitConfig",
    "Fitter",
    "HookedModel",
    "LDSResult",
    "LassoConfig",
    "LassoResult",
    "MeasureConfig",
    "Measurement",
    "OperatorBank",
    "RecoveryConfig",
    "SparseScores",
    "SteeringConfig",
    "SteeringOperator",
    "Stride",
    "StrideConfig",
    "alpha_subsets",
    "examples_from_pairs",
    "examples_from_texts",
    "fista_lasso",
    "fit_operators",
    "init_bank",
    "lambda_max",
    "lds",
    "left_regular_design",
    "load_jsonl",
    "noise_ceiling",
    "responses",
    "solve_lasso",
    "spearman",
]
