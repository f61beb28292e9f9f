r"""The checks of :func:`jaxlinear.check_vjp`, one small function each, each
returning report rows for one run (device, dtype, variant of the arguments).

* ``reference`` (and ``forward``): the rule against float64 autodiff of the
  reference, no worse than autodiff of the reference in the run's dtype, by at
  most ``margin_units`` units of roundoff;
* ``fd-direction`` / ``fd-element``: the rule against float64 finite
  differences of ``fn``, within ``fd_units`` units of roundoff of the RMS
  directional derivative (of the largest entry);
* ``dtype``: each cotangent has its primal's dtype and shape;
* ``retrace``: a second call, fed what an SGD step gives, hits the compile cache.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ._check_args import short_error
from ._check_differences import differences, differences_and_reference
from ._check_measure import Measure, against_differences, against_truth, largest
from ._check_report import CheckRow
from ._check_run import Run, already_float64, reference_vjp, upcast

#: SGD learning rate of the retrace check's second call: x₂ = x − LR · vjp(u).
RETRACE_LR = 0.01


def row(run: Run, check: str, argument: str, dtype, **fields) -> CheckRow:
    """A row of this run: device and variant filled in, the rest by keyword."""
    return CheckRow(
        check=check,
        variant=run.variant.name,
        device=run.dev,
        dtype=str(dtype),
        argument=argument,
        **fields,
    )


def error_row(run: Run, check: str, err: BaseException, what: str) -> CheckRow:
    return row(run, check, "-", run.label, passed=False, detail=f"{what}: {short_error(err)}")


def measured_row(run, check, argument, dtype, m: Measure, bound: float, note="") -> CheckRow:
    passed = bool(m.error <= bound)
    detail = note if passed else m.detail
    return row(
        run,
        check,
        argument,
        dtype,
        error=m.error,
        autodiff_error=m.autodiff_error,
        bound=bound,
        max_abs_err=m.max_abs,
        passed=passed,
        detail=detail,
    )


def margin(run: Run) -> float:
    return run.tol.margin_units * run.unit


def against_autodiff(run: Run, autodiff_error: float) -> float:
    """The largest error allowed a rule: autodiff's own, its scatter, and the margin."""
    return (1.0 + run.tol.autodiff_scatter) * autodiff_error + margin(run)


def fd_bound(run: Run) -> float:
    return run.tol.fd_units * run.unit


def _truths(run: Run):
    """The reference's float64 results, computed with the float64 differences in one
    program (which :func:`fd_rows` then uses), or None when there are no
    differences to compute or that program fails (each then runs alone)."""
    if "fd" not in run.ctx.checks:
        return None
    try:
        leaves, note, truths = differences_and_reference(run)
    except Exception:
        return None
    run.fd = (leaves, note)
    return truths


def reference_rows(run: Run) -> list[CheckRow]:
    """``forward`` and ``reference`` rows: the rule and autodiff of the reference in
    the run's dtype, both against float64 autodiff of the reference."""
    ctx = run.ctx
    try:
        ad_out, ad_cts = run.ad or reference_vjp(run, run.float_host, run.u_host, in_x64=run.x64)
        if already_float64(run, run.float_host, run.u_host):
            out64, g64 = ad_out, ad_cts  # the same program on the same inputs
        elif (truths := _truths(run)) is not None:
            out64, g64 = truths
        else:
            out64, g64 = reference_vjp(
                run,
                upcast(run.float_host),
                upcast(run.u_host),
                in_x64=True,
                device=run.truth_device(),
            )
    except Exception as err:
        return [error_row(run, "reference", err, "reference raised")]
    run.ad_cts = ad_cts
    rows = []
    floor = run.eps * largest(out64)
    for name, a, y, t in zip(ctx.out_names, run.rule_out, ad_out, out64, strict=True):
        m = against_truth(a, y, t, floor)
        rows.append(
            measured_row(run, "forward", name, a.dtype, m, against_autodiff(run, m.autodiff_error))
        )
    floor = run.eps * largest(g64)
    for name, p, a, y, t in zip(
        ctx.float_names, run.float_host, run.rule_cts, ad_cts, g64, strict=True
    ):
        m = against_truth(a, y, t, floor)
        bound = against_autodiff(run, m.autodiff_error)
        rows.append(measured_row(run, "reference", name, p.dtype, m, bound))
    return rows


def sigmas(cts, estimates, weights, eps, axes=None) -> list[np.ndarray]:
    """σ per leaf (and example): max(‖ĝ ∘ w‖₂, RMS of the float64 directional
    derivatives), at least eps times the largest leaf's (1 if all are 0)."""
    raw = []
    for g, d, w in zip(cts, estimates, weights, strict=True):
        own = np.sqrt(np.sum((np.asarray(g, np.float64) * w) ** 2, axis=axes))
        rms = np.sqrt(np.mean(np.where(np.isfinite(d), d, 0.0) ** 2, axis=0))
        raw.append(np.maximum(np.nan_to_num(own, nan=0.0, posinf=0.0), rms))
    floor = eps * max((float(np.max(s)) for s in raw), default=0.0)
    return [np.where(np.maximum(s, floor) > 0, np.maximum(s, floor), 1.0) for s in raw]


def _direction_values(directions, g) -> np.ndarray:
    """⟨ĝ, v⟩ for each of the k directions, shape (k, 1)."""
    k = directions.shape[0]
    if not g.size:
        return np.zeros((k, 1))
    return np.tensordot(directions, g, axes=g.ndim).reshape(k, 1)


def _with_yardstick(run: Run, m: Measure, ad: Measure | None, check, name, dtype, note):
    """A row bounded by ``fd_units`` of roundoff, plus autodiff's own error when the
    reference gives a yardstick."""
    if ad is None:
        return measured_row(run, check, name, dtype, m, fd_bound(run), note)
    m = dataclasses.replace(m, autodiff_error=ad.error)
    return measured_row(run, check, name, dtype, m, ad.error + fd_bound(run), note)


def _element_rows(run: Run, cts, ads, leaves, fd_note) -> list[CheckRow]:
    """``fd-element``: each entry of a small leaf against its own difference,
    relative to the leaf's largest entry (at least eps times the largest of all)."""
    truths = [ld.elements.estimate()[0] if ld.elements else np.zeros(0) for ld in leaves]
    floor = run.eps * largest(truths)
    rows = []
    for name, p, g, a, ld, t in zip(
        run.ctx.float_names, run.float_host, cts, ads, leaves, truths, strict=True
    ):
        if ld.elements is None:
            continue
        scale = [max(largest([t]), floor) or 1.0]
        m = against_differences(g.reshape(-1, 1), ld.elements, scale, rms=False)
        ad = None
        if a is not None:
            ad = against_differences(a.reshape(-1, 1), ld.elements, scale, rms=False)
        note = f"{g.size} elements, one at a time" + (f"; {fd_note}" if fd_note else "")
        rows.append(_with_yardstick(run, m, ad, "fd-element", name, p.dtype, note))
    return rows


def fd_rows(run: Run) -> list[CheckRow]:
    """``fd-direction`` and ``fd-element`` rows against float64 differences of fn;
    with a reference, autodiff of it in the run's dtype is measured the same way
    and its error added to the bound."""
    try:
        leaves, fd_note = run.fd or differences(run, run.float_host, run.other_host, run.u_host)
    except Exception as err:
        return [error_row(run, "fd-direction", err, "fn raised in float64")]
    cts = upcast(run.rule_cts)
    ads = [None] * len(cts) if run.ad_cts is None else upcast(run.ad_cts)
    estimates = [ld.along.estimate()[0] for ld in leaves]
    sig = sigmas(cts, estimates, [ld.weights for ld in leaves], run.eps)
    note = f"{run.ctx.num_directions} random directions: RMS error / RMS directional derivative"
    note += f"; {fd_note}" if fd_note else ""
    rows = []
    for name, p, g, a, ld, s in zip(
        run.ctx.float_names, run.float_host, cts, ads, leaves, sig, strict=True
    ):
        s = np.reshape(s, (1,))
        m = against_differences(_direction_values(ld.directions, g), ld.along, s, rms=True)
        ad = None
        if a is not None:
            ad = against_differences(_direction_values(ld.directions, a), ld.along, s, rms=True)
        rows.append(_with_yardstick(run, m, ad, "fd-direction", name, p.dtype, note))
    return rows + _element_rows(run, cts, ads, leaves, fd_note)


def dtype_rows(run: Run) -> list[CheckRow]:
    rows = []
    for name, primal, ct in zip(run.ctx.float_names, run.float_host, run.rule_cts, strict=True):
        ok = ct.dtype == primal.dtype and ct.shape == primal.shape
        detail = (
            "cotangent dtype = primal dtype"
            if ok
            else f"cotangent {ct.dtype}{list(ct.shape)} for a primal "
            f"{primal.dtype}{list(primal.shape)}"
        )
        rows.append(row(run, "dtype", name, primal.dtype, passed=bool(ok), detail=detail))
    return rows


def _promoted(a, b) -> np.dtype:
    """JAX's standard promotion of two float dtypes, written out so it also works
    under ``jax_numpy_dtype_promotion="strict"``: the wider one; float32 for
    bfloat16 with float16."""
    a, b = np.dtype(a), np.dtype(b)
    if a == b or a.itemsize != b.itemsize:
        return a if a.itemsize >= b.itemsize else b
    return np.dtype(np.float32)


def retrace_rows(run: Run) -> list[CheckRow]:
    """Call 2 gets what SGD would feed back, x₂ = x − lr·dx in JAX's standard
    promotion (so a cotangent of another dtype changes x₂'s dtype), and a new u."""
    names = run.ctx.float_names
    x2 = [
        (np.asarray(x, np.float64) - RETRACE_LR * np.asarray(c, np.float64)).astype(
            _promoted(x.dtype, c.dtype)
        )
        for x, c in zip(run.float_host, run.rule_cts, strict=True)
    ]
    changed = [
        f"{n}: {a.dtype} -> {b.dtype}"
        for n, a, b in zip(names, run.float_host, x2, strict=True)
        if a.dtype != b.dtype
    ]
    changed = "; x changed dtype: " + ", ".join(changed) if changed else ""
    spec = run.spec
    try:
        # fn's output may change dtype with x₂ (it does under standard promotion).
        out2 = jax.tree.leaves(jax.eval_shape(spec.fn, *spec.assemble(x2, run.other_host)))
        rng = run.rng(3)
        u2 = [rng.standard_normal(o.shape).astype(o.dtype) for o in out2]
        u2 = run.put_tree(run.out_treedef, u2)
        before = spec.traces
        ol = run.put(run.other_host)
        jax.block_until_ready(run.call(run.put(x2), ol, u2))
        again = spec.traces - before
    except Exception as err:
        detail = f"call 2 (x - {RETRACE_LR}*dx) raised {short_error(err)}{changed}"
        return [row(run, "retrace", "-", run.label, passed=False, detail=detail)]
    detail = f"call 1 traced {run.traces_first}x, call 2 (x - {RETRACE_LR}*dx) traced {again}x"
    return [row(run, "retrace", "-", run.label, passed=again == 0, detail=detail + changed)]
