"""The one per-dtype tolerance table, with the reason for every number.

Every comparison in the tests and in :func:`jaxlinear.check_vjp` takes its
tolerances from here. Checks are element-wise, ``|a - e| <= atol + rtol * |e|``,
on well-scaled inputs (values of order 1, weights ~ 1/sqrt(fan_in)), so ``atol``
stands for "rtol times the typical magnitude" where cancellation makes an entry
near zero. :func:`jaxlinear.check_vjp`, which cannot assume well-scaled inputs,
multiplies atol by min(1, the largest |entry| of the gradient), so a gradient of
size ~1/N (a mean over N rows) is judged at its own scale: a rule returning zeros
cannot pass under atol alone.

``eps`` below is the dtype's machine epsilon (spacing of numbers near 1):
float64 2.2e-16, float32 1.2e-7, float16 9.8e-4, bfloat16 7.8e-3.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

__all__ = ["Tolerance", "TOLERANCES", "FD_RELATIVE_STEP", "tolerance_for"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Tolerances for one dtype.

    Attributes:
        autodiff: ``(rtol, atol)`` for the hand-derived rule against ``jax.grad``
            of the plain formula, both evaluated in this dtype.
        fd: ``(rtol, atol)`` for the rule evaluated in this dtype against central
            finite differences of the same function evaluated in float64.
        reason: why these numbers.
    """

    autodiff: tuple[float, float]
    fd: tuple[float, float]
    reason: str


TOLERANCES: dict[np.dtype, Tolerance] = {
    np.dtype(jnp.float64): Tolerance(
        autodiff=(1e-12, 1e-12),
        fd=(1e-6, 1e-6),
        reason=(
            "autodiff: the rule and jax.grad compute the same products, at most in a "
            "different summation order: K*eps ~ 2e-13 for K ~ 1e3 terms of order 1. "
            "fd: central differences with step h = eps^(1/3)*max(1,|x|) ~ 6e-6 err "
            "by eps*|f|/h ~ 4e-11 (rounding) plus h^2*|f'''|/6 ~ 6e-12 (truncation); "
            "1e-6 leaves room for |f| ~ 1e3 and still catches a factor 1.001."
        ),
    ),
    np.dtype(jnp.float32): Tolerance(
        autodiff=(1e-5, 1e-5),
        fd=(1e-4, 1e-4),
        reason=(
            "autodiff: summation order may differ; error grows like sqrt(K)*eps "
            "~ 4e-6 for K ~ 1e3. fd: the float32 rule also carries the float32 "
            "forward's rounding, ~ K*eps ~ 1e-4 in the worst case of K ~ 1e3."
        ),
    ),
    np.dtype(jnp.float16): Tolerance(
        autodiff=(2e-3, 2e-3),
        fd=(1e-2, 1e-2),
        reason=(
            "autodiff: both results are rounded to float16 once, so they may differ "
            "by about 2 units in the last place, 2*eps = 2e-3. fd: float16 rounding "
            "of inputs to every product (10 significand bits) accumulates to ~1e-2."
        ),
    ),
    np.dtype(jnp.bfloat16): Tolerance(
        autodiff=(1.6e-2, 1.6e-2),
        fd=(5e-2, 5e-2),
        reason=(
            "autodiff: both results are rounded to bfloat16 (8 significand bits), "
            "so they may differ by 2 units in the last place, 2*eps = 1.6e-2. fd: "
            "bfloat16 rounding inside each product and sum accumulates to ~5e-2."
        ),
    ),
}

#: Relative step of float64 central differences, h = FD_RELATIVE_STEP * max(1, |x|):
#: eps64^(1/3) ~ 6e-6 balances rounding error (eps/h) against truncation (h^2).
FD_RELATIVE_STEP: float = float(np.finfo(np.float64).eps ** (1.0 / 3.0))


def tolerance_for(dtype) -> Tolerance:
    """The :class:`Tolerance` for ``dtype``; a clear error for any other dtype."""
    dt = np.dtype(dtype)
    if dt not in TOLERANCES:
        raise ValueError(
            f"no tolerance for dtype {dt}; the table covers "
            f"{', '.join(str(d) for d in TOLERANCES)}."
        )
    return TOLERANCES[dt]
