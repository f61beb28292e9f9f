"""LinearParams as a pytree, and linear_init's distributions and layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlinear import LinearParams, linear_apply, linear_init
from tests.helpers import assert_close, normal

LAYOUTS = ["in_out", "out_in"]


def test_leaves_are_W_and_b_only_and_layout_is_static():
    ones = jax.device_put(np.ones((3, 4), np.float32))  # host-made: no fill program
    p = LinearParams(ones, jax.device_put(np.zeros(4, np.float32)), "out_in")
    leaves, treedef = jax.tree.flatten(p)
    assert len(leaves) == 2
    q = jax.tree.unflatten(treedef, [np.asarray(a) * 2 for a in leaves])
    assert q.layout == "out_in"
    np.testing.assert_array_equal(q.W, 2 * np.ones((3, 4)))
    assert len(jax.tree.leaves(LinearParams(ones))) == 1  # b=None: no leaf
    # Different layouts are different tree structures, so they cannot be mixed up.
    assert jax.tree.structure(p) != jax.tree.structure(LinearParams(p.W, p.b, "in_out"))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_optax_updates_params_directly_and_keeps_dtype(layout, dtype):
    p = linear_init(jax.random.key(0), 3, 2, layout=layout, dtype=dtype)
    x = np.ones((5, 3), dtype)
    opt = optax.sgd(0.1)

    def loss(p):
        return jnp.sum(linear_apply(p, x).astype(jnp.float32) ** 2)

    @jax.jit  # the gradient and the Optax step as one program, not op by op
    def step(p):
        grads = jax.grad(loss)(p)
        updates, _ = opt.update(grads, opt.init(p), p)
        return grads, optax.apply_updates(p, updates)

    grads, new = step(p)
    assert new.layout == layout
    assert new.W.dtype == new.b.dtype == dtype
    # SGD by hand in float32; Optax works in the parameters' dtype.
    expected_W = np.asarray(p.W, np.float32) - np.float32(0.1) * np.asarray(grads.W, np.float32)
    assert_close(new.W, expected_W, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shapes_and_fan_in_follow_the_layout(layout):
    # in=4, out=2000: PyTorch's bound is 1/sqrt(4) = 0.5 whatever the layout.
    p = linear_init(jax.random.key(1), 4, 2000, layout=layout, init="pytorch")
    assert p.W.shape == ((4, 2000) if layout == "in_out" else (2000, 4))
    assert (p.in_features, p.out_features) == (4, 2000)
    for a in (p.W, p.b):
        assert float(np.max(np.abs(a))) <= 0.5
        assert float(np.max(np.abs(a))) > 0.49  # the bound is reached, not a smaller one
    # Uniform on [-0.5, 0.5]: variance 1/12.
    np.testing.assert_allclose(float(np.var(np.asarray(p.W))), 1 / 12, rtol=0.05)


@pytest.mark.parametrize(
    "init,variance",
    [
        ("lecun_normal", lambda fi, fo: 1 / fi),
        ("he_normal", lambda fi, fo: 2 / fi),
        ("glorot_uniform", lambda fi, fo: 2 / (fi + fo)),
    ],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_named_initialisers_have_their_variance_and_zero_bias(init, variance, layout):
    fi, fo = 64, 512
    p = linear_init(jax.random.key(2), fi, fo, layout=layout, init=init)
    # 32768 samples: the sample variance is within ~2.5% (3 sigma) of the target.
    np.testing.assert_allclose(float(np.var(np.asarray(p.W))), variance(fi, fo), rtol=0.05)
    np.testing.assert_array_equal(p.b, np.zeros(fo))


def test_no_bias_dtype_and_callable_init():
    p = linear_init(
        jax.random.key(3), 3, 2, bias=False, dtype=jnp.bfloat16, init=jax.nn.initializers.ones
    )
    assert p.b is None
    assert p.W.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(p.W, np.float32), np.ones((3, 2)))
    q = linear_init(jax.random.key(3), 3, 2, layout="out_in", init=jax.nn.initializers.ones)
    np.testing.assert_array_equal(q.W, np.ones((2, 3)))


def test_same_key_same_layer_in_both_layouts():
    a = linear_init(jax.random.key(4), 5, 3, layout="in_out", init="pytorch")
    b = linear_init(jax.random.key(4), 5, 3, layout="out_in", init="pytorch")
    np.testing.assert_array_equal(a.W, np.asarray(b.W).T)
    x = normal(jax.random.key(5), (2, 5), jnp.float32)
    np.testing.assert_array_equal(linear_apply(a, x), linear_apply(b, x))


@pytest.mark.slow
@pytest.mark.parametrize(
    "init, dtype",
    [(name, jnp.float32) for name in ("lecun_normal", "he_normal", "glorot_uniform", "pytorch")]
    + [("lecun_normal", jnp.bfloat16), ("pytorch", jnp.float16), ("he_normal", jnp.float64)],
)
def test_compiled_named_initialisers_draw_what_the_initialisers_draw(init, dtype):
    """A named initialiser runs as one compiled program per configuration; the numbers
    are, to the bit, those of the initialiser called layer by layer outside it."""
    from jaxlinear import INITS, mlp_init

    sizes = (3, 4, 2)
    with jax.enable_x64(dtype == jnp.float64):
        key = jax.random.key(3)
        params = mlp_init(key, sizes, dtype=dtype, init=init, layout="out_in")
        keys = jax.random.split(key, len(sizes) - 1)
        for p, k, n_in, n_out in zip(params, keys, sizes[:-1], sizes[1:], strict=True):
            W, b = INITS[init](k, n_in, n_out, np.dtype(dtype))
            b = np.zeros(n_out, dtype) if b is None else b
            for got, want in ((p.W, np.asarray(W).T), (p.b, b)):
                assert got.dtype == want.dtype == dtype
                np.testing.assert_array_equal(
                    np.asarray(got, np.float64), np.asarray(want, np.float64)
                )
    with pytest.raises(TypeError):
        INITS["lecun_normal"] = None  # read-only: a compiled initialiser cannot go stale
