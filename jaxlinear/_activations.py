r"""Element-wise activations with hand-derived backward passes.

Each is a ``jax.custom_vjp`` that saves its *output* as the only residual: every
derivative here is a function of the output, and in an MLP that output is also
the next linear layer's input, which that layer saves anyway, so the residual
costs no extra memory.

=========  ===========================  ==========================================
name       forward                      backward (g = ∂L/∂output)
=========  ===========================  ==========================================
relu       r = max(z, 0)                ∂L/∂z = g · [r > 0]   ([z > 0] ⇔ [r > 0])
sigmoid    s = 1 / (1 + e^{-z})         ∂L/∂z = g · s (1 − s)
tanh       t = tanh z                   ∂L/∂z = g · (1 − t²)
=========  ===========================  ==========================================

The sigmoid derivative: s = (1 + e^{-z})^{-1}, so
ds/dz = e^{-z} (1 + e^{-z})^{-2} = s · e^{-z}/(1 + e^{-z}) = s (1 − s).
The tanh derivative: d tanh z/dz = sech² z = 1 − tanh² z.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._validate import as_float_array, raise_forward_mode_hint

__all__ = ["relu", "sigmoid", "tanh"]


def _elementwise(name: str, forward, backward, doc: str):
    """Build a public activation from its forward and its backward in terms of the output."""

    @jax.custom_vjp
    def act(z):
        return forward(z)

    def fwd(z):
        out = forward(z)
        return out, out

    def bwd(out, g):
        return (backward(out, g),)

    act.defvjp(fwd, bwd)

    def public(z: jax.Array) -> jax.Array:
        z = as_float_array("z", z)
        try:
            return act(z)
        except TypeError as err:
            raise_forward_mode_hint(err, name)
            raise

    public.__name__ = public.__qualname__ = name
    public.__doc__ = doc
    public.__module__ = "jaxlinear"
    return public


def _relu_forward(z):
    return jnp.maximum(z, jnp.zeros((), z.dtype))


def _relu_backward(r, g):
    # [z > 0] read from the output; at z = 0 the derivative is taken as 0, as
    # jax.nn.relu does.
    return jnp.where(r > 0, g, jnp.zeros((), g.dtype))


def _sigmoid_forward(z):
    # e = exp(-|z|) never overflows; for z >= 0 s = 1/(1+e), for z < 0 s = e/(1+e).
    e = jnp.exp(-jnp.abs(z))
    one = jnp.ones((), z.dtype)
    return jnp.where(z >= 0, one, e) / (one + e)


def _sigmoid_backward(s, g):
    return g * (s * (jnp.ones((), s.dtype) - s))


def _tanh_backward(t, g):
    return g * (jnp.ones((), t.dtype) - t * t)


#: name -> (forward(z), derivative_times(output, g)): the one place each rule lives.
#: The Jacobian is diagonal, so the same product g · f'(z) serves as the VJP
#: (g a cotangent) and as the JVP (g a tangent).
RULES = {
    "relu": (_relu_forward, _relu_backward),
    "sigmoid": (_sigmoid_forward, _sigmoid_backward),
    "tanh": (jnp.tanh, _tanh_backward),
}

relu = _elementwise(
    "relu",
    *RULES["relu"],
    """Rectified linear unit, r = max(z, 0), element-wise; any shape, float dtype.

    Backward: ∂L/∂z = g · [r > 0], from the saved output r.

    >>> import jax, jax.numpy as jnp, jaxlinear
    >>> jax.grad(lambda z: jaxlinear.relu(z).sum())(jnp.array([-1.0, 0.0, 2.0])).tolist()
    [0.0, 0.0, 1.0]
    """,
)

sigmoid = _elementwise(
    "sigmoid",
    *RULES["sigmoid"],
    """Logistic sigmoid, s = 1/(1 + e^{-z}), element-wise; stable for large |z|.

    Backward: ∂L/∂z = g · s(1 − s), from the saved output s.

    >>> import jax.numpy as jnp, jaxlinear
    >>> jaxlinear.sigmoid(jnp.array([-1000.0, 0.0, 1000.0])).tolist()
    [0.0, 0.5, 1.0]
    """,
)

tanh = _elementwise(
    "tanh",
    *RULES["tanh"],
    """Hyperbolic tangent, t = tanh z, element-wise.

    Backward: ∂L/∂z = g · (1 − t²), from the saved output t.
    """,
)
