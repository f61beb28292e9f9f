"""The hand-derived linear VJP against autodiff, finite differences and worked examples."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax
from jax.test_util import check_grads

from jaxlinear import LinearParams, linear_apply, linear_backward
from jaxlinear.check import FD_RELATIVE_STEP, tolerance_for
from tests.helpers import (
    DTYPE_IDS,
    DTYPES,
    assert_close,
    assert_tree_close,
    backend_params,
    compiled_once,
    dtype_context,
    normal,
    np_layer,
    np_normal,
    plain_linear as plain,
    well_scaled_linear,
)

LAYOUTS = ["in_out", "out_in"]
BATCHES = [(), (5,), (3, 4), (2, 3, 2)]


def vjp_both(params, x, g):
    """(y, cotangents) of jaxlinear's layer and of autodiff of the plain formula."""
    y1, f1 = jax.vjp(linear_apply, params, x)
    y2, f2 = jax.vjp(plain, params, x)
    return (y1, f1(g)), (y2, f2(g))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vjp_matches_autodiff(layout, dtype):
    """Every batch shape, with and without bias, as one compiled program per dtype and
    layout (the cases share it: one compile instead of eight)."""
    configs = list(itertools.product((True, False), BATCHES))
    with dtype_context(dtype):
        cases = []
        for bias, batch in configs:
            params, x = well_scaled_linear(
                jax.random.key(0), 6, 4, batch, dtype, layout=layout, bias=bias
            )
            cases.append((params, x, normal(jax.random.key(1), batch + (4,), dtype)))

        def both(p, x, g):  # the VJP against autodiff, and the public backward
            return vjp_both(p, x, g), linear_backward(g, x, p.W, layout=layout)

        results = compiled_once(both, cases)
        for (bias, batch), (((y1, (dp1, dx1)), (y2, (dp2, dx2))), backward) in zip(
            configs, results, strict=True
        ):
            case = f"bias={bias}, batch={batch}"
            assert y1.dtype == dtype, case
            assert_close(y1, y2, dtype, err_msg=case)
            assert_tree_close((dp1, dx1), (dp2, dx2), dtype)
            assert dp1.layout == layout and (dp1.b is None) == (not bias), case
            # The public backward is the rule the VJP runs: same numbers exactly.
            for mine, rule in zip(backward, (dx1, dp1.W, dp1.b), strict=True):
                if rule is not None:
                    np.testing.assert_array_equal(
                        np.asarray(mine, np.float64), np.asarray(rule, np.float64), err_msg=case
                    )


@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    batch=st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple),
    in_features=st.integers(1, 5),
    out_features=st.integers(1, 5),
    layout=st.sampled_from(LAYOUTS),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(batch, in_features, out_features, layout, bias, seed):
    """Random shapes, size-0 and size-1 axes included, against autodiff. (NumPy inputs
    and one compiled program per example: no per-shape random-number kernels.)"""
    dtype = jnp.float32
    layer = np_layer(seed, in_features, out_features, layout)
    params = layer if bias else LinearParams(layer.W, None, layout)
    x = np_normal(seed + 2, batch + (in_features,))
    g = np_normal(seed + 3, batch + (out_features,))
    (y1, grads1), (y2, grads2) = jax.jit(vjp_both)(params, x, g)
    assert y1.shape == batch + (out_features,)
    assert_close(y1, y2, dtype)
    assert_tree_close(grads1, grads2, dtype)


def test_worked_example():
    """The numbers, not the eager path: inputs are made on the host and the backward
    and the VJP run compiled (one program per shape, not one per operation)."""
    f32 = np.float32
    x = np.array([[1.0, 2.0]], f32)
    W = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], f32)
    g = np.array([[1.0, 1.0, 1.0]], f32)
    backward = jax.jit(linear_backward)
    dx, dW, db = backward(g, x, W)
    np.testing.assert_array_equal(dx, [[2.0, 2.0]])
    np.testing.assert_array_equal(dW, [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(db, [1.0, 1.0, 1.0])
    # Through the custom VJP, with a bias, in both layouts.
    pullback = jax.jit(lambda p, x, g: jax.vjp(linear_apply, p, x)[1](g))
    for layout, W_ in (("in_out", W), ("out_in", W.T)):
        p = LinearParams(W_, np.zeros(3, f32), layout)
        dp, dx_ = pullback(p, x, g)
        np.testing.assert_array_equal(dx_, [[2.0, 2.0]])
        np.testing.assert_array_equal(dp.W, dW if layout == "in_out" else np.asarray(dW).T)
        np.testing.assert_array_equal(dp.b, [1.0, 1.0, 1.0])
    # db is summed over the batch, not averaged.
    g2 = np.array([[1.0, 2.0], [3.0, 4.0]], f32)
    _, _, db2 = backward(g2, np.ones((2, 2), f32), np.eye(2, dtype=f32))
    np.testing.assert_array_equal(db2, [4.0, 6.0])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_grads_float64_second_order(layout, bias):
    """Reverse mode to second order against float64 central differences."""
    with jax.enable_x64(True):
        params, x = well_scaled_linear(
            jax.random.key(2), 3, 2, (4,), jnp.float64, layout=layout, bias=bias
        )

        def f(W, x, b):
            return jnp.sin(linear_apply(LinearParams(W, b, layout), x))

        # Host copies: check_grads's perturbations x ± eps·v are then NumPy arithmetic
        # (the same float64 sums), not one eager XLA program per shape.
        args = jax.tree.map(np.asarray, (params.W, x, params.b))
        rtol, atol = tolerance_for(jnp.float64).fd
        step = FD_RELATIVE_STEP * max(1.0, float(np.max(np.abs(args[1]))))
        # check_grads would scale a default tolerance; ours comes from the table.
        check_grads(jax.jit(f), args, order=2, modes=("rev",), eps=step, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_elementwise_finite_differences_of_dW(layout):
    with jax.enable_x64(True):
        params, x = well_scaled_linear(
            jax.random.key(3), 3, 4, (2, 5), jnp.float64, layout=layout, bias=True
        )
        c = normal(jax.random.key(4), (2, 5, 4), jnp.float64)

        def loss(W):
            return jnp.sum(c * jnp.tanh(linear_apply(LinearParams(W, params.b, layout), x)))

        dW = jax.jit(jax.grad(loss))(params.W)
        W = np.asarray(params.W)
        fd = np.zeros_like(W)
        loss_jit = jax.jit(loss)
        for idx in itertools.product(*map(range, W.shape)):
            h = FD_RELATIVE_STEP * max(1.0, abs(W[idx]))
            Wp, Wm = W.copy(), W.copy()
            Wp[idx] += h
            Wm[idx] -= h
            fd[idx] = (float(loss_jit(Wp)) - float(loss_jit(Wm))) / (2 * h)
        assert_close(dW, fd, jnp.float64, "fd")


def test_empty_batch_gives_zero_gradients():
    params, _ = well_scaled_linear(
        jax.random.key(5), 3, 2, (), jnp.float32, layout="in_out", bias=True
    )
    x = jax.device_put(np.zeros((0, 3), np.float32))

    def loss(p, x):
        return jnp.sum(linear_apply(p, x) ** 2)

    y = linear_apply(params, x)
    assert y.shape == (0, 2)
    dp, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    np.testing.assert_array_equal(dp.W, np.zeros((3, 2)))
    np.testing.assert_array_equal(dp.b, np.zeros(2))
    assert dx.shape == (0, 3)


def test_nan_and_inf_propagate_like_the_plain_formula():
    params, x = well_scaled_linear(
        jax.random.key(6), 3, 2, (4,), jnp.float32, layout="in_out", bias=True
    )
    x = np.array(x)  # a writable host copy
    x[1, 2], x[3, 0] = np.nan, np.inf
    g = np.ones((4, 2), np.float32)
    (y1, grads1), (y2, grads2) = jax.jit(vjp_both)(params, x, g)
    np.testing.assert_array_equal(np.isnan(y1), np.isnan(y2))
    assert np.isnan(y1).any()
    for a, e in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))  # NaNs equal NaNs
    assert np.isnan(grads1[0].W).any() and np.isinf(grads1[0].W).any()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_preferred_element_type_accumulates_and_keeps_primal_dtypes(dtype):
    params, x = well_scaled_linear(jax.random.key(7), 8, 3, (6,), dtype, layout="in_out", bias=True)

    def ours(p, x):
        return linear_apply(p, x, preferred_element_type=jnp.float32)

    def ref(p, x):
        y = lax.dot_general(x, p.W, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return y + jnp.broadcast_to(p.b.astype(jnp.float32), y.shape)

    g = normal(jax.random.key(8), (6, 3), jnp.float32)

    @jax.jit  # both VJPs in one program
    def both(p, x, g):
        y1, f1 = jax.vjp(ours, p, x)
        y2, f2 = jax.vjp(ref, p, x)
        return (y1, f1(g)), (y2, f2(g))

    (y1, (dp1, dx1)), (y2, (dp2, dx2)) = both(params, x, g)
    assert y1.dtype == jnp.float32
    assert_close(y1, y2, jnp.float32)
    assert dp1.W.dtype == dp1.b.dtype == dx1.dtype == dtype
    # Accumulated in float32 then rounded once: within the low dtype's table entry.
    assert_close(dp1.W, np.asarray(dp2.W, np.float32), dtype)
    assert_close(dx1, np.asarray(dx2, np.float32), dtype)
    assert_close(dp1.b, np.asarray(dp2.b, np.float32), dtype)


@pytest.mark.parametrize(
    "dtype, preferred", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)]
)
def test_eager_calls_equal_the_jitted_primitive_exactly(dtype, preferred):
    """Eager calls run cached compiled code (product, then bias add) instead of
    binding the primitive; on CPU the numbers are the primitive's to the bit. (On a
    GPU, jit may fuse the add into the product's epilogue and round once.)"""
    configs = list(itertools.product(LAYOUTS, (True, False), ((), (5,), (2, 3))))
    with jax.default_device(jax.devices("cpu")[0]):
        cases = [
            well_scaled_linear(jax.random.key(9), 6, 4, batch, dtype, layout=layout, bias=bias)
            for layout, bias, batch in configs
        ]
        apply = functools.partial(linear_apply, preferred_element_type=preferred)
        every_traced = compiled_once(apply, cases)
        every_eager = [apply(*case) for case in cases]
        every_plain = compiled_once(plain, cases)  # the reference: one program, not op by op
    for config, traced, eager, reference in zip(
        configs, every_traced, every_eager, every_plain, strict=True
    ):
        assert eager.dtype == traced.dtype == (preferred or dtype)
        np.testing.assert_array_equal(
            np.asarray(eager, np.float64), np.asarray(traced, np.float64), err_msg=str(config)
        )
        assert_close(eager, np.asarray(reference, eager.dtype), dtype, err_msg=str(config))


@pytest.mark.parametrize("device", backend_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_backend(device, layout):
    """On each backend, at matmul precision 'highest' (GPU/TPU default to TF32/bf16
    passes), the custom rule equals autodiff in float32 and finite differences in
    float64 where the backend supports it."""
    with jax.default_matmul_precision("highest"), jax.default_device(device):
        params, x = well_scaled_linear(
            jax.random.key(9), 16, 8, (4, 3), jnp.float32, layout=layout, bias=True
        )
        params, x = jax.device_put((params, x), device)
        g = jax.device_put(normal(jax.random.key(10), (4, 3, 8), jnp.float32), device)
        (y1, grads1), (y2, grads2) = jax.jit(vjp_both)(params, x, g)
        assert y1.devices() == {device}
        assert_close(y1, y2, jnp.float32)
        assert_tree_close(grads1, grads2, jnp.float32)
        if device.platform == "tpu":
            return  # TPUs have no native float64; float32 against autodiff is the check.
        with jax.enable_x64(True):
            # Widened on the host (exact), then placed on the backend.
            p64 = jax.tree.map(lambda a: jax.device_put(np.asarray(a, np.float64), device), params)
            x64 = jax.device_put(np.asarray(x, np.float64), device)

            def f(W, x, b):
                return jnp.tanh(linear_apply(LinearParams(W, b, layout), x))

            rtol, atol = tolerance_for(jnp.float64).fd
            step = FD_RELATIVE_STEP * max(1.0, float(np.max(np.abs(np.asarray(x64)))))
            check_grads(
                jax.jit(f),
                (p64.W, x64, p64.b),
                order=1,
                modes=("rev",),
                eps=step,
                rtol=rtol,
                atol=atol,
            )
