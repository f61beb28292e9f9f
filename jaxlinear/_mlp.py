r"""Multi-layer perceptrons built from :func:`linear_apply` and the activations.

An MLP with sizes ``(d₀, d₁, …, d_L)`` is h⁰ = x, hˡ = act(hˡ⁻¹ Wˡ + bˡ) for
l < L, and y = final(h^{L-1} W^L + b^L). Backpropagation is the chain rule
applied layer by layer, each layer running its own hand-derived backward:
gˡ⁻¹ = ∂L/∂hˡ⁻¹ = (gˡ ⊙ act'(zˡ)) Wˡᵀ, and ∂L/∂Wˡ = hˡ⁻¹ᵀ (gˡ ⊙ act'(zˡ)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _taps
from ._activations import relu, sigmoid, tanh
from ._hijax import is_eager
from ._init import check_init_config, draw_layer
from ._linear import LinearParams, linear_apply
from ._validate import (
    check_callable,
    check_key,
    check_precision,
    check_sizes,
    describe,
)

__all__ = ["mlp_init", "mlp_apply"]


def mlp_init(
    key: jax.Array,
    sizes: Sequence[int],
    *,
    bias: bool = True,
    layout: str = "in_out",
    dtype: Any = jnp.float32,
    init: str | Callable = "lecun_normal",
) -> tuple[LinearParams, ...]:
    """Initialise an MLP with layer sizes ``sizes = (in, hidden..., out)``.

    ``key`` is one PRNG key (``jax.random.key(seed)`` or a raw uint32[2] key);
    ``sizes`` a sequence of at least two static positive ints.

    Returns a tuple of ``len(sizes) - 1`` :class:`LinearParams`, a plain pytree
    that Optax updates directly. ``bias``, ``layout``, ``dtype`` and ``init`` are
    as in :func:`linear_init` and apply to every layer; each layer gets its own
    key from ``jax.random.split``.

    >>> import jax, jaxlinear
    >>> params = jaxlinear.mlp_init(jax.random.key(0), (64, 32, 10))
    >>> [p.W.shape for p in params]
    [(64, 32), (32, 10)]
    """
    key = check_key(key)
    sizes = check_sizes(sizes)
    config = check_init_config(bias, layout, dtype, init)
    if isinstance(init, str):  # one compiled program per configuration (see _init.py)
        return _draw_mlp_named(key, sizes, *config)
    return _draw_mlp(key, sizes, *config)


def _draw_mlp(key, sizes, bias, layout, dtype, init) -> tuple[LinearParams, ...]:
    keys = jax.random.split(key, len(sizes) - 1)
    return tuple(
        draw_layer(k, i, o, bias, layout, dtype, init)
        for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)
    )


_draw_mlp_named = jax.jit(_draw_mlp, static_argnums=(1, 2, 3, 4, 5))


def _check_mlp(params: Any) -> tuple[LinearParams, ...]:
    if not isinstance(params, (tuple, list)) or not params:
        raise TypeError(
            "`params` must be a non-empty tuple of LinearParams (as mlp_init returns); "
            f"got {type(params).__name__}."
        )
    for i, p in enumerate(params):
        if not isinstance(p, LinearParams):
            raise TypeError(f"`params[{i}]` must be a LinearParams; got {type(p).__name__}.")
        if np.ndim(p.W) != 2:
            raise ValueError(f"`params[{i}].W` must be 2-D; got shape {np.shape(p.W)}.")
    for i in range(1, len(params)):
        prev, cur = params[i - 1].out_features, params[i].in_features
        if prev != cur:
            raise ValueError(
                f"layer sizes do not chain: `params[{i}]` has in_features={cur} but "
                f"`params[{i - 1}]` has out_features={prev}."
            )
    return tuple(params)


def mlp_apply(
    params: Sequence[LinearParams],
    x: jax.Array,
    *,
    activation: Callable[[jax.Array], jax.Array] = relu,
    final_activation: Callable[[jax.Array], jax.Array] | None = None,
    precision: Any = None,
) -> jax.Array:
    """Apply an MLP: ``activation`` after every layer but the last.

    Args:
        params: a tuple of :class:`LinearParams` (from :func:`mlp_init`).
        x: ``(*batch, in_features)``.
        activation: the hidden activation, an element-wise callable (its output
            has its input's shape and dtype), default :func:`jaxlinear.relu`.
        final_activation: a callable applied to the last layer's output, or
            ``None`` (logits, as :func:`softmax_cross_entropy` expects).
        precision: passed to every :func:`linear_apply`.

    Returns:
        ``(*batch, out_features)``.
    """
    if _eager(params, x, activation, final_activation):
        return _mlp_eager(
            _check_mlp(params), x, activation, final_activation, check_precision(precision)
        )
    return mlp_forward(params, x, activation, final_activation, precision, linear_apply)


def _eager(params, x, activation, final_activation) -> bool:
    """An eager call (no tracer) with jaxlinear's own activations: those are fixed,
    hashable functions, so the whole MLP can run as one cached compiled call
    instead of one dispatch per layer and activation."""
    own = (relu, sigmoid, tanh)
    if activation not in own or (final_activation is not None and final_activation not in own):
        return False
    if not is_eager() or _taps.innermost() is not None:
        return False  # traced, or per_example_grad_norms is watching the layers
    leaves = jax.tree.leaves((params, x))  # arrays only: nested lists stay plain values
    return all(
        isinstance(leaf, (jax.Array, np.ndarray)) and not isinstance(leaf, jax.core.Tracer)
        for leaf in leaves
    )


_mlp_eager = jax.jit(
    lambda params, x, activation, final_activation, precision: mlp_forward(
        params, x, activation, final_activation, precision, linear_apply
    ),
    static_argnums=(2, 3, 4),
)


def mlp_forward(params, x, activation, final_activation, precision, linear):
    """The layer loop of :func:`mlp_apply`, with ``linear`` applying one layer."""
    params = _check_mlp(params)
    activation = check_callable("activation", activation)
    final_activation = check_callable("final_activation", final_activation, optional=True)
    h = x
    for p in params[:-1]:
        z = linear(p, h, precision=precision)
        h = activation(z)
        _check_elementwise(z, h)
    y = linear(params[-1], h, precision=precision)
    return y if final_activation is None else final_activation(y)


def _check_elementwise(z, h) -> None:
    """The hidden activation must keep its input's shape and dtype (trace time)."""
    if getattr(h, "shape", None) != z.shape or getattr(h, "dtype", None) != z.dtype:
        raise ValueError(
            "`activation` must return an array of its input's shape and dtype (it is "
            f"applied element-wise between layers, as jaxlinear.relu); got {describe(h)} "
            f"for an input {z.dtype}{list(z.shape)}."
        )
