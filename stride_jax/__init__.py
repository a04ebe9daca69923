"""stride_jax: STRIDE training-data attribution (arXiv 2606.05165) in JAX.

    from stride_jax import Stride, StrideConfig
    attr = Stride(StrideConfig()).fit(model, train).attribute(queries)
    attr.scores  # [n_train, n_query]; positive = the example lowers the query's loss
"""

from stride_jax.attribution import Attribution, Stride
from stride_jax.config import (
    DesignConfig,
    FitConfig,
    MeasureConfig,
    RecoveryConfig,
    SteeringConfig,
    StrideConfig,
)
from stride_jax.design import Design, alpha_subsets, left_regular_design
from stride_jax.fit import Fitter, fit_operators
from stride_jax import lds  # the module: stride_jax.lds.lds(scores, subsets, losses)
from stride_jax.lds import LDSResult, noise_ceiling, spearman
from stride_jax.measure import Measurement, responses
from stride_jax.recovery import FistaConfig, FistaResult, fista_lasso, lambda_max
from stride_jax.steering import OperatorBank, SteeringOperator, init_bank

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Design",
    "DesignConfig",
    "FistaConfig",
    "FistaResult",
    "FitConfig",
    "Fitter",
    "LDSResult",
    "MeasureConfig",
    "Measurement",
    "OperatorBank",
    "RecoveryConfig",
    "SteeringConfig",
    "SteeringOperator",
    "Stride",
    "StrideConfig",
    "alpha_subsets",
    "fista_lasso",
    "fit_operators",
    "init_bank",
    "lambda_max",
    "lds",
    "left_regular_design",
    "noise_ceiling",
    "responses",
    "spearman",
]
