"""Rematerialisation (``jax.checkpoint`` policies, ``checkpoint_name``) and control
flow (``scan``, ``cond``, ``switch``, ``while_loop``, ``fori_loop``) around the
hand-derived rules.

Every gradient is checked against autodiff of the plain formula, and what a
policy saves is checked twice: at the JAX level with
``jax.ad_checkpoint.print_saved_residuals`` (parsed from its printed lines), and
where the compiler keeps it, in the compiled HLO and its memory analysis.
``tests/test_transforms.py`` covers plain jit/vmap/checkpoint/scan; this file
goes beyond it.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name, print_saved_residuals

import jaxlinear
from jaxlinear import LinearParams, linear_apply
from tests.helpers import (
    assert_close,
    assert_tree_close,
    np_layer as layer,
    np_normal as normal,
    plain_linear,
    take,
)

# Slow (checkpoint policies and control flow compile many programs): not in the quick
# subset, -m "not slow".
pytestmark = pytest.mark.slow

F32 = jnp.float32
POLICIES = jax.checkpoint_policies
SIZES = (6, 5, 4, 3)  # an MLP block: two tanh hidden layers, then a linear output
BATCH = 7


# Test inputs come from NumPy's generator: jax.random would compile a threefry
# kernel for every new shape, which costs more CPU than the tests themselves.


def mlp(seed, sizes, layout="in_out"):
    return tuple(
        layer(seed + 2 * i, n_in, n_out, layout)
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    )


def stacked(layers):
    """Stack identical pytrees along a new leading axis (for lax.scan), on the host."""
    return jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *layers)


def block_params():
    return mlp(0, SIZES)


def block(params, x, *, linear=linear_apply, act=jaxlinear.tanh, name=None):
    """The MLP block; ``name="pre"``/``"post"`` tags each hidden layer's linear
    output (pre-activation) or activation output as ``z{i}``/``h{i}``."""
    h = x
    for i, p in enumerate(params[:-1]):
        z = linear(p, h)
        if name == "pre":
            z = checkpoint_name(z, f"z{i}")
        h = act(z)
        if name == "post":
            h = checkpoint_name(h, f"h{i}")
    return linear(params[-1], h)


def plain_block(params, x):
    return block(params, x, linear=plain_linear, act=jnp.tanh)


def outer_loss(f):
    """A loss around a block: the nonlinear ``sin`` makes every cotangent differ."""

    def loss(params, x):
        return jnp.sum(jnp.sin(f(params, x)))

    return loss


def saved_residuals(capsys, f, *args) -> Counter:
    """What ``print_saved_residuals(f, *args)`` prints, as a multiset of
    ``(type, source)`` with source ``"arg <name>"``, ``"named <name>"`` or
    ``"<primitive>"`` (the output of that primitive); file names and line
    numbers are dropped so the expectation survives edits."""
    capsys.readouterr()
    print_saved_residuals(f, *args)
    out = capsys.readouterr().out
    found = Counter()
    for line in out.splitlines():
        aval, src = line.split(" ", 1)
        if m := re.match(r"from the argument (\S+)", src):
            found[aval, f"arg {m[1]}"] += 1
        elif m := re.match(r"named '([^']+)'", src):
            found[aval, f"named {m[1]}"] += 1
        elif m := re.match(r"output of (\S+)", src):
            found[aval, m[1]] += 1
        else:
            raise AssertionError(f"unrecognised print_saved_residuals line: {line!r}")
    return found


def args(*names):
    """The residuals that are the block's own arguments, by name (``W0`` is
    ``params[0].W``; ``x`` is the input)."""
    shapes = {"x": f"f32[{BATCH},{SIZES[0]}]"}
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        shapes[f"W{i}"] = f"f32[{n_in},{n_out}]"
        shapes[f"b{i}"] = f"f32[{n_out}]"
    return Counter(
        {(shapes[n], "arg x" if n == "x" else f"arg params[{n[1]}].{n[0]}"): 1 for n in names}
    )


#: Hidden activations (7, 5) and (7, 4), and the outer sin's residual cos(y) (7, 3).
H0, H1, Y = f"f32[{BATCH},5]", f"f32[{BATCH},4]", f"f32[{BATCH},3]"
OUTER = Counter({(Y, "cos"): 1})


def test_without_checkpoint_each_layer_saves_x_and_w_only(capsys):
    """The custom rules save (x, W) per linear layer and the output of each
    activation, which *is* the next layer's x: one (batch, width) array per
    hidden layer and no bias. Autodiff of the plain formula saves two per
    hidden layer (tanh's output and 1 - tanh², or similar)."""
    params, x = block_params(), normal(100, (BATCH, SIZES[0]))
    got = saved_residuals(capsys, outer_loss(block), params, x)
    assert (
        got
        == args("W0", "W1", "W2", "x")
        + Counter({(H0, "jaxlinear.tanh"): 1, (H1, "jaxlinear.tanh"): 1})
        + OUTER
    )
    plain = saved_residuals(capsys, outer_loss(plain_block), params, x)
    activations = sum(n for (aval, _), n in plain.items() if aval in (H0, H1))
    assert activations > 2, f"plain autodiff saved {plain}; expected more than jaxlinear"


# Where a saved product x W comes from: the layer's forward-mode primal (a dot_general)
# under the default remat, the layer's own remat rule (Linear.remat) under jax_remat3.
PRODUCT = "jaxlinear.linear" if jax.config.jax_remat3 else "dot_general"

# (policy, name tags, expected residuals of the checkpointed block besides OUTER,
#  forward dot_generals recomputed in the backward pass).
REMAT_CASES = {
    # Only what recomputation needs: the arguments, biases included, but not
    # the last bias, and the last product is not recomputed (the block's output
    # y is not needed by its own backward; the outer sin saved cos y).
    "nothing_saveable": (
        POLICIES.nothing_saveable,
        None,
        args("W0", "b0", "W1", "b1", "W2", "x"),
        2,
    ),
    # The forward products x W of the hidden layers are saved: recomputation is
    # only bias + tanh, no dot. (The last layer's product is not needed.)
    "checkpoint_dots": (
        POLICIES.checkpoint_dots,
        None,
        args("W0", "b0", "W1", "b1", "W2", "x") + Counter({(H0, PRODUCT): 1, (H1, PRODUCT): 1}),
        0,
    ),
    # Naming the linear outputs (pre-activations): they are saved, each tanh is
    # recomputed from them, and no dot is recomputed; the biases are not needed.
    "names_pre_activation": (
        POLICIES.save_only_these_names("z0", "z1"),
        "pre",
        args("W0", "W1", "W2", "x") + Counter({(H0, "named z0"): 1, (H1, "named z1"): 1}),
        0,
    ),
    # Naming the activation outputs saves them, but each activation's own
    # residual is its *unnamed* output inside its rule, so the whole forward is
    # recomputed anyway: the same as plain JAX with jnp.tanh (checked below).
    # Name the linear_apply outputs instead.
    "names_post_activation": (
        POLICIES.save_only_these_names("h0", "h1"),
        "post",
        args("W0", "b0", "W1", "b1", "W2", "x")
        + Counter({(H0, "named h0"): 1, (H1, "named h1"): 1}),
        2,
    ),
    # Just one name, the first pre-activation: only the second layer is
    # recomputed, so only its bias is saved.
    "one_name": (
        POLICIES.save_only_these_names("z0"),
        "pre",
        args("W0", "W1", "b1", "W2", "x") + Counter({(H0, "named z0"): 1}),
        1,
    ),
}


def lowered_dots(fn, *args) -> int:
    """dot_generals in the lowered (pre-XLA) module: what JAX asked to compute.

    XLA:CPU may undo a recomputation that is not inside a loop (it CSEs it with
    the forward once the optimisation barrier is gone), so the unrolled block is
    checked here; the scan test below checks the compiled HLO, where it stays.
    """
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.dot_general")


@pytest.fixture(scope="module")
def block_reference():
    """Inputs of the block and (value, grads) without checkpoint: jaxlinear's and
    autodiff of the plain formula's (computed once for every policy)."""
    params, x = block_params(), normal(100, (BATCH, SIZES[0]))
    ours = jax.jit(jax.value_and_grad(outer_loss(block), argnums=(0, 1)))(params, x)
    plain = jax.jit(jax.value_and_grad(outer_loss(plain_block), argnums=(0, 1)))(params, x)
    return params, x, ours, plain


@pytest.mark.parametrize("case", REMAT_CASES)
def test_checkpoint_policy_saves_what_it_says_and_keeps_gradients(capsys, block_reference, case):
    policy, name, expected, recomputed = REMAT_CASES[case]
    params, x, ours, plain = block_reference
    remat = jax.checkpoint(lambda p, x: block(p, x, name=name), policy=policy)
    loss = outer_loss(remat)

    assert saved_residuals(capsys, loss, params, x) == expected + OUTER

    # 3 forward products + dW for 3 layers + dx for 3 layers, plus the recomputed ones.
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    assert lowered_dots(grad, params, x) == 9 + recomputed
    # The same choice as JAX makes for the plain formula with the same policy.
    remat_plain = jax.checkpoint(
        lambda p, x: block(p, x, linear=plain_linear, act=jnp.tanh, name=name), policy=policy
    )
    plain_grad = jax.value_and_grad(outer_loss(remat_plain), argnums=(0, 1))
    assert lowered_dots(plain_grad, params, x) == 9 + recomputed

    value, grads = jax.jit(grad)(params, x)
    for value_ref, grads_ref in (ours, plain):  # remat changes nothing; both as autodiff
        assert_close(value, value_ref, F32)
        assert_tree_close(grads, grads_ref, F32)


def test_remat_of_mlp_apply_with_static_arguments():
    """``jax.remat`` of ``mlp_apply`` itself (PyTorch layout), its activation
    passed as a static argument; first and second derivatives (grad of a
    grad-norm) as autodiff."""
    params = mlp(2, (4, 8, 8, 2), layout="out_in")
    x = normal(3, (5, 4))
    remat = jax.remat(
        lambda p, x, act: jaxlinear.mlp_apply(p, x, activation=act), static_argnums=(2,)
    )

    def loss(apply):
        return lambda p, x: jnp.sum(jnp.sin(apply(p, x)))

    def plain(p, x):
        return block(p, x, linear=plain_linear, act=jax.nn.sigmoid)

    jl_loss = loss(lambda p, x: remat(p, x, jaxlinear.sigmoid))
    grads = jax.jit(jax.grad(jl_loss, argnums=(0, 1)))(params, x)
    assert_tree_close(grads, jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(params, x), F32)

    def grad_norm(loss):
        return lambda p, x: sum(jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(loss)(p, x)))

    gg = jax.jit(jax.grad(grad_norm(jl_loss)))(params, x)
    assert_tree_close(gg, jax.jit(jax.grad(grad_norm(loss(plain))))(params, x), F32)


# ---------------------------------------------------------------------------- scan


def deep_stack(num_layers, width, seed=4):
    return stacked([layer(seed + 2 * i, width, width) for i in range(num_layers)])


def deep(stack, x, *, remat=False, policy=None, linear=linear_apply, act=jaxlinear.tanh):
    """A stack of identical layers h <- act(h W_l + b_l), scanned; optionally each
    step checkpointed."""

    def body(h, p):
        return act(linear(p, h)), None

    if remat:
        body = jax.checkpoint(body, policy=policy)
    h, _ = jax.lax.scan(body, x, stack)
    return jnp.sum(jnp.sin(h))


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


SCAN_CASES = {
    # name: (remat, policy, residual (L, B, D) stacks, dots in the compiled HLO)
    # No remat: per layer the linear saves its input and tanh its output; a scan
    # cannot share them across iterations, so there are two stacks. Dots: the
    # forward, dx and dW.
    "no_remat": (False, None, 2, 3),
    # Everything recomputed: only the carries (each layer's input) are saved,
    # and the forward product is recomputed in the backward loop (a 4th dot).
    "nothing_saveable": (True, POLICIES.nothing_saveable, 1, 4),
    # Products saved: the carries and the products x W, no dot recomputed.
    "checkpoint_dots": (True, POLICIES.checkpoint_dots, 2, 3),
}


def test_scan_over_checkpointed_layers(capsys):
    """Residuals, compiled dots, compiled temporary memory and gradients of a
    scanned stack of layers for each policy. Inside a loop XLA keeps the
    recomputation, so the compiled HLO shows it."""
    L, B, D = 4, 64, 32
    stack, x = deep_stack(L, D), normal(5, (B, D))
    ref = jax.jit(
        jax.value_and_grad(lambda s, x: deep(s, x, linear=plain_linear, act=jnp.tanh), (0, 1))
    )(stack, x)
    temp_bytes = {}
    for case, (remat, policy, stacks, dots) in SCAN_CASES.items():

        def loss(stack, x, remat=remat, policy=policy):
            return deep(stack, x, remat=remat, policy=policy)

        res = saved_residuals(capsys, loss, stack, x)
        assert res[f"f32[{L},{B},{D}]", "scan"] == stacks, (case, res)
        assert res[f"f32[{L},{D},{D}]", "arg stack.W"] == 1, (case, res)
        # The biases are needed only to recompute.
        assert res[f"f32[{L},{D}]", "arg stack.b"] == (1 if remat else 0), (case, res)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(stack, x).compile()
        assert len(re.findall(r"= \S+ dot\(", step.as_text())) == dots, case
        temp_bytes[case] = step.memory_analysis().temp_size_in_bytes
        value, grads = step(stack, x)
        assert_close(value, ref[0], F32, err_msg=case)
        assert_tree_close(grads, ref[1], F32)
    # Checkpointing the body frees at least one (L, B, D) float32 stack (the
    # saved tanh outputs, or the saved products).
    stack_bytes = L * B * D * 4
    assert temp_bytes["no_remat"] - temp_bytes["nothing_saveable"] >= stack_bytes, temp_bytes
    assert temp_bytes["checkpoint_dots"] - temp_bytes["nothing_saveable"] >= stack_bytes, temp_bytes


def test_scan_of_remat_mlp_blocks():
    """A stack of identical two-layer MLP blocks with a residual connection, each
    block ``jax.remat``-ed inside the scan: gradients as autodiff."""
    L, B, D, H = 3, 6, 5, 8
    stack = stacked([mlp(30 + 4 * i, (D, H, D)) for i in range(L)])
    x = normal(7, (B, D))

    def net(linear, act, remat):
        def body(h, p):
            f = lambda p, h: block(p, h, linear=linear, act=act)  # noqa: E731
            if remat:
                f = jax.remat(f)
            return h + f(p, h), None

        return lambda s, x: jnp.sum(jnp.sin(jax.lax.scan(body, x, s)[0]))

    grads = jax.jit(jax.grad(net(linear_apply, jaxlinear.relu, True), argnums=(0, 1)))(stack, x)
    ref = jax.jit(jax.grad(net(plain_linear, jax.nn.relu, False), argnums=(0, 1)))(stack, x)
    assert_tree_close(grads, ref, F32)


# ---------------------------------------------------------------------- cond, switch


def two_layers():
    return layer(8, 4, 3), layer(10, 4, 3, layout="out_in")


def cond_loss(linear, act):
    """Pick the layer by the sign of the input's sum: data-dependent control flow."""

    def loss(params, x):
        pa, pb = params
        y = jax.lax.cond(
            jnp.sum(x) > 0,
            lambda x: act(linear(pa, x)),
            lambda x: linear(pb, act(x)),
            x,
        )
        return jnp.sum(jnp.sin(y))

    return loss


def test_cond_around_layers():
    params = two_layers()
    ours = jax.jit(jax.grad(cond_loss(linear_apply, jaxlinear.tanh), argnums=(0, 1)))
    plain = jax.jit(jax.grad(cond_loss(plain_linear, jnp.tanh), argnums=(0, 1)))
    for branch, sign in enumerate((1.0, -1.0)):
        x = jnp.asarray(np.abs(np.asarray(normal(9, (5, 4)))) * np.float32(sign))
        g = ours(params, x)
        assert_tree_close(g, plain(params, x), F32)
        # The branch not taken gets an exactly zero gradient.
        unused = g[0][1 - branch]
        assert all(not np.asarray(leaf).any() for leaf in jax.tree.leaves(unused)), branch


def test_cond_under_vmap_becomes_select():
    """Per-example gradients where each example takes its own branch (vmap turns
    the cond into a select that runs both branches)."""
    params = two_layers()
    x = normal(10, (6, 4))
    x_host = np.asarray(x)
    assert 0 < int(np.sum(np.sum(x_host, axis=-1) > 0)) < 6, "want both branches taken"
    per_example = jax.jit(jax.vmap(jax.grad(cond_loss(linear_apply, jaxlinear.tanh)), (None, 0)))(
        params, x
    )
    ref = jax.jit(jax.grad(cond_loss(plain_linear, jnp.tanh)))
    for i in range(x.shape[0]):
        assert_tree_close(take(per_example, i), ref(params, x_host[i]), F32)


def test_switch_between_activations():
    p = layer(11, 4, 4)
    x = normal(12, (3, 4))

    def loss(linear, acts):
        def f(p, x, i):
            branches = [lambda h, a=a: a(linear(p, h)) for a in acts]
            return jnp.sum(jnp.sin(jax.lax.switch(i, branches, x)))

        return f

    jl = jax.jit(jax.grad(loss(linear_apply, [jaxlinear.relu, jaxlinear.sigmoid, jaxlinear.tanh])))
    ref = jax.jit(jax.grad(loss(plain_linear, [jax.nn.relu, jax.nn.sigmoid, jnp.tanh])))
    for i in range(3):
        assert_tree_close(jl(p, x, i), ref(p, x, i), F32)


# --------------------------------------------------------------- while_loop, fori_loop


def repeat_layer(p, x, n, *, linear=linear_apply, act=jaxlinear.tanh):
    """Apply the same layer n times (n may be traced): a while_loop."""

    def body(carry):
        i, h = carry
        return i + 1, act(linear(p, h))

    _, h = jax.lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), x))
    return jnp.sum(jnp.sin(h))


def python_repeat(p, x, n, *, linear=plain_linear, act=jnp.tanh):
    h = x
    for _ in range(n):
        h = act(linear(p, h))
    return jnp.sum(jnp.sin(h))


def test_while_loop_values_and_why_reverse_mode_needs_a_static_trip_count():
    p = layer(13, 4, 4)
    x = normal(14, (3, 4))
    looped = jax.jit(repeat_layer)
    # The references (the Python loop under autodiff), all in one program: the values
    # for each trip count, and the gradient for n = 3 (checked below).
    values_ref, grads_ref = jax.jit(
        lambda p, x: (
            [python_repeat(p, x, n) for n in (0, 1, 3)],
            jax.grad(python_repeat, argnums=(0, 1))(p, x, 3),
        )
    )(p, x)
    for n, value_ref in zip((0, 1, 3), values_ref, strict=True):
        assert_close(looped(p, x, n), value_ref, F32, err_msg=f"n={n}")
    # A while_loop has no reverse-mode rule in JAX, whatever is inside it.
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(repeat_layer)(p, x, 3)
    # With a static trip count, fori_loop lowers to a scan and differentiates.
    n = 3

    def fori(p, x):
        h = jax.lax.fori_loop(0, n, lambda i, h: jaxlinear.tanh(linear_apply(p, h)), x)
        return jnp.sum(jnp.sin(h))

    grads = jax.jit(jax.grad(fori, argnums=(0, 1)))(p, x)
    assert_tree_close(grads, grads_ref, F32)


def test_while_loop_differentiates_in_forward_mode():
    """Through a while_loop with a traced trip count, forward mode is the way:
    the hand-derived JVPs give jvp and ``jacfwd`` equal to autodiff."""
    p = layer(15, 4, 4)
    x = normal(16, (3, 4))
    dx = normal(17, (3, 4))
    n = jnp.int32(3)

    def main(p, x):
        return repeat_layer(p, x, n, linear=jaxlinear.linear_apply, act=jaxlinear.tanh)

    def ref(p, x):
        return python_repeat(p, x, 3)

    # Autodiff of the Python loop: the jvp and the gradient, in one program.
    (v_ref, t_ref), grad_ref = jax.jit(
        lambda p, x: (jax.jvp(lambda x: ref(p, x), (x,), (dx,)), jax.grad(ref)(p, x))
    )(p, x)
    v, t = jax.jit(lambda x: jax.jvp(lambda x: main(p, x), (x,), (dx,)))(x)
    assert_close(v, v_ref, F32)
    assert_close(t, t_ref, F32)
    assert_tree_close(jax.jit(jax.jacfwd(main))(p, x), grad_ref, F32)


def test_linear_params_pass_through_control_flow_as_pytrees():
    """LinearParams (with a static layout) is a loop carry: a while_loop that
    takes gradient steps on it keeps the layout and matches a Python loop."""
    p = LinearParams(
        normal(18, (3, 4), 0.5), jnp.asarray(np.zeros((3,), np.float32)), layout="out_in"
    )
    x, t = normal(19, (8, 4)), normal(20, (8, 3))

    def loss(p):
        return jaxlinear.mse_loss(linear_apply(p, x), t)

    def sgd(p):
        return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p))

    steps = jnp.int32(5)
    out = jax.jit(
        lambda p: jax.lax.while_loop(
            lambda c: c[0] < steps, lambda c: (c[0] + 1, sgd(c[1])), (0, p)
        )[1]
    )(p)
    # The reference: five steps of a Python loop, each step one jitted program call.
    ref_step = jax.jit(
        lambda ref: jax.tree.map(
            lambda w, g: w - 0.1 * g,
            ref,
            jax.grad(lambda q: jaxlinear.mse_loss(plain_linear(q, x), t))(ref),
        )
    )
    ref = p
    for _ in range(5):
        ref = ref_step(ref)
    assert out.layout == "out_in"
    assert_tree_close(out, ref, F32)
