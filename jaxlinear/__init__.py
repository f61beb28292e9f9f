"""jaxlinear: a linear layer, activations, losses and MLPs with hand-derived,
verified backward passes."""

from importlib.metadata import PackageNotFoundError, version

from ._activations import relu as relu, sigmoid as sigmoid, tanh as tanh
from ._check import check_vjp as check_vjp
from ._check_report import CheckReport as CheckReport
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

try:
    __version__ = version("jaxlinear")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "CheckReport",
    "INITS",
    "LinearParams",
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
]
