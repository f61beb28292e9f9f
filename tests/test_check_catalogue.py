"""The published catalogue of wrong backward rules, each caught by the check meant
to catch it, and of correct rules that never fail.

Every wrong rule is a ``jax.custom_vjp`` whose forward is right and whose backward
has exactly one bug. ``CATALOGUE`` names each bug and the (check, argument,
variant, dtype) rows that must fail; ``docs/verification.md`` lists the same
names (a test keeps the two in step). Shapes are small and the checks limited
to the ones each entry needs, so the whole catalogue compiles little.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlinear import check_vjp
from jaxlinear.check import library_cases

# Slow (24 wrong and 7 correct rules, each checked): not in -m "not slow".
pytestmark = pytest.mark.slow

CPU0 = [jax.devices("cpu")[0]]
F32, F64, BF16, F16 = "float32", "float64", "bfloat16", "float16"
VALUES = ("reference", "fd")


# ----------------------------------------------------------------- a linear layer to break


def plain(W, b, x):
    """The formula autodiff differentiates: y = x W + b over any leading axes."""
    y = jnp.einsum("...i,io->...o", x, W)
    return y + jnp.broadcast_to(b, y.shape)


def _flat(a):
    return a.reshape(-1, a.shape[-1])


def correct_backward(W, x, g):
    """dx = g Wᵀ, dW = xᵀ g, db = Σ_n g over every leading axis."""
    dx = jnp.einsum("...o,io->...i", g, W)
    return _flat(x).T @ _flat(g), _flat(g).sum(0), dx


def custom_linear(backward):
    """A custom-VJP linear layer fn(W, b, x) whose backward is ``backward(W, x, g)``."""

    @jax.custom_vjp
    def linear(W, b, x):
        return plain(W, b, x)

    linear.defvjp(lambda W, b, x: (plain(W, b, x), (W, x)), lambda res, g: backward(*res, g))
    return linear


def square_inputs(batch=(4,), seed=0):
    """W (4, 4) ~ N(0, 1/4), b, x ~ N(0, 1), float32: square, so that no shape check
    can catch a missing transpose or a dx/dW swap."""
    rng = np.random.default_rng(seed)
    W, b, x = (
        rng.standard_normal((4, 4)) / 2,
        rng.standard_normal(4),
        rng.standard_normal(batch + (4,)),
    )
    return tuple(a.astype(np.float32) for a in (W, b, x))


def with_grads(dW=None, db=None, dx=None):
    """A backward equal to the correct one but for the factors/overrides given."""

    def backward(W, x, g):
        grads = dict(zip(("dW", "db", "dx"), correct_backward(W, x, g), strict=True))
        for key, change in (("dW", dW), ("db", db), ("dx", dx)):
            if change is not None:
                grads[key] = change(grads[key], W, x, g)
        return grads["dW"], grads["db"], grads["dx"]

    return backward


def missing_transpose(W, x, g):
    dW, db, _ = correct_backward(W, x, g)
    return dW, db, jnp.einsum("...o,oi->...i", g, W)  # g W, not g Wᵀ


def dx_dW_swapped(W, x, g):
    dW, db, dx = correct_backward(W, x, g)
    return dx, db, dW  # shapes agree only because N = in = out


def batch_of_one_only(W, x, g):
    _, _, dx = correct_backward(W, x, g)
    return jnp.outer(_flat(x)[0], _flat(g)[0]), _flat(g)[0], dx  # first row only


def leading_axes_not_flattened(W, x, g):
    """Derived for a 2-D x (N, in) only: xᵀ g and a sum over axis 0."""
    return x.T @ g, g.sum(0), g @ W.T


def float32_cotangent(W, x, g):
    """dW accumulated in float32 and never cast back to W's bfloat16."""
    dW = _flat(x).astype(jnp.float32).T @ _flat(g).astype(jnp.float32)
    _, db, dx = correct_backward(W, x, g)
    return dW, db, dx


def in_float32(W, x, g):
    """Right formulas, silently computed in float32 whatever the inputs."""
    f32 = [a.astype(jnp.float32) for a in (W, x, g)]
    return tuple(c.astype(W.dtype) for c in correct_backward(*f32))


def raises_in_bfloat16(W, x, g):
    if g.dtype == jnp.bfloat16:
        raise NotImplementedError("no bfloat16 rule yet")
    return correct_backward(W, x, g)


# ----------------------------------------------------------------- elementwise and losses


def custom_elementwise(f, derivative):
    """fn(x) = f(x) with the backward g * derivative(x)."""

    @jax.custom_vjp
    def fn(x):
        return f(x)

    fn.defvjp(lambda x: (f(x), x), lambda x, g: (g * derivative(x),))
    return fn


def _softplus(x):
    return jnp.logaddexp(x, 0.0)


def _sigmoid(x):
    return jax.nn.sigmoid(x)


def _tanh_prime(x):
    return 1 - jnp.tanh(x) ** 2


def stable_logsumexp(x):
    """logsumexp over the last axis, max-shifted; its gradient is the softmax."""
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return jnp.log(jnp.sum(jnp.exp(x - m), axis=-1)) + m[..., 0]


def custom_logsumexp(softmax):
    @jax.custom_vjp
    def lse(x):
        return stable_logsumexp(x)

    lse.defvjp(lambda x: (stable_logsumexp(x), x), lambda x, g: (g[..., None] * softmax(x),))
    return lse


def naive_softmax(x):
    e = jnp.exp(x)  # overflows for x > 11 in float16
    return e / jnp.sum(e, axis=-1, keepdims=True)


def at_least_float32(a):
    return a.astype(jnp.float32) if a.dtype.itemsize < 4 else a


def plain_mse(y, t):
    """Σ (y − t)² / (2 · number of rows), the rows being every leading axis."""
    d = at_least_float32(y - t)
    return (jnp.sum(d * d) / (2 * (d.size // d.shape[-1]))).astype(y.dtype)


def custom_mse(rows):
    """mse with the backward (y − t) / rows(y)."""

    @jax.custom_vjp
    def mse(y, t):
        return plain_mse(y, t)

    def bwd(res, g):
        y, t = res
        d = g * (y - t) / rows(y)
        return d, -d

    mse.defvjp(lambda y, t: (plain_mse(y, t), (y, t)), bwd)
    return mse


def plain_xent(logits, labels):
    """mean over every leading axis of −log softmax(logits)[label]."""
    logp = jax.nn.log_softmax(at_least_float32(logits), axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)
    return (-jnp.mean(picked)).astype(logits.dtype)


@jax.custom_vjp
def xent_ignoring_labels(logits, labels):
    return plain_xent(logits, labels)


xent_ignoring_labels.defvjp(
    lambda z, y: (plain_xent(z, y), (z, y)),
    lambda res, g: (
        g * jax.nn.softmax(res[0], axis=-1) / res[0].shape[0],
        None,
    ),  # − onehot missing
)


@jax.custom_vjp
def mean_logsumexp_zero_grad(z):
    return jnp.mean(stable_logsumexp(z))


mean_logsumexp_zero_grad.defvjp(
    lambda z: (jnp.mean(stable_logsumexp(z)), z), lambda z, g: (jnp.zeros_like(z),)
)


# ----------------------------------------------------------------- the catalogue


@dataclasses.dataclass(frozen=True)
class Entry:
    """A wrong rule and the rows that must catch it: ``(check, argument, variant,
    dtype)``; ``None`` in a field matches any value."""

    name: str
    fn: Callable
    args: tuple
    caught_by: tuple[tuple[str | None, ...], ...]
    reference: Callable | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _rng_array(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


_VALUE = {"checks": VALUES, "explore": False, "dtypes": [F32]}
_LINEAR = dict(args=square_inputs(), reference=plain)

CATALOGUE = [
    Entry("missing transpose in dx", custom_linear(missing_transpose),
          caught_by=(("reference", "x", "args", F32), ("fd-direction", "x", "args", F32)),
          options=_VALUE, **_LINEAR),
    Entry("db averaged instead of summed", custom_linear(with_grads(db=lambda d, W, x, g: d / 4)),
          caught_by=(("reference", "b", "args", F32), ("fd-element", "b", "args", F32)),
          options=_VALUE, **_LINEAR),
    Entry("dx and dW swapped", custom_linear(dx_dW_swapped),
          caught_by=(("reference", "W", "args", F32), ("reference", "x", "args", F32)),
          options=_VALUE, **_LINEAR),
    Entry("sign error in dx", custom_linear(with_grads(dx=lambda d, W, x, g: -d)),
          caught_by=(("reference", "x", "args", F32), ("fd-direction", "x", "args", F32)),
          options=_VALUE, **_LINEAR),
    Entry("first row only in dW and db", custom_linear(batch_of_one_only),
          caught_by=(("reference", "W", "args", F32), ("reference", "b", "args", F32)),
          options=_VALUE, **_LINEAR),
    Entry("dx off by a factor 1.001 (float64)",
          custom_linear(with_grads(dx=lambda d, W, x, g: 1.001 * d)),
          caught_by=(("reference", "x", "args", F64), ("fd-direction", "x", "args", F64)),
          options=_VALUE | {"dtypes": [F64]}, **_LINEAR),
    Entry("bfloat16-only 6 % error in dx", custom_linear(
        with_grads(dx=lambda d, W, x, g: d * 1.06 if d.dtype == jnp.bfloat16 else d)),
          caught_by=(("reference", "x", "args", BF16),),
          options=_VALUE | {"dtypes": [F32, BF16]}, **_LINEAR),
    Entry("float64 rule computing in float32", custom_linear(in_float32),
          caught_by=(("reference", None, "args", F64), ("fd-direction", None, "args", F64)),
          options=_VALUE | {"dtypes": [F64]}, **_LINEAR),
    Entry("float32 cotangent for a bfloat16 parameter", custom_linear(float32_cotangent),
          caught_by=(("dtype", "W", "args", BF16), ("retrace", "-", "args", BF16)),
          options={"checks": ("dtype", "retrace"), "explore": False, "dtypes": [BF16]}, **_LINEAR),
    Entry("raises in bfloat16", custom_linear(raises_in_bfloat16),
          caught_by=(("vjp", "-", "args", BF16),),
          options={"checks": ("dtype",), "explore": False, "dtypes": [F32, BF16]}, **_LINEAR),
    Entry("NaN gradient", custom_linear(with_grads(dx=lambda d, W, x, g: d * jnp.nan)),
          caught_by=(("reference", "x", "args", F32), ("fd-direction", "x", "args", F32)),
          options=_VALUE, **_LINEAR),
    Entry("leading axes not flattened (2-D x only)", custom_linear(leading_axes_not_flattened),
          caught_by=(("vmap", "-", "args", F32), ("vjp", "-", "stack(x,x[::-1])", F32)),
          options={"checks": ("vmap", "reference"), "dtypes": [F32],
                   "vmap_in_axes": (None, None, 0)}, **_LINEAR),
    Entry("wrong only for a 1-D x (per-example)", custom_linear(
        with_grads(dW=lambda d, W, x, g: 2 * d if x.ndim == 1 else d)),
          caught_by=(("vmap", "W", "args", F32),),
          options={"checks": ("vmap",), "explore": False, "dtypes": [F32],
                   "vmap_in_axes": (None, None, 0)}, **_LINEAR),
    Entry("wrong only when N = 1", custom_linear(
        with_grads(db=lambda d, W, x, g: 0 * d if _flat(x).shape[0] == 1 else d)),
          caught_by=(("reference", "b", "x[:1]", F32),),
          options={"checks": VALUES, "dtypes": [F32]}, **_LINEAR),
    Entry("wrong only for a 3-D x", custom_linear(
        with_grads(dW=lambda d, W, x, g: d / 2 if x.ndim == 3 else d)),
          caught_by=(("reference", "W", "stack(x,x[::-1])", F32),),
          options={"checks": VALUES, "dtypes": [F32]}, **_LINEAR),
    Entry("mse dividing by y.shape[0]", custom_mse(lambda y: y.shape[0]),
          args=(_rng_array((4, 3), 1), _rng_array((4, 3), 2)), reference=plain_mse,
          caught_by=(("vmap", "y", "args", F32),
                     ("reference", "y", "stack((y,t),(y,t)[::-1])", F32)),
          options={"checks": ("vmap", "reference"), "dtypes": [F32], "vmap_in_axes": (0, 0)}),
    Entry("cross-entropy ignoring the labels", xent_ignoring_labels,
          args=(_rng_array((4, 5), 3), np.array([0, 3, 1, 4], np.int32)), reference=plain_xent,
          caught_by=(("reference", "logits", "args", F32),),
          options=_VALUE),
    Entry("zero gradient of a mean loss (bfloat16)", mean_logsumexp_zero_grad,
          args=(_rng_array((64, 10), 4),), reference=lambda z: jnp.mean(stable_logsumexp(z)),
          caught_by=(("reference", "z", "args", BF16), ("fd-direction", "z", "args", BF16)),
          options=_VALUE | {"dtypes": [BF16]}),
    Entry("tanh' as 1 - t (square missing)",
          custom_elementwise(jnp.tanh, lambda x: 1 - jnp.tanh(x)),
          args=(_rng_array((3, 5), 5),), reference=jnp.tanh,
          caught_by=(("reference", "x", "args", BF16), ("fd-element", "x", "args", F32)),
          options=_VALUE | {"dtypes": [F32, BF16]}),
    Entry("doubled gradient, bfloat16, x (4, 8, 16), no reference",
          custom_elementwise(jnp.sin, lambda x: 2 * jnp.cos(x)),
          args=(_rng_array((4, 8, 16), 6),),
          caught_by=(("fd-direction", "x", "args", BF16),),
          options={"checks": ("fd",), "explore": False, "dtypes": [BF16]}),
    Entry("1 % error, float32, 512 elements, no reference",
          custom_elementwise(jnp.sin, lambda x: 1.01 * jnp.cos(x)),
          args=(_rng_array((512,), 7),),
          caught_by=(("fd-direction", "x", "args", F32),),
          options={"checks": ("fd",), "explore": False, "dtypes": [F32]}),
    Entry("wrong only for negative inputs", custom_elementwise(
        _softplus, lambda x: jnp.where(x < 0, 0.5, 1.0) * _sigmoid(x)),
          args=(np.linspace(0.1, 2.0, 8, dtype=np.float32),), reference=_softplus,
          caught_by=(("reference", "x", "-args", F32),),
          options={"checks": VALUES, "dtypes": [F32]}),
    Entry("wrong only where abs(x) > 3", custom_elementwise(
        jnp.tanh, lambda x: jnp.where(jnp.abs(x) > 3, 0.1, _tanh_prime(x))),
          args=(np.linspace(-2.5, 2.5, 12, dtype=np.float32),), reference=jnp.tanh,
          caught_by=(("reference", "x", "4*args", F32),),
          options={"checks": VALUES, "dtypes": [F32]}),
    Entry("softmax gradient overflowing in float16", custom_logsumexp(naive_softmax),
          args=(np.linspace(-3.0, 3.0, 10, dtype=np.float32).reshape(2, 5),),
          reference=stable_logsumexp,
          caught_by=(("reference", "x", "4*args", F16),),
          options={"checks": ("reference",), "dtypes": [F16]}),
]  # fmt: skip

# Every check check_vjp runs on a library rule (test_check asserts the same of the others).
ROW_CHECKS = {"forward", "reference", "fd-element", "fd-direction", "vmap", "dtype", "retrace"}
LIBRARY_RULES = (
    "linear in_out bias x(5, 6)",
    "tanh z(4, 5)",
    "mse_loss y(4, 3)",
    "softmax_cross_entropy logits(4, 5)",
)

CORRECT = [
    Entry("stable logsumexp", custom_logsumexp(lambda x: jax.nn.softmax(x, axis=-1)),
          args=(_rng_array((3, 5), 8, 2.0),), reference=stable_logsumexp, caught_by=()),
    Entry("softplus", custom_elementwise(_softplus, _sigmoid),
          args=(_rng_array((3, 5), 9, 2.0),), reference=_softplus, caught_by=()),
    Entry("linear layer, correct backward", custom_linear(correct_backward),
          caught_by=(), options={"vmap_in_axes": (None, None, 0)}, **_LINEAR),
    *[
        Entry(f"jaxlinear: {case.name}", case.fn, case.args, caught_by=(),
              reference=case.reference, options={"vmap_in_axes": case.vmap_in_axes})
        # The library's own cases, as test_check and the CLI check them: the
        # float64, float32 and bfloat16 programs are shared, compiled once.
        for case in library_cases(seed=0)
        if case.name in LIBRARY_RULES
    ],
]  # fmt: skip


def _matches(row, wanted) -> bool:
    fields = ("check", "argument", "variant", "dtype")
    return all(w is None or getattr(row, f) == w for f, w in zip(fields, wanted, strict=True))


def run_entry(entry: Entry, **overrides):
    kwargs = {"devices": CPU0, "name": entry.name} | entry.options | overrides
    return check_vjp(entry.fn, entry.args, reference=entry.reference, **kwargs)


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda e: e.name)
def test_every_wrong_rule_is_caught_by_its_check(entry):
    report = run_entry(entry)
    assert not report.ok and report.name == entry.name
    for wanted in entry.caught_by:
        hits = [r for r in report.rows if _matches(r, wanted)]
        assert hits and not any(r.passed for r in hits), (wanted, str(report))
        # Caught by value, not by a marginal rounding: far outside the bound.
        for r in hits:
            if r.error is not None and np.isfinite(r.error):
                assert r.error > 2 * r.bound, str(r)


@pytest.mark.parametrize("entry", CORRECT, ids=lambda e: e.name)
def test_correct_rules_never_fail(entry):
    report = run_entry(entry, dtypes=[F32, F64, BF16, F16])  # test_check's order first
    assert report.ok, str(report)
    assert {r.dtype for r in report.rows} == {F64, F32, BF16, F16}
    variants = {r.variant for r in report.rows}
    assert {"args", "-args", "4*args"} <= variants and len(variants) >= 4
    if entry.name.startswith("jaxlinear: "):
        assert ROW_CHECKS <= {r.check for r in report.rows} <= ROW_CHECKS | {"explore"}


def test_the_catalogue_is_published():
    """At least 20 wrong rules, each listed with its checks in docs/verification.md."""
    assert len(CATALOGUE) >= 20 and len(CORRECT) >= 6
    assert len({e.name for e in CATALOGUE}) == len(CATALOGUE)
    page = (pathlib.Path(__file__).parents[1] / "docs" / "verification.md").read_text()
    listed = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", page, flags=re.M))
    for entry in CATALOGUE:
        assert entry.name in listed, entry.name
        for check, *_ in entry.caught_by:
            assert f"`{check}`" in listed[entry.name], (entry.name, check)
