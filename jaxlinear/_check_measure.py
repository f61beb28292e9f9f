r"""Measurements of :func:`jaxlinear.check_vjp`: a rule's error against float64
truth, relative to the size of what is compared.

* :func:`against_truth` -- element-wise truth (float64 autodiff of the
  reference): the rule's largest error and autodiff's in the same dtype, both
  divided by the largest true entry. The rule passes when its error is at most
  autodiff's plus a margin: "no worse than autodiff in the same dtype".
* :func:`against_differences` -- float64 central differences: for random
  directions v, the rule's ⟨ĝ, v⟩ against D(h) = (φ(x + hv) − φ(x − hv)) / 2h,
  φ = ⟨u, fn⟩. For v ~ N(0, I) the directional derivative ⟨g, v⟩ has RMS
  σ = ‖g‖₂, and an element-wise error e gives ⟨e, v⟩ of RMS ‖e‖₂: their ratio
  ‖e‖/‖g‖ does not depend on the number of elements, so neither does the
  check's power. The differences' own error δ = |D(h) − D(2h)| (truncation, a
  kink crossed) + 2·eps·Σ|u||f|/h (rounding) is subtracted first.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Measure:
    """A rule's relative error (and autodiff's), the largest absolute one, and
    where the worst entry is."""

    error: float
    autodiff_error: float | None
    max_abs: float
    detail: str = ""


def abs_errors(actual, truth) -> np.ndarray:
    """|a − t| in float64; NaN where both are NaN or the same infinity counts as 0,
    any other non-finite entry as inf."""
    a, t = np.asarray(actual, np.float64), np.asarray(truth, np.float64)
    same = (np.isnan(a) & np.isnan(t)) | (np.isinf(a) & (a == t))
    finite = np.isfinite(a) & np.isfinite(t)
    with np.errstate(invalid="ignore"):
        return np.where(finite, np.abs(a - t), np.where(same, 0.0, np.inf))


def largest(values) -> float:
    """max |entry| over the finite entries of every array given (0 if none)."""
    finite = [np.abs(v[np.isfinite(v)]) for v in map(np.asarray, values) if np.size(v)]
    return max((float(v.max()) for v in finite if v.size), default=0.0)


def scale_of(truth, floor: float) -> float:
    """The size errors are divided by: the largest true entry, at least ``floor``
    (a leaf whose gradient cancels to ~0 is judged against the others'), 1 if all
    are 0."""
    s = max(largest([truth]), floor)
    return s if s > 0 else 1.0


def against_truth(actual, yardstick, truth, floor: float) -> Measure:
    """The rule's and autodiff's largest errors against ``truth``, relative to its scale."""
    a, t = np.asarray(actual, np.float64), np.asarray(truth, np.float64)
    if a.shape != t.shape:
        return Measure(np.inf, None, np.inf, f"shape {a.shape} vs expected {t.shape}")
    if a.size == 0:
        return Measure(0.0, None if yardstick is None else 0.0, 0.0, "empty")
    scale = scale_of(t, floor)
    err = abs_errors(a, t)
    worst = int(np.argmax(err))
    ad = None if yardstick is None else float(np.max(abs_errors(yardstick, t))) / scale
    index = tuple(int(i) for i in np.unravel_index(worst, a.shape)) if a.ndim else ()
    detail = f"worst at {index}: got {a.flat[worst]:.6g}, float64 {t.flat[worst]:.6g}"
    if yardstick is not None:
        detail += f", autodiff {np.asarray(yardstick, np.float64).flat[worst]:.6g}"
    return Measure(float(err.flat[worst]) / scale, ad, float(err.flat[worst]), detail)


def per_example(measure, *arrays) -> tuple[int, Measure]:
    """``measure`` on each example (axis 0 of every array given, ``None`` passed
    through), and the example whose error exceeds autodiff's the most."""
    results = []
    for b in range(np.shape(arrays[0])[0]):
        results.append(measure(*[None if a is None else np.asarray(a)[b] for a in arrays]))
    excess = [m.error - (m.autodiff_error or 0.0) for m in results]
    worst = int(np.nanargmax(np.where(np.isnan(excess), np.inf, excess)))
    return worst, results[worst]


@dataclasses.dataclass(frozen=True)
class Differences:
    """Float64 central differences of φ along k perturbations, for B examples.

    ``d1``, ``d2``: φ(x + p) − φ(x − p) at steps h and 2h, shape (k, B);
    ``step``: h for each of the k perturbations (broadcast against (k, B));
    ``rounding``: 2·eps·Σ|u||f|/h, the rounding error of D(h), shape (k, B).
    """

    d1: np.ndarray
    d2: np.ndarray
    step: np.ndarray
    rounding: np.ndarray

    def estimate(self) -> tuple[np.ndarray, np.ndarray]:
        """D(h) and its error bound δ = |D(h) − D(2h)| + rounding."""
        dh = self.d1 / (2 * self.step)
        d2h = self.d2 / (4 * self.step)
        with np.errstate(invalid="ignore"):
            return dh, np.abs(dh - d2h) + self.rounding


def against_differences(rule_values, diffs: Differences, sigma, *, rms: bool) -> Measure:
    """The rule's values (k, B) against the differences, relative to ``sigma`` (B,).

    The error beyond the differences' own is combined over the k values by RMS
    (directions: one random projection of the error each) or max (elements);
    the worst example is returned.
    """
    r = np.asarray(rule_values, np.float64)
    d, delta = diffs.estimate()
    err = abs_errors(r, d)
    with np.errstate(invalid="ignore"):
        excess = np.where(np.isfinite(err), np.maximum(0.0, err - delta), err)
    combined = np.sqrt(np.mean(excess**2, axis=0)) if rms else np.max(excess, axis=0)
    relative = combined / np.asarray(sigma, np.float64)
    b = int(np.argmax(np.where(np.isnan(relative), np.inf, relative)))
    k = int(np.argmax(np.where(np.isnan(err[:, b]), np.inf, err[:, b])))
    detail = f"worst: rule {r[k, b]:.6g}, float64 differences {d[k, b]:.6g} ± {delta[k, b]:.2g}"
    if r.shape[1] > 1:
        detail += f" (example {b})"
    return Measure(float(relative[b]), None, float(np.max(err)), detail)
