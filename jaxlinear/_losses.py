r"""Losses with hand-derived rules, per example first and reduced second.

Both losses read their last axis as features and every leading axis as rows
i = 1..N. Each computes one value ℓᵢ per row, then reduces with ``reduction``
(Optax's convention): ``"none"`` returns ℓ of shape ``(*batch,)``, ``"sum"``
returns Σᵢ ℓᵢ and ``"mean"`` (the default) returns 1/N Σᵢ ℓᵢ. With ``w`` the
weight a row's ℓᵢ carries in the result (the cotangent gᵢ for ``"none"``, g for
``"sum"``, g/N for ``"mean"``), each rule below is derived once per row.

**Mean squared error** (y, t of shape ``(*batch, d)``): ℓᵢ = ½‖yᵢ − tᵢ‖², so

* VJP: ∂/∂yᵢ = wᵢ (yᵢ − tᵢ), ∂/∂tᵢ = −wᵢ (yᵢ − tᵢ);
* JVP: ℓ̇ᵢ = (yᵢ − tᵢ)·(ẏᵢ − ṫᵢ).

**Softmax cross-entropy** (logits z ``(*batch, C)``, integer labels
``(*batch,)``): ℓᵢ = log Σ_c e^{z_ic} − z_{i,labelᵢ}. With pᵢ = softmax(zᵢ),
∂ℓᵢ/∂z_ic = p_ic − [c = labelᵢ], so

* VJP: ∂/∂zᵢ = wᵢ (pᵢ − onehotᵢ);
* JVP: ℓ̇ᵢ = (pᵢ − onehotᵢ)·żᵢ.

The log-sum-exp is computed as m + log Σ e^{z − m}, m = max_c z_c, which never
overflows. Every sum, and p, stays in at least float32; results come back in the
inputs' dtype. An out-of-range label (possible only under ``jit``, where labels
are not concrete) makes its row's loss and gradient NaN, never a wrong number.

Each loss is one primitive with ``k`` leading axes that are never reduced
(``k = 0`` for a user's call; ``vmap`` adds one per mapped axis), so a batched
call is the same rule on a bigger array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._hijax import Rule, is_zero, staged_primitive, wants_cotangent
from ._linear import _at_axis
from ._validate import as_float_array, check_same_dtype, sum_dtype

__all__ = ["MSELoss", "SoftmaxCrossEntropy", "mse_loss", "softmax_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------- reductions


def _rows(shape: tuple[int, ...], k: int) -> int:
    """N, the number of rows: the axes between the k kept axes and the features."""
    return math.prod(shape[k:-1])


def _reduce(per_row, reduction: str, k: int):
    """ℓ ``(*E, *rows)`` reduced over the rows (in ℓ's dtype, at least float32)."""
    if reduction == "none":
        return per_row
    total = jnp.sum(per_row, axis=tuple(range(k, per_row.ndim)))
    return total if reduction == "sum" else total / _rows(per_row.shape + (1,), k)


def _row_weights(g, reduction: str, k: int, rows_shape, dtype):
    """w ``(*E, *rows)``: the weight each row's ℓᵢ carries, times the cotangent g."""
    g = g.astype(dtype)
    if reduction == "none":
        return g
    if reduction == "mean":
        g = g / _rows(rows_shape + (1,), k)
    return jax.lax.broadcast_in_dim(g, rows_shape, tuple(range(k)))


def _out_aval(fn, in_avals, reduction: str, k: int):
    """The loss's abstract value: ``(*E, *rows)`` for "none", ``(*E,)`` otherwise."""
    first = in_avals[0]
    if first.sharding.mesh.empty:
        shape = first.shape[:-1] if reduction == "none" else first.shape[:k]
        return jax.core.ShapedArray(shape, first.dtype)
    return jax.make_jaxpr(fn)(*in_avals).out_avals[0]  # JAX's rules give the sharding


class _Loss(Rule):
    """What both losses share: configuration, binding and the batching rule."""

    def __init__(self, a_aval, b_aval, *, reduction: str, k: int = 0):
        self.in_avals = (a_aval, b_aval)
        self.params = dict(reduction=reduction, k=k, avals=self.in_avals)
        self.reduction, self.k = reduction, k
        self.out_aval = _out_aval(self.expand, self.in_avals, reduction, k)
        super().__init__()

    @classmethod
    def bind(cls, a, b, *, reduction: str, k: int = 0):
        return cls(jax.typeof(a), jax.typeof(b), reduction=reduction, k=k)(a, b)

    # A mapped axis is one more kept axis in front: the same rule on bigger arrays.
    def batch(self, axis_data, args, dims):
        if all(d is None for d in dims):
            return self(*args), None
        a, b = (_at_axis(x, d, 0, axis_data.size) for x, d in zip(args, dims, strict=True))
        return type(self).bind(a, b, reduction=self.reduction, k=self.k + 1), 0

    def lin(self, nzs, a, b):
        return self(a, b), self._residual(a, b)

    def jvp(self, primals, tangents):
        return self(*primals), self.linearized(self._residual(*primals), *tangents)


# --------------------------------------------------------------------- mean squared error


class MSELoss(_Loss):
    """ℓᵢ = ½‖yᵢ − tᵢ‖², reduced; residual: the difference y − t."""

    staged = staged_primitive("jaxlinear.mse_loss")

    def expand(self, y, t):
        d = (y - t).astype(sum_dtype(y.dtype))
        per_row = 0.5 * jnp.sum(d * d, axis=-1)
        return _reduce(per_row, self.reduction, self.k).astype(y.dtype)

    def _residual(self, y, t):
        return y - t

    def vjp_fwd(self, nzs, y, t):
        return self(y, t), self._residual(y, t)

    # VJP: ∂/∂y = w (y − t), ∂/∂t = −w (y − t).
    def vjp_bwd(self, diff, g, y_accum, t_accum):
        if is_zero(g):
            return
        acc = sum_dtype(diff.dtype)
        w = _row_weights(g, self.reduction, self.k, diff.shape[:-1], acc)
        dy = diff.astype(acc) * w[..., None]
        if wants_cotangent(y_accum):
            y_accum.accum(dy.astype(diff.dtype))
        if wants_cotangent(t_accum):
            t_accum.accum((-dy).astype(diff.dtype))

    # JVP: ℓ̇ᵢ = (yᵢ − tᵢ)·(ẏᵢ − ṫᵢ), reduced like ℓ.
    def linearized(self, diff, dy, dt):
        acc = sum_dtype(diff.dtype)
        dy, dt = (None if is_zero(v) else v.astype(acc) for v in (dy, dt))
        d_dot = dy if dt is None else (-dt if dy is None else dy - dt)
        per_row = jnp.sum(diff.astype(acc) * d_dot, axis=-1)
        return _reduce(per_row, self.reduction, self.k).astype(diff.dtype)


# --------------------------------------------------------------------- cross-entropy


def _log_softmax(z):
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    shifted = z - m
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def _valid_labels(labels, num_classes):
    """Rows whose label lies in [0, num_classes); the others are made NaN."""
    return (labels >= 0) & (labels < num_classes)


def _xent_rows(logits, labels):
    """(ℓ per row, softmax probabilities), both in at least float32.

    p stays in float32: rounded to bfloat16, p − 1 for a confident true class
    would lose all its digits in the backward pass.
    """
    logp = _log_softmax(logits.astype(sum_dtype(logits.dtype)))
    safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    nan = jnp.full((), jnp.nan, picked.dtype)
    per_row = -jnp.where(_valid_labels(labels, logits.shape[-1]), picked, nan)
    return per_row, jnp.exp(logp)


def _p_minus_onehot(p, labels):
    """pᵢ − onehot(labelᵢ) in p's dtype; NaN rows for out-of-range labels."""
    # Class indices in int32, whatever the labels' dtype (uint8 would wrap past 255).
    classes = jax.lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1)
    onehot = (labels.astype(jnp.int32)[..., None] == classes).astype(p.dtype)
    valid = _valid_labels(labels, p.shape[-1])
    return jnp.where(valid[..., None], p - onehot, jnp.full((), jnp.nan, p.dtype))


class SoftmaxCrossEntropy(_Loss):
    """ℓᵢ = logsumexp(zᵢ) − z_{i,labelᵢ}, reduced; residual: p − onehot (float32)."""

    staged = staged_primitive("jaxlinear.softmax_cross_entropy")

    def expand(self, logits, labels):
        per_row, _ = _xent_rows(logits, labels)
        return _reduce(per_row, self.reduction, self.k).astype(logits.dtype)

    def _residual(self, logits, labels):
        _, p = _xent_rows(logits, labels)
        return _p_minus_onehot(p, labels)

    def vjp_fwd(self, nzs, logits, labels):
        per_row, p = _xent_rows(logits, labels)
        loss = _reduce(per_row, self.reduction, self.k).astype(logits.dtype)
        return loss, _p_minus_onehot(p, labels)

    # VJP: ∂/∂zᵢ = wᵢ (pᵢ − onehotᵢ); integer labels get no cotangent.
    def vjp_bwd(self, delta, g, logits_accum, labels_accum):
        dtype = self.in_avals[0].dtype
        if is_zero(g) or not wants_cotangent(logits_accum):
            return
        w = _row_weights(g, self.reduction, self.k, delta.shape[:-1], delta.dtype)
        logits_accum.accum((delta * w[..., None]).astype(dtype))

    # JVP: ℓ̇ᵢ = (pᵢ − onehotᵢ)·żᵢ, reduced like ℓ.
    def linearized(self, delta, dlogits, dlabels):
        dtype = self.in_avals[0].dtype
        if is_zero(dlogits):
            return jnp.zeros(self.out_aval.shape, dtype)
        per_row = jnp.sum(delta * dlogits.astype(delta.dtype), axis=-1)
        return _reduce(per_row, self.reduction, self.k).astype(dtype)


# --------------------------------------------------------------------- public functions


def _check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(
            f"`reduction` must be one of {REDUCTIONS!r} (mean over rows, sum, or one "
            f"loss per row as Optax's losses return); got {reduction!r}."
        )
    return reduction


def _check_rows(name: str, a: jax.Array, reduction: str) -> None:
    if a.ndim == 0:
        raise ValueError(f"`{name}` must have at least one axis, (..., features); got a scalar.")
    if reduction == "mean" and _rows(a.shape, 0) == 0:
        raise ValueError(
            f"`{name}` has no rows (shape {a.shape}): the mean over an empty batch is "
            "undefined. Skip empty batches, or use reduction='sum' or 'none'."
        )


def _apply(prim, a, b, reduction):
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return prim.bind(a, b, reduction=reduction)
    return _loss_eager(prim, a, b, reduction)  # eager: a cached compiled call


_loss_eager = jax.jit(
    lambda prim, a, b, reduction: prim.bind(a, b, reduction=reduction), static_argnums=(0, 3)
)


def mse_loss(y: jax.Array, t: jax.Array, *, reduction: str = "mean") -> jax.Array:
    """Squared error ℓᵢ = ½‖yᵢ − tᵢ‖² per row, reduced.

    Args:
        y: predictions ``(*batch, d)``; a 1-D ``(d,)`` is one row.
        t: targets, the same shape and dtype as ``y``.
        reduction: ``"mean"`` (default, 1/N Σᵢ ℓᵢ over the N rows), ``"sum"``
            (Σᵢ ℓᵢ) or ``"none"`` (ℓ of shape ``(*batch,)``).

    Returns:
        the loss in ``y.dtype`` (summed in at least float32).

    Rules (hand-derived, w the weight of row i: g/N, g or gᵢ):
    ∂/∂y = w (y − t), ∂/∂t = −w (y − t); ℓ̇ᵢ = (yᵢ − tᵢ)·(ẏᵢ − ṫᵢ).

    >>> import jax, jax.numpy as jnp, jaxlinear
    >>> y, t = jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.zeros((2, 2))
    >>> float(jaxlinear.mse_loss(y, t))  # (1 + 4 + 9 + 16) / (2 * 2)
    7.5
    >>> jaxlinear.mse_loss(y, t, reduction="none").tolist()
    [2.5, 12.5]
    >>> jax.grad(jaxlinear.mse_loss)(y, t).tolist()
    [[0.5, 1.0], [1.5, 2.0]]
    """
    reduction = _check_reduction(reduction)
    y, t = validate_mse_args(y, t, reduction)
    return _apply(MSELoss, y, t, reduction)


def validate_mse_args(y, t, reduction: str = "mean"):
    """Trace-time checks of :func:`mse_loss`'s arguments."""
    y = as_float_array("y", y)
    t = as_float_array("t", t)
    check_same_dtype(y=y, t=t)
    if y.shape != t.shape:
        raise ValueError(
            f"`y` and `t` must have the same shape; got y.shape={y.shape}, t.shape={t.shape}."
        )
    _check_rows("y", y, reduction)
    return y, t


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, reduction: str = "mean"
) -> jax.Array:
    """Softmax cross-entropy ℓᵢ = logsumexp(zᵢ) − z_{i,labelᵢ} with integer labels, reduced.

    Args:
        logits: ``(*batch, C)`` float scores.
        labels: ``(*batch,)`` integer classes in ``[0, C)``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (ℓ of shape
            ``(*batch,)``).

    Returns:
        the loss in ``logits.dtype``.

    Rules (hand-derived, w the weight of row i): ∂/∂zᵢ = wᵢ (softmax(zᵢ) −
    onehot(labelᵢ)); ℓ̇ᵢ = (pᵢ − onehotᵢ)·żᵢ.

    Labels are checked at trace time for dtype and shape; their values are
    checked when they are concrete (outside ``jit``). Inside ``jit`` an
    out-of-range label makes its row's loss and gradient NaN, never a silently
    wrong number.

    >>> import jax.numpy as jnp, jaxlinear
    >>> z = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    >>> round(float(jaxlinear.softmax_cross_entropy(z, jnp.array([0, 1]))), 6)  # log 2
    0.693147
    """
    reduction = _check_reduction(reduction)
    logits, labels = validate_xent_args(logits, labels, reduction)
    return _apply(SoftmaxCrossEntropy, logits, labels, reduction)


def validate_xent_args(logits, labels, reduction: str = "mean"):
    """Trace-time checks of :func:`softmax_cross_entropy`'s arguments."""
    logits = as_float_array("logits", logits)
    if labels is None or not _array_like(labels):
        raise TypeError(
            "`labels` must be an integer array of class indices, shape logits.shape[:-1]; "
            f"got {type(labels).__name__}."
        )
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"`labels` must have an integer dtype (class indices); got {labels.dtype}. "
            "Pass class indices, e.g. `labels.astype(jnp.int32)`, not one-hot floats."
        )
    _check_rows("logits", logits, reduction)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape logits.shape[:-1] = {logits.shape[:-1]}; "
            f"got labels.shape={labels.shape} (logits.shape={logits.shape})."
        )
    _check_label_values(labels, logits.shape[-1])
    return logits, labels


def _array_like(value) -> bool:
    try:
        jnp.asarray(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_label_values(labels, num_classes: int) -> None:
    if isinstance(labels, jax.core.Tracer) or not labels.size:
        return  # traced labels: out-of-range rows come out NaN instead
    host = np.asarray(labels)  # concrete: check on the host, nothing is staged
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}) for logits with "
            f"{num_classes} classes; got values from {lo} to {hi}."
        )
