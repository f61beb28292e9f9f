"""The linear layer composed with jit, vmap, grad-of-grad, checkpoint and scan."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlinear import LinearParams, linear_apply
from tests.helpers import (
    assert_close,
    assert_tree_close,
    host,
    normal,
    plain_linear as plain,
    take,
    well_scaled_linear,
)

LAYOUTS = ["in_out", "out_in"]
F32 = jnp.float32


def sq_loss(apply):
    def loss(params, x):
        return 0.5 * jnp.sum(jnp.tanh(apply(params, x)) ** 2)

    return loss


def test_jit_matches_eager_and_does_not_retrace():
    params, x = well_scaled_linear(jax.random.key(0), 5, 3, (4,), F32, layout="in_out", bias=True)
    traces = []

    def loss(p, x):
        traces.append(None)
        return sq_loss(linear_apply)(p, x)

    step = jax.jit(jax.value_and_grad(loss))
    v1, g1 = step(params, x)
    v2, g2 = step(jax.tree.map(lambda a: a + 1, params), x + 1)
    assert len(traces) == 1, "second call with the same shapes retraced"
    ve, ge = jax.jit(jax.value_and_grad(sq_loss(plain)))(params, x)
    assert_close(v1, ve, F32)
    assert_tree_close(g1, ge, F32)
    assert not np.allclose(v1, v2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [(), (3,)], ids=["flat", "seq"])
def test_vmap_per_example_gradients_equal_python_loop(layout, batch):
    """Per-example gradients: the rule sees unbatched (in,) inputs (or (T, in))."""
    B = 6
    params, x = well_scaled_linear(
        jax.random.key(1), 4, 3, (B,) + batch, F32, layout=layout, bias=True
    )
    per_example = jax.jit(jax.vmap(jax.grad(sq_loss(linear_apply)), in_axes=(None, 0)))(params, x)
    reference = jax.jit(jax.grad(sq_loss(plain)))
    for i in range(B):
        assert_tree_close(take(per_example, i), reference(params, x[i]), F32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_over_an_ensemble_of_parameters(layout):
    E = 4
    layers = [
        well_scaled_linear(jax.random.key(20 + e), 5, 2, (), F32, layout=layout, bias=True)[0]
        for e in range(E)
    ]
    stack = jax.tree.map(lambda *a: host(np.stack(a)), *layers)
    x = normal(jax.random.key(3), (7, 5), F32)
    axes = LinearParams(0, 0, layout)
    grads = jax.jit(jax.vmap(jax.grad(sq_loss(linear_apply)), in_axes=(axes, None)))(stack, x)
    reference = jax.jit(jax.grad(sq_loss(plain)))
    for e in range(E):
        assert_tree_close(take(grads, e), reference(take(stack, e), x), F32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_of_grad_equals_autodiff(layout):
    with jax.enable_x64(True):
        params, x = well_scaled_linear(
            jax.random.key(4), 3, 2, (4,), jnp.float64, layout=layout, bias=True
        )
        h1 = jax.jit(jax.jacrev(jax.jacrev(sq_loss(linear_apply), argnums=(0, 1)), argnums=(0, 1)))(
            params, x
        )
        h2 = jax.jit(jax.jacrev(jax.jacrev(sq_loss(plain), argnums=(0, 1)), argnums=(0, 1)))(
            params, x
        )
        assert_tree_close(h1, h2, jnp.float64)


@pytest.mark.parametrize(
    "policy",
    [None, jax.checkpoint_policies.nothing_saveable, jax.checkpoint_policies.checkpoint_dots],
    ids=["default", "nothing_saveable", "checkpoint_dots"],
)
def test_checkpoint(policy):
    params, x = well_scaled_linear(jax.random.key(5), 6, 6, (5,), F32, layout="in_out", bias=True)

    def two_layers(p, x):
        return linear_apply(p, jnp.tanh(linear_apply(p, x)))

    remat = jax.checkpoint(two_layers, policy=policy)
    g1 = jax.jit(jax.grad(lambda p, x: jnp.sum(remat(p, x) ** 2)))(params, x)
    g2 = jax.jit(jax.grad(lambda p, x: jnp.sum(plain(p, jnp.tanh(plain(p, x))) ** 2)))(params, x)
    assert_tree_close(g1, g2, F32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_over_a_stack_of_layers(layout):
    L, D = 4, 5
    layers = [
        well_scaled_linear(jax.random.key(60 + i), D, D, (), F32, layout=layout, bias=True)[0]
        for i in range(L)
    ]
    stack = jax.tree.map(lambda *a: host(np.stack(a)), *layers)
    x = normal(jax.random.key(7), (3, D), F32)

    def deep(apply):
        def f(stack, x):
            def body(h, p):
                return jnp.tanh(apply(p, h)), None

            h, _ = jax.lax.scan(body, x, stack)
            return jnp.sum(h**2)

        return f

    g1 = jax.jit(jax.grad(deep(linear_apply), argnums=(0, 1)))(stack, x)
    g2 = jax.jit(jax.grad(deep(plain), argnums=(0, 1)))(stack, x)
    assert_tree_close(g1, g2, F32)


def count_dots(fn, *args):
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r"= \S+ dot\(", hlo))


def _loss(x, W, b):
    return 0.5 * jnp.sum(linear_apply(LinearParams(W, b), x) ** 2)


@pytest.mark.parametrize(
    "argnums,expected",
    [(1, 2), (0, 2), (2, 1), ((1, 2), 2), ((0, 1, 2), 3)],
    ids=["W", "x", "b", "W+b", "all"],
)
def test_unrequested_gradients_cost_nothing(argnums, expected):
    """Forward dot + one dot per requested matrix gradient; db is a reduction."""
    params, x = well_scaled_linear(jax.random.key(8), 16, 8, (32,), F32, layout="in_out", bias=True)
    assert count_dots(jax.grad(_loss, argnums=argnums), x, params.W, params.b) == expected
