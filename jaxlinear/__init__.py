"""jaxlinear: a linear layer y = x W + b, activations, losses and MLPs whose
derivatives are derived by hand.

Each function is one JAX primitive carrying hand-written VJP, JVP, transpose and
batching rules, so it works under ``grad``, ``jvp``, ``jacfwd``, ``hessian``,
``vmap``, ``jit``, ``scan``, ``checkpoint`` and sharding.

Start with README.md at the root of the repository: the quickstart, a
five-minute tour, the API table, the examples, and links to the guides in docs/:
derivation.md (the VJP and the JVP, and which rule JAX runs in each mode),
training.md, recipes.md (Flax NNX, Equinox, Orbax), per-example.md (per-example
gradient norms and DP-SGD), verification.md (``check_vjp``), scaling-out.md and
performance.md.

Public API: ``LinearParams``, ``linear_init``, ``linear_apply``,
``linear_backward``; ``relu``, ``sigmoid``, ``tanh``; ``mse_loss``,
``softmax_cross_entropy``; ``mlp_init``, ``mlp_apply``; ``per_example_grad_norms``,
``clipped_grad``; ``check_vjp``, ``CheckReport``. The tolerance table and the
command line ``python -m jaxlinear.check`` live in :mod:`jaxlinear.check`.
"""

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
