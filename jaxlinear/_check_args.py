"""Argument checks of :func:`jaxlinear.check_vjp`: each bad argument is a clear
``TypeError``/``ValueError`` naming it, raised before anything runs."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tolerances import TOLERANCES, Tolerance

#: The checks :func:`check_vjp` can run, as named in its ``checks`` argument.
CHECKS = ("reference", "fd", "vmap", "dtype", "retrace")


def all_devices() -> list:
    """Every device of every backend present (``jax.devices()`` shows one backend)."""
    found: dict[tuple[str, int], Any] = {}
    for platform in (None, "cpu", "gpu", "tpu"):
        try:
            devices = jax.devices(platform) if platform else jax.devices()
        except RuntimeError:  # that backend is not present
            continue
        for d in devices:
            found.setdefault((d.platform, d.id), d)
    return list(found.values())


def device_name(device) -> str:
    return f"{device.platform}:{device.id}"


def short_error(err: BaseException) -> str:
    """``"TypeName: first line"`` of an exception, at most 300 characters."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first[:300]}"


def check_devices(devices) -> list:
    available = all_devices()
    if devices is None:
        return available
    if isinstance(devices, jax.Device):
        devices = [devices]
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence) or not devices:
        raise TypeError(
            "`devices` must be None (every device JAX sees) or a non-empty sequence of "
            f"jax.Device, e.g. jax.devices('cpu'); got {devices!r}."
        )
    names = ", ".join(device_name(d) for d in available)
    for d in devices:
        if not isinstance(d, jax.Device):
            raise TypeError(
                f"`devices` entries must be jax.Device objects (from jax.devices()); got {d!r}."
            )
        if d not in available:
            raise ValueError(f"`devices` entry {d!r} is not present; available: {names}.")
    return list(dict.fromkeys(devices))


def check_tolerances(tolerances) -> dict[np.dtype, Tolerance]:
    table = dict(TOLERANCES)
    if tolerances is None:
        return table
    if not isinstance(tolerances, Mapping):
        raise TypeError(
            "`tolerances` must be a mapping {dtype: jaxlinear.check.Tolerance}; "
            f"got {type(tolerances).__name__}."
        )
    for dt, tol in tolerances.items():
        key = as_float_dtype("tolerances", dt)
        if not isinstance(tol, Tolerance):
            raise TypeError(
                f"`tolerances[{key}]` must be a jaxlinear.check.Tolerance(autodiff=..., "
                f"fd=..., margin_units=..., fd_units=..., reason=...); got {tol!r}."
            )
        table[key] = tol
    return table


def as_float_dtype(name: str, dt) -> np.dtype:
    try:
        d = jnp.dtype(dt)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}`: {dt!r} is not a dtype.") from err
    if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"`{name}`: {d} is not a real floating dtype.")
    return np.dtype(d)


def check_dtypes(dtypes, table) -> list[np.dtype | None]:
    if dtypes is None:
        return [None]
    if isinstance(dtypes, (str, type, np.dtype)):
        dtypes = [dtypes]
    if not isinstance(dtypes, Sequence) or not dtypes:
        raise TypeError(
            "`dtypes` must be None (the args' own dtypes) or a non-empty sequence of "
            f"floating dtypes; got {dtypes!r}."
        )
    out = []
    for dt in dtypes:
        d = as_float_dtype("dtypes", dt)
        if d not in table:
            raise ValueError(
                f"`dtypes`: no tolerance for {d}; the table covers "
                f"{', '.join(str(k) for k in table)}. Pass tolerances={{{d}: Tolerance(...)}}."
            )
        out.append(d)
    return list(dict.fromkeys(out))


def check_checks(checks) -> frozenset[str]:
    if checks is None:
        return frozenset(CHECKS)
    if isinstance(checks, str) or not isinstance(checks, Sequence | frozenset | set):
        raise TypeError(f"`checks` must be a sequence of names from {CHECKS}; got {checks!r}.")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        raise ValueError(f"`checks` must be non-empty names from {CHECKS}; got {checks!r}.")
    return frozenset(checks)


def check_precision(precision) -> None:
    if precision is None:
        return
    try:
        with jax.default_matmul_precision(precision):
            pass
    except (TypeError, ValueError) as err:
        raise ValueError(
            "`precision` must be None or a default matmul precision such as 'highest', "
            f"'float32' or 'bfloat16'; got {precision!r}."
        ) from err


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False; got {value!r}.")
    return value


def check_callables(fn, args, reference) -> None:
    if not callable(fn):
        raise TypeError(f"`fn` must be callable; got {type(fn).__name__}.")
    if not isinstance(args, tuple):
        raise TypeError(
            "`args` must be a tuple of fn's positional arguments, e.g. (params, x) or "
            f"(x,) for one; got {type(args).__name__}."
        )
    if reference is not None and not callable(reference):
        raise TypeError(f"`reference` must be callable or None; got {type(reference).__name__}.")


def host_leaf(leaf) -> np.ndarray:
    """A host copy with the dtype JAX would give the leaf (NumPy arrays keep theirs)."""
    if isinstance(leaf, jax.core.Tracer):
        raise TypeError(
            "`args` must be concrete arrays; got a tracer. Call check_vjp outside jit/vmap."
        )
    if isinstance(leaf, (np.ndarray, np.generic)):
        return np.asarray(leaf)
    return np.asarray(jnp.asarray(leaf))


def split_leaves(paths, host, table, run_dtypes) -> tuple[list[int], list[int]]:
    """Indices of the floating leaves (differentiated) and of the others (held fixed)."""
    for path, h in zip(paths, host, strict=True):
        if jnp.issubdtype(h.dtype, jnp.complexfloating):
            raise TypeError(
                f"`args` leaf {jax.tree_util.keystr(path)} is complex ({h.dtype}); "
                "check_vjp checks real floating leaves only."
            )
    float_idx = [i for i, h in enumerate(host) if jnp.issubdtype(h.dtype, jnp.floating)]
    other_idx = [i for i in range(len(host)) if i not in float_idx]
    if not float_idx:
        raise ValueError(
            "`args` has no floating-point leaves to differentiate; got leaf dtypes "
            f"{[str(h.dtype) for h in host]}."
        )
    if run_dtypes == [None]:
        for i in float_idx:
            if host[i].dtype not in table:
                raise ValueError(
                    f"no tolerance for the args' dtype {host[i].dtype}; pass "
                    f"tolerances={{{host[i].dtype}: Tolerance(...)}} or dtypes=[...]."
                )
    return float_idx, other_idx


def check_outputs(fn, reference, args, selected, vmap_in_axes):
    """``fn``'s output shapes (raising clearly when fn, reference or vmap_in_axes
    do not fit ``args``)."""
    try:
        out_shape = jax.eval_shape(fn, *args)
    except Exception as err:
        raise ValueError(
            f"`fn(*args)` failed before any check could run: {short_error(err)}"
        ) from err
    for p, o in jax.tree_util.tree_flatten_with_path(out_shape)[0]:
        if not jnp.issubdtype(o.dtype, jnp.floating):
            raise TypeError(
                f"`fn` must return floating arrays; output{jax.tree_util.keystr(p)} "
                f"has dtype {o.dtype}."
            )
    if reference is not None and "reference" in selected:
        try:
            ref_shape = jax.eval_shape(reference, *args)
        except Exception as err:
            raise ValueError(f"`reference(*args)` failed: {short_error(err)}") from err
        got = jax.tree.map(lambda s: s.shape, ref_shape)
        want = jax.tree.map(lambda s: s.shape, out_shape)
        if jax.tree.structure(ref_shape) != jax.tree.structure(out_shape) or got != want:
            raise ValueError(
                "`reference` must return what `fn` returns (structure and shapes); "
                f"fn gives {want}, reference gives {got}."
            )
    if vmap_in_axes is not None and "vmap" in selected:
        try:
            jax.eval_shape(jax.vmap(lambda *a: a, in_axes=vmap_in_axes), *args)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`vmap_in_axes` ({vmap_in_axes!r}) does not fit `args`: {short_error(err)}"
            ) from err
    return out_shape


def leaf_names(fn, args, paths) -> list[str]:
    """``"params.W"``, ``"x"``: fn's parameter names followed by each leaf's path."""
    names: list[str] = []
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    names = names[: len(args)]
    names += [f"args[{i}]" for i in range(len(names), len(args))]
    return [names[path[0].idx] + jax.tree_util.keystr(path[1:]) for path in paths]


def output_names(out_shape) -> list[str]:
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(out_shape)[0]]
    return ["output" + jax.tree_util.keystr(p) for p in paths]
