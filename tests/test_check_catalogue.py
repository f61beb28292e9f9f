"""A catalogue of deliberately wrong backward rules, each caught by the check meant to catch it.

Every rule is a ``jax.custom_vjp`` of y = x W + b (or of an activation) whose
forward is right and whose backward has exactly one bug. Each test asserts that
the report is not ok, *which* checks fail (and on which argument), and that the
checks the bug should not disturb still pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlinear import Tolerance, check_vjp

CPU0 = [jax.devices("cpu")[0]]
FD = {"fd-direction", "fd-element"}
VALUES = {"reference"} | FD  # the checks that compare numbers with the truth
F32, F64, BF16, F16 = jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16


def plain(W, b, x):
    """The formula autodiff differentiates: y = x W + b over any leading axes."""
    y = jnp.einsum("...i,io->...o", x, W)
    return y + jnp.broadcast_to(b, y.shape)


def _flat(a):
    return a.reshape(-1, a.shape[-1])


def correct_backward(W, x, g):
    """dx = g Wᵀ, dW = xᵀ g, db = Σ_n g over every leading axis."""
    dx = jnp.einsum("...o,io->...i", g, W)
    dW = _flat(x).T @ _flat(g)
    return dW, _flat(g).sum(0), dx


def custom_linear(backward):
    """A custom-VJP linear layer fn(W, b, x) whose backward is ``backward(W, x, g)``."""

    @jax.custom_vjp
    def linear(W, b, x):
        return plain(W, b, x)

    linear.defvjp(lambda W, b, x: (plain(W, b, x), (W, x)), lambda res, g: backward(*res, g))
    return linear


def square_inputs(dtype=F32, batch=(4,), seed=0):
    """Well-scaled W (4, 4) ~ N(0, 1/4), b, x ~ N(0, 1); square, so that shape checks
    cannot catch a missing transpose, and N = in = out for the dx/dW swap. NumPy
    arrays, so float64 needs no x64 here: check_vjp scopes it."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((4, 4)) / 2.0
    b = rng.standard_normal(4)
    x = rng.standard_normal(batch + (4,))
    return tuple(a.astype(dtype) for a in (W, b, x))


def check(fn, args, **kwargs):
    kwargs.setdefault("devices", CPU0)
    return check_vjp(fn, args, reference=plain, **kwargs)


def failing_arguments(report):
    return {r.argument for r in report.failures}


# ----------------------------------------------------------------- value bugs


def missing_transpose(W, x, g):
    dW, db, _ = correct_backward(W, x, g)
    return dW, db, jnp.einsum("...o,oi->...i", g, W)  # g W, not g Wᵀ


def db_averaged(W, x, g):
    dW, _, dx = correct_backward(W, x, g)
    return dW, _flat(g).mean(0), dx  # mean over rows instead of the sum


def dx_dW_swapped(W, x, g):
    dW, db, dx = correct_backward(W, x, g)
    return dx, db, dW  # shapes agree only because N = in = out


def sign_error(W, x, g):
    dW, db, dx = correct_backward(W, x, g)
    return dW, db, -dx


def batch_of_one_only(W, x, g):
    _, _, dx = correct_backward(W, x, g)
    # Right when there is one row: the outer product of the first row, its g as db.
    return jnp.outer(_flat(x)[0], _flat(g)[0]), _flat(g)[0], dx


@pytest.mark.parametrize(
    ("backward", "wrong"),
    [
        (missing_transpose, {"x"}),
        (db_averaged, {"b"}),
        (dx_dW_swapped, {"W", "x"}),
        (sign_error, {"x"}),
        (batch_of_one_only, {"W", "b"}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_value_bugs_are_caught_by_reference_and_finite_differences(backward, wrong):
    report = check(custom_linear(backward), square_inputs(), dtypes=[F32, F64])
    assert not report.ok
    # Both the autodiff reference and the finite differences see it, in both
    # dtypes, on exactly the wrong arguments; vmap, dtype and retrace still pass
    # (a wrong rule is consistently wrong).
    assert report.failed_checks == VALUES
    assert failing_arguments(report) == wrong
    for dtype in ("float32", "float64"):
        for name in wrong:
            for c in VALUES:
                (row,) = report.select(c, dtype=dtype, argument=name)
                assert not row.passed, (c, dtype, name)
                assert row.max_abs_err > 10 * row.tolerance[1]  # far outside, not marginal


def test_right_rule_passes_the_same_checks():
    report = check(custom_linear(correct_backward), square_inputs(), dtypes=[F32, F64])
    assert report.ok, report
    assert {r.check for r in report.rows} == VALUES | {"forward", "vmap", "dtype", "retrace"}


def test_batch_of_one_rule_passes_with_one_row():
    """The batch-of-one rule is right for N = 1: it is the batch that exposes it."""
    report = check(
        custom_linear(batch_of_one_only), square_inputs(batch=(1,)), dtypes=[F64], vmap_in_axes=None
    )
    assert report.ok, report


# ----------------------------------------------------------------- a small factor


def off_by_a_factor(W, x, g):
    dW, db, dx = correct_backward(W, x, g)
    return dW, db, 1.001 * dx


def test_small_factor_is_caught_only_by_a_tight_float64_check():
    fn = custom_linear(off_by_a_factor)
    tight = check(fn, square_inputs(F64), dtypes=[F64])
    assert tight.failed_checks == VALUES
    assert failing_arguments(tight) == {"x"}
    (row,) = tight.select("reference", argument="x")
    assert row.max_rel_err == pytest.approx(1e-3, rel=1e-6)  # exactly the factor
    # The low-precision tolerances (2e-3 and more) cannot see a relative error of
    # 1e-3: the same rule passes in float16 and bfloat16.
    loose = check(fn, square_inputs(F32), dtypes=[F16, BF16])
    assert loose.ok, loose
    # Nor can a float32-sized check at the float16 table's tolerance, while
    # float32's own table (rtol 1e-4) can.
    f16_tol = Tolerance(autodiff=(2e-3, 2e-3), fd=(1e-2, 1e-2), reason="float16's, for the test")
    assert check(fn, square_inputs(F32), dtypes=[F32], tolerances={F32: f16_tol}).ok
    assert not check(fn, square_inputs(F32), dtypes=[F32]).ok


# ----------------------------------------------------------------- shapes and vmap


def leading_axes_not_flattened(W, x, g):
    """Derived for a 2-D x (N, in) only: xᵀ g and a sum over axis 0."""
    return x.T @ g, g.sum(0), g @ W.T


def test_unflattened_leading_axes_fail_only_under_vmap():
    fn = custom_linear(leading_axes_not_flattened)
    # x (4, 4): every comparison passes...
    report = check(fn, square_inputs(), dtypes=[F32], vmap_in_axes=(None, None, 0))
    assert not report.ok
    # ...except per-example vmap, where the rule sees a 1-D x and xᵀ g is a scalar.
    assert report.failed_checks == {"vmap"}
    (row,) = report.failures
    assert "raised" in row.detail and "shape" in row.detail
    assert report.select("reference") and all(r.passed for r in report.select("reference"))


def test_unflattened_leading_axes_fail_on_a_3d_input():
    fn = custom_linear(leading_axes_not_flattened)
    report = check(fn, square_inputs(batch=(2, 3)), dtypes=[F32])
    assert report.failed_checks == {"vjp"}  # the rule cannot even run
    (row,) = report.failures
    assert row.detail.startswith("the rule raised")
    # The correct rule handles both.
    good = custom_linear(correct_backward)
    assert check(good, square_inputs(batch=(2, 3)), dtypes=[F32]).ok
    assert check(good, square_inputs(), dtypes=[F32], vmap_in_axes=(None, None, 0)).ok


# ----------------------------------------------------------------- dtypes


def float32_cotangent(W, x, g):
    """dW accumulated in float32 and never cast back to W's bfloat16."""
    f32 = jnp.float32
    dW = _flat(x).astype(f32).T @ _flat(g).astype(f32)
    _, db, dx = correct_backward(W, x, g)
    return dW, db, dx


def test_float32_cotangent_for_a_bfloat16_parameter_fails_the_dtype_check():
    report = check(custom_linear(float32_cotangent), square_inputs(BF16), dtypes=[BF16])
    assert not report.ok
    dtype_rows = {r.argument: r for r in report.select("dtype")}
    assert not dtype_rows["W"].passed
    assert dtype_rows["W"].detail == "cotangent float32[4, 4] for a primal bfloat16[4, 4]"
    assert dtype_rows["b"].passed and dtype_rows["x"].passed
    # Its numbers are right (more precise, even): every value check passes.
    assert all(r.passed for c in VALUES | {"vmap"} for r in report.select(c))
    # An SGD step would turn W into float32, so the next call compiles again:
    # the retrace check fails as a consequence, naming the change.
    assert report.failed_checks == {"dtype", "retrace"}
    (retrace,) = report.select("retrace")
    assert "W: bfloat16 -> float32" in retrace.detail


# ----------------------------------------------------------------- an activation


@jax.custom_vjp
def tanh_missing_square(z):
    return jnp.tanh(z)


tanh_missing_square.defvjp(
    lambda z: (jnp.tanh(z), jnp.tanh(z)),
    lambda t, g: (g * (1 - t),),  # should be 1 - t²
)


def test_activation_derivative_bug_is_caught():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), F32)
    report = check_vjp(
        tanh_missing_square, (z,), reference=jnp.tanh, dtypes=[F32, BF16], devices=CPU0
    )
    assert report.failed_checks == VALUES
    # Big enough to be seen even at bfloat16's tolerance.
    assert {r.dtype for r in report.failures} == {"float32", "bfloat16"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_zero_gradient_for_a_mean_loss_is_caught_in_low_precision(dtype):
    """A mean over N = 64 rows has gradients ~1/N, below the table's absolute atol in
    bfloat16 and float16; atol is scaled to the gradient's magnitude, so a rule
    returning zeros fails instead of passing under atol alone."""

    @jax.custom_vjp
    def xent(logits):
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])

    xent.defvjp(lambda z: (xent(z), z), lambda z, g: (jnp.zeros_like(z),))
    z = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    report = check_vjp(
        xent,
        (z,),
        reference=lambda z: jnp.mean(jax.nn.logsumexp(z, axis=-1) - z[:, 0]),
        dtypes=[dtype],
        devices=jax.devices("cpu")[:1],
    )
    assert not report.ok
    # (640 entries is past the element-wise limit; the directional check stands in.)
    assert {"reference", "fd-direction"} <= report.failed_checks
