r"""The one per-dtype tolerance table, with the reason for every number.

Every comparison in the tests and in :func:`jaxlinear.check_vjp` takes its
tolerances from here. Two kinds of entries:

* ``autodiff`` and ``fd`` are element-wise ``(rtol, atol)`` pairs,
  ``|a - e| <= atol + rtol * |e|``, for tests on well-scaled inputs (values of
  order 1, weights ~ 1/sqrt(fan_in)), where ``atol`` stands for "rtol times the
  typical magnitude" at entries that cancel to near zero.
* ``margin_units`` and ``fd_units`` are what :func:`jaxlinear.check_vjp` uses.
  They count *units of roundoff* ``u(dtype, K) = eps(dtype) + sqrt(K) *
  eps(accumulation dtype)`` (see :func:`unit_roundoff`): the rounding of one
  result to ``dtype`` plus a random walk of K roundings in the dtype sums are
  accumulated in (float32 for 16-bit floats and float32, float64 for float64).
  ``K`` is the length of the rule's reductions, bounded by the size of its
  largest argument or output. The unit does not grow with the number of elements
  checked: errors are measured relative to the size of the quantity compared
  (the largest entry of a gradient, or the RMS of a directional derivative), so
  a bug that is 1 % of the gradient is 1 % whatever the array's size.

``eps`` below is the dtype's machine epsilon (spacing of numbers near 1):
float64 2.2e-16, float32 1.2e-7, float16 9.8e-4, bfloat16 7.8e-3.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

__all__ = ["Tolerance", "TOLERANCES", "FD_RELATIVE_STEP", "tolerance_for", "unit_roundoff"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Tolerances for one dtype.

    Attributes:
        autodiff: ``(rtol, atol)`` for a hand-derived rule against ``jax.grad``
            of the plain formula, both evaluated in this dtype (tests).
        fd: ``(rtol, atol)`` for the rule evaluated in this dtype against central
            finite differences of the same function evaluated in float64 (tests).
        margin_units: by how much a rule's error against float64 truth may exceed
            the error of autodiff of the reference in the same dtype, in units of
            :func:`unit_roundoff` times the largest true entry
            (:func:`jaxlinear.check_vjp`'s ``reference``, ``forward``, ``vmap``).
        autodiff_scatter: the bound also admits this multiple of autodiff's own
            error. Two correct computations that round differently have errors of
            the same size but different realisations; in a chain of rules (an MLP
            into a loss) the rounded forward residuals' errors pass through every
            rule, so a correct chain's largest error is autodiff's up to that
            scatter (measured: 60 random float16 chains, MLP tanh 6-8-8-4 into
            cross-entropy at 4x scale, jaxlinear's RMS error 0.95x autodiff's in
            the median, yet larger on 21 % of the leaves). 1 (the bound is twice
            autodiff's error plus the margin) still fails an error several times
            autodiff's, e.g. 6 % in bfloat16 where autodiff's is below 1 %.
        fd_units: the largest RMS error of a rule's directional derivatives
            ⟨u, J v⟩ (and, for small arguments, of its entries) against float64
            finite differences, in units of :func:`unit_roundoff` times the RMS
            directional derivative (``fd-direction``, ``fd-element``, and ``vmap``
            without a reference). No autodiff to compare with here, so it covers
            every rounding a correct rule makes, forward residuals included.
        reason: why these numbers.
    """

    autodiff: tuple[float, float]
    fd: tuple[float, float]
    margin_units: float
    fd_units: float
    reason: str
    autodiff_scatter: float = 1.0


TOLERANCES: dict[np.dtype, Tolerance] = {
    np.dtype(jnp.float64): Tolerance(
        autodiff=(1e-12, 1e-12),
        fd=(1e-6, 1e-6),
        margin_units=8.0,
        fd_units=8.0,
        reason=(
            "autodiff: the rule and jax.grad compute the same products, at most in a "
            "different summation order: K*eps ~ 2e-13 for K ~ 1e3 terms of order 1. "
            "fd: central differences with step h = eps^(1/3)*max(1,|x|) ~ 6e-6 err "
            "by eps*|f|/h ~ 4e-11 (rounding) plus h^2*|f'''|/6 ~ 6e-12 (truncation); "
            "1e-6 leaves room for |f| ~ 1e3 and still catches a factor 1.001. "
            "margin/fd units: float64 autodiff of the reference *is* the truth, so a "
            "rule may differ from it only by a different summation order, sqrt(K)*eps "
            "at random; 8 units is 4e-15 at K = 100, a million times below a rule "
            "that computes in float32 (6e-8). check_vjp adds the finite differences' "
            "own error (estimated from steps h and 2h) to the fd bound."
        ),
    ),
    np.dtype(jnp.float32): Tolerance(
        autodiff=(1e-5, 1e-5),
        fd=(1e-4, 1e-4),
        margin_units=8.0,
        fd_units=16.0,
        reason=(
            "autodiff: summation order may differ; error grows like sqrt(K)*eps "
            "~ 4e-6 for K ~ 1e3. fd: the float32 rule also carries the float32 "
            "forward's rounding, ~ K*eps ~ 1e-4 in the worst case of K ~ 1e3. "
            "margin: rule and autodiff round different sums differently, each "
            "~ sqrt(K)*eps; their largest errors differ by a few units. fd units: "
            "forward residuals (tanh t, softmax p, hidden activations) are rounded to "
            "float32 too and their errors pass through the chain rule; 16 units "
            "(2e-6 at K = 1) is 5,000 times below a 1 % error."
        ),
    ),
    np.dtype(jnp.float16): Tolerance(
        autodiff=(2e-3, 2e-3),
        fd=(1e-2, 1e-2),
        margin_units=2.0,
        fd_units=6.0,
        reason=(
            "autodiff: both results are rounded to float16 once, so they may differ "
            "by about 2 units in the last place, 2*eps = 2e-3. fd: float16 rounding "
            "of inputs to every product (10 significand bits) accumulates to ~1e-2. "
            "margin: sums accumulate in float32, so a correct rule's error is its "
            "final rounding (half an ulp) plus that of its rounded residuals, as is "
            "autodiff's: 2 units = 2 ulps more than autodiff. fd units: with no "
            "autodiff to compare with, the rounded forward residuals (up to ~2 ulps "
            "each through the chain rule) and the final rounding: 6 units = 6e-3, "
            "ten times below a 6 % error."
        ),
    ),
    np.dtype(jnp.bfloat16): Tolerance(
        autodiff=(1.6e-2, 1.6e-2),
        fd=(5e-2, 5e-2),
        margin_units=2.0,
        fd_units=6.0,
        reason=(
            "autodiff: both results are rounded to bfloat16 (8 significand bits), "
            "so they may differ by 2 units in the last place, 2*eps = 1.6e-2. fd: "
            "bfloat16 rounding inside each product and sum accumulates to ~5e-2. "
            "margin: sums accumulate in float32, so a correct rule's error is its "
            "final rounding plus that of its rounded residuals, as is autodiff's: "
            "2 units = 2 ulps (1.6e-2) more than autodiff, below a 6 % error. fd "
            "units: 6 units = 4.7e-2 RMS, twenty times below a doubled gradient."
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


def unit_roundoff(dtype, reduction_length: int) -> float:
    r"""u(dtype, K) = eps(dtype) + sqrt(K) · eps(accumulation dtype).

    The error, relative to the result's size, of a correct computation that
    rounds its result to ``dtype`` once and accumulates sums of K terms in
    float32 (in float64 for float64 and wider), where rounding errors of random
    sign add up like a random walk.

    >>> round(unit_roundoff("bfloat16", 100), 5)
    0.00781
    >>> unit_roundoff("float32", 100) == 11 * float(np.finfo(np.float32).eps)
    True
    """
    dt = np.dtype(dtype)
    accumulate = np.float64 if dt.itemsize >= 8 else np.float32
    k = max(1, int(reduction_length))
    return float(jnp.finfo(dt).eps) + math.sqrt(k) * float(np.finfo(accumulate).eps)
