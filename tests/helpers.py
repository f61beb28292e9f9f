"""Shared test utilities: dtype contexts, well-scaled inputs, backends, comparisons."""

from __future__ import annotations

import contextlib
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlinear.check import tolerance_for

DTYPES = [jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16]
# After ``-W error`` on a subprocess's command line: the shared compilation cache's
# read-while-written warning (see conftest.py) stays a warning, all else an error.
CACHE_WARNINGS = (
    "-W",
    "ignore:Error reading persistent compilation cache entry",
    "-W",
    "ignore:Error writing persistent compilation cache entry",
)
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]
PLATFORMS = ("cpu", "gpu", "tpu")


def needs(*modules: str, reason: str):
    """A skip mark for a test module whose code needs ``modules`` (an optional extra).

    Looked up without importing them: every pytest-xdist worker collects every
    file, and importing scikit-learn there would cost each worker about 1.5 s."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{reason} (missing: {', '.join(missing)})")


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


def _host_normal(key, shape, dtype, scale, stream):
    """Standard-normal draws in float32, scaled, then rounded to ``dtype`` on the
    host (NumPy's bfloat16 and float16 round to nearest even, as XLA does), so no
    conversion program is compiled per shape either."""
    draws = _rng(key, stream).standard_normal(tuple(shape), dtype=np.float32)
    return (np.float32(scale) * draws).astype(jnp.dtype(dtype))


def host(a, dtype=None):
    """``a`` (an array or nested list) made on the host, as a jax.Array: ``jax.device_put``
    compiles nothing, where ``jnp.asarray``, ``jnp.array``, ``jnp.ones`` and ``astype``
    each compile a small program per shape and dtype."""
    return jax.device_put(np.asarray(a, dtype))


def ones(shape, dtype=np.float32):
    """``jnp.ones`` made on the host (see :func:`host`)."""
    return host(np.ones(shape, dtype))


def cast(tree, dtype):
    """Every leaf of ``tree`` converted to ``dtype`` on the host (see :func:`host`)."""
    return jax.tree.map(lambda a: host(np.asarray(a).astype(dtype)), tree)


def normal(key, shape, dtype, scale=1.0, *, stream: int = 0):
    """Standard-normal draws in float32, scaled, then cast (the same values up to
    rounding whatever the dtype)."""
    return host(_host_normal(key, shape, dtype, scale, stream))


def well_scaled_linear(key, in_features, out_features, batch, dtype, *, layout, bias):
    """x ~ N(0, 1) of shape batch + (in,), W ~ N(0, 1/in), b ~ N(0, 1)."""
    from jaxlinear import LinearParams

    kx, kw, kb = key, key, key  # three independent streams of one generator seed
    W = _host_normal(kw, (in_features, out_features), dtype, 1.0 / np.sqrt(in_features), 1)
    if layout == "out_in":
        W = np.ascontiguousarray(W.T)
    b = host(_host_normal(kb, (out_features,), dtype, 1.0, 2)) if bias else None
    x = normal(kx, tuple(batch) + (in_features,), dtype, stream=3)
    return LinearParams(host(W), b, layout), x


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


def compiled_once(fn, cases):
    """``fn(*case)`` for every case, all in one compiled program (one compile, not one
    per case, when the cases differ only in shape)."""
    return jax.jit(lambda cases: [fn(*case) for case in cases])(cases)


def take(tree, i):
    """Entry ``i`` of every leaf of a stacked pytree, as NumPy arrays (indexing on the
    host compiles nothing)."""
    return jax.tree.map(lambda a: np.asarray(a)[i], tree)


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
    return host(float(scale) * rng.standard_normal(shape, dtype=np.float32))


def np_layer(seed, n_in, n_out, layout="in_out"):
    """Well-scaled parameters from NumPy: W ~ N(0, 1/n_in), b ~ N(0, 1/4) (nonzero)."""
    from jaxlinear import LinearParams

    W = np.asarray(np_normal(seed, (n_in, n_out), 1 / np.sqrt(n_in)))
    return LinearParams(
        host(W if layout == "in_out" else W.T), np_normal(seed + 1, (n_out,), 0.5), layout
    )


# Standard deviation of W per named init, in units of 1/sqrt(fan_in).
_INIT_STD = {"lecun_normal": 1.0, "he_normal": np.sqrt(2.0), "pytorch": 1.0 / np.sqrt(3.0)}


def mlp_params(seed, sizes, *, dtype=jnp.float32, layout="in_out", bias=True, init="lecun_normal"):
    """An MLP's parameters drawn on the host, for tests whose subject is not the
    initialiser: W uniform with the standard deviation ``init`` gives it (the
    ``init`` argument of :func:`jaxlinear.mlp_init`), b uniform in ±1/sqrt(fan_in).
    No random-number kernel is compiled per layer shape (about 0.2 s each)."""
    from jaxlinear import LinearParams

    rng = np.random.default_rng(seed)
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False):
        half_width = np.sqrt(3.0) * _INIT_STD[init] / np.sqrt(n_in)
        W = rng.uniform(-half_width, half_width, (n_in, n_out)).astype(jnp.dtype(dtype))
        b = rng.uniform(-1, 1, n_out) / np.sqrt(n_in) if bias else None
        layers.append(
            LinearParams(
                host(W if layout == "in_out" else np.ascontiguousarray(W.T)),
                None if b is None else host(b.astype(jnp.dtype(dtype))),
                layout,
            )
        )
    return tuple(layers)


def int_labels(seed, shape, classes):
    """Integer class labels in [0, classes), drawn on the host."""
    return host(np.random.default_rng(seed).integers(0, classes, shape, dtype=np.int32))
