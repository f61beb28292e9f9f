"""Shared test utilities: dtype contexts, well-scaled inputs, backends, comparisons."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlinear.check import tolerance_for

DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16]
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]
PLATFORMS = ("cpu", "gpu", "tpu")


@contextlib.contextmanager
def dtype_context(dtype):
    """x64 on (scoped, never leaking) exactly when float64 is asked for."""
    if np.dtype(dtype) == np.float64:
        with jax.enable_x64(True):
            yield
    else:
        yield


def _rng(key, stream: int = 0) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key (and a stream number): drawing test
    inputs on the host compiles no random-number kernel per shape and dtype, which
    cost more CPU than most small tests themselves."""
    data = np.asarray(jax.random.key_data(key)).ravel().tolist()
    return np.random.default_rng([*data, stream])


def normal(key, shape, dtype, scale=1.0, *, stream: int = 0):
    """Standard-normal draws in float32, scaled, then cast (the same values up to
    rounding whatever the dtype)."""
    draws = _rng(key, stream).standard_normal(tuple(shape), dtype=np.float32)
    return jnp.asarray(np.float32(scale) * draws).astype(dtype)


def well_scaled_linear(key, in_features, out_features, batch, dtype, *, layout, bias):
    """x ~ N(0, 1) of shape batch + (in,), W ~ N(0, 1/in), b ~ N(0, 1)."""
    from jaxlinear import LinearParams

    kx, kw, kb = key, key, key  # three independent streams of one generator seed
    W = normal(kw, (in_features, out_features), dtype, 1.0 / np.sqrt(in_features), stream=1)
    if layout == "out_in":
        W = W.T
    b = normal(kb, (out_features,), dtype, stream=2) if bias else None
    x = normal(kx, tuple(batch) + (in_features,), dtype, stream=3)
    return LinearParams(W, b, layout), x


def assert_close(actual, expected, dtype, kind="autodiff", err_msg=""):
    """Element-wise check with the per-dtype table (`kind` is 'autodiff' or 'fd')."""
    rtol, atol = getattr(tolerance_for(dtype), kind)
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        np.asarray(expected, np.float64),
        rtol=rtol,
        atol=atol,
        err_msg=err_msg,
    )


def assert_tree_close(actual, expected, dtype, kind="autodiff"):
    la, ta = jax.tree.flatten(actual)
    le, te = jax.tree.flatten(expected)
    assert ta == te, f"tree structures differ: {ta} vs {te}"
    for i, (a, e) in enumerate(zip(la, le, strict=True)):
        assert a.shape == e.shape, f"leaf {i}: shape {a.shape} vs {e.shape}"
        assert a.dtype == e.dtype, f"leaf {i}: dtype {a.dtype} vs {e.dtype}"
        assert_close(a, e, dtype, kind, err_msg=f"leaf {i}")


def take(tree, i):
    """Entry ``i`` of every leaf of a stacked pytree."""
    return jax.tree.map(lambda a: a[i], tree)


def backend_params():
    """One pytest param per platform: the first device of each present backend,
    and a visible skip (with the reason) for each absent one."""
    params = []
    for platform in PLATFORMS:
        try:
            devices = jax.devices(platform)
        except RuntimeError:
            devices = []
        if devices:
            params.append(pytest.param(devices[0], id=platform))
        else:
            params.append(
                pytest.param(
                    None,
                    id=platform,
                    marks=pytest.mark.skip(reason=f"no {platform.upper()} backend present"),
                )
            )
    return params


def plain_linear(params, x):
    """The linear layer written for autodiff: einsum plus an explicit broadcast."""
    spec = "...i,io->...o" if params.layout == "in_out" else "...i,oi->...o"
    y = jnp.einsum(spec, x, params.W)
    if params.b is not None:
        y = y + jnp.broadcast_to(params.b, y.shape)
    return y


def np_normal(seed, shape, scale=1.0):
    """float32 N(0, scale²) draws from NumPy, the same for a given seed (no threefry
    kernel compiled per shape, which costs more CPU than small tests themselves)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(float(scale) * rng.standard_normal(shape, dtype=np.float32))


def np_layer(seed, n_in, n_out, layout="in_out"):
    """Well-scaled parameters from NumPy: W ~ N(0, 1/n_in), b ~ N(0, 1/4) (nonzero)."""
    from jaxlinear import LinearParams

    W = np_normal(seed, (n_in, n_out), 1 / np.sqrt(n_in))
    return LinearParams(
        W if layout == "in_out" else W.T, np_normal(seed + 1, (n_out,), 0.5), layout
    )
