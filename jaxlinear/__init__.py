"""jaxlinear: a linear layer with a hand-derived, verified backward pass."""

from importlib.metadata import PackageNotFoundError, version

from ._init import INITS as INITS
from ._init import linear_init as linear_init
from ._linear import (
    LinearParams as LinearParams,
)
from ._linear import (
    linear_apply as linear_apply,
)
from ._linear import (
    linear_backward as linear_backward,
)
from ._tolerances import (
    FD_RELATIVE_STEP as FD_RELATIVE_STEP,
)
from ._tolerances import (
    TOLERANCES as TOLERANCES,
)
from ._tolerances import (
    Tolerance as Tolerance,
)
from ._tolerances import (
    tolerance_for as tolerance_for,
)

try:
    __version__ = version("jaxlinear")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "FD_RELATIVE_STEP",
    "INITS",
    "LinearParams",
    "TOLERANCES",
    "Tolerance",
    "linear_apply",
    "linear_backward",
    "linear_init",
    "tolerance_for",
]
