"""Forward-mode twins of jaxlinear's functions (``jax.jvp``, ``jacfwd``, ``linearize``).

The main functions carry hand-derived ``custom_vjp`` backward passes, which JAX
cannot run in forward mode. These twins compute the same values with
hand-derived ``custom_jvp`` tangent rules, so every JAX transformation works;
reverse mode through them is JAX's transpose of the tangent rule. Switch by
import::

    import jaxlinear.fwd as jlf
    jax.hessian(lambda p: jlf.mse_loss(jlf.mlp_apply(p, x), t))(params)

Parameters (``LinearParams``, ``mlp_init``) are shared with the main API.
"""

from ._forward_mode import (
    linear_apply as linear_apply,
    mlp_apply as mlp_apply,
    mse_loss as mse_loss,
    relu as relu,
    sigmoid as sigmoid,
    softmax_cross_entropy as softmax_cross_entropy,
    tanh as tanh,
)

__all__ = [
    "linear_apply",
    "mlp_apply",
    "mse_loss",
    "relu",
    "sigmoid",
    "softmax_cross_entropy",
    "tanh",
]
