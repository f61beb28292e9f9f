r"""The linear layer y = x W + b as one JAX primitive with hand-derived rules.

Derivation (layout ``"in_out"``, W of shape ``(in, out)``). Flatten every
leading axis of x into one axis of N rows, so x is ``(N, in)`` and
y = x W + 1 bᵀ is ``(N, out)``, with y_nj = Σ_k x_nk W_kj + b_j.

**Forward mode (JVP).** Perturb the inputs along (ẋ, Ẇ, ḃ); y is bilinear in
(x, W) and affine in b, so to first order

    ẏ = ẋ W + x Ẇ + ḃ        (``"out_in"``: ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ),

a map that is *linear* in the tangents. A term whose tangent is a symbolic zero
(e.g. ``jacfwd`` with respect to W alone) is never computed.

**Reverse mode (VJP).** For a scalar loss L with g = ∂L/∂y ``(N, out)``, the
VJP is the transpose of that linear map: ⟨g, ẏ⟩ = ⟨g Wᵀ, ẋ⟩ + ⟨xᵀ g, Ẇ⟩ +
⟨Σ_n g_n, ḃ⟩ for every tangent, so

* **dx = g Wᵀ** ``(N, in)`` (∂y_nj/∂x_nk = W_kj),
* **dW = xᵀ g** ``(in, out)`` (∂y_nj/∂W_kj = x_nk),
* **db = Σ_n g_n** ``(out,)``, summed over rows, not averaged.

For ``"out_in"`` (PyTorch's, W of shape ``(out, in)``) the same steps give
dx = g W and dW = gᵀ x. dx needs only W and dW only x, so the VJP saves x only
when W needs a gradient and W only when x does.

Every product is one ``lax.dot_general`` whose dimension numbers name the axes
to contract ("flatten the leading axes" becomes "contract over every leading
axis"), so no reshape or transpose is materialised.

:class:`Linear` puts the forward, the VJP, the JVP, its transpose and the
batching rule side by side. ``jax.grad`` runs :meth:`Linear.vjp_bwd`, which is
:func:`linear_backward`'s code; ``jax.jvp``/``jacfwd``/``linearize`` run
:meth:`Linear.jvp`, whose tangent is built from :class:`Linear` itself, so any
path that differentiates by JVP-then-transpose (``jax.linear_transpose``, the
default ``jax.checkpoint``) reaches :meth:`Linear.transpose`, which again is
:func:`linear_backward`'s code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import _taps
from ._hijax import (
    Rule,
    Zero,
    agree_varying_axes,
    is_zero,
    primal_left_tangent_right,
    saves_output,
    staged_primitive,
    wants_cotangent,
)
from ._validate import (
    accumulation_dtype,
    as_float_array,
    check_layout,
    check_precision,
    check_preferred_element_type,
    check_same_dtype,
    sum_dtype,
)

__all__ = ["Linear", "LinearParams", "linear_apply", "linear_backward"]

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["W", "b"], meta_fields=["layout"])
@dataclasses.dataclass(frozen=True)
class LinearParams:
    """Parameters of one linear layer: a pytree whose only leaves are ``W`` and ``b``.

    Attributes:
        W: weight, ``(in_features, out_features)`` for ``layout="in_out"`` or
            ``(out_features, in_features)`` for ``layout="out_in"`` (PyTorch).
        b: bias ``(out_features,)``, or ``None`` for a layer without bias.
        layout: static pytree metadata, not a leaf, so Optax and ``jax.tree``
            see only the arrays, and a PyTorch-layout weight keeps its layout
            through every transformation.

    Leaves are not checked here (pytree utilities rebuild this class with
    placeholders such as ``vmap`` axis specs); :func:`linear_apply` checks them.
    """

    W: Any
    b: Any = None
    layout: str = "in_out"

    def __post_init__(self):
        check_layout(self.layout)

    @property
    def in_features(self) -> int:
        return self.W.shape[0 if self.layout == "in_out" else 1]

    @property
    def out_features(self) -> int:
        return self.W.shape[1 if self.layout == "in_out" else 0]


def _check_weight(W: Array, layout: str) -> tuple[int, int]:
    """Return ``(in_features, out_features)`` of a validated 2-D weight."""
    if W.ndim != 2:
        expected = (
            "(in_features, out_features)" if layout == "in_out" else ("(out_features, in_features)")
        )
        raise ValueError(
            f"`W` must be 2-D {expected} for layout {layout!r}; got W.shape={W.shape}."
        )
    return (W.shape[0], W.shape[1]) if layout == "in_out" else (W.shape[1], W.shape[0])


def _check_x(x: Array, in_features: int, W: Array, layout: str) -> None:
    if x.ndim == 0:
        raise ValueError(
            "`x` must have at least one axis, (..., in_features); got a scalar. "
            "Use x[None] for a single feature."
        )
    if x.shape[-1] != in_features:
        raise ValueError(
            f"`x.shape[-1]` (={x.shape[-1]}) must equal in_features (={in_features}) "
            f"of W with layout {layout!r} (W.shape={W.shape}); got x.shape={x.shape}."
            + (
                " The weight looks like the other layout: pass layout="
                f"{'out_in' if layout == 'in_out' else 'in_out'!r} if it is."
                if x.shape[-1] == (W.shape[1] if layout == "in_out" else W.shape[0])
                else ""
            )
        )


# --------------------------------------------------------------------- dimension numbers
# Shapes, with k ensemble axes E (k = 0 outside ``vmap`` over W):
#   x (*E, *rows, in), W (*E, in, out) or (*E, out, in), b (*E, out), y (*E, *rows, out).


def _ensemble(k: int):
    return tuple(range(k))


def _dims_forward(x_ndim: int, layout: str, k: int = 0):
    """y = x W: contract x's last axis with W's input axis; E axes are batch axes."""
    w_in = k + (0 if layout == "in_out" else 1)
    return (((x_ndim - 1,), (w_in,)), (_ensemble(k), _ensemble(k)))


def _dims_dx(g_ndim: int, layout: str, k: int):
    """dx = g Wᵀ (``"in_out"``) or g W (``"out_in"``): contract g's out axis with W's."""
    w_out = k + (1 if layout == "in_out" else 0)
    return (((g_ndim - 1,), (w_out,)), (_ensemble(k), _ensemble(k)))


def _dims_dw(g_ndim: int, k: int):
    """dW = xᵀ g (or gᵀ x): contract every row axis at once; E axes are batch axes."""
    rows = tuple(range(k, g_ndim - 1))
    return ((rows, rows), (_ensemble(k), _ensemble(k)))


def _broadcast_bias(b: Array, shape: tuple[int, ...], dtype, k: int) -> Array:
    """b ``(*E, out)`` broadcast explicitly to y's shape (holds under rank promotion "raise")."""
    dims = _ensemble(k) + (len(shape) - 1,)
    return lax.broadcast_in_dim(b.astype(dtype), shape, dims)


def _add_bias(y: Array, b: Array | None, k: int = 0) -> Array:
    """y + b, b ``(*E, out)`` broadcast explicitly to y; y itself when there is no b."""
    return y if b is None else lax.add(y, _broadcast_bias(b, y.shape, y.dtype, k))


def _forward(x, W, b, *, layout, precision, preferred_element_type, k=0):
    """y = x W + b as one ``dot_general`` and an explicitly broadcast add."""
    y = lax.dot_general(
        x,
        W,
        _dims_forward(x.ndim, layout, k),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return _add_bias(y, b, k)


def _backward(g, x, W, *, layout, precision, k=0, need=(True, True, True), x_aval, W_aval):
    """(dx, dW, db) of ``y = x W + b``, each computed only if ``need`` says so (else None).

    Every product and sum accumulates in at least float32 (in the wider of g's and
    W's dtypes), then dx is cast to x's dtype and dW, db to W's: cotangents always
    have their primal's dtype and, under explicit sharding, its sharding.
    """
    acc = sum_dtype(accumulation_dtype(g.dtype, W_aval.dtype))
    dx = dW = db = None
    if need[0]:
        dx = lax.dot_general(
            g,
            W,
            _dims_dx(g.ndim, layout, k),
            precision=precision,
            preferred_element_type=acc,
            out_sharding=_cotangent_sharding(x_aval),
        ).astype(x_aval.dtype)
    if need[1]:
        lhs, rhs = (x, g) if layout == "in_out" else (g, x)
        dW = lax.dot_general(
            lhs,
            rhs,
            _dims_dw(g.ndim, k),
            precision=precision,
            preferred_element_type=acc,
            out_sharding=_cotangent_sharding(W_aval),
        ).astype(W_aval.dtype)
    if need[2]:
        # Summed in float32 at least: jnp.sum(g, dtype=bfloat16) would add in bfloat16.
        db = jnp.sum(g.astype(acc), axis=tuple(range(k, g.ndim - 1))).astype(W_aval.dtype)
    return dx, dW, db


def _cotangent_sharding(aval):
    """A cotangent takes its primal's sharding (as JAX's own dot_general transpose
    does). A primal not placed on the current mesh (an uncommitted array) is
    replicated on it; with no mesh this is None, a no-op."""
    if not aval.sharding.mesh.empty:
        return aval.sharding
    if jax.sharding.get_abstract_mesh().empty:
        return None
    return jax.sharding.PartitionSpec(*(None,) * len(aval.shape))


# --------------------------------------------------------------------- the primitive


def _out_aval(x_aval, W_aval, *, layout, preferred_element_type, k):
    """y's abstract value; under a mesh or shard_map, JAX's own dot_general rule gives
    its sharding and varying axes."""
    dtype = x_aval.dtype if preferred_element_type is None else preferred_element_type
    if x_aval.sharding.mesh.empty and W_aval.sharding.mesh.empty:
        out = W_aval.shape[-1] if layout == "in_out" else W_aval.shape[-2]
        return jax.core.ShapedArray(x_aval.shape[:-1] + (out,), dtype)
    aval, _ = lax.dot_general_p.abstract_eval(
        x_aval,
        W_aval,
        dimension_numbers=_dims_forward(len(x_aval.shape), layout, k),
        precision=None,
        preferred_element_type=dtype,
        out_sharding=None,
    )
    return aval


class Linear(Rule):
    """``y = x W + b`` (``x Wᵀ + b`` for ``"out_in"``) with every rule written by hand.

    Inputs x ``(*E, *rows, in)``, W ``(*E, in, out)`` (or ``(*E, out, in)``), b
    ``(*E, out)`` or ``None``; output ``(*E, *rows, out)``. ``E`` are the ``k``
    leading *ensemble* axes that ``vmap`` over W adds (``k = 0`` for one layer).
    Static configuration (layout, precision, preferred_element_type, k) lives in
    ``params``, never differentiated.
    """

    staged = staged_primitive("jaxlinear.linear")

    def __init__(self, x_aval, W_aval, b_aval, *, layout, precision, preferred_element_type, k=0):
        self.in_avals = (x_aval, W_aval, b_aval)
        self.out_aval = _out_aval(
            x_aval, W_aval, layout=layout, preferred_element_type=preferred_element_type, k=k
        )
        self.params = dict(
            layout=layout,
            precision=precision,
            preferred_element_type=preferred_element_type,
            k=k,
            avals=self.in_avals,
        )
        super().__init__()

    @classmethod
    def bind(cls, x, W, b, *, layout, precision=None, preferred_element_type=None, k=0):
        """Build the primitive for these operands and apply it."""
        prim = cls(
            jax.typeof(x),
            jax.typeof(W),
            None if b is None else jax.typeof(b),
            layout=layout,
            precision=precision,
            preferred_element_type=preferred_element_type,
            k=k,
        )
        return prim(x, W, b)

    def _again(self, x, W, b, k=None):
        """This layer's configuration applied to other operands (tangents, batches)."""
        return Linear.bind(
            x,
            W,
            b,
            layout=self.layout,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
            k=self.k if k is None else k,
        )

    # -- forward ------------------------------------------------------------------------
    def expand(self, x, W, b):
        return _forward(
            x,
            W,
            b,
            layout=self.layout,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
            k=self.k,
        )

    # -- reverse mode: save (x, W) as needed, then dx = g Wᵀ, dW = xᵀ g, db = Σ g ---------
    def vjp_fwd(self, nzs, x, W, b):
        x_needed, w_needed = nzs[0], nzs[1]
        residuals = (x if w_needed else None, W if x_needed else None)
        return self(x, W, b), residuals

    def vjp_bwd(self, residuals, g, *accums):
        self._pull_back(g, *residuals, accums)

    # -- forward mode: ẏ = ẋ W + x Ẇ + ḃ, built from Linear itself ----------------------
    # (The primal y is the forward's own dot_general and add, so jax.checkpoint
    # policies that pick products, e.g. checkpoint_dots, see and can save x W.)
    def jvp(self, primals, tangents):
        x, W, b = primals
        tx, tW, tb = (None if is_zero(t) else t for t in tangents)
        return self.expand(x, W, b), self._tangent(x, W, tx, tW, tb)

    def lin(self, nzs, x, W, b):
        return self.expand(x, W, b), (x, W)

    def linearized(self, residuals, tx, tW, tb):
        x, W = residuals
        return self._tangent(x, W, *(None if is_zero(t) else t for t in (tx, tW, tb)))

    def _tangent(self, x, W, tx, tW, tb):
        terms = []
        if tx is not None:  # ẋ W
            terms.append(self._again(tx, W, None))
        if tW is not None:  # x Ẇ (+ ḃ, in the same primitive)
            terms.append(self._again(x, tW, tb))
        elif tb is not None:  # ḃ alone, broadcast over the rows
            y = self.out_aval
            terms.append(_broadcast_bias(tb, y.shape, y.dtype, self.k))
        if not terms:
            return Zero(self.out_aval.to_tangent_aval())
        return functools.reduce(lax.add, terms)

    # -- transpose of the linear map in x (or in W, b): the VJP's code again -------------
    def transpose(self, g, x, W, b):
        self._pull_back(g, x, W, (x, W, b))

    def _pull_back(self, g, x, W, accums):
        if isinstance(g, Zero):
            return
        need = tuple(wants_cotangent(a) for a in accums)
        grads = _backward(
            g,
            x,
            W,
            layout=self.layout,
            precision=self.precision,
            k=self.k,
            need=need,
            x_aval=self.in_avals[0],
            W_aval=self.in_avals[1],
        )
        for accum, grad in zip(accums, grads, strict=True):
            if grad is not None:
                accum.accum(grad)

    # -- jax.checkpoint under jax_remat3: a policy that saves products saves x W -------------
    def remat(self, policy, x, W, b):
        if saves_output(policy, self.staged, *self.in_avals_flat, rule=self):
            return super().remat(policy, x, W, b)  # the whole layer's output
        dims = _dims_forward(x.ndim, self.layout, self.k)
        if not saves_output(
            policy,
            lax.dot_general_p,
            jax.typeof(x),
            jax.typeof(W),
            dimension_numbers=dims,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
            out_sharding=None,
        ):
            return self(x, W, b), self  # recompute the whole layer
        product = self._again(x, W, None)

        def recompute(x, W, b):  # the saved product, with the tangent of a fresh one
            return _add_bias(primal_left_tangent_right(product, self._again(x, W, None)), b, self.k)

        return _add_bias(product, b, self.k), recompute

    # -- batching: x gains a row axis, W an ensemble axis, b is added ----------------------
    def batch(self, axis_data, args, dims):
        x, W, b = args
        dx, dW, db = dims
        if dx is None and dW is None and db is None:
            return self(x, W, b), None  # JAX asks even when nothing is batched.
        k, size = self.k, axis_data.size
        if dW is None and db is not None:  # y = (x W, batched or not) + b batched
            y, dy = self._again(x, W, None), None
            if dx is not None:
                y, dy = self.batch(axis_data, (x, W, None), (dx, None, None))
            y = _at_axis(y, dy, k, size)
            b = jnp.moveaxis(b, db, k)
            return _add_bias(y, b, k + 1), k
        if dW is None:  # a batched x is one more row axis
            return self._again(jnp.moveaxis(x, dx, k), W, b), k
        # A batched W is one more ensemble axis (a dot_general batch dimension).
        x, W = _at_axis(x, dx, 0, size), jnp.moveaxis(W, dW, 0)
        b = None if b is None else _at_axis(b, db, 0, size)
        return self._again(x, W, b, k=k + 1), 0


def _at_axis(a: Array, d: int | None, axis: int, size: int) -> Array:
    """``a`` with its batch axis ``d`` moved to ``axis``, or broadcast there if unbatched."""
    if d is not None:
        return jnp.moveaxis(a, d, axis)
    shape = a.shape[:axis] + (size,) + a.shape[axis:]
    kept = tuple(i for i in range(len(shape)) if i != axis)
    return lax.broadcast_in_dim(a, shape, kept)


def _linear(layout, precision, preferred_element_type, has_bias, x, W, b):
    """Apply the :class:`Linear` primitive to validated operands."""
    x, W, b = agree_varying_axes(x, W, b if has_bias else None)
    return Linear.bind(
        x, W, b, layout=layout, precision=precision, preferred_element_type=preferred_element_type
    )


# Called eagerly (no tracer among the inputs), binding a primitive re-traces its
# rules on every call. Eager calls take compiled functions instead, cached per shape
# and static configuration; traced calls bind the primitive directly. As in the plain
# expression ``x @ W + b``, the product and the bias add are two compiled calls: on
# XLA:CPU one fused call measured 1.2-1.6x the plain expression's time at
# 128x64->256 (even ``jax.jit(lambda x, W, b: x @ W + b)`` did), two calls 1.08x
# (benchmarks/bench_overhead.py's eager rows).
_product_eager = jax.jit(_linear, static_argnums=(0, 1, 2, 3))


_add_bias_eager = jax.jit(_add_bias, static_argnums=2)


def _linear_eager(layout, precision, preferred_element_type, x, W, b):
    """:func:`_linear` for concrete operands (no transformation is active)."""
    y = _product_eager(layout, precision, preferred_element_type, False, x, W, None)
    return y if b is None else _add_bias_eager(y, b)


# --------------------------------------------------------------------- public functions


def linear_backward(
    grad_out: Array,
    x: Array,
    W: Array,
    *,
    layout: str = "in_out",
    precision: Any = None,
) -> tuple[Array, Array, Array]:
    """The hand-derived backward pass of ``y = x W + b``: the code ``jax.grad`` runs.

    Args:
        grad_out: g = ∂L/∂y, shape ``(*batch, out_features)``.
        x: the forward input, shape ``(*batch, in_features)``; ``batch`` may be
            empty (then dW is the outer product x gᵀ).
        W: the forward weight in ``layout``.
        layout: ``"in_out"`` (W is ``(in, out)``) or ``"out_in"`` (``(out, in)``).
        precision: passed to both ``lax.dot_general`` calls.

    Returns:
        ``(dx, dW, db)`` with

        * ``"in_out"``: dx = g Wᵀ ``(*batch, in)``, dW = xᵀ g ``(in, out)``,
        * ``"out_in"``: dx = g W ``(*batch, in)``, dW = gᵀ x ``(out, in)``,
        * db = Σ over every batch axis of g ``(out,)``, summed, not averaged;

        where xᵀ g contracts *all* batch axes at once. Products and the sum
        accumulate in at least float32 (in the wider of ``grad_out``'s and
        ``W``'s dtypes), then dx is cast to ``x.dtype`` and dW, db to
        ``W.dtype``: cotangents always have their primal's dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlinear import linear_backward
        >>> x = jnp.array([[1.0, 2.0]])
        >>> W = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
        >>> dx, dW, db = linear_backward(jnp.ones((1, 3)), x, W)
        >>> dx.tolist(), dW.tolist(), db.tolist()
        ([[2.0, 2.0]], [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], [1.0, 1.0, 1.0])
    """
    layout = check_layout(layout)
    grad_out = as_float_array("grad_out", grad_out)
    x = as_float_array("x", x)
    W = as_float_array("W", W)
    check_same_dtype(x=x, W=W)
    precision = check_precision(precision)
    in_features, out_features = _check_weight(W, layout)
    _check_x(x, in_features, W, layout)
    expected = x.shape[:-1] + (out_features,)
    if grad_out.shape != expected:
        raise ValueError(
            f"`grad_out` must have the shape of y = linear(x), x.shape[:-1] + "
            f"(out_features,) = {expected}; got grad_out.shape={grad_out.shape}."
        )
    return _backward(
        grad_out,
        x,
        W,
        layout=layout,
        precision=precision,
        x_aval=jax.typeof(x),
        W_aval=jax.typeof(W),
    )


def validate_linear_args(params, x, precision, preferred_element_type):
    """Trace-time checks of :func:`linear_apply`'s arguments.

    Returns ``(layout, x, W, b, precision, preferred_element_type)``.
    """
    if not isinstance(params, LinearParams):
        raise TypeError(
            f"`params` must be a jaxlinear.LinearParams; got {type(params).__name__}. "
            "Build one with LinearParams(W, b) or linear_init(...)."
        )
    layout = params.layout
    W = as_float_array("W", params.W)
    b = None if params.b is None else as_float_array("b", params.b)
    x = as_float_array("x", x)
    check_same_dtype(x=x, W=W, b=b)
    in_features, out_features = _check_weight(W, layout)
    _check_x(x, in_features, W, layout)
    if b is not None and b.shape != (out_features,):
        raise ValueError(
            f"`b` must have shape (out_features,) = ({out_features},) for W.shape="
            f"{W.shape} with layout {layout!r}; got b.shape={b.shape}."
        )
    preferred_element_type = check_preferred_element_type(preferred_element_type, W.dtype)
    return layout, x, W, b, check_precision(precision), preferred_element_type


def linear_apply(
    params: LinearParams,
    x: Array,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """Apply a linear layer, ``y = x W + b`` (``x Wᵀ + b`` for ``layout="out_in"``).

    Args:
        params: a :class:`LinearParams`.
        x: input of shape ``(*batch, in_features)``, any number of leading axes
            including none; same dtype as ``params.W``.
        precision: ``lax.dot_general`` precision for the forward and every
            derivative product (e.g. ``"highest"`` to avoid TF32 on GPUs).
        preferred_element_type: accumulation and output dtype of the product
            (e.g. ``jnp.float32`` for bfloat16 operands). ``None`` keeps the
            operands' dtype.

    Returns:
        y of shape ``(*batch, out_features)``.

    One :class:`Linear` primitive: ``jax.grad`` runs :func:`linear_backward`
    (saving x only if W needs a gradient and W only if x does); ``jax.jvp``,
    ``jacfwd``, ``linearize`` and ``hessian`` run the tangent ẏ = ẋ W + x Ẇ + ḃ;
    ``vmap`` over x, W or b runs the hand-written batching rule.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxlinear import LinearParams, linear_apply
        >>> p = LinearParams(W=jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]),
        ...                  b=jnp.array([0.0, 0.0, 1.0]))
        >>> linear_apply(p, jnp.array([1.0, 2.0])).tolist()
        [1.0, 2.0, 4.0]
        >>> y, y_dot = jax.jvp(lambda x: linear_apply(p, x), (jnp.array([1.0, 2.0]),),
        ...                    (jnp.array([1.0, 0.0]),))
        >>> y_dot.tolist()  # ẋ W
        [1.0, 0.0, 1.0]
    """
    layout, x, W, b, precision, preferred_element_type = validate_linear_args(
        params, x, precision, preferred_element_type
    )
    tap = _taps.innermost()
    if tap is not None:  # only while per_example_grad_norms / clipped_grad trace a loss
        return tap(params, x, W, b, precision, preferred_element_type)
    if not any(isinstance(a, jax.core.Tracer) for a in (x, W, b)):
        return _linear_eager(layout, precision, preferred_element_type, x, W, b)
    return _linear(layout, precision, preferred_element_type, b is not None, x, W, b)
