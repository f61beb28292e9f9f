"""Forward mode: the main functions' hand-derived JVP rules against autodiff and differences."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlinear as jl
from jaxlinear import LinearParams
from jaxlinear.check import FD_RELATIVE_STEP, tolerance_for
from tests.helpers import (
    assert_close,
    assert_tree_close,
    mlp_params,
    normal,
    plain_linear,
    well_scaled_linear,
)
from tests.test_mlp import plain_mlp

LAYOUTS = ["in_out", "out_in"]
F32, F64 = jnp.float32, jnp.float64


def scaled_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    # The split keys' data on the host: iterating over a key array would compile an
    # unstack program per number of leaves.
    keys = np.asarray(jax.random.key_data(jax.random.split(key, len(leaves))))
    return jax.tree.unflatten(
        treedef,
        [
            normal(jax.random.wrap_key_data(k), a.shape, a.dtype)
            for k, a in zip(keys, leaves, strict=True)
        ],
    )


@pytest.mark.parametrize("batch", [(), (4,), (2, 3)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_jvp_matches_autodiff(layout, bias, batch):
    params, x = well_scaled_linear(jax.random.key(0), 5, 3, batch, F32, layout=layout, bias=bias)
    tangents = scaled_like((params, x), jax.random.key(1))
    # jaxlinear's jvp and the references (autodiff of the plain formula, and x Ẇ for the
    # W-only tangent below), all in one program: one compile.
    got, want, want_only_w = jax.jit(
        lambda p, t: (
            jax.jvp(jl.linear_apply, p, t),
            jax.jvp(plain_linear, p, t),
            plain_linear(LinearParams(t[0].W, None, layout), p[1]),
        )
    )((params, x), tangents)
    assert_tree_close(got, want, F32)
    # Tangent along W only: ẏ = x Ẇ.
    dW = tangents[0].W
    only_w = jax.jvp(
        lambda W: jl.linear_apply(LinearParams(W, params.b, layout), x), (params.W,), (dW,)
    )[1]
    assert_close(only_w, want_only_w, F32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reverse_mode_equals_the_hand_derived_backward(layout):
    params, x = well_scaled_linear(jax.random.key(2), 4, 6, (5,), F32, layout=layout, bias=True)
    g = normal(jax.random.key(3), (5, 6), F32)
    _, vjp = jax.vjp(jl.linear_apply, params, x)
    dp, dx = vjp(g)
    dx2, dW2, db2 = jl.linear_backward(g, x, params.W, layout=layout)
    assert_tree_close((dx, dp.W, dp.b), (dx2, dW2, db2), F32)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_jacfwd_linearize_and_finite_differences(layout):
    with jax.enable_x64(True):
        params, x = well_scaled_linear(jax.random.key(4), 3, 2, (4,), F64, layout=layout, bias=True)

        def f(W, x, b):
            return jnp.tanh(jl.linear_apply(LinearParams(W, b, layout), x))

        def ref(W, x, b):
            return jnp.tanh(plain_linear(LinearParams(W, b, layout), x))

        args = (params.W, x, params.b)
        t = scaled_like(args, jax.random.key(5))
        # Both references (autodiff of the plain formula) in one program.
        ref_jac, ref_tangent = jax.jit(
            lambda args, t: (jax.jacrev(ref, argnums=(0, 1, 2))(*args), jax.jvp(ref, args, t)[1])
        )(args, t)
        assert_tree_close(jax.jit(jax.jacfwd(f, argnums=(0, 1, 2)))(*args), ref_jac, F64)
        y, f_lin = jax.linearize(f, *args)
        assert_close(f_lin(*t), ref_tangent, F64)
        rtol, atol = tolerance_for(F64).fd
        step = FD_RELATIVE_STEP * max(1.0, float(np.max(np.abs(np.asarray(x)))))
        check_grads(jax.jit(f), args, order=2, modes=("fwd", "rev"), eps=step, rtol=rtol, atol=atol)


ACTIVATIONS = {
    "relu": (jl.relu, jax.nn.relu),
    "sigmoid": (jl.sigmoid, jax.nn.sigmoid),
    "tanh": (jl.tanh, jnp.tanh),
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_jvp_equals_autodiff_and_finite_differences(name):
    """The JVP's primal and tangent against autodiff of jax.nn's, then second order
    against float64 finite differences in both modes."""
    ours, ref = ACTIVATIONS[name]
    with jax.enable_x64(True):
        z = np.asarray(normal(jax.random.key(6), (4, 3), F64, 2.0))
        z = jnp.asarray(np.where(np.abs(z) < 0.1, z + 0.3, z))  # away from relu's kink
        dz = normal(jax.random.key(7), (4, 3), F64)
        want = jax.jit(lambda z, dz: jax.jvp(ref, (z,), (dz,)))(z, dz)
        assert_tree_close(jax.jvp(ours, (z,), (dz,)), want, F64)
        rtol, atol = tolerance_for(F64).fd
        check_grads(
            jax.jit(ours),
            (z,),
            order=2,
            modes=("fwd", "rev"),
            eps=FD_RELATIVE_STEP * 2.0,
            rtol=rtol,
            atol=atol,
        )


def test_loss_jvps_equal_autodiff():
    with jax.enable_x64(True):
        y, t = normal(jax.random.key(8), (5, 3), F64), normal(jax.random.key(9), (5, 3), F64)
        dy, dt = normal(jax.random.key(10), (5, 3), F64), normal(jax.random.key(11), (5, 3), F64)

        def plain_mse(y, t):
            return 0.5 * jnp.sum((y - t) ** 2) / y.shape[0]

        labels = jnp.array([0, 2, 1, 1, 0])

        def plain_xent(z):
            logp = jax.nn.log_softmax(z)
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

        # The three references (autodiff of the plain formulas) in one program.
        want_mse, want_mse_y, want_xent = jax.jit(
            lambda y, t, dy, dt: (
                jax.jvp(plain_mse, (y, t), (dy, dt)),
                jax.jvp(lambda y: plain_mse(y, t), (y,), (dy,)),
                jax.jvp(plain_xent, (y,), (dy,)),
            )
        )(y, t, dy, dt)
        assert_tree_close(jax.jvp(jl.mse_loss, (y, t), (dy, dt)), want_mse, F64)
        assert_tree_close(jax.jvp(lambda y: jl.mse_loss(y, t), (y,), (dy,)), want_mse_y, F64)
        assert_tree_close(
            jax.jvp(lambda z: jl.softmax_cross_entropy(z, labels), (y,), (dy,)), want_xent, F64
        )


@pytest.mark.slow
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_hessian_of_a_small_mlp_three_ways(act):
    """jax.hessian (forward over reverse) == jacrev(jacrev) == jacfwd(jacfwd) == autodiff."""
    with jax.enable_x64(True):
        params = mlp_params(12, (3, 4, 2), dtype=F64)
        x = normal(jax.random.key(13), (6, 3), F64)
        labels = jnp.array([0, 1, 1, 0, 1, 0])
        main_act = getattr(jl, act)
        ref_act = jax.nn.relu if act == "relu" else jnp.tanh

        def main(p):
            return jl.softmax_cross_entropy(jl.mlp_apply(p, x, activation=main_act), labels)

        def ref(p):
            logp = jax.nn.log_softmax(plain_mlp(p, x, ref_act))
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

        h_ref = jax.jit(jax.hessian(ref))(params)
        assert_tree_close(jax.jit(jax.hessian(main))(params), h_ref, F64)
        assert_tree_close(jax.jit(jax.jacrev(jax.jacrev(main)))(params), h_ref, F64)
        assert_tree_close(jax.jit(jax.jacfwd(jax.jacfwd(main)))(params), h_ref, F64)


def test_symbolic_zero_tangents_skip_products():
    """jvp with respect to W alone: forward dot + x Ẇ, no ẋ W product."""
    params, x = well_scaled_linear(
        jax.random.key(14), 16, 8, (32,), F32, layout="in_out", bias=True
    )

    def f(W, dW):
        return jax.jvp(lambda W: jl.linear_apply(LinearParams(W, params.b), x), (W,), (dW,))

    hlo = jax.jit(f).lower(params.W, params.W).compile().as_text()
    assert len(re.findall(r"= \S+ dot\(", hlo)) == 2
