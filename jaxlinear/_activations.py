r"""Element-wise activations with hand-derived backward passes.

Each is one :class:`Activation` primitive (a ``VJPHiPrimitive``) that saves its
*output* as the only residual: every
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

The Jacobian is diagonal, so one function, v ↦ v · f'(z) computed from the output,
is both rules: the VJP applies it to a cotangent g, the JVP to a tangent ż.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._hijax import Rule, is_zero, staged_primitive
from ._validate import as_float_array, sum_dtype

__all__ = ["Activation", "relu", "sigmoid", "tanh"]


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


def _in_float32(rule):
    """Evaluate ``rule(out, g)`` in at least float32 and round once to g's dtype: in
    bfloat16/float16 each intermediate rounding would cost an ulp."""

    def at_least_f32(out, g):
        acc = sum_dtype(g.dtype)
        return rule(out.astype(acc), g.astype(acc)).astype(g.dtype)

    return at_least_f32


@_in_float32
def _sigmoid_backward(s, g):
    return g * (s * (1 - s))


@_in_float32
def _tanh_backward(t, g):
    # (1 + t)(1 − t), not 1 − t²: near saturation t² rounds to 1 and 1 − t² loses
    # every digit, while 1 − t is exact (Sterbenz); JAX's own tanh rule does the same.
    return g * ((1 + t) * (1 - t))


#: name -> (forward(z), derivative_times(output, g)): the one place each rule lives.
#: The Jacobian is diagonal, so the same product v · f'(z) serves as the VJP
#: (v a cotangent) and as the JVP (v a tangent).
RULES = {
    "relu": (_relu_forward, _relu_backward),
    "sigmoid": (_sigmoid_forward, _sigmoid_backward),
    "tanh": (jnp.tanh, _tanh_backward),
}


class Activation(Rule):
    """An element-wise activation with its rules: forward f(z), and v ↦ v · f'(z)
    from the output as both the VJP (v = g) and the JVP (v = ż).

    Any shape; the output has z's shape, dtype and sharding.
    """

    _staged = {name: staged_primitive(f"jaxlinear.{name}") for name in ("relu", "sigmoid", "tanh")}

    @property
    def staged(self):
        return self._staged[self.name]

    def __init__(self, z_aval, *, name: str):
        self.in_avals = (z_aval,)
        self.out_aval = z_aval
        self.params = dict(name=name, aval=z_aval)
        super().__init__()

    @classmethod
    def bind(cls, z, *, name: str):
        return cls(jax.typeof(z), name=name)(z)

    def _times_derivative(self, out, v):
        return RULES[self.name][1](out, v)

    def expand(self, z):
        return RULES[self.name][0](z)

    # Reverse mode: save the output, then ∂L/∂z = g · f'(z).
    def vjp_fwd(self, nzs, z):
        out = self(z)
        return out, out

    def vjp_bwd_retval(self, out, g):
        return (None if is_zero(g) else self._times_derivative(out, g),)

    # Forward mode: ż · f'(z), from the output as in the VJP.
    def jvp(self, primals, tangents):
        (z,), (dz,) = primals, tangents
        out = self(z)
        return out, self._times_derivative(out, dz)

    def lin(self, nzs, z):
        out = self(z)
        return out, out

    def linearized(self, out, dz):
        return self._times_derivative(out, dz)

    # Element-wise: a batched z is just a bigger z.
    def batch(self, axis_data, args, dims):
        (z,), (d,) = args, dims
        return (self(z) if d is None else Activation.bind(z, name=self.name)), d


_activation_eager = jax.jit(lambda z, name: Activation.bind(z, name=name), static_argnums=1)


def _elementwise(name: str, doc: str):
    """The public function: validate z, then bind the :class:`Activation` primitive."""

    def public(z: jax.Array) -> jax.Array:
        z = as_float_array("z", z)
        if isinstance(z, jax.core.Tracer):
            return Activation.bind(z, name=name)
        return _activation_eager(z, name)  # eager: a cached compiled call

    public.__name__ = public.__qualname__ = name
    public.__doc__ = doc
    public.__module__ = "jaxlinear"
    return public


relu = _elementwise(
    "relu",
    """Rectified linear unit, r = max(z, 0), element-wise; any shape, float dtype.

    Backward: ∂L/∂z = g · [r > 0], from the saved output r.

    >>> import jax, jax.numpy as jnp, jaxlinear
    >>> jax.grad(lambda z: jaxlinear.relu(z).sum())(jnp.array([-1.0, 0.0, 2.0])).tolist()
    [0.0, 0.0, 1.0]
    """,
)

sigmoid = _elementwise(
    "sigmoid",
    """Logistic sigmoid, s = 1/(1 + e^{-z}), element-wise; stable for large |z|.

    Backward: ∂L/∂z = g · s(1 − s), from the saved output s.

    >>> import jax.numpy as jnp, jaxlinear
    >>> jaxlinear.sigmoid(jnp.array([-1000.0, 0.0, 1000.0])).tolist()
    [0.0, 0.5, 1.0]
    """,
)

tanh = _elementwise(
    "tanh",
    """Hyperbolic tangent, t = tanh z, element-wise.

    Backward: ∂L/∂z = g · (1 − t²), from the saved output t.
    """,
)
