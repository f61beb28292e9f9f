"""Beyond one device: data parallel (batch sharded, parameters replicated) and
model parallel (W sharded along ``out_features`` or ``in_features``) on 8
simulated CPU devices, against the unsharded run and against autodiff of the
plain formula, including the collectives in the compiled HLO.

``tests/conftest.py`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts, so ``jax.devices("cpu")`` has 8 devices. The meshes use
``AxisType.Auto`` axes (sharding propagated by the compiler); the explicit-axes
mode, ``jax.make_mesh``'s default, is covered by the last test.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxlinear
from jaxlinear import LinearParams, linear_apply
from tests.helpers import (
    assert_close,
    assert_tree_close,
    np_layer as layer,
    np_normal as normal,
    plain_linear,
)

F32 = jnp.float32
NUM_DEVICES = 8
CPUS = jax.devices("cpu")

pytestmark = [
    # Slow (programs partitioned over eight simulated devices): not in the quick subset,
    # -m "not slow".
    pytest.mark.slow,
    pytest.mark.skipif(
        len(CPUS) < NUM_DEVICES,
        reason=f"needs {NUM_DEVICES} CPU devices: run with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES} (tests/conftest.py "
        "sets it unless XLA_FLAGS already names a device count)",
    ),
]

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
#: XLA:CPU's pass that merges independent all-reduces into one tuple all-reduce.
COMBINER = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}


def mesh(shape, names, axis_types=AxisType.Auto):
    return jax.make_mesh(
        shape, names, axis_types=(axis_types,) * len(names), devices=CPUS[: int(np.prod(shape))]
    )


def collectives(compiled) -> Counter:
    """Collective ops in a compiled executable's HLO, by kind (an async
    ``*-start``/``*-done`` pair counts once)."""
    pattern = r" ({})(?:-start)?\(".format("|".join(COLLECTIVES))
    return Counter(m[1] for m in re.finditer(pattern, compiled.as_text()))


def all_reduce_shapes(compiled) -> list[list[str]]:
    """For each all-reduce, the shapes it reduces (several if combined into a
    tuple), layouts dropped: ``[["f32[]", "f32[64,32]", ...], ...]``."""
    found = []
    for line in compiled.as_text().splitlines():
        if m := re.search(r"= (.*?) all-reduce(?:-start)?\(", line):
            found.append(re.findall(r"[a-z]+\d*\[[\d,]*\]", m[1]))
    return found


def on_one_device(tree):
    return jax.device_put(tree, CPUS[0])


# ----------------------------------------------------------------- data parallel

SIZES = (64, 32, 10)  # the digits MLP's shape
BATCH = 64  # 8 rows per device


def digits_like(layout="in_out"):
    params = tuple(
        layer(2 * i, n_in, n_out, layout)
        for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True))
    )
    # x and labels stay on the host: no eager abs, and no slicing program compiled to
    # split a device array into the mesh's shards.
    x = np.abs(np.asarray(normal(50, (BATCH, SIZES[0]))))
    labels = np.random.default_rng(51).integers(0, SIZES[-1], BATCH, dtype=np.int32)
    return params, x, labels


def mlp_loss(params, x, labels):
    return jaxlinear.softmax_cross_entropy(jaxlinear.mlp_apply(params, x), labels)


def plain_mlp_loss(params, x, labels):
    h = x
    for p in params[:-1]:
        h = jax.nn.relu(plain_linear(p, h))
    logp = jax.nn.log_softmax(plain_linear(params[-1], h))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_data_parallel_gradients_equal_single_device(layout):
    m = mesh((NUM_DEVICES,), ("data",))
    replicated, rows = NamedSharding(m, P()), NamedSharding(m, P("data"))
    params, x, labels = digits_like(layout)
    sharded = jax.jit(
        jax.value_and_grad(mlp_loss),
        in_shardings=(replicated, rows, rows),
        out_shardings=(replicated, replicated),
    )
    loss, grads = sharded(params, x, labels)
    # The references on one device, in one program: jaxlinear's and the plain formula's.
    (single_loss, single_grads), (plain_loss, plain_grads) = jax.jit(
        lambda *a: (jax.value_and_grad(mlp_loss)(*a), jax.value_and_grad(plain_mlp_loss)(*a))
    )(*on_one_device((params, x, labels)))
    assert_close(loss, single_loss, F32)
    assert_tree_close(grads, single_grads, F32)
    assert_close(loss, plain_loss, F32)
    assert_tree_close(grads, plain_grads, F32)
    # Every device holds the full (all-reduced) gradient.
    for g in jax.tree.leaves(grads):
        assert g.sharding.is_fully_replicated and len(g.sharding.device_set) == NUM_DEVICES


def adam_step(loss_fn, optimizer):
    def step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def test_train_step_has_a_single_all_reduce():
    """The compiled data-parallel Adam step communicates once: one all-reduce
    that carries the loss and every gradient, and no other collective.

    What happens: the SPMD partitioner gives each device the local partial sums
    of the loss and of dW = xᵀg and db = Σg over its 8 rows and inserts one
    all-reduce per gradient leaf plus one for the loss (5, seen with the
    combiner disabled); XLA:CPU's all-reduce combiner then merges these
    independent, small all-reduces into a single tuple-shaped all-reduce. The
    Adam update is element-wise on replicated values and needs no collective.
    The plain formula under autodiff compiles to the same collectives.
    """
    m = mesh((NUM_DEVICES,), ("data",))
    replicated, rows = NamedSharding(m, P()), NamedSharding(m, P("data"))
    params, x, labels = digits_like()
    optimizer = optax.adam(1e-2)
    opt_state = jax.jit(optimizer.init)(params)  # one program, not one per zeros leaf
    shardings = dict(
        in_shardings=(replicated, replicated, rows, rows),
        out_shardings=(replicated, replicated, replicated),
    )
    # Optax's Adam raises a float to an int32 step count: standard promotion.
    with jax.numpy_dtype_promotion("standard"):
        lowered = {
            name: jax.jit(adam_step(fn, optimizer), **shardings).lower(params, opt_state, x, labels)
            for name, fn in (("jaxlinear", mlp_loss), ("plain", plain_mlp_loss))
        }
        single = jax.jit(adam_step(mlp_loss, optimizer)).lower(
            *on_one_device((params, opt_state, x, labels))
        )
    single = single.compile()
    step = lowered["jaxlinear"].compile()
    gradient_shapes = sorted(
        jax.typeof(a).str_short(short_dtypes=True) for a in jax.tree.leaves(params)
    )
    assert collectives(step) == Counter({"all-reduce": 1})
    [combined] = all_reduce_shapes(step)
    assert sorted(combined) == sorted(["f32[]", *gradient_shapes])

    uncombined = lowered["jaxlinear"].compile(compiler_options=COMBINER)
    assert sorted(map(tuple, all_reduce_shapes(uncombined))) == sorted(
        [("f32[]",)] + [(s,) for s in gradient_shapes]
    )
    assert collectives(lowered["plain"].compile()) == collectives(step)
    assert collectives(lowered["plain"].compile(compiler_options=COMBINER)) == collectives(
        uncombined
    )

    # Three steps on the mesh follow three steps on one device.
    state, state_1 = (params, opt_state), on_one_device((params, opt_state))
    for _ in range(3):
        *state, loss = step(*state, x, labels)
        *state_1, loss_1 = single(*state_1, *on_one_device((x, labels)))
        assert_close(loss, loss_1, F32)
        assert_tree_close(state[0], state_1[0], F32)


# ---------------------------------------------------------------- model parallel

#: (layout, sharded feature axis) -> the W axis that holds it.
W_AXIS = {
    ("in_out", "out"): 1,
    ("in_out", "in"): 0,
    ("out_in", "out"): 0,
    ("out_in", "in"): 1,
}

# Expected collectives on an 8-device "model" axis (the same for the plain
# formula under autodiff, checked too):
# * W split along out_features: each device computes its own columns of y, so
#   the forward has no collective. In the backward, dx = g Wᵀ contracts the
#   sharded axis: partial sums, one all-reduce (combined with the loss's).
# * W split along in_features: y = x W contracts the sharded axis, so the
#   forward is partial sums and one all-reduce; dx = g Wᵀ and dW = xᵀ g are
#   then local to each device's slice of in_features, and dx, split along
#   in_features, is all-gathered only when x (so dx) is asked to be replicated.
AR, AG = "all-reduce", "all-gather"
MODEL_PARALLEL_CASES = [
    # (layout, sharded axis, x split along its features?, forward collectives,
    #  value-and-grad collectives)
    ("in_out", "out", False, {}, {AR: 1}),
    ("out_in", "out", False, {}, {AR: 1}),
    ("in_out", "in", False, {AR: 1}, {AR: 1, AG: 1}),
    ("out_in", "in", False, {AR: 1}, {AR: 1, AG: 1}),
    ("in_out", "in", True, {AR: 1}, {AR: 1}),
    ("out_in", "in", True, {AR: 1}, {AR: 1}),
]


@pytest.mark.parametrize(
    "layout,axis,x_split,expected_fwd,expected_step",
    MODEL_PARALLEL_CASES,
    ids=[f"{c[0]}-W_by_{c[1]}{'-x_by_in' if c[2] else ''}" for c in MODEL_PARALLEL_CASES],
)
def test_model_parallel_weight(layout, axis, x_split, expected_fwd, expected_step):
    m = mesh((NUM_DEVICES,), ("model",))
    spec = [None, None]
    spec[W_AXIS[layout, axis]] = "model"
    p_sharding = LinearParams(
        NamedSharding(m, P(*spec)),
        NamedSharding(m, P("model") if axis == "out" else P()),
        layout,
    )
    x_sharding = NamedSharding(m, P(None, "model") if x_split else P())
    # Inputs on the host: no slicing program compiled to split device arrays into shards.
    params, x = jax.tree.map(np.asarray, layer(60, 32, 16, layout)), np.asarray(normal(62, (4, 32)))

    def loss(apply):
        return lambda p, x: jnp.sum(jnp.sin(apply(p, x)))

    def compiled(apply):
        fwd = jax.jit(apply, in_shardings=(p_sharding, x_sharding)).lower(params, x).compile()
        step = jax.jit(
            jax.value_and_grad(loss(apply), argnums=(0, 1)),
            in_shardings=(p_sharding, x_sharding),
            out_shardings=(NamedSharding(m, P()), (p_sharding, x_sharding)),
        )
        return fwd, step.lower(params, x).compile()

    fwd, step = compiled(linear_apply)
    plain_fwd, plain_step = compiled(plain_linear)
    assert collectives(fwd) == collectives(plain_fwd) == Counter(expected_fwd)
    assert collectives(step) == collectives(plain_step) == Counter(expected_step)

    # The references on one device, in one program: jaxlinear's forward and
    # value-and-grad, and the plain formula's gradients.
    ref_y, (ref_value, ref_grads), plain_grads = jax.jit(
        lambda p, x: (
            linear_apply(p, x),
            jax.value_and_grad(loss(linear_apply), argnums=(0, 1))(p, x),
            jax.grad(loss(plain_linear), argnums=(0, 1))(p, x),
        )
    )(*on_one_device((params, x)))
    assert_close(fwd(params, x), ref_y, F32)
    value, (g_params, g_x) = step(params, x)
    assert_close(value, ref_value, F32)
    assert_tree_close((g_params, g_x), ref_grads, F32)
    assert_tree_close((g_params, g_x), plain_grads, F32)
    # The gradient of W lives where W lives.
    assert g_params.W.sharding.is_equivalent_to(p_sharding.W, 2)


def test_data_and_model_parallel_mlp():
    """A 4 x 2 mesh: the batch split 4 ways ("data"), and a Megatron-style MLP
    split 2 ways ("model"): W1 by out_features (column-parallel, with its
    bias), W2 by in_features (row-parallel), so the hidden activations never
    move and the forward needs one all-reduce over "model" (the partial sums of
    h W2). The value-and-grad step adds one more, over "data", that carries
    the loss and every weight gradient (combined, as in the data-parallel
    step). The plain formula under autodiff compiles to the same collectives.
    """
    m = mesh((4, 2), ("data", "model"))

    def s(*spec):
        return NamedSharding(m, P(*spec))

    # Inputs on the host: no slicing program compiled to split device arrays into shards.
    params = jax.tree.map(np.asarray, (layer(70, 16, 32), layer(72, 32, 8)))
    x = np.asarray(normal(74, (32, 16)))
    labels = np.random.default_rng(75).integers(0, 8, 32, dtype=np.int32)
    p_sharding = (
        LinearParams(s(None, "model"), s("model")),
        LinearParams(s("model", None), s()),
    )

    def compiled(loss_fn):
        step = jax.jit(
            jax.value_and_grad(loss_fn),
            in_shardings=(p_sharding, s("data", None), s("data")),
            out_shardings=(s(), p_sharding),
        )
        return step.lower(params, x, labels).compile()

    fwd = (
        jax.jit(jaxlinear.mlp_apply, in_shardings=(p_sharding, s("data", None)))
        .lower(params, x)
        .compile()
    )
    assert collectives(fwd) == Counter({"all-reduce": 1})
    step = compiled(mlp_loss)
    assert collectives(step) == collectives(compiled(plain_mlp_loss)) == Counter({"all-reduce": 2})

    # The references on one device, in one program: jaxlinear's forward and
    # value-and-grad, and the plain formula's gradients.
    ref_y, (ref_value, ref_grads), plain_grads = jax.jit(
        lambda p, x, labels: (
            jaxlinear.mlp_apply(p, x),
            jax.value_and_grad(mlp_loss)(p, x, labels),
            jax.grad(plain_mlp_loss)(p, x, labels),
        )
    )(*on_one_device((params, x, labels)))
    assert_close(fwd(params, x), ref_y, F32)
    value, grads = step(params, x, labels)
    assert_close(value, ref_value, F32)
    assert_tree_close(grads, ref_grads, F32)
    assert_tree_close(grads, plain_grads, F32)


def test_explicit_sharding_mode():
    """``jax.make_mesh`` defaults to ``AxisType.Explicit`` axes, where every
    ``dot_general`` that contracts a sharded axis on both sides must be told its
    output sharding. The hand-derived backward gives dx x's sharding and dW W's
    (as JAX's own transpose rule for ``dot_general`` does), so ``dW = xᵀ g``,
    contracting the batch axis sharded on both sides, traces, and the compiled
    step has the same single all-reduce as in Auto mode."""
    m = mesh((NUM_DEVICES,), ("data",), AxisType.Explicit)
    replicated, rows = NamedSharding(m, P()), NamedSharding(m, P("data"))
    single = on_one_device(digits_like())
    single_loss, single_grads = jax.jit(jax.value_and_grad(mlp_loss))(*single)
    params, x, labels = digits_like()
    params = jax.device_put(params, replicated)
    x, labels = jax.device_put(x, rows), jax.device_put(labels, rows)

    plain_loss, plain_grads = jax.jit(jax.value_and_grad(plain_mlp_loss))(params, x, labels)
    assert_close(plain_loss, single_loss, F32)
    assert_tree_close(plain_grads, single_grads, F32)

    compiled = jax.jit(jax.value_and_grad(mlp_loss)).lower(params, x, labels).compile()
    assert collectives(compiled) == Counter({"all-reduce": 1})
    loss, grads = compiled(params, x, labels)
    assert_close(loss, single_loss, F32)
    assert_tree_close(grads, single_grads, F32)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("axis", ["in", "out"])
def test_explicit_sharding_model_parallel_weight(layout, axis):
    """Explicit axes with W split along either feature axis: the cotangents keep
    their primals' shardings, and values and gradients equal one device's."""
    m = mesh((NUM_DEVICES,), ("model",), AxisType.Explicit)
    spec = [None, None]
    spec[W_AXIS[layout, axis]] = "model"
    params, x = layer(70, 32, 16, layout), normal(72, (4, 32))
    sharded = LinearParams(  # placed from host copies: no slicing program per shard shape
        jax.device_put(np.asarray(params.W), NamedSharding(m, P(*spec))),
        jax.device_put(
            np.asarray(params.b), NamedSharding(m, P("model") if axis == "out" else P())
        ),
        layout,
    )
    x_rep = jax.device_put(x, NamedSharding(m, P()))

    def loss(p, x):
        return jnp.sum(jnp.sin(linear_apply(p, x)))

    value, (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(sharded, x_rep)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        *on_one_device((params, x))
    )
    assert_close(value, ref_value, F32)
    assert_tree_close((g_params, g_x), ref_grads, F32)
    assert g_params.W.sharding.is_equivalent_to(sharded.W.sharding, 2)


def small_problem():
    W = jnp.asarray(normal(60, (4, 3), 0.5))
    b = jnp.asarray(normal(61, (3,)))
    x = jnp.asarray(normal(62, (16, 4)))
    return W, b, x


def sq(apply):
    return lambda W, b, x: jnp.sum(jnp.tanh(apply(LinearParams(W, b), x)) ** 2)


def test_shard_map_grad_jvp_and_grad_of_shard_map():
    """Inside ``shard_map`` (x split by rows, W and b replicated, so they vary over
    fewer axes than x) the layer's VJP, JVP and the gradient of the whole
    ``shard_map`` equal autodiff of the plain formula."""
    m = mesh((NUM_DEVICES,), ("data",))
    specs = dict(mesh=m, in_specs=(P(), P(), P("data")))

    def three(f):
        per_shard_grads = jax.shard_map(
            lambda W, b, x: jax.tree.map(
                lambda g: jax.lax.psum(g, "data"), jax.grad(f, (0, 1))(W, b, x)
            ),
            out_specs=P(),
            **specs,
        )
        per_shard_jvp = jax.shard_map(
            lambda W, b, x: jax.jvp(lambda x: f(W, b, x), (x,), (x,))[1][None],
            out_specs=P("data"),
            **specs,
        )
        total = jax.shard_map(
            lambda W, b, x: jax.lax.psum(f(W, b, x), "data"), out_specs=P(), **specs
        )
        return jax.jit(
            lambda *a: (per_shard_grads(*a), per_shard_jvp(*a), jax.grad(total, (0, 1, 2))(*a))
        )

    args = tuple(np.asarray(a) for a in small_problem())  # on the host: x is split by rows
    assert_tree_close(three(sq(linear_apply))(*args), three(sq(plain_linear))(*args), F32)


def test_explicit_mesh_with_uncommitted_parameters():
    """Explicit axes, x sharded by rows and W, b never placed on the mesh: the
    cotangents of W and b are replicated on it (dW = xᵀ g contracts the sharded
    rows), and the layer's type carries x's row sharding."""
    m = mesh((NUM_DEVICES,), ("data",), AxisType.Explicit)
    W, b, x = small_problem()
    with jax.set_mesh(m):
        xs = jax.device_put(np.asarray(x), NamedSharding(m, P("data")))  # split on the host
        y = jax.jit(lambda W, b, x: linear_apply(LinearParams(W, b), x))(W, b, xs)
        assert jax.typeof(y).sharding.spec == P("data", None)
        ours = jax.jit(jax.grad(sq(linear_apply), (0, 1, 2)))(W, b, xs)
        plain = jax.jit(jax.grad(sq(plain_linear), (0, 1, 2)))(W, b, xs)
        tangents = jax.jit(
            lambda x: [
                jax.jvp(lambda x, f=f: sq(f)(W, b, x), (x,), (x,))[1]
                for f in (linear_apply, plain_linear)
            ]
        )(xs)
    assert_tree_close(ours, plain, F32)
    assert_close(tangents[0], tangents[1], F32)
