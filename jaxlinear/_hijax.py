"""The experimental JAX internals jaxlinear's primitives are built on, in one place.

Every rule in jaxlinear is a :class:`jax.experimental.hijax.VJPHiPrimitive`: one
object that carries the forward pass and its hand-derived VJP, JVP, transpose and
batching rules. That API is experimental, so this module imports exactly what is
used, from the JAX versions the test suite ran on (``SUPPORTED_JAX`` below, the
same range ``pyproject.toml`` pins), and fails at import with a message naming
that range when JAX lacks it.
"""

from __future__ import annotations

import jax

#: The JAX versions whose hijax API the test suite ran on (pinned in pyproject.toml).
SUPPORTED_JAX = ">=0.10.2,<0.10.3"

try:
    from jax._src import core as _core, dispatch as _dispatch, hijax as _hijax
    from jax._src.ad_checkpoint import primal_left_tangent_right
    from jax._src.interpreters import (
        ad as _ad,
        batching as _batching,
        mlir as _mlir,
        partial_eval as _pe,
        remat as _remat,
    )
    from jax._src.interpreters.ad import GradAccum, NullAccum
    from jax._src.lax.lax import canonicalize_precision
    from jax._src.tree_util import tree_leaves_checked, tree_unflatten
    from jax.experimental.hijax import VJPHiPrimitive, Zero
except ImportError as err:  # pragma: no cover - depends on the installed JAX
    raise ImportError(
        f"jaxlinear needs jax.experimental.hijax.VJPHiPrimitive (JAX {SUPPORTED_JAX}); "
        f"the installed JAX {jax.__version__} does not provide it ({err}). Install a "
        f"supported version: pip install 'jax{SUPPORTED_JAX}'."
    ) from err

__all__ = [
    "Rule",
    "SUPPORTED_JAX",
    "staged_primitive",
    "VJPHiPrimitive",
    "Zero",
    "agree_varying_axes",
    "canonicalize_precision",
    "is_eager",
    "is_zero",
    "primal_left_tangent_right",
    "saves_output",
    "wants_cotangent",
]


def is_eager() -> bool:
    """Whether JAX is evaluating eagerly: no transformation or trace is active."""
    return isinstance(_core.trace_ctx.trace, _core.EvalTrace)


def is_zero(t) -> bool:
    """Whether a tangent or cotangent is JAX's symbolic zero (or absent)."""
    return t is None or isinstance(t, Zero)


def wants_cotangent(slot) -> bool:
    """Whether a transpose/VJP argument slot is an accumulator that needs a cotangent.

    Defined primals arrive as values; undefined ones as ``GradAccum``s, of which a
    ``NullAccum`` discards what it is given (nothing downstream needs it), so its
    product is not computed at all.
    """
    return isinstance(slot, GradAccum) and not isinstance(slot, NullAccum)


def agree_varying_axes(*arrays):
    """Inside ``shard_map``, mark every array varying over the union of the arrays'
    manual axes (what JAX's own binary operations do before they bind), so one
    primitive sees operands of one type. Outside ``shard_map`` a no-op."""
    present = [a for a in arrays if a is not None]
    if not present:
        return arrays
    agreed = iter(_core.auto_insert_reshard(*present))
    return tuple(None if a is None else next(agreed) for a in arrays)


# ----------------------------------------------------------------------------- staging
# JAX 0.10.2 gives up its C++ dispatch fast path for every jitted program whose jaxpr
# holds a hijax primitive (pjit.py: a "high" jaxpr is re-lowered on every call, about
# 0.1 ms per call whatever the program). So a :class:`Rule` is bound as a hijax
# primitive only where a transformation handles it (JVP, linearize/VJP, vmap: the
# traces whose rules are written by hand here). Where it would be *staged* into a
# jaxpr, or evaluated, it is bound as its *low twin*: an ordinary primitive
# whose parameter is the same rule object and whose JVP, linearization, transpose and
# batching rules call that object's methods. A staged program that is differentiated
# or batched later (grad of jit, scan, checkpoint, cond) therefore runs the same
# hand-written rules, and a jitted call keeps JAX's fast dispatch.

_TRANSFORM_TRACES = (_ad.JVPTrace, _ad.LinearizeTrace, _batching.BatchTrace)


class Rule(VJPHiPrimitive):
    """A :class:`VJPHiPrimitive` that is staged as its low twin (see above).

    Subclasses set ``staged``, the twin made by :func:`staged_primitive`.
    """

    staged: _core.Primitive

    def remat(self, policy, *args):
        """``jax.checkpoint`` under ``jax_remat3``: save the output if the policy
        saves this primitive's (e.g. ``everything_saveable``), else recompute it."""
        out = self(*args)
        if not saves_output(policy, self.staged, *self.in_avals_flat, rule=self):
            return out, self
        return out, lambda *a: jax.tree.map(primal_left_tangent_right, out, self(*a))

    def __call__(self, *args):
        if isinstance(_core.trace_ctx.trace, _TRANSFORM_TRACES):
            return super().__call__(*args)
        out = self.staged.bind(*tree_leaves_checked(self.in_tree, args), rule=self)
        return tree_unflatten(self.out_tree, out)


def staged_primitive(name: str) -> _core.Primitive:
    """A low primitive standing for :class:`Rule` objects in staged programs.

    Its one parameter is the rule object; evaluation, lowering, JVP, linearization
    (VJP), transposition and batching all call that object's methods.
    """
    prim = _core.Primitive(name)
    prim.multiple_results = True
    prim.def_impl(lambda *args, rule: _dispatch.apply_primitive(prim, *args, rule=rule))
    prim.def_abstract_eval(lambda *avals, rule: rule.out_avals_flat)
    _mlir.register_lowering(prim, _mlir.lower_fun(_expand_flat, multiple_results=True))
    _ad.primitive_jvps[prim] = _jvp_flat
    _ad.primitive_linearizations[prim] = _linearize_flat
    _ad.fancy_transposes[prim] = _transpose_flat
    _batching.fancy_primitive_batchers[prim] = _batch_flat
    _remat.rules[prim] = _remat_flat
    return prim


def _expand_flat(*args, rule):
    out = rule.expand(*tree_unflatten(rule.in_tree, args))
    return tree_leaves_checked(rule.out_tree, out)


def _jvp_flat(primals, tangents, *, rule):
    out, out_dot = rule.jvp(
        tree_unflatten(rule.in_tree, primals), tree_unflatten(rule.in_tree, tangents)
    )
    return tree_leaves_checked(rule.out_tree, out), rule.out_tree.flatten_up_to(out_dot)


def _linearize_flat(is_vjp, nzs, *args, rule):
    return _hijax._call_hi_primitive_linearize(is_vjp, nzs, *args, _prim=rule)


def _transpose_flat(cts, *args, rule):
    rule.transpose(tree_unflatten(rule.out_tree, cts), *tree_unflatten(rule.in_tree, args))


def _batch_flat(axis_data, args, dims, *, rule):
    return _hijax._call_hi_primitive_batcher(axis_data, args, dims, _prim=rule)


def _remat_flat(policy, *args, rule):
    return _hijax._call_hi_primitive_remat(policy, *args, _prim=rule)


def saves_output(policy, prim, *avals, **params) -> bool:
    """Whether a ``jax.checkpoint`` policy, asked about ``prim`` as ``jax_remat3``
    asks, saves its output (offloading counts as recomputing here)."""
    if policy is None:
        return False
    return isinstance(_pe.ensure_enum(policy(prim, *avals, **params)), _pe.SaveableType)
