r"""The ``vmap`` check of :func:`jaxlinear.check_vjp`: the rule under ``jax.vmap``,
each example's result against that example's float64 truth.

The truth is float64 autodiff of the reference under ``vmap`` (JAX's own
batching of a plain formula), judged "no worse than the reference in the same
dtype under vmap"; with no reference, float64 finite differences of ``fn``
evaluated one example at a time (``lax.map``), so neither depends on the
rule's batching. A rule wrong only for the shapes one example has (a 1-D x, a
sum over ``x.shape[0]``) fails here, where comparing with a loop of the same
rule could not see it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.api_util import flatten_axes

from . import _check_programs as programs
from ._check_differences import differences
from ._check_explore import _is_float
from ._check_measure import against_differences, against_truth, largest, per_example
from ._check_report import CheckRow
from ._check_rows import against_autodiff, error_row, fd_bound, measured_row, sigmas
from ._check_run import Run, already_float64, scoped, to_host

#: Relative size of the perturbations between the copies of the default vmap batch.
COPY_NOISE = 0.1


def _batch_axis_first(in_axes, args):
    """``args`` as ``jax.vmap(lambda *a: a, in_axes)`` returns them (every leaf with
    its batch axis first, unbatched leaves broadcast), made on the host: no small
    program compiled per leaf. ``in_axes`` was checked against ``args`` already."""
    leaves, treedef = jax.tree.flatten(tuple(args))
    axes = flatten_axes(
        "vmap_in_axes", treedef, tuple(in_axes) if isinstance(in_axes, list) else in_axes
    )
    size = next(np.shape(a)[ax] for a, ax in zip(leaves, axes, strict=True) if ax is not None)
    moved = [
        np.broadcast_to(a, (size, *np.shape(a))) if ax is None else np.moveaxis(a, ax, 0)
        for a, ax in zip(leaves, axes, strict=True)
    ]
    return jax.tree.unflatten(treedef, moved)


def _batch(run: Run):
    """(in_axes, batched args, list of per-example args, detail)."""
    ctx, spec = run.ctx, run.ctx.spec
    if ctx.vmap_in_axes is None:
        rng = run.rng(4)
        copies = [run.float_host] + [
            [
                (h + rng.standard_normal(h.shape) * COPY_NOISE).astype(h.dtype)
                for h in run.float_host
            ]
            for _ in range(ctx.vmap_size - 1)
        ]
        examples = [spec.assemble(c, run.other_host) for c in copies]
        batched = jax.tree.map(lambda *a: np.stack(a), *examples)
        return 0, batched, examples, f"{len(examples)} perturbed copies stacked on a new axis 0"
    in_axes = ctx.vmap_in_axes
    batched = spec.assemble(run.float_host, run.other_host)
    moved = _batch_axis_first(in_axes, batched)
    size = jax.tree.leaves(moved)[0].shape[0]
    examples = [jax.tree.map(lambda a, i=i: a[i], moved) for i in range(size)]
    return in_axes, batched, examples, f"in_axes={in_axes!r}, {size} examples"


def _vmapped(spec, in_axes):
    try:
        hash(in_axes)
        return functools.partial(programs.vmapped_jit, spec, in_axes)
    except TypeError:  # unhashable in_axes (lists): compile a fresh closure
        return jax.jit(functools.partial(programs.vmapped, spec, in_axes))


def _call(run: Run, spec, in_axes, batched, U, device=None):
    put = functools.partial(jax.device_put, device=device or run.device)
    return to_host(*_vmapped(spec, in_axes)(jax.tree.map(put, batched), jax.tree.map(put, U)))


def _reference_spec(run: Run):
    ctx = run.ctx
    base_u = jax.tree.unflatten(run.out_treedef, run.u_host)
    traced = functools.partial(programs.vjp, ctx.ref_spec)
    return ctx.fingerprinted(ctx.ref_spec, "vjp", traced, run.float_host, run.other_host, base_u)


def _call_paired(run: Run, in_axes, batched, U):
    """(the rule's, the reference's) results under vmap from one compiled program, or
    None if that program fails or ``in_axes`` is unhashable (then each runs alone,
    and an error is attributed to the one that raised)."""
    try:
        hash(in_axes)
        program = functools.partial(
            programs.vmapped_pair_jit, run.spec, _reference_spec(run), in_axes
        )
        put = functools.partial(jax.device_put, device=run.device)
        rule, reference = program(jax.tree.map(put, batched), jax.tree.map(put, U))
    except Exception:
        return None
    return to_host(*rule), to_host(*reference)


def _with_reference(run: Run, in_axes, batched, U, rule, ad, detail) -> list[CheckRow]:
    ctx = run.ctx
    ref = _reference_spec(run)
    ad_out, ad_cts = ad or _call(run, ref, in_axes, batched, U)
    floats = [a for a in jax.tree.leaves(batched) if _is_float(a)]
    if already_float64(run, floats, jax.tree.leaves(U)):
        out64, g64 = ad_out, ad_cts  # the same program on the same inputs
    else:
        with scoped(True, ctx.precision):
            b64 = jax.tree.map(lambda a: a.astype(np.float64) if _is_float(a) else a, batched)
            u64 = jax.tree.map(lambda a: np.asarray(a, np.float64), U)
            out64, g64 = _call(run, ref, in_axes, b64, u64, run.truth_device())
    rows = []
    for names, got, ad, truth in (
        (ctx.out_names, rule[0], ad_out, out64),
        (ctx.float_names, rule[1], ad_cts, g64),
    ):
        floor = run.eps * largest(truth)
        for name, a, y, t in zip(names, got, ad, truth, strict=True):
            b, m = per_example(functools.partial(_against, floor=floor), a, y, t)
            m = dataclasses.replace(m, detail=f"{m.detail} (example {b})")
            bound = against_autodiff(run, m.autodiff_error)
            rows.append(measured_row(run, "vmap", name, a.dtype, m, bound, detail))
    return rows


def _against(a, y, t, *, floor):
    return against_truth(a, y, t, floor)


def _with_differences(run: Run, examples, U, rule, detail) -> list[CheckRow]:
    spec = run.ctx.spec
    split = [spec.split(ex) for ex in examples]
    fl = [np.stack(leaves) for leaves in zip(*[f for f, _ in split], strict=True)]
    ol = [np.stack(leaves) for leaves in zip(*[o for _, o in split], strict=True)]
    leaves, _ = differences(run, fl, ol, jax.tree.leaves(U), batch=len(examples))
    cts = [np.asarray(g, np.float64) for g in rule[1]]
    estimates = [ld.along.estimate()[0] for ld in leaves]
    axes = [tuple(range(1, g.ndim)) for g in cts]
    sig = [
        sigmas([g], [e], [ld.weights], 0.0, ax)[0]
        for g, e, ld, ax in zip(cts, estimates, leaves, axes, strict=True)
    ]
    rows = []
    note = f"{detail}; float64 differences per example"
    for name, p, g, ld, s, ax in zip(
        run.ctx.float_names, run.float_host, cts, leaves, sig, axes, strict=True
    ):
        r = np.sum(ld.directions * g[None], axis=tuple(a + 1 for a in ax))
        m = against_differences(r, ld.along, s, rms=True)
        rows.append(measured_row(run, "vmap", name, p.dtype, m, fd_bound(run), note))
    return rows


def vmap_rows(run: Run) -> list[CheckRow]:
    """``vmap`` rows: every cotangent (and, with a reference, every output) per example."""
    ctx = run.ctx
    in_axes, batched, examples, detail = _batch(run)
    try:
        shape = jax.eval_shape(ctx.spec.fn, *examples[0])
    except Exception as err:
        return [error_row(run, "vmap", err, "fn raised on one example")]
    rng = run.rng(5)
    u_leaves = [
        rng.standard_normal((len(examples),) + o.shape).astype(o.dtype)
        for o in jax.tree.leaves(shape)
    ]
    U = jax.tree.unflatten(jax.tree.structure(shape), u_leaves)
    paired = _call_paired(run, in_axes, batched, U) if ctx.compares_reference else None
    try:
        rule = paired[0] if paired else _call(run, run.spec, in_axes, batched, U)
    except Exception as err:
        return [error_row(run, "vmap", err, "the rule raised under vmap")]
    try:
        if ctx.compares_reference:
            ad = paired[1] if paired else None
            return _with_reference(run, in_axes, batched, U, rule, ad, detail)
        return _with_differences(run, examples, U, rule, detail)
    except Exception as err:
        return [error_row(run, "vmap", err, "the truth raised under vmap")]
