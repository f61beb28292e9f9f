"""Trace-time checks shared by every public function.

Every check runs on static information only (shapes and dtypes), so it costs
nothing at run time and fires once, when the function is traced. Messages name
the argument, say what was expected, and show what came.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._hijax import canonicalize_precision

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_FLOAT_NP_DTYPES = frozenset(np.dtype(jnp.dtype(d)) for d in FLOAT_DTYPES)
LAYOUTS = ("in_out", "out_in")


def as_float_array(name: str, value: Any) -> jax.Array:
    """Return ``value`` as a JAX array, or raise if its dtype is not a real float."""
    if isinstance(value, jax.Array) and value.dtype in _FLOAT_NP_DTYPES:
        return value  # already a float JAX array (or tracer): nothing to convert
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
    """Return ``dtype`` as a NumPy dtype, or raise if it is not a real float that
    JAX can compute in (float64 only with 64-bit mode on, never silently float32)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"`{name}` must be a floating dtype; got {dtype!r}.") from err
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"`{name}` must be a real floating dtype ({', '.join(FLOAT_DTYPES)}); got {dt}."
        )
    if dt.itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"`{name}` float64 needs 64-bit JAX, which is off: JAX would silently compute "
            "in float32. Enable it with jax.config.update('jax_enable_x64', True) or "
            f"`with jax.enable_x64(True):`, or ask for float32; got {dt}."
        )
    return dt


def describe(value: Any) -> str:
    """A short description of what came, for error messages: ``float32[2, 3]``,
    ``a traced int32[]``, ``None``, ``the str 'relu'``."""
    if isinstance(value, jax.core.Tracer):
        return f"a traced {value.dtype}{list(value.shape)}"
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return f"{value.dtype}{list(np.shape(value))}"
    if value is None:
        return "None"
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"the {type(value).__name__} {shown}"


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise unless it is a static positive integer
    (Python, NumPy or a concrete JAX integer; never a bool, never traced)."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a static positive int: it fixes an array's shape, so it "
            "cannot be traced under jax.jit (close over it, or pass it in "
            f"static_argnums); got {describe(value)}."
        )
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        size = operator.index(value)  # Python, NumPy and concrete JAX integers alike
    except TypeError:
        raise TypeError(f"`{name}` must be a positive int; got {value!r}.") from None
    if size < 1:
        raise ValueError(f"`{name}` must be a positive int; got {size}.")
    return size


def check_sizes(sizes: Any) -> tuple[int, ...]:
    """Return an MLP's ``sizes`` as a tuple of at least two positive ints, or raise."""
    expected = "a sequence of positive ints (input, hidden..., output), e.g. (4, 8, 1)"
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(f"`sizes` must be {expected}; got {describe(sizes)}.")
    try:
        items = tuple(sizes)
    except TypeError as err:  # e.g. iterating a 0-d array
        raise TypeError(f"`sizes` must be {expected}; got {describe(sizes)}.") from err
    if len(items) < 2:
        raise ValueError(
            f"`sizes` must list at least an input and an output size, e.g. (4, 8, 1); "
            f"got {items!r}."
        )
    return tuple(check_positive_int(f"sizes[{i}]", v) for i, v in enumerate(items))


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False; got {describe(value)}.")
    return bool(value)


def check_key(key: Any) -> jax.Array:
    """Return ``key`` if it is one JAX PRNG key, typed (``jax.random.key(seed)``) or
    raw (``jax.random.PRNGKey(seed)``, uint32[2]); raise otherwise."""
    expected = (
        "a JAX PRNG key, jax.random.key(seed) (or a raw uint32[2] key from "
        "jax.random.PRNGKey(seed))"
    )
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"`key` must be a single PRNG key (shape ()); got a key array of shape "
                f"{key.shape}. Pass one key, e.g. key[0], or jax.vmap over the keys."
            )
        return key
    if dtype is not None and np.dtype(dtype) == np.uint32 and np.ndim(key) >= 1:
        if np.shape(key) != (2,):
            raise ValueError(f"`key` must be {expected}; got {describe(key)}.")
        return key
    hint = ""
    if isinstance(key, int) or (dtype is not None and jnp.issubdtype(dtype, jnp.integer)):
        hint = " An integer seed is not a key: pass jax.random.key(seed)."
    raise TypeError(f"`key` must be {expected}; got {describe(key)}.{hint}")


def check_callable(name: str, value: Any, *, optional: bool = False) -> Any:
    """Return ``value`` if it is callable (or None when ``optional``), or raise with
    the jaxlinear activation it probably meant."""
    if callable(value) or (optional and value is None):
        return value
    suggestion = "jaxlinear.relu"
    if isinstance(value, str) and value in ("relu", "sigmoid", "tanh"):
        suggestion = f"jaxlinear.{value}"
    what = "a callable or None" if optional else "a callable"
    raise TypeError(
        f"`{name}` must be {what}, an element-wise function of a jax.Array such as "
        f"{suggestion} (or jaxlinear.tanh, jax.nn.gelu); got {describe(value)}."
    )


def check_l2_clip(l2_clip: Any) -> None:
    """Static checks of a clipping norm: a real scalar; when concrete, also positive
    and finite. A traced value is checked at run time (NaN gradients if it is bad)."""
    expected = "a real number, the clipping norm C > 0 (a Python float or a real scalar array)"
    if l2_clip is None or isinstance(l2_clip, (bool, np.bool_, str, bytes)):
        raise TypeError(f"`l2_clip` must be {expected}; got {describe(l2_clip)}.")
    try:
        dtype = jnp.result_type(l2_clip)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`l2_clip` must be {expected}; got {describe(l2_clip)}.") from err
    real = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    if not real or dtype == np.bool_:
        raise TypeError(f"`l2_clip` must be {expected}; got {describe(l2_clip)} ({dtype}).")
    if np.ndim(l2_clip) != 0:
        raise ValueError(f"`l2_clip` must be a positive scalar; got {describe(l2_clip)}.")
    if isinstance(l2_clip, jax.core.Tracer):
        return
    value = float(l2_clip)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"`l2_clip` must be a positive, finite scalar (the clipping norm C); got {value}."
        )


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
