r"""Per-example gradient norms and clipped gradients without per-example gradients.

Differentially private SGD clips each example's gradient to norm at most C. The
usual JAX recipe, ``vmap(grad)``, materialises one full gradient per example.
For a model built from :func:`jaxlinear.linear_apply` layers that is not needed
("ghost clipping", as in Opacus): for one layer y = x W + b and one example i
whose rows are x_{i,t}, t = 1..T (T = 1 for flat inputs ``(B, in)``, T = the
product of the middle axes of ``(B, *seq, in)``), with g_{i,t} = ∂Lᵢ/∂y_{i,t},

* ∇_W Lᵢ = Σ_t x_{i,t} g_{i,t}ᵀ and ∇_b Lᵢ = Σ_t g_{i,t} (the layer's own backward
  restricted to example i's rows), so
* ‖∇_W Lᵢ‖²_F = Σ_{s,t} (x_{i,s}·x_{i,t}) (g_{i,s}·g_{i,t}), which for T = 1 is
  ‖xᵢ‖² ‖gᵢ‖², and ‖∇_b Lᵢ‖² = ‖Σ_t g_{i,t}‖²;
* every g_{i,t} of every layer comes from ONE backward pass of Σᵢ Lᵢ with respect
  to zero "probes" added to the layers' outputs, because example i's rows only
  reach Lᵢ;
* the clipped mean gradient (1/B) Σᵢ sᵢ ∇Lᵢ, sᵢ = min(1, C/‖∇Lᵢ‖), is for each
  layer xᵀ (s ⊙ g) / B: one matmul per layer, on the x and g already at hand.

A weight used by several calls (shared) has ∇_W Lᵢ = Σ_k Σ_t x^k_{i,t} g^k_{i,t}ᵀ:
its calls are concatenated along the sequence axis and the same formulas apply.
For ``layout="out_in"`` the roles of x and g swap (∇_W = gᵀ x), which leaves the
norm unchanged.

The squared norm of a sequence layer is computed in one of two forms, chosen
statically per weight to keep the temporaries small: the Gram form above, with
``(B, T, T)`` temporaries, when T² ≤ p·q for a ``(p, q)`` weight, otherwise the
explicit per-example xᵢᵀgᵢ, with ``(B, p, q)`` temporaries (then T > √(pq), so
p·q < T·(p + q)/2: smaller than the layer's own input and output gradient).

How the layers are found: :func:`per_example_grad_norms` traces ``loss_fn``
with a *tap* made active by ``jaxlinear._taps.tapping`` (a ``ContextVar``, so
scoped to this thread and this call), which every :func:`linear_apply` call
consults at trace time (no tap is active otherwise, so the hook costs nothing
outside these functions and nothing at run time). A first,
abstract trace (``jax.make_jaxpr``) finds each call whose ``W`` or ``b`` *is*
(by identity) a leaf of ``params``, and checks that every float leaf of
``params`` reaches the loss only through such calls; a second trace under
``jax.vjp`` adds the probes and records each call's input x. A call made under
another transformation inside ``loss_fn`` (``vmap``, ``scan``, ``checkpoint``, a
nested ``jit``) is seen at a different JAX trace state and, if it uses a
parameter, refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _taps
from ._linear import LinearParams, _linear
from ._validate import accumulation_dtype, check_l2_clip, describe, sum_dtype

try:  # the public home since JAX 0.5; Flax reads the trace state the same way.
    from jax.extend.core import Literal as _Literal, get_opaque_trace_state as _trace_state
except ImportError:  # pragma: no cover - older JAX
    from jax.core import Literal as _Literal, get_opaque_trace_state as _trace_state

__all__ = ["clipped_grad", "per_example_grad_norms"]

Array = jax.Array

_TRANSFORM_HINT = (
    "per_example_grad_norms reads each layer's input and output gradient from the trace "
    "of `loss_fn` itself, so a layer that uses a parameter must be called directly in "
    "`loss_fn`, on x of shape (B, ..., in_features) with the examples along the leading "
    "axis: not under jax.vmap, lax.scan, jax.checkpoint, lax.cond or a nested jax.jit "
    "inside `loss_fn` (jit the whole per_example_grad_norms/clipped_grad call instead)."
)


@dataclasses.dataclass(frozen=True)
class _Call:
    """One :func:`linear_apply` call at the traced level of ``loss_fn``, in call order.

    ``w_leaf``/``b_leaf`` index the flattened ``params`` leaves (``None``: the
    call's W or b is not a parameter; a call with neither is not tapped).
    """

    w_leaf: int | None
    b_leaf: int | None
    layout: str
    precision: Any
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    y_dtype: np.dtype

    @property
    def tapped(self) -> bool:
        return self.w_leaf is not None or self.b_leaf is not None


@dataclasses.dataclass(frozen=True)
class _Plan:
    calls: tuple[_Call, ...]
    paths: tuple[str, ...]  # pytree path of each params leaf, for messages
    leaf_shapes: tuple[tuple[int, ...], ...]
    leaf_dtypes: tuple[np.dtype, ...]
    treedef: Any
    batch_size: int


class _Tap:
    """The interceptor active (``_taps.tapping``) while one trace of ``loss_fn`` runs.

    ``mode="discover"``: record every call (abstract trace; a parameter weight is
    replaced by zeros so that the jaxpr shows any *other* use of that leaf).
    ``mode="probe"``: compute the layer, add its probe, record its input x.
    """

    def __init__(self, mode: str, leaves: list, paths, batch_size: int, plan=None, probes=None):
        self.mode = mode
        self.leaves = leaves
        self.paths = paths
        self.batch_size = batch_size
        self.index = {id(leaf): i for i, leaf in enumerate(leaves)}
        self.plan = plan
        self.probes = probes
        self.calls: list[_Call] = []
        self.xs: list[Array] = []
        self.count = 0
        self.state = None

    def __enter__(self):
        self.state = _trace_state()
        self._scope = _taps.tapping(self)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc):
        return self._scope.__exit__(*exc)

    def __call__(self, params, x, W, b, precision, preferred_element_type):
        """The hook :func:`linear_apply` calls (on the innermost tap) after validation."""
        state = _trace_state()
        for tap in reversed(_taps.active()):
            if tap.state == state:
                return tap._layer(params, x, W, b, precision, preferred_element_type)
        # A call under a transformation inside loss_fn: fine unless it uses a parameter.
        for tap in _taps.active():
            tap._refuse_if_parameter(params)
        return _linear(params.layout, precision, preferred_element_type, b is not None, x, W, b)

    def _leaf_of(self, value) -> int | None:
        return None if value is None else self.index.get(id(value))

    def _refuse_if_parameter(self, params: LinearParams) -> None:
        for name in ("W", "b"):
            i = self._leaf_of(getattr(params, name))
            if i is not None:
                raise ValueError(
                    f"`linear_apply` was called with `params{self.paths[i]}` as its `{name}` "
                    f"under a JAX transformation inside `loss_fn`. {_TRANSFORM_HINT}"
                )

    def _layer(self, params, x, W, b, precision, preferred_element_type):
        k = self.count
        self.count += 1
        layout = params.layout
        if self.mode == "discover":
            w_leaf, b_leaf = self._leaf_of(params.W), self._leaf_of(params.b)
            # Zeros stand in for the parameters (only shapes matter here), so the
            # jaxpr references a leaf only where loss_fn uses it outside a layer.
            W_used = W if w_leaf is None else jnp.zeros(W.shape, W.dtype)
            b_used = b if b_leaf is None else jnp.zeros(b.shape, b.dtype)
            y = _linear(layout, precision, preferred_element_type, b is not None, x, W_used, b_used)
            call = _Call(w_leaf, b_leaf, layout, precision, x.shape, y.shape, np.dtype(y.dtype))
            if call.tapped:
                self._check_rows(call, k)
            self.calls.append(call)
            return y
        y = _linear(layout, precision, preferred_element_type, b is not None, x, W, b)
        plan_calls = self.plan.calls
        if k >= len(plan_calls):
            raise _retrace_error(f"it made more than {len(plan_calls)} linear_apply calls")
        call = plan_calls[k]
        if not call.tapped:
            if self._leaf_of(params.W) is not None or self._leaf_of(params.b) is not None:
                raise _retrace_error(
                    f"linear_apply call #{k} used a parameter only the second time"
                )
            return y
        same = (
            (call.w_leaf is None or params.W is self.leaves[call.w_leaf])
            and (call.b_leaf is None or params.b is self.leaves[call.b_leaf])
            and x.shape == call.x_shape
            and y.shape == call.y_shape
        )
        if not same:
            raise _retrace_error(f"linear_apply call #{k} used other parameters or shapes")
        self.xs.append(x)
        return y + self.probes[len(self.xs) - 1]

    def _check_rows(self, call: _Call, k: int) -> None:
        B = self.batch_size
        if len(call.x_shape) < 2 or call.x_shape[0] != B:
            leaf = call.w_leaf if call.w_leaf is not None else call.b_leaf
            raise ValueError(
                f"`linear_apply` call #{k} (parameter `params{self.paths[leaf]}`) got "
                f"x.shape={call.x_shape}, but per-example gradients need the B={B} examples "
                f"along x's leading axis, x.shape == (B, ..., in_features), as in every "
                f"leaf of `batch`. {_TRANSFORM_HINT}"
            )


def _retrace_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"`loss_fn` traced differently on its two traces ({what}). per_example_grad_norms "
        "needs `loss_fn` to be a pure function of (params, batch)."
    )


def _batch_size(batch: Any) -> int:
    leaves_with_paths = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves_with_paths:
        raise ValueError(
            "`batch` must contain at least one array whose leading axis indexes the "
            f"examples; got a pytree with no leaves: {batch!r}."
        )
    sizes = {}
    for path, leaf in leaves_with_paths:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(
                f"every leaf of `batch` must have a leading example axis (B, ...); "
                f"`batch{jax.tree_util.keystr(path)}` is a scalar."
            )
        sizes[jax.tree_util.keystr(path)] = shape[0]
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"batch{p}: {n}" for p, n in sizes.items())
        raise ValueError(
            f"every leaf of `batch` must have the same leading (example) axis; got {shown}."
        )
    return next(iter(sizes.values()))


def _live_invars(jaxpr) -> list[bool]:
    """Which inputs of ``jaxpr`` its outputs depend on (through a gradient-carrying path)."""
    live = {v for v in jaxpr.outvars if not isinstance(v, _Literal)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.primitive.name == "stop_gradient":
            continue
        if eqn.effects or any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, _Literal))
    return [v in live for v in jaxpr.invars]


def _plan(loss_fn: Callable, params: Any, batch: Any) -> _Plan:
    """Validate the arguments and find the layers: the abstract (discovery) trace."""
    if not callable(loss_fn):
        raise TypeError(
            f"`loss_fn` must be a callable loss_fn(params, batch) -> (B,) per-example "
            f"losses; got {type(loss_fn).__name__}."
        )
    B = _batch_size(batch)
    paths, leaves, treedef = _float_leaves(params)
    calls: list[_Call] = []

    def traced(leaf_values, batch):
        with _Tap("discover", leaf_values, paths, B) as tap:
            losses = loss_fn(jax.tree.unflatten(treedef, leaf_values), batch)
        calls.extend(tap.calls)
        _check_losses(losses, B)
        return losses

    closed = jax.make_jaxpr(traced)(leaves, batch)
    _check_only_layers_use_parameters(calls, _live_invars(closed.jaxpr), paths, leaves)
    return _Plan(
        calls=tuple(calls),
        paths=paths,
        leaf_shapes=tuple(tuple(np.shape(leaf)) for leaf in leaves),
        leaf_dtypes=tuple(np.dtype(jnp.result_type(leaf)) for leaf in leaves),
        treedef=treedef,
        batch_size=B,
    )


def _float_leaves(params: Any):
    """(pytree paths, leaves, treedef) of ``params``, every leaf a real float array."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = tuple(jax.tree_util.keystr(p) for p, _ in with_paths)
    leaves = [leaf for _, leaf in with_paths]
    for path, leaf in zip(paths, leaves, strict=True):
        try:
            dtype = jnp.result_type(leaf)
        except (TypeError, ValueError):
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"every leaf of `params` must be a real floating array (a trained "
                f"parameter); `params{path}` is {getattr(dtype, 'name', type(leaf).__name__)}. "
                "Pass non-trainable values through `batch` or close over them in `loss_fn`."
            )
    return paths, leaves, treedef


def _check_only_layers_use_parameters(calls, live, paths, leaves) -> None:
    """Every parameter the loss depends on is the W or b of layer calls, and only that."""
    consumed = set()
    for call in calls:
        consumed.update(i for i in (call.w_leaf, call.b_leaf) if i is not None)
    for i, path in enumerate(paths):
        if i not in consumed and live[i]:
            raise ValueError(
                f"`params{path}` (shape {np.shape(leaves[i])}) is not the `W` or `b` of any "
                "jaxlinear.linear_apply call in `loss_fn`, so its per-example gradient "
                "cannot be computed without materialising it. Per-example norms cover "
                "exactly the weights and biases of jaxlinear layers (linear_apply, mlp_apply) "
                "passed unchanged from "
                "`params`; keep other values out of `params` (close "
                "over them, or pass them in `batch`), or fold them into a LinearParams. "
                f"(If it is a layer's weight: {_TRANSFORM_HINT})"
            )
        if i in consumed and live[i]:
            raise ValueError(
                f"`params{path}` is used by `loss_fn` outside jaxlinear.linear_apply as well "
                "(e.g. a weight penalty, weight tying through W.T, or a cast/reshape before "
                "the layer), so the layers alone do not give its per-example gradient. Use "
                "each parameter only as the `W` or `b` of linear_apply calls, and apply a "
                "weight penalty outside the per-example losses (e.g. "
                "optax.add_decayed_weights)."
            )


def _check_losses(losses: Any, B: int) -> None:
    """``loss_fn``'s output must be one float array of shape (B,) (trace time)."""
    expected = (
        f"one float array of per-example losses of shape (B,) = ({B},), B being the "
        "leading axis of `batch`"
    )
    if not isinstance(losses, (jax.Array, np.ndarray)):
        kind = type(losses).__name__
        if isinstance(losses, dict):
            kind = f"a dict with keys {sorted(map(str, losses))}"
        elif isinstance(losses, (tuple, list)):
            kind = f"a {type(losses).__name__} of {len(losses)}: return aux values elsewhere"
        raise TypeError(f"`loss_fn(params, batch)` must return one array: {expected}; got {kind}.")
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(
            f"`loss_fn(params, batch)` must return a float array: {expected}; got "
            f"{describe(losses)}."
        )
    if losses.shape != (B,):
        raise ValueError(
            f"`loss_fn(params, batch)` must return {expected}; got "
            f"{losses.dtype}{list(losses.shape)}. Return the losses before taking their mean."
        )


def _probe(loss_fn, params, batch, plan: _Plan):
    """One forward and one backward pass: each tapped call's (x, g = ∂Σᵢ Lᵢ/∂y)."""
    leaves = jax.tree.leaves(params)
    tapped = [c for c in plan.calls if c.tapped]
    probes = [jnp.zeros(c.y_shape, c.y_dtype) for c in tapped]

    def with_probes(probes):
        with _Tap("probe", leaves, plan.paths, plan.batch_size, plan, probes) as tap:
            losses = loss_fn(params, batch)
        if tap.count != len(plan.calls):
            raise _retrace_error(f"{tap.count} linear_apply calls, then {len(plan.calls)}")
        return losses, tap.xs

    losses, vjp, xs = jax.vjp(with_probes, probes, has_aux=True)
    (gs,) = vjp(jnp.ones(losses.shape, losses.dtype))
    return tapped, xs, gs


@dataclasses.dataclass
class _Group:
    """All tapped calls that use one parameter leaf."""

    kind: str  # "W" or "b"
    calls: list = dataclasses.field(default_factory=list)  # (call, x, g)


def _groups(plan: _Plan, tapped, xs, gs) -> dict[int, _Group]:
    groups: dict[int, _Group] = {}
    for call, x, g in zip(tapped, xs, gs, strict=True):
        for leaf, kind in ((call.w_leaf, "W"), (call.b_leaf, "b")):
            if leaf is not None:
                groups.setdefault(leaf, _Group(kind)).calls.append((call, x, g))
    return groups


def _rows(a: Array) -> Array:
    """``(B, *seq, f)`` -> ``(B, T, f)`` with T = prod(seq) (1 for flat inputs)."""
    return a.reshape(a.shape[0], math.prod(a.shape[1:-1]), a.shape[-1])


def _oriented(call: _Call, x: Array, g: Array) -> tuple[Array, Array]:
    """(a, c) with ∇W = aᵀ c in W's own layout: (x, g) for "in_out", (g, x) for "out_in"."""
    return (x, g) if call.layout == "in_out" else (g, x)


def _sum_dtype(*dtypes) -> np.dtype:
    """The :func:`sum_dtype` that holds every one of ``dtypes``."""
    return functools.reduce(accumulation_dtype, dtypes, sum_dtype(np.float32))


def _squared_norms(group: _Group, acc: np.dtype) -> Array:
    """‖∇Lᵢ‖² of one leaf, ``(B,)`` in ``acc``."""
    precision = group.calls[0][0].precision
    if group.kind == "b":
        total = None
        for _, _, g in group.calls:
            s = jnp.sum(_rows(g), axis=1, dtype=acc)  # Σ_t g_t  (B, out)
            total = s if total is None else total + s
        return jnp.sum(total * total, axis=-1)
    pairs = [_oriented(call, _rows(x), _rows(g)) for call, x, g in group.calls]
    if len(pairs) == 1:
        a, c = pairs[0]
    else:  # a shared weight: its calls are more rows of the same examples
        a = jnp.concatenate([a.astype(acc) for a, _ in pairs], axis=1)
        c = jnp.concatenate([c.astype(acc) for _, c in pairs], axis=1)
    T, p, q = a.shape[1], a.shape[2], c.shape[2]
    if T == 1:  # ‖aᵢ‖² ‖cᵢ‖², squared in the accumulation dtype
        a, c = a.astype(acc), c.astype(acc)
        return jnp.sum(a * a, axis=(1, 2)) * jnp.sum(c * c, axis=(1, 2))
    if T * T <= p * q:  # Gram form Σ_{s,t} (a_s·a_t)(c_s·c_t), (B, T, T) temporaries
        gram = (((2,), (2,)), ((0,), (0,)))
        ga = lax.dot_general(a, a, gram, precision=precision, preferred_element_type=acc)
        gc = lax.dot_general(c, c, gram, precision=precision, preferred_element_type=acc)
        return jnp.sum(ga * gc, axis=(1, 2))
    # Explicit per-example aᵢᵀ cᵢ, (B, p, q) temporaries.
    m = lax.dot_general(
        a, c, (((1,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=acc
    )
    return jnp.sum(m * m, axis=(1, 2))


def _norms(plan: _Plan, groups: dict[int, _Group], acc: np.dtype) -> Array:
    total = jnp.zeros((plan.batch_size,), acc)
    for leaf in sorted(groups):
        total = total + _squared_norms(groups[leaf], acc)
    return jnp.sqrt(jnp.maximum(total, jnp.zeros((), acc)))


def _acc_dtype(plan: _Plan, tapped) -> np.dtype:
    return _sum_dtype(*plan.leaf_dtypes, *(c.y_dtype for c in tapped))


def per_example_grad_norms(loss_fn: Callable[[Any, Any], Array], params: Any, batch: Any) -> Array:
    r"""The L2 norm of each example's gradient, without computing per-example gradients.

    Args:
        loss_fn: ``loss_fn(params, batch) -> (B,)`` per-example losses (not their
            mean), built from :func:`jaxlinear.linear_apply` layers (directly or
            through :func:`jaxlinear.mlp_apply`) with any activations and any
            per-example loss. Every layer that uses a parameter must see the
            examples along the leading axis of its input, ``(B, in)`` or
            ``(B, *seq, in)``, and be called directly in ``loss_fn`` (not under a
            ``vmap``/``scan``/``checkpoint``/nested ``jit`` inside it; jit the
            whole call instead). Example i's rows must affect only Lᵢ (no
            batch-norm-like mixing across examples): this is assumed, not checked.
        params: a pytree whose every leaf is a float array used as the ``W`` or
            ``b`` of one or more such layers, e.g. a tuple from
            :func:`jaxlinear.mlp_init`. A weight shared by several calls is fine,
            and so is a float leaf the losses do not depend on at all (its
            gradient is zero). A leaf used any other way (a scale vector, a
            weight penalty, an integer counter) is refused with an error naming
            its pytree path, never silently left out of the norm.
        batch: a pytree of arrays, each with the B examples along axis 0; B may
            be 0 or 1.

    Returns:
        ``(B,)`` norms ‖∇_params Lᵢ‖₂ over all of ``params``, in float32, or in
        the widest dtype of the parameters and layer outputs if wider (float64).

    Cost: one forward pass, one backward pass for the layers' output gradients
    (no weight-gradient matmuls), and O(B·T·(in+out)) for the norms of flat or
    short-sequence layers. ``jax.jit`` it (``loss_fn`` as a closure or static
    argument); it traces ``loss_fn`` twice.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlinear
        >>> params = jaxlinear.mlp_init(jax.random.key(0), (3, 4, 2))
        >>> x, t = jnp.ones((5, 3)), jnp.zeros((5, 2))
        >>> def loss_fn(params, batch):
        ...     x, t = batch
        ...     return 0.5 * jnp.sum((jaxlinear.mlp_apply(params, x) - t) ** 2, axis=-1)
        >>> norms_of = jax.jit(jaxlinear.per_example_grad_norms, static_argnums=0)
        >>> norms_of(loss_fn, params, (x, t)).shape
        (5,)
    """
    plan = _plan(loss_fn, params, batch)
    tapped, xs, gs = _probe(loss_fn, params, batch, plan)
    return _norms(plan, _groups(plan, tapped, xs, gs), _acc_dtype(plan, tapped))


def _clip_scale(norms: Array, l2_clip) -> Array:
    """sᵢ = min(1, C/‖gᵢ‖), and 1 where ‖gᵢ‖ ≤ C (a zero gradient included).

    A C that is not positive and finite (possible only when traced: concrete values
    are refused) gives sᵢ = NaN, so every clipped gradient is NaN, never silently
    wrong (a negative C would otherwise reverse the gradients).
    """
    C = jnp.asarray(l2_clip, norms.dtype)
    over = norms > C
    scale = jnp.where(over, C / jnp.where(over, norms, jnp.ones((), norms.dtype)), 1)
    valid = (C > 0) & jnp.isfinite(C)
    return jnp.where(valid, scale, jnp.full((), jnp.nan, norms.dtype))


def clipped_grad(
    loss_fn: Callable[[Any, Any], Array], params: Any, batch: Any, l2_clip: float | Array
) -> tuple[Any, Array]:
    r"""The mean of per-example gradients clipped to norm ``l2_clip``, and their norms.

    Computes (1/B) Σᵢ sᵢ ∇_params Lᵢ with sᵢ = min(1, C/‖∇Lᵢ‖) (sᵢ = 1 when the
    gradient is zero), the DP-SGD gradient before noise, without materialising
    any per-example gradient: for each layer it is xᵀ (s ⊙ g) / B, one matmul
    on the layer input x and output gradient g that :func:`per_example_grad_norms`
    computes anyway.

    Args:
        loss_fn, params, batch: as in :func:`per_example_grad_norms` (same
            requirements, same refusals).
        l2_clip: the clipping norm C, a positive finite real scalar (a Python
            number or a real 0-d array), checked when concrete. It may be traced
            under ``jit``; then a non-positive or non-finite C makes every
            clipped gradient NaN (the norms stay finite) rather than silently
            wrong.

    Returns:
        ``(grads, norms)``: ``grads`` has the pytree structure, shapes and dtypes
        of ``params`` (ready for an Optax update); ``norms`` are the *unclipped*
        per-example norms ``(B,)``. For B = 0 the grads are zeros.

    Cost: one forward pass, one backward pass without the weight-gradient
    matmuls, the norms, and one matmul per layer, i.e. about the cost of one
    ordinary ``jax.grad`` of the mean loss.

    Example:
        >>> import jax, jax.numpy as jnp, jaxlinear
        >>> params = jaxlinear.mlp_init(jax.random.key(0), (3, 4, 2))
        >>> def loss_fn(params, batch):
        ...     x, t = batch
        ...     return 0.5 * jnp.sum((jaxlinear.mlp_apply(params, x) - t) ** 2, axis=-1)
        >>> batch = (jnp.ones((5, 3)), jnp.zeros((5, 2)))
        >>> clipped = jax.jit(jaxlinear.clipped_grad, static_argnums=0)  # one program
        >>> grads, norms = clipped(loss_fn, params, batch, 0.1)
        >>> bool(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))) <= 0.1 + 1e-6)
        True
    """
    check_l2_clip(l2_clip)
    plan = _plan(loss_fn, params, batch)
    tapped, xs, gs = _probe(loss_fn, params, batch, plan)
    acc = _acc_dtype(plan, tapped)
    groups = _groups(plan, tapped, xs, gs)
    norms = _norms(plan, groups, acc)
    B = plan.batch_size
    weight = _clip_scale(norms, l2_clip) * jnp.asarray(1.0 / max(B, 1), acc)  # sᵢ / B
    grads = []
    for leaf, value in enumerate(jax.tree.leaves(params)):
        shape, dtype = plan.leaf_shapes[leaf], plan.leaf_dtypes[leaf]
        if leaf in groups:
            # The gradient takes its parameter's sharding (explicit mesh axes need it).
            sharding = jax.typeof(value).sharding
            grads.append(_weighted_grad(groups[leaf], weight, acc, sharding).astype(dtype))
        else:  # a leaf the losses do not depend on: its gradient is exactly zero
            grads.append(jnp.zeros(shape, dtype))
    return jax.tree.unflatten(plan.treedef, grads), norms


def _weighted_grad(group: _Group, weight: Array, acc: np.dtype, sharding) -> Array:
    """Σ_k (over the leaf's calls) of its layer gradient with example i's rows of g scaled by wᵢ."""
    total = None
    for call, x, g in group.calls:
        # w ⊙ g: wᵢ along g's leading (example) axis.
        wg = g.astype(acc) * lax.broadcast_in_dim(weight, g.shape, (0,))
        batch_axes = tuple(range(g.ndim - 1))
        if group.kind == "b":
            term = jnp.sum(wg, axis=batch_axes)
        else:
            a, c = _oriented(call, x.astype(acc), wg)
            term = lax.dot_general(
                a,
                c,
                ((batch_axes, batch_axes), ((), ())),
                precision=call.precision,
                preferred_element_type=acc,
                out_sharding=sharding,
            )
        total = term if total is None else total + term
    return total
