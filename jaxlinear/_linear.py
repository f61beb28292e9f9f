r"""The linear layer y = x W + b and its hand-derived backward pass.

Derivation (layout ``"in_out"``, W of shape ``(in, out)``). Flatten every
leading axis of x into one axis of N rows, so x is ``(N, in)`` and
y = x W + 1 bᵀ is ``(N, out)``. For a scalar loss L with g = ∂L/∂y ``(N, out)``:

* y_nj = Σ_k x_nk W_kj + b_j, so ∂y_nj/∂x_nk = W_kj and
  dx_nk = Σ_j g_nj W_kj, i.e. **dx = g Wᵀ** ``(N, in)``;
* ∂y_nj/∂W_kj = x_nk, so dW_kj = Σ_n x_nk g_nj, i.e. **dW = xᵀ g** ``(in, out)``;
* ∂y_nj/∂b_j = 1, so **db = Σ_n g_n** ``(out,)``, summed over rows, not averaged.

For layout ``"out_in"`` (PyTorch's, W of shape ``(out, in)``), y = x Wᵀ + b and
the same steps give dx = g W and dW = gᵀ x.

No reshape or transpose is materialised: each product is one
``lax.dot_general`` whose dimension numbers name the axes to contract, and
"flatten the leading axes" becomes "contract over every leading axis".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._validate import (
    accumulation_dtype,
    as_float_array,
    check_float_dtype,
    check_layout,
    check_same_dtype,
    raise_forward_mode_hint,
)

__all__ = ["LinearParams", "linear_apply", "linear_backward"]

Array = jax.Array

#: Trace-time taps on :func:`linear_apply`: empty except while
#: ``jaxlinear.per_example_grad_norms`` traces a loss (their code is in ``_per_example.py``).
TAPS: list = []


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


def _dims_forward(x_ndim: int, layout: str):
    # Contract x's last axis with W's input axis: 0 for "in_out", 1 for "out_in".
    return (((x_ndim - 1,), (0 if layout == "in_out" else 1,)), ((), ()))


def linear_backward(
    grad_out: Array,
    x: Array,
    W: Array,
    *,
    layout: str = "in_out",
    precision: Any = None,
) -> tuple[Array, Array, Array]:
    """The hand-derived backward pass of ``y = x W + b``.

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

        where xᵀ g contracts *all* batch axes at once. Each product accumulates
        in the wider of ``grad_out``'s and ``W``'s dtypes (so a forward run with
        ``preferred_element_type=float32`` on bfloat16 operands gives a float32
        g and float32 accumulation), then dx is cast to ``x.dtype`` and dW, db
        to ``W.dtype``: cotangents always have their primal's dtype.

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
    in_features, out_features = _check_weight(W, layout)
    _check_x(x, in_features, W, layout)
    expected = x.shape[:-1] + (out_features,)
    if grad_out.shape != expected:
        raise ValueError(
            f"`grad_out` must have the shape of y = linear(x), x.shape[:-1] + "
            f"(out_features,) = {expected}; got grad_out.shape={grad_out.shape}."
        )
    return _backward(grad_out, x, W, layout, precision)


def _backward(g: Array, x: Array, W: Array, layout: str, precision: Any):
    """:func:`linear_backward` after validation (also the custom VJP's rule)."""
    acc = accumulation_dtype(g.dtype, W.dtype)
    last = g.ndim - 1
    batch = tuple(range(last))  # every leading axis, contracted as one.
    # dx = g Wᵀ ("in_out": contract g's out axis with W's axis 1) or g W ("out_in").
    w_out_axis = 1 if layout == "in_out" else 0
    dx = lax.dot_general(
        g,
        W,
        (((last,), (w_out_axis,)), ((), ())),
        precision=precision,
        preferred_element_type=acc,
        # Under explicit sharding a cotangent takes its primal's sharding (as JAX's
        # own dot_general transpose does); otherwise this is a no-op.
        out_sharding=jax.typeof(x).sharding,
    )
    # dW = xᵀ g (in, out) or gᵀ x (out, in): contract every batch axis; with no
    # batch axes this is the outer product, as vmap over examples needs.
    lhs, rhs = (x, g) if layout == "in_out" else (g, x)
    dW = lax.dot_general(
        lhs,
        rhs,
        ((batch, batch), ((), ())),
        precision=precision,
        preferred_element_type=acc,
        out_sharding=jax.typeof(W).sharding,
    )
    db = jnp.sum(g, axis=batch, dtype=acc)
    return dx.astype(x.dtype), dW.astype(W.dtype), db.astype(W.dtype)


def linear_forward(layout, precision, preferred_element_type, has_bias, x, W, b):
    """y = x W + b as one ``dot_general`` and an explicitly broadcast add."""
    y = lax.dot_general(
        x,
        W,
        _dims_forward(x.ndim, layout),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if has_bias:
        # Broadcast explicitly: b (out,) joins y's last axis, so the add also
        # holds under jax_numpy_rank_promotion="raise".
        y = lax.add(y, lax.broadcast_in_dim(b.astype(y.dtype), y.shape, (y.ndim - 1,)))
    return y


# Static configuration (hashable, never differentiated) is nondiff; x, W, b are
# the differentiable arrays. ``has_bias`` is static so the residuals stay (x, W).
_linear = jax.custom_vjp(linear_forward, nondiff_argnums=(0, 1, 2, 3))


def _linear_fwd(layout, precision, preferred_element_type, has_bias, x, W, b):
    y = linear_forward(layout, precision, preferred_element_type, has_bias, x, W, b)
    # Residuals are exactly (x, W): db needs only g, and b's dtype is W's.
    return y, (x, W)


def _linear_bwd(layout, precision, preferred_element_type, has_bias, residuals, g):
    x, W = residuals
    dx, dW, db = _backward(g, x, W, layout, precision)
    return dx, dW, (db if has_bias else None)


_linear.defvjp(_linear_fwd, _linear_bwd)

# Called eagerly (no transformation, so no tracer among the inputs), a custom_vjp
# re-traces its rule on every call (~0.5 ms). Eager calls take this compiled forward,
# cached per shape and static configuration, instead; traced calls keep the plain
# custom_vjp, so residuals and checkpoint policies see its operations directly.
_linear_eager = jax.jit(linear_forward, static_argnums=(0, 1, 2, 3))


def validate_linear_args(params, x, precision, preferred_element_type):
    """Trace-time checks of :func:`linear_apply`'s arguments (shared by the
    forward-mode twin). Returns ``(layout, x, W, b, preferred_element_type)``."""
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
    if preferred_element_type is not None:
        preferred_element_type = check_float_dtype("preferred_element_type", preferred_element_type)
        if jnp.finfo(preferred_element_type).bits < jnp.finfo(W.dtype).bits:
            raise ValueError(
                f"`preferred_element_type` (={np.dtype(preferred_element_type)}) "
                f"must be at least as wide as the operands' dtype ({W.dtype})."
            )
    try:
        hash(precision)
    except TypeError as err:
        raise TypeError(
            "`precision` must be None, a string such as 'highest', a "
            f"lax.Precision, or a tuple of two; got {precision!r}."
        ) from err
    return layout, x, W, b, preferred_element_type


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
        precision: ``lax.dot_general`` precision for the forward and both
            backward products (e.g. ``"highest"`` to avoid TF32 on GPUs).
        preferred_element_type: accumulation and output dtype of the product
            (e.g. ``jnp.float32`` for bfloat16 operands). ``None`` keeps the
            operands' dtype.

    Returns:
        y of shape ``(*batch, out_features)``.

    Differentiated by a ``jax.custom_vjp`` whose backward is
    :func:`linear_backward`; it saves exactly ``(x, W)`` as residuals.

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxlinear import LinearParams, linear_apply
        >>> p = LinearParams(W=jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]),
        ...                  b=jnp.array([0.0, 0.0, 1.0]))
        >>> linear_apply(p, jnp.array([1.0, 2.0])).tolist()
        [1.0, 2.0, 4.0]
    """
    layout, x, W, b, preferred_element_type = validate_linear_args(
        params, x, precision, preferred_element_type
    )
    if TAPS:  # only while per_example_grad_norms / clipped_grad trace a loss
        return TAPS[-1](params, x, W, b, precision, preferred_element_type)
    try:
        args = (layout, precision, preferred_element_type, b is not None, x, W, b)
        if not any(isinstance(a, jax.core.Tracer) for a in (x, W, b)):
            return _linear_eager(*args)
        return _linear(*args)
    except TypeError as err:
        raise_forward_mode_hint(err, "linear_apply")
        raise
