r"""Losses with hand-derived backward passes.

Both losses read their last axis as features and flatten every leading axis
into N rows.

**Mean squared error** (y, t of shape ``(*batch, d)``):
L = 1/(2N) Σᵢ ‖yᵢ − tᵢ‖², so ∂L/∂y = (y − t)/N and ∂L/∂t = −(y − t)/N.

**Softmax cross-entropy** (logits z of shape ``(*batch, C)``, integer labels
``(*batch,)``): Lᵢ = log Σ_c e^{z_ic} − z_{i,labelᵢ}, L = 1/N Σᵢ Lᵢ. With
pᵢ = softmax(zᵢ), ∂Lᵢ/∂z_ic = p_ic − [c = labelᵢ], so ∂L/∂z = (p − onehot)/N.
The log-sum-exp is computed as m + log Σ e^{z − m}, m = max_c z_c, which never
overflows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._validate import (
    as_float_array,
    check_same_dtype,
    raise_forward_mode_hint,
    sum_dtype,
)

__all__ = ["mse_loss", "softmax_cross_entropy"]


def _rows(name: str, a: jax.Array) -> int:
    if a.ndim == 0:
        raise ValueError(f"`{name}` must have at least one axis, (..., features); got a scalar.")
    n = math.prod(a.shape[:-1])
    if n == 0:
        raise ValueError(
            f"`{name}` has no rows (shape {a.shape}): the mean over an empty batch is "
            "undefined. Skip empty batches, or use a sum."
        )
    return n


def mse_forward(y, t):
    """L = 1/(2N) Σ ‖yᵢ − tᵢ‖², summed in at least float32."""
    d = (y - t).astype(sum_dtype(y.dtype))
    n = math.prod(y.shape[:-1])
    return (jnp.sum(d * d) / (2 * n)).astype(y.dtype)


_mse = jax.custom_vjp(mse_forward)


def _mse_fwd(y, t):
    return mse_forward(y, t), y - t  # one residual: the difference


def _mse_bwd(diff, g):
    n = math.prod(diff.shape[:-1])
    # (y − t)/N times the incoming scalar, scaled in at least float32: in float16,
    # N > 65504 would round 1/N's denominator to inf and the gradient to zero.
    acc = sum_dtype(diff.dtype)
    dy = (diff.astype(acc) * (g.astype(acc) / n)).astype(diff.dtype)
    return dy, -dy


_mse.defvjp(_mse_fwd, _mse_bwd)


def mse_loss(y: jax.Array, t: jax.Array) -> jax.Array:
    """Mean squared error L = 1/(2N) Σᵢ ‖yᵢ − tᵢ‖² over N rows.

    Args:
        y: predictions ``(*batch, d)``; a 1-D ``(d,)`` is one row.
        t: targets, the same shape and dtype as ``y``.

    Returns:
        a scalar in ``y.dtype`` (summed in at least float32).

    Backward (hand-derived): ∂L/∂y = (y − t)/N, ∂L/∂t = −(y − t)/N.

    >>> import jax, jax.numpy as jnp, jaxlinear
    >>> y, t = jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.zeros((2, 2))
    >>> float(jaxlinear.mse_loss(y, t))  # (1 + 4 + 9 + 16) / (2 * 2)
    7.5
    >>> jax.grad(jaxlinear.mse_loss)(y, t).tolist()
    [[0.5, 1.0], [1.5, 2.0]]
    """
    y, t = validate_mse_args(y, t)
    try:
        return _mse(y, t)
    except TypeError as err:
        raise_forward_mode_hint(err, "mse_loss")
        raise


def validate_mse_args(y, t):
    """Trace-time checks of :func:`mse_loss`'s arguments (shared with the twin)."""
    y = as_float_array("y", y)
    t = as_float_array("t", t)
    check_same_dtype(y=y, t=t)
    if y.shape != t.shape:
        raise ValueError(
            f"`y` and `t` must have the same shape; got y.shape={y.shape}, t.shape={t.shape}."
        )
    _rows("y", y)
    return y, t


def _log_softmax(z):
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    shifted = z - m
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def _valid_labels(labels, num_classes):
    """Rows whose label lies in [0, num_classes); the others are made NaN."""
    return (labels >= 0) & (labels < num_classes)


def xent_forward(logits, labels):
    """(loss, softmax probabilities) of the mean cross-entropy.

    The probabilities stay in at least float32: rounded to bfloat16, p − 1 for a
    confident true class would lose all its digits in the backward pass.
    """
    z = logits.astype(sum_dtype(logits.dtype))
    logp = _log_softmax(z)
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    # An out-of-range label gives NaN, so the loss says so instead of being wrong.
    nan = jnp.full((), jnp.nan, picked.dtype)
    picked = jnp.where(_valid_labels(labels, logits.shape[-1]), picked, nan)
    n = math.prod(logits.shape[:-1])
    loss = (-jnp.sum(picked) / n).astype(logits.dtype)
    return loss, jnp.exp(logp)


def xent_dlogits(p, labels):
    """∂L/∂logits = (p − onehot(labels))/N in p's dtype; NaN rows for out-of-range labels."""
    n = math.prod(p.shape[:-1])
    # Class indices in int32, whatever the labels' dtype (uint8 would wrap past 255).
    classes = jax.lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1)
    onehot = (labels.astype(jnp.int32)[..., None] == classes).astype(p.dtype)
    valid = _valid_labels(labels, p.shape[-1])
    grad = jnp.where(valid[..., None], p - onehot, jnp.full((), jnp.nan, p.dtype))
    return grad / n


_xent = jax.custom_vjp(lambda logits, labels: xent_forward(logits, labels)[0])


def _xent_fwd(logits, labels):
    loss, p = xent_forward(logits, labels)
    # Residuals: softmax probabilities and the labels (both needed for p − onehot).
    return loss, (p, labels)


def _xent_bwd(residuals, g):
    p, labels = residuals
    # p is in at least float32; the cotangent g has the loss's (= the logits') dtype.
    dlogits = (xent_dlogits(p, labels) * g.astype(p.dtype)).astype(g.dtype)
    return dlogits, None  # integer labels: no cotangent


_xent.defvjp(_xent_fwd, _xent_bwd)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels.

    Args:
        logits: ``(*batch, C)`` float scores.
        labels: ``(*batch,)`` integer classes in ``[0, C)``.

    Returns:
        scalar L = 1/N Σᵢ (logsumexp(zᵢ) − z_{i,labelᵢ}) in ``logits.dtype``.

    Backward (hand-derived): ∂L/∂logits = (softmax(logits) − onehot(labels))/N.

    Labels are checked at trace time for dtype and shape; their values are
    checked when they are concrete (outside ``jit``). Inside ``jit`` an
    out-of-range label makes the loss and its gradient NaN, never a silently
    wrong number.

    >>> import jax.numpy as jnp, jaxlinear
    >>> z = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    >>> round(float(jaxlinear.softmax_cross_entropy(z, jnp.array([0, 1]))), 6)  # log 2
    0.693147
    """
    logits, labels = validate_xent_args(logits, labels)
    try:
        return _xent(logits, labels)
    except TypeError as err:
        raise_forward_mode_hint(err, "softmax_cross_entropy")
        raise


def validate_xent_args(logits, labels):
    """Trace-time checks of :func:`softmax_cross_entropy`'s arguments."""
    logits = as_float_array("logits", logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"`labels` must have an integer dtype (class indices); got {labels.dtype}. "
            "Pass class indices, e.g. `labels.astype(jnp.int32)`, not one-hot floats."
        )
    _rows("logits", logits)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape logits.shape[:-1] = {logits.shape[:-1]}; "
            f"got labels.shape={labels.shape} (logits.shape={logits.shape})."
        )
    num_classes = logits.shape[-1]
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        # Concrete labels (eager, or closed over under jit): check on the host, where
        # no operation is staged into a trace.
        host = np.asarray(labels)
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"`labels` must lie in [0, {num_classes}) for logits with "
                f"{num_classes} classes; got values from {lo} to {hi}."
            )
    return logits, labels
