"""Hand-derived activation and loss rules against autodiff, finite differences and examples."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxlinear as jl
from jaxlinear.check import FD_RELATIVE_STEP, tolerance_for
from tests.helpers import (
    DTYPE_IDS,
    DTYPES,
    assert_close,
    assert_tree_close,
    backend_params,
    compiled_once,
    dtype_context,
    host,
    int_labels,
    normal,
)

ACTIVATIONS = {
    "relu": (jl.relu, jax.nn.relu),
    "sigmoid": (jl.sigmoid, jax.nn.sigmoid),
    "tanh": (jl.tanh, jnp.tanh),
}
SHAPES = [(), (7,), (3, 5), (2, 3, 4)]


def plain_mse(y, t):
    n = int(np.prod(y.shape[:-1]))
    return 0.5 * jnp.sum((y - t) ** 2) / n


def plain_xent(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_vjp_matches_autodiff(name, dtype):
    ours, ref = ACTIVATIONS[name]

    def both(z, g):
        y1, f1 = jax.vjp(ours, z)
        y2, f2 = jax.vjp(ref, z)
        return y1, f1(g)[0], y2, f2(g)[0]

    with dtype_context(dtype):
        cases = [
            (normal(jax.random.key(0), shape, dtype, 2.0), normal(jax.random.key(1), shape, dtype))
            for shape in SHAPES
        ]
        for shape, (y1, d1, y2, d2) in zip(SHAPES, compiled_once(both, cases), strict=True):
            assert y1.dtype == d1.dtype == dtype, shape
            assert_close(y1, y2, dtype, err_msg=str(shape))
            assert_close(d1, d2, dtype, err_msg=str(shape))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_float64_finite_differences_second_order(name):
    ours, _ = ACTIVATIONS[name]
    with jax.enable_x64(True):
        # Keep relu's inputs away from its kink at 0, where differences straddle it.
        z = np.asarray(normal(jax.random.key(2), (4, 3), jnp.float64))
        z = np.where(np.abs(z) < 0.1, z + np.sign(z) * 0.2, z)
        rtol, atol = tolerance_for(jnp.float64).fd
        step = FD_RELATIVE_STEP * max(1.0, float(np.max(np.abs(z))))
        check_grads(
            jax.jit(ours), (host(z),), order=2, modes=("rev",), eps=step, rtol=rtol, atol=atol
        )


def test_relu_derivative_at_zero_is_zero_like_jax_nn():
    z = host([-1.0, 0.0, 1e-30, 3.0])
    ours, theirs = jax.jit(
        lambda z: (
            jax.grad(lambda z: jl.relu(z).sum())(z),
            jax.grad(lambda z: jax.nn.relu(z).sum())(z),
        )
    )(z)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, [0, 0, 1, 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sigmoid_is_stable_for_large_inputs(dtype):
    with dtype_context(dtype):
        z = host([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], jnp.dtype(dtype))

        def ours_and_reference(z):
            s, vjp = jax.vjp(jl.sigmoid, z)
            (ds,) = vjp(jnp.ones_like(z))
            return s, ds, jax.nn.sigmoid(z), jax.grad(lambda z: jax.nn.sigmoid(z).sum())(z)

        s, ds, s_ref, ds_ref = jax.jit(ours_and_reference)(z)
        assert np.all(np.isfinite(np.asarray(s, np.float64)))
        assert np.all(np.isfinite(np.asarray(ds, np.float64)))
        assert_close(s, s_ref, dtype)
        assert_close(ds, ds_ref, dtype)
        s = np.asarray(s, np.float64)
        assert s[0] == 0.0 and s[-1] == 1.0


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_saves_only_its_output(name, capsys):
    ours, _ = ACTIVATIONS[name]
    from jax.ad_checkpoint import print_saved_residuals

    print_saved_residuals(lambda z: ours(z).sum(), host(np.ones((4, 3), np.float32)))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    # One residual, the (4, 3) output; nothing else of the input is kept.
    assert len(lines) == 1, lines
    assert "f32[4,3]" in lines[0]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_composes(name):
    ours, ref = ACTIVATIONS[name]
    z = normal(jax.random.key(3), (5, 3), jnp.float32)
    per_row = jax.jit(jax.vmap(jax.grad(lambda r: jnp.sum(ours(r) ** 2))))(z)
    expected = jax.jit(jax.vmap(jax.grad(lambda r: jnp.sum(ref(r) ** 2))))(z)
    assert_close(per_row, expected, jnp.float32)
    with jax.enable_x64(True):
        z64 = host(np.asarray(z).astype(np.float64))
        h1 = jax.jit(jax.jacrev(jax.jacrev(lambda r: jnp.sum(ours(r) ** 3))))(z64)
        h2 = jax.jit(jax.jacrev(jax.jacrev(lambda r: jnp.sum(ref(r) ** 3))))(z64)
        assert_close(h1, h2, jnp.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mse_matches_autodiff(dtype):
    shapes = [(3,), (6, 3), (2, 4, 3)]

    def both(y, t):
        return [jax.value_and_grad(f, argnums=(0, 1))(y, t) for f in (jl.mse_loss, plain_mse)]

    with dtype_context(dtype):
        cases = [
            (normal(jax.random.key(4), shape, dtype), normal(jax.random.key(5), shape, dtype))
            for shape in shapes
        ]
        results = compiled_once(both, cases)
        for shape, ((l1, (dy1, dt1)), (l2, (dy2, dt2))) in zip(shapes, results, strict=True):
            assert l1.dtype == dy1.dtype == dt1.dtype == dtype, shape
            assert_close(l1, l2, dtype, err_msg=str(shape))
            assert_tree_close((dy1, dt1), (dy2, dt2), dtype)


def test_mse_worked_example_and_mean_over_rows():
    y = host([[1.0, 2.0], [3.0, 4.0]])
    t = host([[0.0, 0.0], [1.0, 1.0]])
    # N = 2 rows: L = (1 + 4 + 4 + 9) / (2 * 2) = 4.5, dL/dy = (y - t)/2.
    assert float(jl.mse_loss(y, t)) == 4.5
    dy, dt = jax.jit(jax.grad(jl.mse_loss, (0, 1)))(y, t)
    np.testing.assert_array_equal(dy, [[0.5, 1.0], [1.0, 1.5]])
    np.testing.assert_array_equal(dt, [[-0.5, -1.0], [-1.0, -1.5]])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_xent_matches_autodiff(dtype):
    batches = [(), (6,), (2, 3)]

    def both(logits, labels):
        return [
            jax.value_and_grad(f)(logits, labels) for f in (jl.softmax_cross_entropy, plain_xent)
        ]

    with dtype_context(dtype):
        cases = [
            (normal(jax.random.key(6), batch + (5,), dtype, 3.0), int_labels(7, batch, 5))
            for batch in batches
        ]
        results = compiled_once(both, cases)
        for batch, ((l1, d1), (l2, d2)) in zip(batches, results, strict=True):
            assert l1.dtype == d1.dtype == dtype, batch
            assert_close(l1, l2, dtype, err_msg=str(batch))
            assert_close(d1, d2, dtype, err_msg=str(batch))


def test_xent_worked_example_and_stability():
    logits = host([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    labels = host([0, 2])  # closed over: concrete, so its values are checked as eagerly
    loss, d = jax.jit(jax.value_and_grad(lambda z: jl.softmax_cross_entropy(z, labels)))(logits)
    # Row 0 is certain and right (loss 0); row 1 is uniform (loss log 3). N = 2.
    # Exact values against the float32 computation: the table's float32 entry.
    assert_close(loss, np.log(3) / 2, jnp.float32)
    assert_close(d, [[0.0, 0.0, 0.0], [1 / 6, 1 / 6, -1 / 3]], jnp.float32)


@pytest.mark.parametrize(
    "loss,args",
    [
        ("mse", lambda k: (normal(k, (4, 3), jnp.float64), normal(k, (4, 3), jnp.float64, 0.5))),
        ("xent", lambda k: (normal(k, (4, 5), jnp.float64), host([0, 4, 2, 2]))),
    ],
)
def test_loss_float64_finite_differences_second_order(loss, args):
    with jax.enable_x64(True):
        a = args(jax.random.key(8))
        fn = (
            jl.mse_loss
            if loss == "mse"
            else (lambda z, labels=a[1]: jl.softmax_cross_entropy(z, labels))
        )
        a = a if loss == "mse" else a[:1]
        rtol, atol = tolerance_for(jnp.float64).fd
        step = FD_RELATIVE_STEP * max(1.0, float(np.max(np.abs(np.asarray(a[0])))))
        check_grads(jax.jit(fn), a, order=2, modes=("rev",), eps=step, rtol=rtol, atol=atol)


def test_loss_grad_of_grad_equals_autodiff():
    with jax.enable_x64(True):
        z = normal(jax.random.key(9), (3, 4), jnp.float64)
        labels = host([1, 0, 3])
        t = normal(jax.random.key(10), (3, 4), jnp.float64)

        def second_derivatives(z, labels, t):
            return (
                jax.jacrev(jax.jacrev(jl.softmax_cross_entropy))(z, labels),
                jax.jacrev(jax.jacrev(plain_xent))(z, labels),
                jax.hessian(plain_mse)(z, t),
                jax.jacrev(jax.jacrev(jl.mse_loss))(z, t),
            )

        h1, h2, h3, h4 = jax.jit(second_derivatives)(z, labels, t)
        assert_close(h1, h2, jnp.float64)
        assert_close(h3, h4, jnp.float64)


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


def test_loss_errors():
    # The bad arguments are built on the host; the calls under test stay eager.
    y = host(np.ones((2, 3), np.float32))
    with raises(
        ValueError, "`y` and `t` must have the same shape; got y.shape=(2, 3), t.shape=(3, 2)."
    ):
        jl.mse_loss(y, host(np.ones((3, 2), np.float32)))
    with raises(TypeError, "`y`, `t` must share one dtype"):
        jl.mse_loss(y, host(np.ones((2, 3), jnp.bfloat16)))
    with raises(
        ValueError, "`y` has no rows (shape (0, 3)): the mean over an empty batch is undefined."
    ):
        jl.mse_loss(host(np.ones((0, 3), np.float32)), host(np.ones((0, 3), np.float32)))
    with raises(TypeError, "`labels` must have an integer dtype (class indices); got float32."):
        jl.softmax_cross_entropy(y, host([0.0, 1.0]))
    with raises(
        ValueError,
        "`labels` must have shape logits.shape[:-1] = (2,); got "
        "labels.shape=(2, 3) (logits.shape=(2, 3)).",
    ):
        jl.softmax_cross_entropy(y, host(np.zeros((2, 3), np.int32)))
    with raises(
        ValueError, "`labels` must lie in [0, 3) for logits with 3 classes; got values from 0 to 3."
    ):
        jl.softmax_cross_entropy(y, host([0, 3]))
    with raises(TypeError, "`z` must have a real floating dtype"):
        jl.relu(host(np.arange(3, dtype=np.int32)))


def test_out_of_range_labels_under_jit_give_nan_not_a_wrong_number():
    logits = normal(jax.random.key(11), (3, 4), jnp.float32)
    labels = host([0, 7, 1])
    loss, d = jax.jit(jax.value_and_grad(jl.softmax_cross_entropy))(logits, labels)
    d = np.asarray(d)
    assert np.isnan(float(loss))
    assert np.isnan(d[1]).all()
    # Rows with valid labels keep their exact gradient.
    ref = np.asarray(jax.jit(jax.grad(plain_xent))(logits, host([0, 0, 1])))
    assert_close(d[[0, 2]], ref[[0, 2]], jnp.float32)


@pytest.mark.parametrize("device", backend_params())
def test_activations_and_losses_on_every_backend(device):
    with jax.default_matmul_precision("highest"), jax.default_device(device):
        z = jax.device_put(normal(jax.random.key(12), (6, 5), jnp.float32), device)
        labels = jax.device_put(np.array([0, 1, 2, 3, 4, 0], np.int32), device)
        t = jax.device_put(np.zeros((6, 5), np.float32), device)

        def references(z, labels, t):  # all in one program
            return (
                [
                    jax.grad(lambda z, f=ref: jnp.sum(f(z) ** 2))(z)
                    for _, ref in ACTIVATIONS.values()
                ],
                jax.grad(plain_xent)(z, labels),
                jax.grad(plain_mse)(z, t),
            )

        expected_activations, expected_xent, expected_mse = jax.jit(references)(z, labels, t)
        for (ours, _), expected in zip(ACTIVATIONS.values(), expected_activations, strict=True):
            assert_close(
                jax.jit(jax.grad(lambda z, f=ours: jnp.sum(f(z) ** 2)))(z), expected, jnp.float32
            )
        assert_close(
            jax.jit(jax.grad(jl.softmax_cross_entropy))(z, labels), expected_xent, jnp.float32
        )
        assert_close(jax.jit(jax.grad(jl.mse_loss))(z, t), expected_mse, jnp.float32)


def test_float16_losses_keep_their_gradient_past_65504_rows():
    """1/N is taken in float32: in float16, N = 70000 would overflow to inf and the
    gradient would round to zero."""
    n = 70_000
    y = host(np.full((n, 1), 100.0, np.float16))
    dy = jax.jit(jax.grad(jl.mse_loss))(y, host(np.zeros((n, 1), np.float16)))
    # Values of order 1/N: the table's float16 rtol alone (its atol assumes order 1).
    rtol = tolerance_for(jnp.float16).autodiff[0]
    np.testing.assert_allclose(np.asarray(dy, np.float32), 100.0 / n, rtol=rtol, atol=0)
    logits = host(np.zeros((n, 2), np.float16))
    d = jax.jit(jax.grad(jl.softmax_cross_entropy))(logits, host(np.zeros(n, np.int32)))
    d = np.asarray(d, np.float32)
    # p = 1/2 for both classes: dL/dz = (1/2 - [c = 0])/N.
    np.testing.assert_allclose(d[:, 0], -0.5 / n, rtol=rtol, atol=0)
    np.testing.assert_allclose(d[:, 1], 0.5 / n, rtol=rtol, atol=0)


def test_bfloat16_cross_entropy_keeps_the_true_class_gradient():
    """The softmax residual stays float32, so p − 1 for a confident true class is not
    rounded away (in bfloat16 it would be 0 and the row would not sum to zero)."""
    logits = np.array([[8.0, 0.0]], np.float32)
    labels = host([0])
    # Eager on purpose: each op rounds its result to bfloat16, as the docstring
    # reasons, with no fusion that could keep an intermediate in float32.
    d = jax.grad(jl.softmax_cross_entropy)(host(logits.astype(jnp.bfloat16)), labels)
    ref = jax.jit(jax.grad(plain_xent))(host(logits), labels)
    assert d.dtype == jnp.bfloat16
    assert_close(d, ref, jnp.bfloat16)
    assert float(np.asarray(d, np.float32)[0, 0]) < 0


def test_negative_and_too_large_labels_under_jit_give_nan_loss_and_gradient():
    logits = host(np.zeros((2, 3), np.float32))
    loss_and_grad = jax.jit(jax.value_and_grad(jl.softmax_cross_entropy))
    for bad in (-1, 3):
        loss, d = loss_and_grad(logits, host([0, bad]))
        d = np.asarray(d)
        assert np.isnan(float(loss)), bad
        assert np.isnan(d[1]).all() and np.isfinite(d[0]).all()


def test_narrow_integer_labels_with_many_classes():
    """uint8 labels with 300 classes: class indices are compared in int32, so class
    256 is not mistaken for class 0."""
    logits = host(np.zeros((1, 300), np.float32))
    labels = host([0], np.uint8)  # closed over: concrete, so its values are checked as eagerly
    d = jax.jit(jax.grad(lambda z: jl.softmax_cross_entropy(z, labels)))(logits)
    ref = jax.jit(jax.grad(plain_xent))(logits, host([0]))
    assert_close(d, ref, jnp.float32)


def test_scalar_logits_are_refused_clearly():
    with raises(ValueError, "`logits` must have at least one axis, (..., features); got a scalar."):
        jl.softmax_cross_entropy(host(np.ones((), np.float32)), host(0))
