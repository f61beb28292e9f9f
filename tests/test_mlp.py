"""Whole-MLP gradients against the same network in plain jnp/jax.nn with autodiff."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlinear as jl
from tests.helpers import (
    assert_tree_close,
    backend_params,
    dtype_context,
    int_labels,
    mlp_params,
    normal,
)

ACTS = {
    "relu": (jl.relu, jax.nn.relu),
    "sigmoid": (jl.sigmoid, jax.nn.sigmoid),
    "tanh": (jl.tanh, jnp.tanh),
}


def plain_mlp(params, x, activation):
    h = x
    for i, p in enumerate(params):
        W = p.W if p.layout == "in_out" else p.W.T
        h = jnp.einsum("...i,io->...o", h, W)
        if p.b is not None:
            h = h + jnp.broadcast_to(p.b, h.shape)
        if i < len(params) - 1:
            h = activation(h)
    return h


def losses(kind, act):
    ours_act, ref_act = ACTS[act]

    def ours(params, x, target):
        y = jl.mlp_apply(params, x, activation=ours_act)
        return jl.mse_loss(y, target) if kind == "mse" else jl.softmax_cross_entropy(y, target)

    def ref(params, x, target):
        y = plain_mlp(params, x, ref_act)
        if kind == "mse":
            return 0.5 * jnp.sum((y - target) ** 2) / (y.size // y.shape[-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(y, target))

    return ours, ref


# A covering design rather than the full product: every loss x activation pair, every
# depth, both layouts, with and without bias and both batch shapes each appear.
CASES = [
    ("mse", "relu", (4, 3), "in_out", True, (8,)),
    ("xent", "relu", (5, 8, 3), "out_in", False, (2, 5)),
    ("mse", "sigmoid", (6, 7, 7, 3), "in_out", False, (2, 5)),
    ("xent", "sigmoid", (4, 3), "out_in", True, (8,)),
    ("mse", "tanh", (5, 8, 3), "out_in", True, (2, 5)),
    ("xent", "tanh", (6, 7, 7, 3), "in_out", True, (8,)),
    ("xent", "relu", (6, 7, 7, 3), "out_in", True, (2, 5)),
    ("mse", "tanh", (4, 3), "in_out", False, (8,)),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind,act,sizes,layout,bias,batch", CASES, ids=str)
def test_mlp_gradients_equal_autodiff(kind, act, sizes, layout, bias, batch, dtype):
    with dtype_context(dtype):
        params = mlp_params(0, sizes, bias=bias, layout=layout, dtype=dtype)
        x = normal(jax.random.key(1), batch + (sizes[0],), dtype)
        if kind == "mse":
            target = normal(jax.random.key(2), batch + (sizes[-1],), dtype)
        else:
            target = int_labels(2, batch, sizes[-1])
        ours, ref = losses(kind, act)
        got, want = jax.jit(  # one program for both: one compile
            lambda *a: tuple(jax.value_and_grad(f, argnums=(0, 1))(*a) for f in (ours, ref))
        )(params, x, target)
        assert_tree_close(got, want, dtype)


def test_mlp_grad_of_grad_and_final_activation():
    with jax.enable_x64(True):
        params = mlp_params(3, (3, 4, 2), dtype=jnp.float64)
        x = normal(jax.random.key(4), (5, 3), jnp.float64)

        def ours(p):
            return jnp.sum(jl.mlp_apply(p, x, activation=jl.tanh, final_activation=jl.sigmoid))

        def ref(p):
            return jnp.sum(jax.nn.sigmoid(plain_mlp(p, x, jnp.tanh)))

        assert_tree_close(
            jax.jit(jax.jacrev(jax.jacrev(ours)))(params),
            jax.jit(jax.jacrev(jax.jacrev(ref)))(params),
            jnp.float64,
        )


@pytest.mark.parametrize("device", backend_params())
def test_mlp_on_every_backend(device):
    with jax.default_matmul_precision("highest"), jax.default_device(device):
        params = jax.device_put(mlp_params(5, (8, 16, 4)), device)
        x = jax.device_put(normal(jax.random.key(6), (10, 8), jnp.float32), device)
        labels = jax.device_put(int_labels(7, (10,), 4), device)
        ours, ref = losses("xent", "relu")
        assert_tree_close(
            jax.jit(jax.grad(ours))(params, x, labels),
            jax.jit(jax.grad(ref))(params, x, labels),
            jnp.float32,
        )


def test_mlp_init_shapes_and_independent_layers():
    params = jl.mlp_init(jax.random.key(8), (64, 32, 10), layout="out_in", bias=False)
    assert isinstance(params, tuple) and len(params) == 2
    assert [p.W.shape for p in params] == [(32, 64), (10, 32)]
    assert all(p.b is None and p.layout == "out_in" for p in params)
    a = jl.mlp_init(jax.random.key(9), (8, 8, 8))
    assert not np.allclose(a[0].W, a[1].W)  # each layer has its own key


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


def test_mlp_errors():
    key = jax.random.key(0)
    with raises(ValueError, "`sizes` must list at least an input and an output size"):
        jl.mlp_init(key, (4,))
    a = jl.linear_init(key, 4, 5)
    b = jl.linear_init(key, 6, 2)
    with raises(
        ValueError,
        "layer sizes do not chain: `params[1]` has in_features=6 but "
        "`params[0]` has out_features=5.",
    ):
        jl.mlp_apply((a, b), jnp.ones((1, 4)))
    with raises(TypeError, "`params` must be a non-empty tuple of LinearParams"):
        jl.mlp_apply(a, jnp.ones((1, 4)))
    with raises(TypeError, "`params[1]` must be a LinearParams; got dict."):
        jl.mlp_apply((a, {"W": 1}), jnp.ones((1, 4)))


def test_mlp_apply_accepts_what_linear_apply_accepts():
    """Weights given as nested lists are arrays to linear_apply, and to mlp_apply."""
    p = jl.LinearParams([[1.0], [2.0]])
    x = jnp.array([[1.0, 1.0]])
    assert jl.mlp_apply((p,), x).tolist() == jl.linear_apply(p, x).tolist() == [[3.0]]
