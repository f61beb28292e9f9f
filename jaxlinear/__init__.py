"""jaxlinear: a linear layer, activations, losses and MLPs with hand-derived,
verified backward passes."""

from importlib.metadata import PackageNotFoundError, version

from ._activations import relu as relu, sigmoid as sigmoid, tanh as tanh
from ._check import CheckReport as CheckReport, CheckRow as CheckRow, check_vjp as check_vjp
from ._init import INITS as INITS, linear_init as linear_init
from ._linear import (
    LinearParams as LinearParams,
    linear_apply as linear_apply,
    linear_backward as linear_backward,
)
from ._losses import mse_loss as mse_loss, softmax_cross_entropy as softmax_cross_entropy
from ._mlp import mlp_apply as mlp_apply, mlp_init as mlp_init
from ._per_example import (
    clipped_grad as clipped_grad,
    per_example_grad_norms as per_example_grad_norms,
)
from ._tolerances import (
    FD_RELATIVE_STEP as FD_RELATIVE_STEP,
    TOLERANCES as TOLERANCES,
    Tolerance as Tolerance,
    tolerance_for as tolerance_for,
)

try:
    __version__ = version("jaxlinear")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "CheckReport",
    "CheckRow",
    "FD_RELATIVE_STEP",
    "INITS",
    "LinearParams",
    "TOLERANCES",
    "Tolerance",
    "check_vjp",
    "clipped_grad",
    "linear_apply",
    "linear_backward",
    "linear_init",
    "mlp_apply",
    "mlp_init",
    "mse_loss",
    "per_example_grad_norms",
    "relu",
    "sigmoid",
    "softmax_cross_entropy",
    "tanh",
    "tolerance_for",
]
