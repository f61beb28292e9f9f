"""Bad input fails at trace time with a message naming the argument, expectation and value."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlinear import LinearParams, linear_apply, linear_backward, linear_init
from tests.helpers import cast, ones

W = ones((3, 4))
b = ones(4)
x = ones((2, 3))


def raises(exc, text):
    return pytest.raises(exc, match=re.escape(text))


def test_wrong_feature_size_names_both_numbers_and_the_layout():
    with raises(
        ValueError,
        "`x.shape[-1]` (=5) must equal in_features (=3) of W with layout "
        "'in_out' (W.shape=(3, 4)); got x.shape=(2, 5).",
    ):
        linear_apply(LinearParams(W, b), ones((2, 5)))


def test_wrong_layout_suggests_the_other_layout():
    with raises(ValueError, "pass layout='out_in' if it is"):
        linear_apply(LinearParams(W, b), ones((2, 4)))
    with raises(ValueError, "in_features (=4) of W with layout 'out_in'"):
        linear_apply(LinearParams(ones((3, 4)), ones(3), "out_in"), ones((2, 3)))


def test_errors_fire_at_trace_time_under_jit():
    with raises(ValueError, "`x.shape[-1]` (=5) must equal in_features (=3)"):
        jax.jit(linear_apply)(LinearParams(W, b), ones((2, 5)))


@pytest.mark.parametrize("bad_b", [ones(3), ones((1, 4)), ones(())])
def test_bias_of_the_wrong_shape(bad_b):
    with raises(
        ValueError,
        f"`b` must have shape (out_features,) = (4,) for W.shape=(3, 4) "
        f"with layout 'in_out'; got b.shape={bad_b.shape}.",
    ):
        linear_apply(LinearParams(W, bad_b), x)


@pytest.mark.parametrize("bad_W", [ones(3), ones((3, 4, 1))])
def test_W_not_2d(bad_W):
    with raises(
        ValueError,
        f"`W` must be 2-D (in_features, out_features) for layout 'in_out'; "
        f"got W.shape={bad_W.shape}.",
    ):
        linear_apply(LinearParams(bad_W), x)


def test_scalar_x():
    with raises(ValueError, "`x` must have at least one axis, (..., in_features); got a scalar."):
        linear_apply(LinearParams(W, b), ones(()))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64, jnp.uint8])
@pytest.mark.parametrize("which", ["x", "W", "b"])
def test_non_float_dtypes(which, dtype):
    args = {"x": x, "W": W, "b": b}
    args[which] = cast(args[which], dtype)
    with raises(
        TypeError,
        f"`{which}` must have a real floating dtype (float16, bfloat16, "
        f"float32, float64); got {np.dtype(dtype)}.",
    ):
        linear_apply(LinearParams(args["W"], args["b"]), args["x"])


def test_mixed_dtypes_are_refused_not_promoted():
    with raises(
        TypeError,
        "`x`, `W`, `b` must share one dtype; `x` is bfloat16, `W` is float32, `b` is float32. "
        "jaxlinear never promotes silently: cast explicitly, e.g. `W.astype(x.dtype)`.",
    ):
        linear_apply(LinearParams(W, b), cast(x, jnp.bfloat16))


def test_unknown_layout():
    with raises(ValueError, "`layout` must be one of ('in_out', 'out_in')"):
        LinearParams(W, b, "io")
    with raises(ValueError, "got 'OI'"):
        linear_backward(ones((2, 4)), x, W, layout="OI")
    with raises(ValueError, "`layout` must be one of"):
        linear_init(jax.random.key(0), 3, 4, layout="torch")


def test_params_must_be_linear_params():
    with raises(TypeError, "`params` must be a jaxlinear.LinearParams; got dict."):
        linear_apply({"W": W, "b": b}, x)


@pytest.mark.parametrize("g_shape", [(2, 3), (4,), (1, 2, 4)])
def test_grad_out_that_does_not_fit(g_shape):
    with raises(
        ValueError,
        "`grad_out` must have the shape of y = linear(x), x.shape[:-1] + "
        f"(out_features,) = (2, 4); got grad_out.shape={g_shape}.",
    ):
        linear_backward(ones(g_shape), x, W)


def test_linear_backward_checks_its_inputs_too():
    with raises(ValueError, "`x.shape[-1]` (=2) must equal in_features (=3)"):
        linear_backward(ones((2, 4)), ones((2, 2)), W)
    with raises(TypeError, "`grad_out` must have a real floating dtype"):
        linear_backward(ones((2, 4), np.int32), x, W)


def test_preferred_element_type_checks():
    with raises(TypeError, "`preferred_element_type` must be a real floating dtype"):
        linear_apply(LinearParams(W, b), x, preferred_element_type=jnp.int32)
    with raises(
        ValueError,
        "`preferred_element_type` must be a dtype that holds every float32 operand "
        "value exactly (float32, float64); got bfloat16.",
    ):
        linear_apply(LinearParams(W, b), x, preferred_element_type=jnp.bfloat16)
    # Same width is not enough: float16 cannot hold bfloat16's range, nor bfloat16
    # float16's digits.
    p16 = LinearParams(cast(W, jnp.bfloat16), cast(b, jnp.bfloat16))
    with raises(
        ValueError, "holds every bfloat16 operand value exactly (bfloat16, float32, float64)"
    ):
        linear_apply(p16, cast(x, jnp.bfloat16), preferred_element_type=jnp.float16)
    h16 = LinearParams(cast(W, jnp.float16), cast(b, jnp.float16))
    with raises(ValueError, "holds every float16 operand value exactly (float16, float32"):
        linear_apply(h16, cast(x, jnp.float16), preferred_element_type=jnp.bfloat16)


@pytest.mark.parametrize("precision", ["bogus", ["highest"], ("high", "nope"), 3.5])
def test_bad_precision(precision):
    with raises(ValueError, "`precision` must be None, one of 'default', 'high', 'highest'"):
        linear_apply(LinearParams(W, b), x, precision=precision)
    with raises(
        ValueError,
        "got " + repr(precision if not isinstance(precision, list) else tuple(precision)),
    ):
        jax.jit(lambda p, x: linear_apply(p, x, precision=precision))(LinearParams(W, b), x)


def test_init_argument_errors():
    key = jax.random.key(0)
    with raises(ValueError, "`in_features` must be a positive int; got 0."):
        linear_init(key, 0, 4)
    with raises(TypeError, "`out_features` must be a positive int; got 2.5."):
        linear_init(key, 3, 2.5)
    with raises(TypeError, "`in_features` must be a positive int; got True."):
        linear_init(key, True, 2)
    # NumPy integers (e.g. from np.array sizes) are ints too.
    assert linear_init(key, np.int64(3), np.int32(2)).W.shape == (3, 2)
    with raises(TypeError, "`dtype` must be a real floating dtype"):
        linear_init(key, 3, 4, dtype=jnp.int32)
    with raises(
        ValueError,
        "`init` must be one of ['glorot_uniform', 'he_normal', "
        "'lecun_normal', 'pytorch'] or a callable; got 'xavier'.",
    ):
        linear_init(key, 3, 4, init="xavier")
    with raises(
        ValueError,
        "`init` must return an array of shape (in_features, out_features) "
        "= (3, 4); got shape (4, 3).",
    ):
        linear_init(key, 3, 4, init=lambda k, s, d: jnp.zeros(s[::-1], d))


def test_new_argument_messages_in_full():
    """The messages issue 11 asked for, pinned word for word (the catalogue in
    tests/test_bad_calls.py checks fragments of many more)."""
    import jaxlinear as jl

    key = jax.random.key(0)
    expected_key = (
        "`key` must be a JAX PRNG key, jax.random.key(seed) (or a raw uint32[2] key from "
        "jax.random.PRNGKey(seed)); got "
    )
    with raises(TypeError, expected_key + "None."):
        linear_init(None, 3, 2)
    with raises(
        TypeError,
        expected_key + "the int 0. An integer seed is not a key: pass jax.random.key(seed).",
    ):
        jl.mlp_init(0, (3, 2))
    with raises(
        TypeError,
        "`sizes` must be a sequence of positive ints (input, hidden..., output), e.g. "
        "(4, 8, 1); got the int 4.",
    ):
        jl.mlp_init(key, 4)
    with raises(
        TypeError,
        "`activation` must be a callable, an element-wise function of a jax.Array such as "
        "jaxlinear.relu (or jaxlinear.tanh, jax.nn.gelu); got the str 'relu'.",
    ):
        jl.mlp_apply(jl.mlp_init(key, (3, 2)), x, activation="relu")
    with raises(
        TypeError,
        "`l2_clip` must be a real number, the clipping norm C > 0 (a Python float or a real "
        "scalar array); got the str '0.5'.",
    ):
        jl.clipped_grad(lambda p, b: jl.linear_apply(p, b).sum(-1), LinearParams(W, b), x, "0.5")
    with raises(
        TypeError,
        "`labels` must be an integer array of class indices, shape logits.shape[:-1]; "
        "got NoneType.",
    ):
        jl.softmax_cross_entropy(x, None)
