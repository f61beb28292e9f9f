"""Per-example gradient norms and clipped gradients (ghost clipping) against vmap(grad).

The reference materialises every example's gradient with ``jax.vmap(jax.grad)``
of the same ``loss_fn`` on a batch of one, then takes norms and the clipped
mean. The ghost versions must agree within the per-dtype autodiff tolerance of
``jaxlinear.TOLERANCES`` (the two compute the same products in a different
order), and refuse, with a message naming the parameter, whatever they cannot
compute exactly.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlinear
from jaxlinear import (
    LinearParams,
    _taps,
    clipped_grad,
    linear_apply,
    mlp_apply,
    mlp_init,
    per_example_grad_norms,
)
from tests.helpers import (
    assert_close,
    assert_tree_close,
    dtype_context,
    int_labels,
    mlp_params,
    normal,
    plain_linear,
)

F32, F64 = jnp.float32, jnp.float64
CLIP = 0.7  # below the typical norm here (~1-3), so most examples are clipped


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


def sq_loss(y, t):
    """0.5 ‖yᵢ − tᵢ‖² per example: jaxlinear.mse_loss per row (reduction="none"),
    summed over every row axis of an example but the first (a sequence's steps)."""
    per_row = jaxlinear.mse_loss(y, t, reduction="none")
    return jnp.sum(per_row, axis=tuple(range(1, per_row.ndim)))


def mlp_loss(activation=jaxlinear.relu):
    def loss_fn(params, batch):
        x, t = batch
        return sq_loss(mlp_apply(params, x, activation=activation), t)

    return loss_fn


def reference(loss_fn, params, batch, l2_clip):
    """(norms, clipped mean) from materialised per-example gradients."""

    def one(example):
        single = jax.tree.map(lambda a: a[None], example)
        return jax.grad(lambda p: loss_fn(p, single)[0])(params)

    grads = jax.vmap(one)(batch)
    leaves = jax.tree.leaves(grads)
    acc = F64 if any(leaf.dtype == F64 for leaf in leaves) else F32
    B = leaves[0].shape[0]
    norms = jnp.sqrt(sum(jnp.sum(leaf.astype(acc).reshape(B, -1) ** 2, axis=1) for leaf in leaves))
    scale = jnp.minimum(1, l2_clip / jnp.maximum(norms, jnp.finfo(acc).tiny))

    def mean(g):
        s = scale.reshape((B,) + (1,) * (g.ndim - 1))
        return jnp.mean(g.astype(acc) * s, axis=0).astype(g.dtype)

    return norms, jax.tree.map(mean, grads)


def check_against_reference(loss_fn, params, batch, dtype, l2_clip=CLIP):
    """Both public functions and the reference, compiled as one program (one compile)."""

    def all_three(p, b):
        return (
            per_example_grad_norms(loss_fn, p, b),
            clipped_grad(loss_fn, p, b, l2_clip),
            reference(loss_fn, p, b, l2_clip),
        )

    norms, (grads, norms2), (ref_norms, ref_grads) = jax.jit(all_three)(params, batch)
    assert norms.dtype == ref_norms.dtype
    assert_close(norms, ref_norms, dtype, err_msg="per_example_grad_norms")
    assert_close(norms2, ref_norms, dtype, err_msg="clipped_grad norms")
    assert_tree_close(grads, ref_grads, dtype)
    return norms, grads


def data(key, B, seq, sizes, dtype):
    """Inputs and targets: two independent host streams of one key (no split kernel)."""
    x = normal(key, (B, *seq, sizes[0]), dtype, stream=1)
    t = normal(key, (B, *seq, sizes[-1]), dtype, stream=2)
    return x, t


ARCHS = {
    "depth1": ((5, 3), jaxlinear.relu),
    "depth2-sigmoid": ((5, 7, 3), jaxlinear.sigmoid),
    "depth3-relu": ((5, 8, 6, 3), jaxlinear.relu),
}
SEQS = {"flat": (), "seq3": (3,), "seq2x40": (2, 40)}  # seq2x40: T² > in·out, explicit path


# Every architecture with every input shape in float32, bias on and off in turn; a
# float64 case for each architecture and shape, with the other bias setting.
CASES = [
    pytest.param(arch, (i + j) % 2 == 0, seq, F32, id=f"{arch}-{s}-f32")
    for i, arch in enumerate(ARCHS)
    for j, (s, seq) in enumerate(SEQS.items())
] + [
    pytest.param(arch, i % 2 == 1, seq, F64, id=f"{arch}-{s}-f64")
    for i, (arch, (s, seq)) in enumerate(zip(ARCHS, SEQS.items(), strict=True))
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "bias", "seq", "dtype"), CASES)
def test_mlp_matches_vmap_grad(arch, bias, seq, dtype):
    sizes, activation = ARCHS[arch]
    with dtype_context(dtype):
        params = mlp_params(0, sizes, bias=bias, dtype=dtype, init="pytorch")
        batch = data(jax.random.key(1), 5, seq, sizes, dtype)
        norms, _ = check_against_reference(mlp_loss(activation), params, batch, dtype)
        assert norms.shape == (5,)
        assert norms.dtype == dtype
        # The clip is active for some examples and not others in most cases; the
        # comparison above covers both branches of min(1, C/‖g‖).
        assert float(np.max(np.asarray(norms))) > CLIP


@pytest.mark.parametrize("seq", [(), (4,)], ids=["flat", "seq4"])
def test_out_in_layout_and_tanh(seq):
    params = mlp_params(2, (4, 6, 2), layout="out_in", init="pytorch")
    check_against_reference(
        mlp_loss(jaxlinear.tanh), params, data(jax.random.key(3), 6, seq, (4, 2), F32), F32
    )


@pytest.mark.parametrize("seq", [(), (3,)], ids=["flat", "seq3"])
def test_batch_of_one(seq):
    params = mlp_params(4, (4, 5, 2), init="pytorch")
    norms, _ = check_against_reference(
        mlp_loss(), params, data(jax.random.key(5), 1, seq, (4, 2), F32), F32
    )
    assert norms.shape == (1,)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_empty_batch_gives_no_norms_and_zero_gradients(dtype):
    with dtype_context(dtype):
        params = mlp_params(6, (4, 5, 2), dtype=dtype)
        batch = data(jax.random.key(7), 0, (), (4, 2), dtype)
        norms, (grads, norms2) = jax.jit(
            lambda p, b: (
                per_example_grad_norms(mlp_loss(), p, b),
                clipped_grad(mlp_loss(), p, b, 1.0),
            )
        )(params, batch)
        assert norms.shape == norms2.shape == (0,)
        assert norms.dtype == dtype
        for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
            assert g.shape == p.shape and g.dtype == p.dtype
            np.testing.assert_array_equal(g, np.zeros(p.shape))


def test_per_example_cross_entropy_from_the_library():
    """Per-example losses from softmax_cross_entropy(..., reduction="none"), and the
    same losses from the mean-reduced rule vmapped over single rows."""
    params = mlp_params(8, (6, 16, 4), init="he_normal")
    x = normal(jax.random.key(9), (7, 6), F32)
    labels = int_labels(10, (7,), 4)

    def loss_fn(params, batch):
        x, labels = batch
        return jaxlinear.softmax_cross_entropy(mlp_apply(params, x), labels, reduction="none")

    def vmapped(params, batch):
        x, labels = batch
        logits = mlp_apply(params, x)
        return jax.vmap(jaxlinear.softmax_cross_entropy)(logits[:, None], labels[:, None])

    check_against_reference(loss_fn, params, (x, labels), F32, l2_clip=0.5)
    both = jax.jit(lambda p, b: (loss_fn(p, b), vmapped(p, b)))  # one program, not op by op
    assert_close(*both(params, (x, labels)), F32)


def test_matches_materialised_gradients_of_the_plain_formula():
    """Independent of jaxlinear's own backward: per-example gradients of an einsum MLP."""
    params = mlp_params(11, (5, 6, 3), init="pytorch")
    batch = data(jax.random.key(12), 4, (3,), (5, 3), F32)

    def plain_loss(params, batch):
        x, t = batch
        h = jax.nn.relu(plain_linear(params[0], x))
        return sq_loss(plain_linear(params[1], h), t)

    (grads, norms), (ref_norms, ref_grads) = jax.jit(
        lambda p, b: (clipped_grad(mlp_loss(), p, b, CLIP), reference(plain_loss, p, b, CLIP))
    )(params, batch)
    assert_close(norms, ref_norms, F32)
    assert_tree_close(grads, ref_grads, F32)


@pytest.mark.parametrize("seq", [(), (3,)], ids=["flat", "seq3"])
def test_shared_weight_used_by_several_calls(seq):
    """One square W applied twice, and the same W read as its transpose ('out_in')."""
    key = jax.random.key(13)
    W = normal(key, (4, 4), F32, 0.5, stream=1)
    params = {"W": W, "b": normal(key, (4,), F32, stream=2)}

    def loss_fn(params, batch):
        x, t = batch
        layer = LinearParams(params["W"], params["b"])
        transposed = LinearParams(params["W"], None, "out_in")
        h = jaxlinear.tanh(linear_apply(layer, x))
        h = jaxlinear.tanh(linear_apply(layer, h))
        return sq_loss(linear_apply(transposed, h), t)

    check_against_reference(loss_fn, params, data(jax.random.key(14), 5, seq, (4, 4), F32), F32)


def test_parameter_bias_with_a_fixed_weight():
    W = normal(jax.random.key(15), (3, 2), F32)

    def loss_fn(params, batch):
        x, t = batch
        return sq_loss(linear_apply(LinearParams(W, params["b"]), x), t)

    params = {"b": jax.device_put(np.zeros(2, np.float32))}
    check_against_reference(loss_fn, params, data(jax.random.key(16), 4, (2,), (3, 2), F32), F32)


def test_unused_float_leaf_gets_a_zero_gradient():
    params = {"mlp": mlp_params(17, (3, 2)), "unused": jax.device_put(np.ones(5, np.float32))}

    def loss_fn(params, batch):
        return mlp_loss()(params["mlp"], batch)

    batch = data(jax.random.key(18), 4, (), (3, 2), F32)
    _, grads = check_against_reference(loss_fn, params, batch, F32)
    np.testing.assert_array_equal(grads["unused"], np.zeros(5))


def test_stop_gradient_use_is_not_a_gradient_path():
    params = mlp_params(19, (3, 4, 2))

    def loss_fn(params, batch):
        penalty = jnp.sum(jax.lax.stop_gradient(params[0].W) ** 2)
        return mlp_loss()(params, batch) + penalty

    check_against_reference(loss_fn, params, data(jax.random.key(20), 4, (), (3, 2), F32), F32)


def test_bfloat16_with_float32_accumulation_keeps_dtypes():
    tol_dtype = jnp.bfloat16
    params = mlp_params(21, (6, 8, 3), dtype=jnp.bfloat16, init="pytorch")
    x, t = data(jax.random.key(22), 5, (), (6, 3), jnp.bfloat16)

    def loss_fn(params, batch):
        x, t = batch
        h = jaxlinear.relu(linear_apply(params[0], x, preferred_element_type=F32))
        y = linear_apply(params[1], h.astype(jnp.bfloat16), preferred_element_type=F32)
        return sq_loss(y, t.astype(F32))

    (grads, norms), (ref_norms, ref_grads) = jax.jit(
        lambda p, b: (clipped_grad(loss_fn, p, b, CLIP), reference(loss_fn, p, b, CLIP))
    )(params, (x, t))
    assert norms.dtype == F32
    assert [g.dtype for g in jax.tree.leaves(grads)] == [jnp.bfloat16] * 4
    assert_close(norms, ref_norms, tol_dtype)
    assert_tree_close(grads, ref_grads, tol_dtype)


# --- clipping semantics ------------------------------------------------------------------


def test_large_clip_gives_the_ordinary_mean_gradient():
    params = mlp_params(23, (4, 6, 2))
    batch = data(jax.random.key(24), 6, (), (4, 2), F32)
    (grads, norms), expected = jax.jit(
        lambda p: (
            clipped_grad(mlp_loss(), p, batch, 1e6),
            jax.grad(lambda p: jnp.mean(mlp_loss()(p, batch)))(p),
        )
    )(params)
    assert float(np.max(np.asarray(norms))) < 1e6
    assert_tree_close(grads, expected, F32)


def test_tiny_clip_bounds_the_mean_by_the_clip():
    params = mlp_params(25, (4, 6, 2))
    batch = data(jax.random.key(26), 6, (), (4, 2), F32)
    C = 1e-3
    grads, norms = jax.jit(lambda p: clipped_grad(mlp_loss(), p, batch, C))(params)
    assert bool(np.all(np.asarray(norms) > C))
    total = np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(grads)))
    assert float(total) <= C * (1 + 1e-5)


def test_examples_with_zero_gradient_are_finite_and_unscaled():
    """A mask zeroes some losses (as Poisson-sampled DP-SGD does): norms 0, no NaN."""
    params = mlp_params(27, (4, 6, 2))
    x, t = data(jax.random.key(28), 6, (), (4, 2), F32)
    mask = np.array([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], np.float32)

    def loss_fn(params, batch):
        x, t, mask = batch
        return mask * sq_loss(mlp_apply(params, x), t)

    norms, grads = check_against_reference(loss_fn, params, (x, t, mask), F32)
    np.testing.assert_array_equal(np.asarray(norms)[[1, 3, 4]], 0.0)
    assert all(bool(np.all(np.isfinite(g))) for g in jax.tree.leaves(grads))


# --- transformations ---------------------------------------------------------------------


def test_jit_does_not_retrace_and_accepts_a_traced_clip():
    params = mlp_params(29, (4, 6, 2))
    batch = data(jax.random.key(30), 6, (), (4, 2), F32)
    traces = []

    def loss_fn(params, batch):
        traces.append(None)
        return mlp_loss()(params, batch)

    step = jax.jit(lambda p, b, c: clipped_grad(loss_fn, p, b, c))
    g1, _ = step(params, batch, 0.5)
    n_traces = len(traces)
    g2, _ = step(params, batch, 0.25)
    assert len(traces) == n_traces == 2, "traced loss_fn more than twice, or retraced"
    ref = jax.jit(lambda p, c: reference(mlp_loss(), p, batch, c)[1])
    ref1, ref2 = ref(params, 0.5), ref(params, 0.25)
    assert_tree_close(g1, ref1, F32)
    assert_tree_close(g2, ref2, F32)


def test_vmap_over_an_ensemble_of_parameters():
    stack = jax.jit(
        lambda key: jax.vmap(lambda k: mlp_init(k, (4, 5, 2)))(jax.random.split(key, 3))
    )(jax.random.key(31))
    batch = data(jax.random.key(32), 6, (), (4, 2), F32)
    norms, ref_norms = jax.jit(
        lambda s: (
            jax.vmap(lambda p: per_example_grad_norms(mlp_loss(), p, batch))(s),
            jax.lax.map(lambda p: reference(mlp_loss(), p, batch, CLIP)[0], s),
        )
    )(stack)
    assert norms.shape == (3, 6)
    assert_close(norms, ref_norms, F32)


def test_an_optax_step_inside_scan():
    params = mlp_params(33, (4, 6, 2))
    xs, ts = data(jax.random.key(34), 3 * 5, (), (4, 2), F32)
    batches = (np.asarray(xs).reshape(3, 5, 4), np.asarray(ts).reshape(3, 5, 2))
    tx = optax.sgd(0.1)

    def step(carry, batch):
        params, state = carry
        grads, norms = clipped_grad(mlp_loss(), params, batch, CLIP)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), norms

    (trained, _), norms = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), batches))(params)
    assert norms.shape == (3, 5)

    def reference_step(p, batch):
        _, g = reference(mlp_loss(), p, batch, CLIP)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

    expected, _ = jax.jit(lambda p: jax.lax.scan(reference_step, p, batches))(params)
    assert_tree_close(trained, expected, F32)


# --- refusals ----------------------------------------------------------------------------

PARAMS = mlp_params(40, (3, 4, 2))
BATCH = (jax.device_put(np.ones((5, 3), np.float32)), jax.device_put(np.zeros((5, 2), np.float32)))


def test_a_scale_vector_is_refused_by_path():
    params = {"mlp": PARAMS, "scale": jax.device_put(np.ones(2, np.float32))}

    def loss_fn(params, batch):
        x, t = batch
        return sq_loss(mlp_apply(params["mlp"], x) * params["scale"][None], t)

    text = "`params['scale']` (shape (2,)) is not the `W` or `b` of any jaxlinear.linear_apply"
    with raises(ValueError, text):
        per_example_grad_norms(loss_fn, params, BATCH)
    with raises(ValueError, text):
        jax.jit(lambda p, b: clipped_grad(loss_fn, p, b, 1.0))(params, BATCH)
    assert _taps.active() == (), "a tap leaked past an error"


def test_an_integer_leaf_is_refused():
    params = {"mlp": PARAMS, "step": jax.device_put(np.int32(3))}
    with raises(TypeError, "`params['step']` is int32. Pass non-trainable values through"):
        per_example_grad_norms(lambda p, b: mlp_loss()(p["mlp"], b), params, BATCH)


def test_a_weight_penalty_inside_the_loss_is_refused():
    def loss_fn(params, batch):
        return mlp_loss()(params, batch) + 1e-3 * jnp.sum(params[1].W ** 2)

    with raises(ValueError, "`params[1].W` is used by `loss_fn` outside jaxlinear.linear_apply"):
        clipped_grad(loss_fn, PARAMS, BATCH, 1.0)


def test_weight_tying_through_a_transpose_is_refused():
    params = {"W": jax.device_put(np.ones((3, 3), np.float32) / np.float32(3))}

    def loss_fn(params, batch):
        x, _ = batch
        h = linear_apply(LinearParams(params["W"]), x)
        return jnp.sum((h @ params["W"].T) ** 2, axis=-1)

    with raises(ValueError, "`params['W']` is used by `loss_fn` outside"):
        per_example_grad_norms(loss_fn, params, BATCH)


def test_layers_under_vmap_inside_the_loss_are_refused():
    def loss_fn(params, batch):
        x, t = batch
        y = jax.vmap(lambda xi: mlp_apply(params, xi))(x)
        return sq_loss(y, t)

    with raises(ValueError, "`linear_apply` was called with `params[0].W` as its `W` under a JAX"):
        per_example_grad_norms(loss_fn, PARAMS, BATCH)
    assert _taps.active() == ()


@pytest.mark.parametrize("wrap", [jax.jit, jax.checkpoint], ids=["jit", "checkpoint"])
def test_layers_under_a_nested_transformation_are_refused(wrap):
    def loss_fn(params, batch):
        x, t = batch
        return sq_loss(wrap(mlp_apply)(params, x), t)

    with raises(ValueError, "`params[0].W` (shape (3, 4)) is not the `W` or `b` of any"):
        per_example_grad_norms(loss_fn, PARAMS, BATCH)


def test_a_weight_used_by_a_plain_matmul_is_refused():
    def loss_fn(params, batch):
        x, t = batch
        h = jnp.tanh(x @ params[0].W + params[0].b[None])  # not a jaxlinear layer
        return sq_loss(linear_apply(params[1], h), t)

    with raises(ValueError, "(linear_apply, mlp_apply) passed unchanged from `params`"):
        per_example_grad_norms(loss_fn, PARAMS, BATCH)


def test_taps_are_scoped_to_the_tracing_thread():
    """A tap is active only in the thread (context) that traces loss_fn: another
    thread's linear_apply meanwhile binds the plain layer and sees no tap."""
    import threading

    seen = {}
    started, release = threading.Event(), threading.Event()

    def loss_fn(params, batch):
        started.set()
        release.wait(timeout=30)
        x, t = batch
        return sq_loss(mlp_apply(params, x), t)

    def other():
        started.wait(timeout=30)
        seen["taps"] = _taps.active()
        seen["y"] = jax.jit(linear_apply)(PARAMS[0], BATCH[0])
        release.set()

    worker = threading.Thread(target=other)
    worker.start()
    norms = per_example_grad_norms(loss_fn, PARAMS, BATCH)
    worker.join()
    assert seen["taps"] == ()
    x, W, b = (np.asarray(a) for a in (BATCH[0], PARAMS[0].W, PARAMS[0].b))
    assert_close(seen["y"], x @ W + b[None], F32)
    ref = jax.jit(lambda p, batch: reference(mlp_loss(), p, batch, CLIP)[0])  # one program
    assert_close(norms, ref(PARAMS, BATCH), F32)


def test_a_layer_that_does_not_see_the_examples_is_refused():
    def loss_fn(params, batch):
        x, t = batch
        shared = linear_apply(params[0], x[0])  # one row for the whole batch
        y = mlp_apply(params[1:], jnp.broadcast_to(shared, (x.shape[0], 4)))
        return sq_loss(y, t)

    with raises(
        ValueError,
        "`linear_apply` call #0 (parameter `params[0].W`) got x.shape=(3,), but "
        "per-example gradients need the B=5 examples along x's leading axis",
    ):
        per_example_grad_norms(loss_fn, PARAMS, BATCH)


def test_a_mean_loss_is_refused():
    def loss_fn(params, batch):
        return jnp.mean(mlp_loss()(params, batch))

    with raises(ValueError, "must return one float array of per-example losses of shape (B,)"):
        per_example_grad_norms(loss_fn, PARAMS, BATCH)
    with raises(ValueError, "= (5,), B being the leading axis of `batch`; got float32[]"):
        per_example_grad_norms(loss_fn, PARAMS, BATCH)


def test_batch_checks():
    with raises(ValueError, "same leading (example) axis; got batch[0]: 5, batch[1]: 4"):
        per_example_grad_norms(
            mlp_loss(), PARAMS, (BATCH[0], jax.device_put(np.zeros((4, 2), np.float32)))
        )
    with raises(ValueError, "`batch[1]` is a scalar"):
        per_example_grad_norms(mlp_loss(), PARAMS, (BATCH[0], 0.0))
    with raises(ValueError, "`batch` must contain at least one array"):
        per_example_grad_norms(mlp_loss(), PARAMS, ())


def test_loss_fn_must_be_callable():
    with raises(TypeError, "`loss_fn` must be a callable loss_fn(params, batch)"):
        per_example_grad_norms("mse", PARAMS, BATCH)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_clip_must_be_positive_and_finite(bad):
    with raises(ValueError, f"positive, finite scalar (the clipping norm C); got {bad}."):
        clipped_grad(mlp_loss(), PARAMS, BATCH, bad)


def test_clip_must_be_a_scalar():
    with raises(ValueError, "`l2_clip` must be a positive scalar; got"):
        clipped_grad(mlp_loss(), PARAMS, BATCH, jax.device_put(np.ones(2, np.float32)))


def test_linear_apply_is_untouched_outside_the_taps():
    """The hook is only consulted while a tap is pushed: plain calls keep their result."""
    x = BATCH[0]
    before = linear_apply(PARAMS[0], x)
    per_example_grad_norms(mlp_loss(), PARAMS, BATCH)
    assert _taps.active() == ()
    np.testing.assert_array_equal(linear_apply(PARAMS[0], x), before)


# --- data parallelism --------------------------------------------------------------------


@pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices (tests/conftest.py)")
@pytest.mark.parametrize(
    "axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit], ids=str
)
def test_batch_sharded_across_devices(axis_type):
    """Examples split over 8 devices: the same values as one device, one all-reduce
    (the clipped sum), and gradients with their parameters' sharding."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,), devices=jax.devices("cpu")[:8])
    params = mlp_params(50, (6, 16, 3))
    batch = data(jax.random.key(51), 16, (), (6, 3), F32)
    step = jax.jit(lambda p, b: clipped_grad(mlp_loss(), p, b, CLIP))
    ref_grads, ref_norms = step(params, batch)
    params_r = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    # Split on the host, as a data loader would: no slicing program per device.
    batch_s = jax.device_put(
        jax.tree.map(np.asarray, batch), NamedSharding(mesh, PartitionSpec("data"))
    )
    compiled = step.lower(params_r, batch_s).compile()
    assert len(re.findall(r" all-reduce(?:-start)?\(", compiled.as_text())) == 1
    grads, norms = compiled(params_r, batch_s)
    assert_close(norms, ref_norms, F32)
    assert_tree_close(grads, ref_grads, F32)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params_r), strict=True):
        assert g.sharding.is_equivalent_to(p.sharding, g.ndim)
