"""Trace-time checks shared by every public function.

Every check runs on static information only (shapes and dtypes), so it costs
nothing at run time and fires once, when the function is traced. Messages name
the argument, say what was expected, and show what came.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
LAYOUTS = ("in_out", "out_in")


def as_float_array(name: str, value: Any) -> jax.Array:
    """Return ``value`` as a JAX array, or raise if its dtype is not a real float."""
    if value is None:
        raise TypeError(f"`{name}` must be an array with a floating dtype; got None.")
    try:
        array = jnp.asarray(value)
    except TypeError as err:
        raise TypeError(
            f"`{name}` must be an array with a floating dtype; "
            f"got an object of type {type(value).__name__}."
        ) from err
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a real floating dtype ({', '.join(FLOAT_DTYPES)}); "
            f"got {array.dtype}. Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )
    return array


def check_float_dtype(name: str, dtype: Any) -> np.dtype:
    """Return ``dtype`` as a NumPy dtype, or raise if it is not a real float."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"`{name}` must be a floating dtype; got {dtype!r}.") from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"`{name}` must be a real floating dtype ({', '.join(FLOAT_DTYPES)}); got {dt}."
        )
    return dt


def check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(
            f"`layout` must be one of {LAYOUTS!r} ('in_out': W is (in_features, "
            f"out_features), y = x @ W; 'out_in': PyTorch's (out_features, "
            f"in_features), y = x @ W.T); got {layout!r}."
        )
    return layout


def check_same_dtype(**arrays: jax.Array | None) -> None:
    """Raise a ``TypeError`` unless every non-None array has the same dtype."""
    present = {k: v.dtype for k, v in arrays.items() if v is not None}
    if len(set(present.values())) > 1:
        shown = ", ".join(f"`{k}` is {v}" for k, v in present.items())
        first = next(iter(present))
        other = next(k for k, v in present.items() if v != present[first])
        raise TypeError(
            f"{', '.join(f'`{k}`' for k in present)} must share one dtype; {shown}. "
            f"jaxlinear never promotes silently: cast explicitly, e.g. "
            f"`{other}.astype({first}.dtype)`."
        )


def accumulation_dtype(a: np.dtype, b: np.dtype) -> np.dtype:
    """The narrowest float dtype that holds both ``a`` and ``b`` exactly.

    Written out (rather than ``jnp.promote_types``) so it also works under
    ``jax_numpy_dtype_promotion="strict"``, where bfloat16 and float32 have no
    implicit promotion path.
    """
    a, b = np.dtype(a), np.dtype(b)
    if a == b:
        return a
    bits_a, bits_b = jnp.finfo(a).bits, jnp.finfo(b).bits
    if bits_a == bits_b:  # float16 with bfloat16: neither holds the other.
        return np.dtype(jnp.float32)
    return a if bits_a > bits_b else b


def sum_dtype(dtype) -> np.dtype:
    """At least float32: sums and scalings of float16/bfloat16 values lose digits."""
    return accumulation_dtype(dtype, np.dtype(jnp.float32))


def raise_forward_mode_hint(err: TypeError, name: str) -> None:
    """Re-raise JAX's "forward-mode on a custom_vjp" error with the alternative.

    Called from an ``except TypeError`` around a custom-VJP call; returns (so the
    caller re-raises the original) for any other ``TypeError``.
    """
    if "forward-mode" not in str(err) or "custom_vjp" not in str(err):
        return
    raise TypeError(
        f"jaxlinear.{name} differentiates in reverse mode only (its backward is a "
        f"hand-derived custom_vjp), so forward mode (jax.jvp, jacfwd, linearize) "
        f"cannot pass through it. Use the forward-mode twin `jaxlinear.fwd.{name}`, whose "
        f"hand-derived JVP rule supports forward and reverse mode alike. "
        f"(JAX said: {err})"
    ) from err
