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

from ._hijax import canonicalize_precision

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


def check_precision(precision: Any) -> Any:
    """Return ``precision`` (lists as tuples, so it can be static), or raise if
    ``lax.dot_general`` would not accept it."""
    if precision is None:
        return None
    if isinstance(precision, list):
        precision = tuple(precision)
    try:
        canonicalize_precision(precision)
        hash(precision)
    except (TypeError, ValueError) as err:
        raise ValueError(
            "`precision` must be None, one of 'default', 'high', 'highest' (or "
            "'bfloat16', 'tensorfloat32', 'float32'), a lax.Precision, a pair of those, "
            f"or a lax.DotAlgorithmPreset; got {precision!r}."
        ) from err
    return precision


def check_preferred_element_type(preferred_element_type: Any, operand_dtype) -> np.dtype | None:
    """Return ``preferred_element_type`` as a dtype that holds every operand value
    exactly (the operands' dtype or a wider float), or raise."""
    if preferred_element_type is None:
        return None
    dt = check_float_dtype("preferred_element_type", preferred_element_type)
    if accumulation_dtype(dt, operand_dtype) != dt:
        holds = [d for d in FLOAT_DTYPES if accumulation_dtype(np.dtype(d), operand_dtype) == d]
        raise ValueError(
            f"`preferred_element_type` must be a dtype that holds every {operand_dtype} "
            f"operand value exactly ({', '.join(holds)}); got {dt}."
        )
    return dt
