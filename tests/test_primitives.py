"""The rules as primitives: every JAX transformation on the main functions, under
every setting of JAX's upcoming ``jax_remat3`` / ``jax_custom_vjp3`` flags, equals
autodiff of the plain formula; and each mode runs the rule written for it.

One battery of transformations per function is compiled once per flag setting
(float64, so "equal to autodiff" is checked to the float64 row of the tolerance
table); the planted-error tests show which hand-written rule each mode runs.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear as jl
from jaxlinear import LinearParams, linear_apply
from jaxlinear._activations import Activation
from jaxlinear._linear import Linear
from jaxlinear._losses import MSELoss, SoftmaxCrossEntropy
from jaxlinear.check import tolerance_for
from tests.helpers import assert_tree_close, np_normal

F64 = jnp.float64
#: float32 comparisons of one rule with another path to the same number (reverse
#: vs forward mode, a patched rule vs twice the true one): the table's float32 row.
RTOL = tolerance_for(np.float32).autodiff[0]
FLAGS = {
    "default": {},
    "remat3": {"jax_remat3": True},
    "custom_vjp3": {"jax_custom_vjp3": True},
    "both": {"jax_remat3": True, "jax_custom_vjp3": True},
}


@contextlib.contextmanager
def flags(settings):
    """Set JAX flags for the block and restore them (no config leaks)."""
    before = {name: getattr(jax.config, name) for name in settings}
    try:
        for name, value in settings.items():
            jax.config.update(name, value)
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)


# ---------------------------------------------------------------- the functions


def inputs(dtype=np.float32):
    """Well-scaled inputs: W (4, 3), b (3,), x (5, 4) and a target t (5, 3)."""
    shapes = ((4, 3), (3,), (5, 4), (5, 3))
    return tuple(
        np.asarray(np_normal(seed, shape, 0.5 if seed == 0 else 1.0), dtype)
        for seed, shape in enumerate(shapes)
    )


def plain_xent(z, labels, reduction):
    per_row = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, labels[..., None], -1)[..., 0]
    return {"mean": jnp.mean, "sum": jnp.sum, "none": lambda a: a}[reduction](per_row)


def plain_mse(y, t, reduction):
    per_row = 0.5 * jnp.sum((y - t) ** 2, -1)
    return {"mean": jnp.mean, "sum": jnp.sum, "none": lambda a: a}[reduction](per_row)


def model(ops, reduction="mean", layout="in_out"):
    """f(W, b, x, t): a layer, tanh, sigmoid, relu and both losses, so one battery
    covers every rule. ``ops`` is jaxlinear's functions or the plain formulas."""
    linear, tanh, sigmoid, relu, mse, xent = ops

    def f(W, b, x, t):
        Wl = W if layout == "in_out" else W.T
        y = linear(LinearParams(Wl, b, layout), x)
        h = tanh(y) + sigmoid(y) * relu(y)
        labels = jnp.argmax(t, axis=-1)  # integer classes that follow t's batching
        return jnp.sum(jnp.sin(mse(h, t, reduction))) + jnp.sum(xent(h * t, labels, reduction))

    return f


def _plain_linear(p, x):
    W = p.W if p.layout == "in_out" else p.W.T
    return x @ W + p.b[None]


OURS = (
    linear_apply,
    jl.tanh,
    jl.sigmoid,
    jl.relu,
    lambda y, t, r: jl.mse_loss(y, t, reduction=r),
    lambda z, lab, r: jl.softmax_cross_entropy(z, lab, reduction=r),
)
PLAIN = (_plain_linear, jnp.tanh, jax.nn.sigmoid, jax.nn.relu, plain_mse, plain_xent)


def transformations(f, W, b, x, t):
    """Every transformation the issue lists, applied to f(W, b, x, t) -> scalar."""
    args = (W, b, x, t)
    tangents = (0.3 * W, -0.2 * b, 0.1 * x, 0.5 * t)
    y_of = lambda W, b, x: jnp.tanh(  # noqa: E731  (the layer alone, vector-valued)
        linear_apply(LinearParams(W, b), x)
    )
    argnums = (0, 1, 2, 3)
    stack = lambda a: jnp.stack([a, 2.0 * a])  # noqa: E731
    return {
        "grad": jax.grad(f, argnums)(*args),
        "value_and_grad": jax.value_and_grad(f, argnums)(*args),
        "vjp": jax.vjp(f, *args)[1](jnp.ones((), F64)),
        "jvp": jax.jvp(f, args, tangents),
        "linearize": jax.linearize(f, *args)[1](*tangents),
        "jacfwd": jax.jacfwd(f, argnums)(*args),
        "jacrev": jax.jacrev(f, argnums)(*args),
        "hessian_x": jax.hessian(f, 2)(*args),
        "laplacian": jax.jvp(
            lambda x: jax.jvp(lambda x: f(W, b, x, t), (x,), (t[:, :1] * x,))[1], (x,), (x,)
        ),
        "grad_of_grad": jax.grad(lambda W: jnp.sum(jax.grad(f, 2)(W, b, x, t) ** 2))(W),
        "vmap_x": jax.vmap(f, (None, None, 0, 0))(W, b, stack(x), stack(t)),
        "vmap_W": jax.vmap(f, (0, None, None, None))(stack(W), b, x, t),
        "vmap_b": jax.vmap(f, (None, 0, None, None))(W, stack(b), x, t),
        "vmap_all": jax.vmap(f, (0, 0, 1, None))(stack(W), stack(b), jnp.stack([x, -x], 1), t),
        "per_example_grad": jax.vmap(jax.grad(f, (0, 1)), (None, None, 0, 0))(
            W, b, x[:, None], t[:, None]
        ),
        "ensemble_grad": jax.grad(
            lambda Ws: jnp.sum(jax.vmap(f, (0, None, None, None))(Ws, b, x, t))
        )(stack(W)),
        "vmap_of_jvp": jax.vmap(lambda x: jax.jvp(f, args[:2] + (x, t), tangents))(stack(x)),
        "jvp_of_vmap": jax.jvp(
            lambda x: jax.vmap(f, (None, None, 0, None))(W, b, x, t),
            (stack(x),),
            (stack(tangents[2]),),
        ),
        "checkpoint": jax.grad(jax.checkpoint(f), argnums)(*args),
        "checkpoint_dots": jax.grad(
            jax.checkpoint(f, policy=jax.checkpoint_policies.dots_saveable), argnums
        )(*args),
        "scan": jax.grad(
            lambda W: jax.lax.scan(lambda c, xi: (c + f(W, b, xi, t), None), 0.0, stack(x))[0]
        )(W),
        "fori_jvp": jax.jvp(
            lambda x: jax.lax.fori_loop(
                0, 2, lambda i, h: jnp.tanh(y_of(jnp.eye(4, dtype=F64), b[:1].repeat(4), h)), x
            ),
            (x,),
            (t[:, :1] * x,),
        ),
        "while_jvp": jax.jvp(
            lambda x: jax.lax.while_loop(
                lambda c: c[0] < 2,
                lambda c: (c[0] + 1, y_of(jnp.eye(4, dtype=F64), b[:1].repeat(4), c[1])),
                (0, x),
            )[1],
            (x,),
            (x,),
        ),
        "cond": jax.grad(
            lambda W: jax.lax.cond(
                W[0, 0] > -10, lambda W: f(W, b, x, t), lambda W: 0.0 * W[0, 0], W
            )
        )(W),
        "switch_jvp": jax.jvp(
            lambda W: jax.lax.switch(1, [lambda W: 0.0 * jnp.sum(W), lambda W: f(W, b, x, t)], W),
            (W,),
            (W,),
        ),
        "linear_transpose": jax.linear_transpose(lambda x: linear_apply(LinearParams(W), x), x)(t),
        "eval_shape": jnp.zeros(jax.eval_shape(y_of, W, b, x).shape),
    }


# The whole battery runs with each flag off ("default") and on ("both"), and with
# remat3 alone, which changes how jax.checkpoint reaches the rules. (custom_vjp3 alone
# changes nothing for them: no rule is a custom_vjp.) The reductions and layouts,
# which the flags do not touch, rotate across the settings so that each is covered.
CASES = [
    ("default", "mean", "in_out"),
    ("remat3", "sum", "out_in"),
    ("both", "none", "in_out"),
]


@pytest.mark.slow
@pytest.mark.parametrize("setting,reduction,layout", CASES, ids=[c[0] for c in CASES])
def test_every_transformation_equals_autodiff(setting, reduction, layout):
    with flags(FLAGS[setting]), jax.enable_x64(True):
        args = inputs(np.float64)

        def both(*a):  # one program: XLA compiles what the two batteries share once
            return tuple(
                transformations(model(ops, reduction, layout), *a) for ops in (OURS, PLAIN)
            )

        ours, plain = jax.jit(both)(*args)
    assert ours.keys() == plain.keys()
    for name in plain:
        assert_tree_close(ours[name], plain[name], F64)


# ---------------------------------------------------------------- which rule runs


def planted(monkeypatch, cls, method, scale=2.0):
    """Patch ``cls.method`` (test-only) to return its result times ``scale``."""
    original = getattr(cls, method)

    def wrong(self, *args):
        out = original(self, *args)
        return jax.tree.map(lambda a: a * scale, out) if out is not None else None

    monkeypatch.setattr(cls, method, wrong)


def planted_backward(monkeypatch, module, name, scale=2.0):
    original = getattr(module, name)
    monkeypatch.setattr(
        module,
        name,
        lambda *a, **k: tuple(None if g is None else g * scale for g in original(*a, **k)),
    )


def modes(f, *args):
    """Reverse-mode and forward-mode derivatives of scalar f w.r.t. its first argument.

    Both in one jitted program (a fresh one per call, so a rule patched since the last
    call is traced anew) rather than op by op."""
    a = args[0]
    direction = np.asarray(np_normal(9, np.shape(a)), np.asarray(a).dtype)

    def both(*args):
        rev = jnp.vdot(jax.grad(f)(*args), direction)
        fwd = jax.jvp(lambda a: f(a, *args[1:]), (args[0],), (direction,))[1]
        return rev, fwd

    rev, fwd = jax.jit(both)(*args)
    return float(rev), float(fwd)


def test_linear_reverse_mode_runs_the_vjp_and_forward_mode_the_jvp(monkeypatch):
    import jaxlinear._linear as lin

    W, b, x, t = inputs()

    def f(x):
        return jnp.sum(jnp.sin(linear_apply(LinearParams(W, b), x)))

    rev, fwd = modes(f, x)
    assert rev == pytest.approx(fwd, rel=RTOL)
    with monkeypatch.context() as m:  # an error in the VJP's code (linear_backward's)
        planted_backward(m, lin, "_backward")
        bad_rev, good_fwd = modes(f, x)
    assert bad_rev == pytest.approx(2 * rev, rel=RTOL) and good_fwd == pytest.approx(fwd, rel=RTOL)
    with monkeypatch.context() as m:  # an error in the JVP's tangent
        planted(m, Linear, "_tangent")
        good_rev, bad_fwd = modes(f, x)
    assert good_rev == pytest.approx(rev, rel=RTOL) and bad_fwd == pytest.approx(2 * fwd, rel=RTOL)


def test_checkpoint_and_linear_transpose_run_the_transpose_rule(monkeypatch):
    """JVP-then-transpose paths (the default jax.checkpoint, linear_transpose) reach
    Linear.transpose, which is linear_backward's code (under jax_remat3, checkpoint
    runs the VJP instead: the same code). Each call builds fresh functions: JAX caches
    the partial evaluation of a traced function, which would hide the patch."""
    import jaxlinear._linear as lin

    W, b, x, t = inputs()

    def checkpointed_grad():
        f = jax.checkpoint(lambda x: jnp.sum(jnp.sin(linear_apply(LinearParams(W, b), x))))
        return jax.grad(f)(x)

    def transposed():
        return jax.linear_transpose(lambda x: linear_apply(LinearParams(W), x), x)(t)[0]

    def both():  # one jitted program per call (fresh, so it traces the patch)
        return jax.jit(lambda: (checkpointed_grad(), transposed()))()

    good_grad, good_transpose = (np.asarray(a) for a in both())
    with monkeypatch.context() as m:
        planted_backward(m, lin, "_backward")
        bad_grad, bad_transpose = both()
        np.testing.assert_allclose(bad_grad, 2 * good_grad, rtol=RTOL)
        np.testing.assert_allclose(bad_transpose, 2 * good_transpose, rtol=RTOL)


EXPECTED_RULES = {
    # mode: (rules with the default flags, rules under jax_remat3)
    "grad": (["vjp_fwd", "vjp_bwd"],) * 2,
    "grad_of_jit": (["vjp_fwd", "vjp_bwd"],) * 2,
    "grad_of_checkpoint": (["jvp", "transpose"], ["vjp_fwd", "vjp_bwd"]),
    "jvp": (["jvp"],) * 2,
    "linearize": (["lin"],) * 2,
    "linear_transpose": (["transpose"],) * 2,
    "vmap": (["batch"],) * 2,
}


@pytest.mark.parametrize("remat3", [False, True], ids=["default", "remat3"])
def test_each_mode_calls_the_rule_written_for_it(monkeypatch, remat3):
    """Record which of Linear's hand-written methods each transformation calls."""
    calls = []
    for name in ("vjp_fwd", "vjp_bwd", "jvp", "lin", "transpose", "batch"):
        original = getattr(Linear, name)
        monkeypatch.setattr(
            Linear,
            name,
            lambda self, *a, _o=original, _n=name: (calls.append(_n), _o(self, *a))[1],
        )
    W, b, x, t = inputs()

    def f(x):
        return jnp.sum(jnp.sin(linear_apply(LinearParams(W, b), x)))

    modes = {
        "grad": lambda: jax.grad(f)(x),
        "grad_of_jit": lambda: jax.grad(jax.jit(lambda x: f(x)))(x),
        "grad_of_checkpoint": lambda: jax.grad(jax.checkpoint(lambda x: f(x)))(x),
        "jvp": lambda: jax.jvp(f, (x,), (x,)),
        "linearize": lambda: jax.linearize(f, x),
        "linear_transpose": lambda: jax.linear_transpose(
            lambda x: linear_apply(LinearParams(W), x), x
        )(t),
        "vmap": lambda: jax.vmap(f)(x[:, None]),
    }
    with flags({"jax_remat3": remat3}):
        for mode, run in modes.items():
            calls.clear()
            run()
            assert calls == EXPECTED_RULES[mode][remat3], mode


@pytest.mark.parametrize(
    "cls,vjp,jvp,fn",
    [
        (Activation, "vjp_bwd_retval", "jvp", lambda z: jnp.sum(jnp.sin(jl.tanh(z)))),
        (MSELoss, "vjp_bwd", "linearized", lambda y: jl.mse_loss(y, jnp.sin(y) * 0.3 + 0.1)),
        (
            SoftmaxCrossEntropy,
            "vjp_bwd",
            "linearized",
            lambda z: jl.softmax_cross_entropy(z, jnp.array([0, 2, 1, 1, 0])),
        ),
    ],
    ids=["activation", "mse", "xent"],
)
def test_activation_and_loss_modes_run_their_own_rules(monkeypatch, cls, vjp, jvp, fn):
    z = np.asarray(np_normal(5, (5, 3)), np.float32)
    rev, fwd = modes(fn, z)
    assert rev == pytest.approx(fwd, rel=RTOL)
    with monkeypatch.context() as m:
        if vjp == "vjp_bwd":  # accumulator-style: scale what reaches the accumulators
            original = getattr(cls, vjp)

            def wrong(self, res, g, *accums):
                return original(self, res, jax.tree.map(lambda a: 2 * a, g), *accums)

            m.setattr(cls, vjp, wrong)
        else:
            planted(m, cls, vjp)
        bad_rev, good_fwd = modes(fn, z)
    assert bad_rev == pytest.approx(2 * rev, rel=RTOL) and good_fwd == pytest.approx(fwd, rel=RTOL)
    with monkeypatch.context() as m:
        if jvp == "jvp":
            original_jvp = cls.jvp

            def wrong_jvp(self, primals, tangents):
                out, dout = original_jvp(self, primals, tangents)
                return out, 2 * dout

            m.setattr(cls, "jvp", wrong_jvp)
        else:
            planted(m, cls, jvp)
        good_rev, bad_fwd = modes(fn, z)
    assert good_rev == pytest.approx(rev, rel=RTOL) and bad_fwd == pytest.approx(2 * fwd, rel=RTOL)


# ---------------------------------------------------------------- residuals and HLO


def test_residuals_are_only_what_each_gradient_needs():
    """The VJP saves x only when W needs a gradient, and W only when x does."""
    W, b, x, _ = inputs()
    rule = Linear(
        jax.typeof(x),
        jax.typeof(W),
        jax.typeof(b),
        layout="in_out",
        precision=None,
        preferred_element_type=None,
    )
    _, (rx, rW) = rule.vjp_fwd((False, True, True), x, W, b)  # only W and b need one
    assert rx is x and rW is None
    _, (rx, rW) = rule.vjp_fwd((True, False, False), x, W, b)  # only x needs one
    assert rx is None and rW is W


def test_jitted_calls_keep_the_fast_dispatch_path():
    """A jitted program holding jaxlinear's rules is an ordinary (low) program, so JAX
    caches its dispatch: the C++ fast path serves repeated calls."""
    W, b, x, _ = inputs()
    step = jax.jit(lambda p, x: jax.grad(lambda p: jnp.sum(linear_apply(p, x) ** 2))(p))
    p = LinearParams(W, b)
    step(p, x)
    step(p, x)
    assert step._cache_size() == 1
