r"""Forward-mode twins: the same functions with hand-derived JVP rules.

A ``jax.custom_vjp`` cannot be differentiated in forward mode, so
``jax.jvp``, ``jax.jacfwd`` and ``jax.linearize`` fail on the main functions
(``jax.hessian``, forward over reverse, works on both). Each twin here
computes the same forward pass and carries a ``jax.custom_jvp`` whose tangent
rule is derived by hand:

=======================  ===================================================
function                 tangent rule (dots are tangents)
=======================  ===================================================
linear                   ẏ = ẋ W + x Ẇ + ḃ   (``"out_in"``: ẋ Wᵀ + x Ẇᵀ + ḃ)
relu / sigmoid / tanh    ż · f'(z), from the output as in the VJP rules
mse_loss                 L̇ = 1/N Σᵢ (yᵢ − tᵢ)·(ẏᵢ − ṫᵢ)
softmax_cross_entropy    L̇ = 1/N Σᵢ (pᵢ − onehotᵢ)·żᵢ
=======================  ===================================================

Reverse mode through a twin is JAX's transpose of that linear tangent rule,
which is the same algebra as the hand-derived backward (the tests check it
against :func:`jaxlinear.linear_backward` and autodiff). Terms whose input
tangent is a symbolic zero are skipped (``symbolic_zeros=True``), so
``jacfwd`` with respect to W alone computes no ẋ W product.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from ._activations import RULES
from ._linear import LinearParams, _dims_forward, linear_forward, validate_linear_args
from ._losses import (
    mse_forward,
    validate_mse_args,
    validate_xent_args,
    xent_dlogits,
    xent_forward,
)
from ._mlp import mlp_forward
from ._validate import as_float_array, sum_dtype

__all__ = [
    "linear_apply",
    "mlp_apply",
    "mse_loss",
    "relu",
    "sigmoid",
    "softmax_cross_entropy",
    "tanh",
]


def _nonzero(t) -> bool:
    return not isinstance(t, SymbolicZero)


# --- linear --------------------------------------------------------------------------------

_linear = jax.custom_jvp(linear_forward, nondiff_argnums=(0, 1, 2, 3))


@functools.partial(_linear.defjvp, symbolic_zeros=True)
def _linear_jvp(layout, precision, preferred_element_type, has_bias, primals, tangents):
    x, W, b = primals
    dx, dW, db = tangents
    y = linear_forward(layout, precision, preferred_element_type, has_bias, x, W, b)
    dims = _dims_forward(x.ndim, layout)
    terms = []
    if _nonzero(dx):  # ẋ W (or ẋ Wᵀ)
        terms.append(
            lax.dot_general(dx, W, dims, precision=precision, preferred_element_type=y.dtype)
        )
    if _nonzero(dW):  # x Ẇ (or x Ẇᵀ)
        terms.append(
            lax.dot_general(x, dW, dims, precision=precision, preferred_element_type=y.dtype)
        )
    if has_bias and _nonzero(db):  # ḃ broadcast over the batch
        terms.append(lax.broadcast_in_dim(db.astype(y.dtype), y.shape, (y.ndim - 1,)))
    dy = functools.reduce(lax.add, terms) if terms else jnp.zeros_like(y)
    return y, dy


def linear_apply(
    params: LinearParams,
    x: jax.Array,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """:func:`jaxlinear.linear_apply` with a hand-derived JVP rule, for forward mode.

    Same arguments, checks and result; the tangent is ẏ = ẋ W + x Ẇ + ḃ.
    """
    layout, x, W, b, preferred_element_type = validate_linear_args(
        params, x, precision, preferred_element_type
    )
    return _linear(layout, precision, preferred_element_type, b is not None, x, W, b)


# --- activations ---------------------------------------------------------------------------


def _twin_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    forward, derivative_times = RULES[name]
    act = jax.custom_jvp(forward)

    @act.defjvp
    def _jvp(primals, tangents):
        (z,), (dz,) = primals, tangents
        out = forward(z)
        return out, derivative_times(out, dz)

    def public(z: jax.Array) -> jax.Array:
        return act(as_float_array("z", z))

    public.__name__ = public.__qualname__ = name
    public.__doc__ = (
        f"Forward-mode twin of :func:`jaxlinear.{name}`: same forward, tangent ż·f'(z) "
        "computed from the output."
    )
    public.__module__ = "jaxlinear.fwd"
    return public


relu = _twin_activation("relu")
sigmoid = _twin_activation("sigmoid")
tanh = _twin_activation("tanh")


# --- losses --------------------------------------------------------------------------------

_mse = jax.custom_jvp(mse_forward)


@functools.partial(_mse.defjvp, symbolic_zeros=True)
def _mse_jvp(primals, tangents):
    y, t = primals
    dy, dt = tangents
    loss = mse_forward(y, t)
    if _nonzero(dy) and _nonzero(dt):
        d = dy - dt
    elif _nonzero(dy):
        d = dy
    elif _nonzero(dt):
        d = -dt
    else:
        return loss, jnp.zeros_like(loss)
    acc = sum_dtype(y.dtype)
    dloss = jnp.sum((y - t).astype(acc) * d.astype(acc)) / math.prod(y.shape[:-1])
    return loss, dloss.astype(loss.dtype)


def mse_loss(y: jax.Array, t: jax.Array) -> jax.Array:
    """Forward-mode twin of :func:`jaxlinear.mse_loss`; L̇ = 1/N Σ (y − t)·(ẏ − ṫ)."""
    y, t = validate_mse_args(y, t)
    return _mse(y, t)


_xent = jax.custom_jvp(lambda logits, labels: xent_forward(logits, labels)[0])


@functools.partial(_xent.defjvp, symbolic_zeros=True)
def _xent_jvp(primals, tangents):
    logits, labels = primals
    dlogits, _ = tangents  # integer labels have no tangent
    loss, p = xent_forward(logits, labels)
    if not _nonzero(dlogits):
        return loss, jnp.zeros_like(loss)
    grad = xent_dlogits(p, labels)  # (p − onehot)/N
    acc = sum_dtype(logits.dtype)
    dloss = jnp.sum(grad.astype(acc) * dlogits.astype(acc))
    return loss, dloss.astype(loss.dtype)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Forward-mode twin of :func:`jaxlinear.softmax_cross_entropy`;
    L̇ = 1/N Σᵢ (pᵢ − onehotᵢ)·żᵢ."""
    logits, labels = validate_xent_args(logits, labels)
    return _xent(logits, labels)


# --- MLP -----------------------------------------------------------------------------------


def mlp_apply(
    params,
    x: jax.Array,
    *,
    activation: Callable[[jax.Array], jax.Array] = relu,
    final_activation: Callable[[jax.Array], jax.Array] | None = None,
    precision: Any = None,
) -> jax.Array:
    """Forward-mode twin of :func:`jaxlinear.mlp_apply` (default activation: the
    twin :func:`relu`). Pass twin activations (``jaxlinear.fwd.tanh``, …) so that
    every layer supports forward mode."""
    return mlp_forward(params, x, activation, final_activation, precision, linear_apply)
