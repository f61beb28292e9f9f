r"""Gradient verification for hand-derived VJPs: :func:`check_vjp`.

For ``y = fn(*args)`` and a random cotangent u (fixed by ``seed``), the rule
under test is the pullback ``vjp(u) = (∂y/∂args)ᵀ u``, computed in the run's
dtype. Everything is judged against **float64 truth** on the same (rounded)
inputs and the same u:

* **reference** (and **forward**) -- float64 autodiff of a plain
  ``reference`` formula. The rule must be no less accurate than autodiff of the
  reference in the rule's own dtype: its largest error, relative to the
  largest true entry, may exceed autodiff's by ``margin_units`` units of
  roundoff (see :mod:`jaxlinear.check`'s table). So a rule more accurate than
  autodiff never fails, and one that computes a float64 gradient in float32,
  or is 6 % off in bfloat16, does.
* **fd-direction** / **fd-element** -- float64 central differences of ``fn``
  along random directions v: the rule's ⟨ĝ, v⟩ against ⟨u, J v⟩, the RMS error
  over the directions relative to the RMS directional derivative; and, for
  small leaves, each entry. The bound is ``fd_units`` units of roundoff of the
  rule's dtype plus the differences' own error, never a multiple of the number
  of elements, so the check's power does not fall with size.
* **vmap** -- the rule under ``jax.vmap``, each example against that example's
  float64 truth (reference under vmap, or differences one example at a time).
* **dtype** -- each cotangent has its primal's dtype and shape.
* **retrace** -- a second call, fed what an SGD step gives, hits the compile
  cache.

With ``explore=True`` the value checks (reference, forward, fd) also run on
variants derived from ``args`` -- a leading-axis slice of size 1, one extra
leading axis, sign-flipped and ×4-scaled floating leaves -- each in its own
rows (column ``variant``), so bugs that show only for N = 1, a 3-D x, negative
inputs or |x| > 3 are seen even when ``args`` holds no such case.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from . import _check_args as checked
from ._check_explore import Variant, variants
from ._check_programs import Spec
from ._check_report import ROW_ORDER, CheckReport, CheckRow
from ._check_rows import dtype_rows, error_row, fd_rows, reference_rows, retrace_rows, row
from ._check_run import Context, call_rule, new_run, prepare, scoped
from ._check_vmap import vmap_rows
from ._tolerances import Tolerance

__all__ = ["check_vjp"]


def check_vjp(
    fn: Callable,
    args: tuple,
    *,
    reference: Callable | None = None,
    dtypes: Sequence[Any] | None = None,
    devices: Sequence[Any] | None = None,
    tolerances: Mapping[Any, Tolerance] | None = None,
    checks: Sequence[str] | None = None,
    seed: int = 0,
    num_directions: int = 4,
    elementwise_max_size: int = 128,
    vmap_in_axes: Any = None,
    vmap_size: int = 3,
    explore: bool = True,
    precision: Any = "highest",
    name: str | None = None,
) -> CheckReport:
    r"""Check the VJP of ``fn`` at ``args`` against float64 truth: autodiff of a
    reference, finite differences, per-example under vmap.

    Args:
        fn: the function under test, ``fn(*args)`` returning an array or a
            pytree of floating arrays; typically a ``jax.custom_vjp``.
        args: a tuple of positional arguments (pytrees allowed, e.g.
            :class:`LinearParams`). Floating leaves are differentiated; other
            leaves (integer labels, say) are held fixed.
        reference: a plain formula with ``fn``'s signature and output. Its
            float64 autodiff is the truth of the ``reference``, ``forward`` and
            ``vmap`` rows, its autodiff in the rule's dtype the yardstick.
            ``None``: no ``reference``/``forward`` rows, and ``vmap`` uses finite
            differences.
        dtypes: cast every floating leaf to each dtype in turn; ``None`` keeps the
            args' own dtypes. float64 runs inside ``jax.enable_x64(True)``,
            scoped to this call.
        devices: the devices to run on; ``None`` means every device JAX sees.
        tolerances: ``{dtype: jaxlinear.check.Tolerance}`` overriding entries of
            ``jaxlinear.check.TOLERANCES``. A run's tolerance is that of its
            least precise floating input or output dtype.
        checks: a subset of ``("reference", "fd", "vmap", "dtype", "retrace")``;
            ``None`` runs them all.
        seed: fixes the cotangents, directions and batch copies.
        num_directions: random directions per floating leaf (``fd-direction``).
        elementwise_max_size: leaves of at most this many elements are also
            differenced one element at a time (``fd-element``); 0 turns it off.
        vmap_in_axes: how the ``vmap`` check forms its batch. ``None``: stack
            ``vmap_size`` perturbed copies of every argument on a new axis 0.
            Otherwise ``jax.vmap``'s ``in_axes`` over axes ``args`` already have:
            ``(None, 0)`` gives per-example gradients of ``fn(params, x)``.
        vmap_size: the number of copies when ``vmap_in_axes`` is ``None``.
        explore: also check variants derived from ``args`` (a leading-axis
            slice of size 1, an extra leading axis, ``-args``, ``4*args``).
        precision: the default matmul precision of every evaluation
            (``"highest"`` keeps GPUs from using TF32); ``None`` leaves it.
        name: the report's name, default ``fn.__name__``.

    Returns:
        a :class:`CheckReport`. A mismatch, or an exception raised by the rule
        under a check, is a failing row, never an exception.

    Raises:
        TypeError, ValueError: for bad arguments, including ``fn(*args)`` failing
        at the args' own dtypes before any check runs.

    Non-smooth functions (relu's kink) can fail honestly in bfloat16 or
    float16 where a low-precision forward puts a value on the other side of a
    kink than float64 does. Example (f(x) = x·sin x, f' = sin x + x cos x):

    >>> import jax, jax.numpy as jnp, jaxlinear
    >>> @jax.custom_vjp
    ... def xsin(x):
    ...     return x * jnp.sin(x)
    >>> xsin.defvjp(lambda x: (xsin(x), x), lambda x, g: (g * (jnp.sin(x) + x * jnp.cos(x)),))
    >>> report = jaxlinear.check_vjp(xsin, (jnp.linspace(-2.0, 2.0, 5),),
    ...                              reference=lambda x: x * jnp.sin(x),
    ...                              devices=jax.devices("cpu")[:1])
    >>> report.ok, sorted({row.variant for row in report.rows})
    (True, ['-args', '4*args', 'args', 'stack(x,x[::-1])', 'x[:1]'])
    """
    checked.check_callables(fn, args, reference)
    table = checked.check_tolerances(tolerances)
    run_dtypes = checked.check_dtypes(dtypes, table)
    run_devices = checked.check_devices(devices)
    checked.check_precision(precision)
    ctx, (variant_list, notes) = _setup(
        fn,
        args,
        reference=reference,
        table=table,
        run_dtypes=run_dtypes,
        checks=checked.check_checks(checks),
        seed=checked.check_int("seed", seed, 0),
        num_directions=checked.check_int("num_directions", num_directions, 1),
        elementwise_max_size=checked.check_int("elementwise_max_size", elementwise_max_size, 0),
        vmap_in_axes=vmap_in_axes,
        vmap_size=checked.check_int("vmap_size", vmap_size, 2),
        explore=checked.check_bool("explore", explore),
        precision=precision,
    )
    rows: list[CheckRow] = []
    for device in run_devices:
        for i, dtype in enumerate(run_dtypes):
            rows.extend(_run_dtype(ctx, device, dtype, variant_list, notes, first=i == 0))
    report_name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
    return CheckReport(name=report_name, rows=tuple(rows))


def _setup(fn, args, *, reference, table, run_dtypes, checks, explore, **options):
    """The context shared by every run, and the variants of ``args`` to check."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
    paths = [p for p, _ in paths_leaves]
    host = [checked.host_leaf(leaf) for _, leaf in paths_leaves]
    float_idx, other_idx = checked.split_leaves(paths, host, table, run_dtypes)
    names = checked.leaf_names(fn, args, paths)
    spec = Spec(fn, treedef, float_idx, other_idx)
    x64 = any(h.dtype == np.float64 for h in host)
    with scoped(x64, options["precision"]):
        out_shape = checked.check_outputs(fn, reference, args, checks, options["vmap_in_axes"])
        base = Variant("args", host, "the arguments given", False)
        found, notes = ([], [])
        if explore:
            found, notes = variants(
                spec, host, names, options["vmap_in_axes"], jax.tree.structure(out_shape)
            )
    ctx = Context(
        spec=spec,
        ref_spec=None if reference is None else Spec(reference, treedef, float_idx, other_idx),
        float_names=[names[i] for i in float_idx],
        out_names=checked.output_names(out_shape),
        table=table,
        checks=checks,
        **options,
    )
    return ctx, ([base, *found], notes)


def _run_dtype(ctx, device, dtype, variant_list, notes, first) -> list[CheckRow]:
    """Every variant's rows for one device and dtype, variant by variant; the
    variants with new shapes only in the ``first`` dtype checked on a device."""
    rows = []
    # Variants run the value checks only: reference (given one) and fd.
    values = "fd" in ctx.checks or (ctx.ref_spec is not None and "reference" in ctx.checks)
    for index, variant in enumerate(variant_list):
        if index and not values:
            break
        if variant.new_shapes and not first:
            continue  # shape bugs are not precision bugs: one dtype per device
        got = _run_variant(ctx, device, dtype, variant, index)
        rows.extend(sorted(got, key=lambda r: ROW_ORDER.index(r.check)))
    if notes and first:
        run = new_run(ctx, device, dtype, variant_list[0], 0)
        for note in notes:
            rows.append(row(run, "explore", "-", run.label, passed=True, detail=note))
    return rows


def _run_variant(ctx: Context, device, dtype, variant: Variant, index: int) -> list[CheckRow]:
    run = new_run(ctx, device, dtype, variant, index)
    base = index == 0
    with scoped(run.x64, ctx.precision):
        try:
            prepare(run)
        except Exception as err:
            return [error_row(run, "vjp", err, "fn(*args) raised")]
        try:
            call_rule(run)
        except Exception as err:
            return [error_row(run, "vjp", err, "the rule raised")]
        if not base and not all(np.isfinite(o).all() for o in run.rule_out):
            detail = f"fn is not finite at {variant.name} in {run.label}: variant skipped"
            return [row(run, "explore", "-", run.label, passed=True, detail=detail)]
        rows = []
        if base and "dtype" in ctx.checks:
            rows += dtype_rows(run)
        if base and "retrace" in ctx.checks:
            rows += retrace_rows(run)
        if ctx.ref_spec is not None and "reference" in ctx.checks:
            rows += reference_rows(run)
        if "fd" in ctx.checks:
            rows += fd_rows(run)
        if base and "vmap" in ctx.checks:
            rows += vmap_rows(run)
    return rows
