r"""Float64 finite differences for :func:`jaxlinear.check_vjp`: the truth when there
is no reference, computed from ``fn``'s forward alone.

For each floating leaf x (of the arguments, or of a stack of examples) and
random directions v = z ∘ max(1, |x|), z ~ N(0, I), the program returns
φ(x + p) − φ(x − p) for p = h·v and 2h·v (and, for small leaves, p = h·max(1,
|xᵢ|)·eᵢ and twice that, one element at a time), φ = ⟨u, fn(x)⟩, h = eps^(1/3)
of fn's float64 output dtype (:data:`FD_RELATIVE_STEP` for float64).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _check_programs as programs
from ._check_measure import Differences
from ._check_run import Run, scoped, to_host, upcast


@dataclasses.dataclass(frozen=True)
class LeafDifferences:
    """The differences of one leaf: along ``directions`` (k, [B,] *shape) and, if
    the leaf is small, along each element (``elements``, (n, 1))."""

    directions: np.ndarray
    weights: np.ndarray
    along: Differences
    elements: Differences | None


def _output_eps(spec, fl64, ol) -> float:
    """eps of the least precise dtype fn returns for float64 inputs."""
    out = jax.eval_shape(spec.fn, *spec.assemble(fl64, ol))
    return max(float(jnp.finfo(o.dtype).eps) for o in jax.tree.leaves(out))


def _stacks(run: Run, leaves, batch: int | None, step: float, rng):
    """Per leaf: (directions, weights, perturbation stack [hV, 2hV, hE, 2hE])."""
    k = run.ctx.num_directions
    plans = []
    for x in leaves:
        w = np.maximum(1.0, np.abs(x))
        v = rng.standard_normal((k,) + x.shape) * w
        stack = [step * v, 2 * step * v]
        if batch is None and 0 < x.size <= run.ctx.elementwise_max_size:
            e = (np.eye(x.size) * w.reshape(-1)[:, None]).reshape((x.size,) + x.shape)
            stack += [step * e, 2 * step * e]
        plans.append((v, w, np.concatenate(stack)))
    return plans


def _split(diff, rounding, step, w, k) -> tuple[Differences, Differences | None]:
    along = Differences(diff[:k], diff[k : 2 * k], np.asarray(step), rounding / step)
    if diff.shape[0] == 2 * k:
        return along, None
    h = (step * w.reshape(-1))[:, None]
    n = h.shape[0]
    elements = Differences(diff[2 * k : 2 * k + n], diff[2 * k + n :], h, rounding / h)
    return along, elements


def differences(run: Run, float_leaves, other_leaves, u_leaves, *, batch: int | None = None):
    """Float64 differences for every leaf, and a note when fn's output is less
    precise than float64 (so are the differences then).

    ``batch``: the number of examples stacked on axis 0 of every leaf and of u,
    each evaluated alone; ``None`` for the arguments as they are.
    """
    out, note, _ = _differences(run, float_leaves, other_leaves, u_leaves, batch, reference=False)
    return out, note


def differences_and_reference(run: Run):
    """:func:`differences` at the run's own arguments, and the reference's float64
    ``(outputs, cotangents)`` there, from one compiled program (``truths_jit``).
    Raises if either raises; then each is computed alone, so the error is blamed
    on the one that raised."""
    return _differences(run, run.float_host, run.other_host, run.u_host, None, reference=True)


def _differences(run: Run, float_leaves, other_leaves, u_leaves, batch, *, reference: bool):
    ctx, device = run.ctx, run.truth_device()
    rng = run.rng(1 if batch is None else 2)
    with scoped(True, ctx.precision):
        fl64, ol = upcast(float_leaves), list(other_leaves)
        one = (lambda a: a[0]) if batch is not None else (lambda a: a)
        example = ([one(a) for a in fl64], [one(a) for a in ol])
        eps = _output_eps(ctx.spec, *example)
        step = eps ** (1.0 / 3.0)
        plans = _stacks(run, fl64, batch, step, rng)
        u64 = jax.tree.unflatten(run.out_treedef, run.put(upcast(u_leaves), device))
        args = (run.put(fl64, device), run.put(ol, device), u64)
        spec = ctx.fingerprinted(ctx.spec, "forward", ctx.spec.call, *example)
        stacks = run.put([p for *_, p in plans], device)
        truth = None
        if reference:
            traced = functools.partial(programs.vjp, ctx.ref_spec)
            ref = ctx.fingerprinted(ctx.ref_spec, "vjp", traced, *args)
            (ref_out, ref_cts), (size, diffs) = programs.truths_jit(ref, spec, *args, stacks)
            truth = to_host(ref_out, ref_cts)
        else:
            size, diffs = programs.differences_jit(spec, batch is not None, *args, stacks)
        rounding = 2 * eps * np.asarray(size, np.float64)  # 2·eps·Σ|u||f|, shape (B,)
    out = []
    for (v, w, _), diff in zip(plans, diffs, strict=True):
        along, elements = _split(np.asarray(diff, np.float64), rounding, step, w, len(v))
        out.append(LeafDifferences(v, w, along, elements))
    note = "" if eps <= np.finfo(np.float64).eps else f"fn returns eps {eps:.1e} for float64 inputs"
    return out, note, truth
