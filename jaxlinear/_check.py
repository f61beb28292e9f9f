r"""Gradient verification for hand-derived VJPs: :func:`check_vjp` and its report.

For ``y = fn(*args)`` and a cotangent u (random, fixed by ``seed``), the rule
under test is the pullback ``vjp(u) = (∂y/∂args)ᵀ u``. It is checked against:

* **reference** -- ``jax.vjp`` of a plain ``reference`` formula in the same
  dtype and with the same u, element-wise at the table's ``autodiff`` tolerance
  (plus the forward values, row ``forward``);
* **finite differences** -- φ(x) = ⟨u, fn(x)⟩ evaluated in float64 on the
  upcast inputs. Its central difference along a perturbation p,
  ``(φ(x + p) − φ(x − p)) / 2 = ⟨∇φ, p⟩ + O(|p|³)``, is compared with ⟨vjp(u), p⟩
  at the table's ``fd`` tolerance. Row ``fd-element`` perturbs one element at a
  time (p = hᵢ eᵢ, so the estimate is ∂φ/∂xᵢ) for leaves of at most
  ``elementwise_max_size`` elements; row ``fd-direction`` uses random
  directions for every leaf. The step is hᵢ = t · max(1, |xᵢ|) with
  t = eps^(1/3) of the dtype the differences are computed in (float64:
  t = ``FD_RELATIVE_STEP`` ≈ 6e-6), which balances rounding (eps/t) against
  truncation (t²);
* **vmap** -- the rule under ``jax.vmap`` equals a Python loop of the rule;
* **dtype** -- each cotangent has its primal's dtype (JAX silently accepts a
  float32 cotangent for a bfloat16 parameter);
* **retrace** -- a second call of the jitted rule, fed what an SGD step gives
  (x − 0.01·vjp(u)) and a new u, hits the compile cache.

A random direction d has a scalar estimate, so its tolerance follows from the
element-wise one: if every |gᵢ − ĝᵢ| ≤ atol + rtol·|ĝᵢ| then
|⟨g − ĝ, d⟩| ≤ atol·Σ|dᵢ| + rtol·Σ|ĝᵢ dᵢ|, the bound used (ĝ the rule's result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._tolerances import TOLERANCES, Tolerance
from ._validate import accumulation_dtype

__all__ = ["CheckReport", "CheckRow", "check_vjp"]

#: The checks :func:`check_vjp` can run, as named in its ``checks`` argument.
CHECKS = ("reference", "fd", "vmap", "dtype", "retrace")

#: The order of a run's rows in a report.
_ROW_ORDER = (
    "vjp",
    "forward",
    "reference",
    "fd-element",
    "fd-direction",
    "vmap",
    "dtype",
    "retrace",
)
#: SGD learning rate of the retrace check's second call: x₂ = x − LR · vjp(u).
_RETRACE_LR = 0.01
#: Relative size of the perturbations between the copies of the default vmap batch.
_COPY_NOISE = 0.1


# --------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class CheckRow:
    """One measurement of :func:`check_vjp`.

    Attributes:
        check: ``"forward"``, ``"reference"``, ``"fd-element"``,
            ``"fd-direction"``, ``"vmap"``, ``"dtype"``, ``"retrace"``, or
            ``"vjp"`` (the rule itself raised).
        device: ``"platform:id"``, e.g. ``"cpu:0"``.
        dtype: the measured leaf's dtype in this run.
        argument: which leaf, e.g. ``"params.W"``, ``"x"`` or ``"output"``.
        max_abs_err: ``max |actual − expected|``; ``None`` where nothing numeric
            is compared.
        max_rel_err: ``max |actual − expected| / |expected|`` over the entries
            with ``|expected| > atol`` (where a relative error means something);
            ``None`` when there are none.
        tolerance: ``(rtol, atol)`` of the element-wise criterion
            ``|actual − expected| <= atol + rtol·|expected|``, or ``None``. An
            ``fd-direction`` row compares directional derivatives ⟨g, d⟩ with
            the bound this criterion implies (see the module docstring).
        passed: whether the criterion held.
        detail: what was compared, or why it failed.
    """

    check: str
    device: str
    dtype: str
    argument: str
    max_abs_err: float | None
    max_rel_err: float | None
    tolerance: tuple[float, float] | None
    passed: bool
    detail: str = ""

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite errors become the strings ``"nan"``/``"inf"``."""

        def number(v):
            return v if v is None or math.isfinite(v) else str(v)

        return {
            "check": self.check,
            "device": self.device,
            "dtype": self.dtype,
            "argument": self.argument,
            "max_abs_err": number(self.max_abs_err),
            "max_rel_err": number(self.max_rel_err),
            "rtol": None if self.tolerance is None else self.tolerance[0],
            "atol": None if self.tolerance is None else self.tolerance[1],
            "status": self.status,
            "detail": self.detail,
        }


def _fmt_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def _fmt_tol(t: tuple[float, float] | None) -> str:
    return "-" if t is None else f"{t[0]:.2g}, {t[1]:.2g}"


_COLUMNS = (
    "check",
    "device",
    "dtype",
    "argument",
    "max abs err",
    "max rel err",
    "rtol, atol",
    "result",
    "detail",
)


def format_rows(rows: Sequence[CheckRow]) -> list[str]:
    """Rows as aligned text lines, the header first."""
    cells = [
        (
            r.check,
            r.device,
            r.dtype,
            r.argument,
            _fmt_err(r.max_abs_err),
            _fmt_err(r.max_rel_err),
            _fmt_tol(r.tolerance),
            r.status,
            r.detail,
        )
        for r in rows
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(_COLUMNS)]

    def line(values):
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return [line(_COLUMNS)] + [line(c) for c in cells]


@dataclasses.dataclass(frozen=True, repr=False)
class CheckReport:
    """What :func:`check_vjp` measured: one :class:`CheckRow` per check, device,
    dtype and argument. ``str(report)`` is a table; :meth:`to_json` is for machines.

    A mismatch is a failing row here, never an exception.
    """

    name: str
    rows: tuple[CheckRow, ...]

    @property
    def ok(self) -> bool:
        """True when at least one row was measured and every row passed."""
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> tuple[CheckRow, ...]:
        return tuple(r for r in self.rows if not r.passed)

    @property
    def failed_checks(self) -> frozenset[str]:
        """The names of the checks with at least one failing row."""
        return frozenset(r.check for r in self.failures)

    def select(self, check: str | None = None, **fields: str) -> tuple[CheckRow, ...]:
        """The rows whose ``check`` (and any other given field) equal the values given."""
        if check is not None:
            fields["check"] = check
        return tuple(r for r in self.rows if all(getattr(r, k) == v for k, v in fields.items()))

    def summary(self) -> str:
        failed = len(self.failures)
        verdict = "PASS" if self.ok else "FAIL"
        return f"check_vjp({self.name}): {verdict}, {len(self.rows)} rows, {failed} failed"

    def __str__(self) -> str:
        return "\n".join([self.summary(), *format_rows(self.rows)])

    def __repr__(self) -> str:
        return (
            f"CheckReport(name={self.name!r}, ok={self.ok}, rows={len(self.rows)}, "
            f"failed={len(self.failures)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "rows": [r.to_dict() for r in self.rows]}

    def to_json(self, **kwargs) -> str:
        """:meth:`to_dict` as JSON; ``kwargs`` go to :func:`json.dumps` (e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(), **kwargs)


# --------------------------------------------------------------------------- comparisons


def _magnitude(arrays) -> float:
    """The typical magnitude of a gradient, min(1, max |entry| over all its leaves).

    The table's atol is "rtol at a typical magnitude of order 1"; a gradient of a
    mean over N rows is ~1/N, so atol is scaled down to it (never up), and a rule
    returning zeros cannot pass under atol alone. All leaves count together:
    rounding in a backward pass reaches each leaf from the largest values upstream.
    """
    sizes = [np.max(np.abs(np.asarray(a, np.float64))) for a in arrays if np.size(a)]
    finite = [float(m) for m in sizes if np.isfinite(m)]
    return min(1.0, max(finite)) if finite else 1.0


def _compare(actual, expected, tol: tuple[float, float], magnitude: float | None = None):
    """Element-wise ``|a − e| <= atol·m + rtol·|e|``: ``(max_abs, max_rel, passed, detail)``,
    with m = ``magnitude`` (default: :func:`_magnitude` of ``expected``).

    Entries that are NaN in both, or the same infinity, agree; any other
    non-finite entry fails.
    """
    rtol, atol = tol
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return None, None, False, f"shape {a.shape} vs expected {e.shape}"
    if a.size == 0:
        return 0.0, None, True, "empty"
    same = (np.isnan(a) & np.isnan(e)) | (np.isinf(a) & (a == e))
    finite = np.isfinite(a) & np.isfinite(e)
    if not np.all(finite | same):
        worst = int(np.argmax(~(finite | same)))
        return float("nan"), None, False, _worst(a, e, worst, "non-finite: ")
    a, e = np.where(finite, a, 0.0), np.where(finite, e, 0.0)
    diff = np.abs(a - e)
    m = _magnitude([e]) if magnitude is None else magnitude
    bound = atol * m + rtol * np.abs(e)
    passed = bool(np.all(diff <= bound))
    significant = np.abs(e) > atol
    max_rel = None
    if significant.any():
        max_rel = float(np.max(diff[significant] / np.abs(e[significant])))
    detail = "" if passed else _worst(a, e, int(np.argmax(diff - bound)), "")
    return float(np.max(diff)), max_rel, passed, detail


def _worst(a, e, flat_index, prefix):
    index = tuple(int(i) for i in np.unravel_index(flat_index, a.shape)) if a.ndim else ()
    return (
        f"{prefix}worst at {index}: got {a.flat[flat_index]:.6g}, expected {e.flat[flat_index]:.6g}"
    )


def _compare_directional(actual, expected, bound):
    """Scalar estimates along directions, each against its own absolute bound."""
    a, e, b = (np.asarray(v, np.float64) for v in (actual, expected, bound))
    diff = np.abs(a - e)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(e))):
        return float("nan"), None, False
    nonzero = np.abs(e) > 0
    max_rel = float(np.max(diff[nonzero] / np.abs(e[nonzero]))) if nonzero.any() else None
    return float(np.max(diff)), max_rel, bool(np.all(diff <= b))


# --------------------------------------------------------------------------- traced pieces


class _Spec:
    """Static description of ``fn`` applied to a flattened ``args``: the jit cache key.

    Two specs are equal when they hold the same ``fn`` object, argument structure
    and ``fingerprint`` -- a digest of what ``fn`` computes (its jaxpr and
    constants, see :func:`_fingerprint`) -- so repeated checks of one function
    reuse compiled code, but a rule changed in place (``defvjp`` again on the same
    ``custom_vjp``, a closed-over array reassigned) is compiled afresh, never
    answered from a stale cache. ``traces`` counts the traces of
    :func:`_vjp_jit` made with this object.
    """

    def __init__(self, fn, treedef, float_idx, other_idx, fingerprint: str = ""):
        self.fn, self.treedef = fn, treedef
        self.float_idx, self.other_idx = tuple(float_idx), tuple(other_idx)
        self.fingerprint = fingerprint
        self.traces = 0

    def with_fingerprint(self, traced: Callable, *args) -> _Spec:
        """A copy whose fingerprint is that of ``traced(*args)``."""
        return _Spec(
            self.fn, self.treedef, self.float_idx, self.other_idx, _fingerprint(traced, *args)
        )

    def _key(self):
        return (id(self.fn), self.treedef, self.float_idx, self.other_idx, self.fingerprint)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Spec) and self.fn is other.fn and self._key() == other._key()

    def assemble(self, float_leaves, other_leaves):
        leaves = [None] * (len(self.float_idx) + len(self.other_idx))
        for i, a in zip(self.float_idx, float_leaves, strict=True):
            leaves[i] = a
        for i, a in zip(self.other_idx, other_leaves, strict=True):
            leaves[i] = a
        return jax.tree.unflatten(self.treedef, leaves)

    def split(self, args):
        leaves = self.treedef.flatten_up_to(args)
        return [leaves[i] for i in self.float_idx], [leaves[i] for i in self.other_idx]


def _fingerprint(f: Callable, *args) -> str:
    """A digest of what ``f`` computes on ``args``' shapes: its jaxpr's text and its
    constants' bytes. Traced through a fresh wrapper, so no trace cache of JAX's
    (keyed on function identity) can hand back an out-of-date jaxpr."""
    closed = jax.make_jaxpr(lambda *a: f(*a))(*args)
    digest = hashlib.sha256(str(closed.jaxpr).encode())
    for c in closed.consts:
        a = np.asarray(c)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def _vjp(spec: _Spec, float_leaves, other_leaves, cotangent):
    """``(fn(*args), vjp(cotangent))`` w.r.t. the float leaves; other leaves held fixed."""

    def f(fl):
        return spec.fn(*spec.assemble(fl, other_leaves))

    out, pullback = jax.vjp(f, list(float_leaves))
    (cts,) = pullback(cotangent)
    return out, cts


@functools.partial(jax.jit, static_argnums=0)
def _vjp_jit(spec: _Spec, float_leaves, other_leaves, cotangent):
    """:func:`_vjp` compiled; ``spec.traces`` counts its traces."""
    spec.traces += 1  # runs at trace time only
    return _vjp(spec, float_leaves, other_leaves, cotangent)


def _vmapped(spec: _Spec, in_axes, batched_args, cotangents):
    """``jax.vmap`` of :func:`_vjp` over ``in_axes`` of the args and axis 0 of the cotangents."""

    def per_example(args, u):
        fl, ol = spec.split(args)
        return _vjp(spec, fl, ol, u)

    return jax.vmap(per_example, in_axes=(in_axes, 0))(batched_args, cotangents)


_vmapped_jit = jax.jit(_vmapped, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=0)
def _fd_jit(spec: _Spec, float_leaves, other_leaves, cotangent, perturbations):
    """For each float leaf j and each p in ``perturbations[j]`` (a stack of arrays of
    that leaf's shape): φ(x + p) − φ(x − p), p added to leaf j alone, with
    φ(x) = ⟨cotangent, fn(x)⟩. One p at a time (``lax.map``), so fn is never batched."""

    def phi(fl):
        out = spec.fn(*spec.assemble(fl, other_leaves))
        terms = [
            jnp.sum(o.astype(c.dtype) * c)
            for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(cotangent), strict=True)
        ]
        return functools.reduce(operator.add, terms)

    def differences(pos, stack):
        x = float_leaves[pos]

        def difference(p):
            plus, minus = list(float_leaves), list(float_leaves)
            plus[pos], minus[pos] = x + p, x - p
            return phi(plus) - phi(minus)

        return lax.map(difference, stack)

    return [differences(pos, stack) for pos, stack in enumerate(perturbations)]


# --------------------------------------------------------------------------- validation


def _all_devices() -> list:
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


def _check_devices(devices) -> list:
    available = _all_devices()
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


def _check_tolerances(tolerances) -> dict[np.dtype, Tolerance]:
    table = dict(TOLERANCES)
    if tolerances is None:
        return table
    if not isinstance(tolerances, Mapping):
        raise TypeError(
            "`tolerances` must be a mapping {dtype: jaxlinear.Tolerance}; "
            f"got {type(tolerances).__name__}."
        )
    for dt, tol in tolerances.items():
        key = _as_dtype("tolerances", dt)
        if not isinstance(tol, Tolerance):
            raise TypeError(
                f"`tolerances[{key}]` must be a jaxlinear.Tolerance(autodiff=(rtol, atol), "
                f"fd=(rtol, atol), reason=...); got {tol!r}."
            )
        table[key] = tol
    return table


def _as_dtype(name: str, dt) -> np.dtype:
    try:
        d = jnp.dtype(dt)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}`: {dt!r} is not a dtype.") from err
    if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"`{name}`: {d} is not a real floating dtype.")
    return np.dtype(d)


def _check_dtypes(dtypes, table) -> list[np.dtype | None]:
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
        d = _as_dtype("dtypes", dt)
        if d not in table:
            raise ValueError(
                f"`dtypes`: no tolerance for {d}; the table covers "
                f"{', '.join(str(k) for k in table)}. Pass tolerances={{{d}: Tolerance(...)}}."
            )
        out.append(d)
    return list(dict.fromkeys(out))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}.")
    return value


def _host(leaf) -> np.ndarray:
    """A host copy with the dtype JAX would give the leaf (NumPy arrays keep theirs)."""
    if isinstance(leaf, jax.core.Tracer):
        raise TypeError(
            "`args` must be concrete arrays; got a tracer. Call check_vjp outside jit/vmap."
        )
    if isinstance(leaf, (np.ndarray, np.generic)):
        return np.asarray(leaf)
    return np.asarray(jnp.asarray(leaf))


def _arg_names(fn, n: int) -> list[str]:
    names: list[str] = []
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        else:
            break
    names = names[:n]
    return names + [f"args[{i}]" for i in range(len(names), n)]


def _leaf_names(arg_names, paths) -> list[str]:
    out = []
    for path in paths:
        head, rest = path[0], path[1:]
        out.append(arg_names[head.idx] + jax.tree_util.keystr(rest))
    return out


def _output_names(out_paths) -> list[str]:
    return ["output" + jax.tree_util.keystr(p) for p in out_paths]


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first[:300]}"


# --------------------------------------------------------------------------- the check


@dataclasses.dataclass
class _Context:
    spec: _Spec
    ref_spec: _Spec | None
    host_leaves: list[np.ndarray]
    float_names: list[str]
    out_names: list[str]
    table: dict[np.dtype, Tolerance]
    checks: frozenset[str]
    seed: int
    num_directions: int
    elementwise_max_size: int
    vmap_in_axes: Any
    vmap_size: int
    precision: Any


def check_vjp(
    fn: Callable,
    args: tuple,
    *,
    reference: Callable | None = None,
    dtypes: Sequence[Any] | None = None,
    devices: Sequence[Any] | None = None,
    tolerances: Mapping[Any, Tolerance] | None = None,
    checks: Sequence[str] | None = None,
    seed: int = 0,
    num_directions: int = 3,
    elementwise_max_size: int = 128,
    vmap_in_axes: Any = None,
    vmap_size: int = 3,
    precision: Any = "highest",
    name: str | None = None,
) -> CheckReport:
    r"""Check the VJP of ``fn`` at ``args`` against autodiff, finite differences and vmap.

    Args:
        fn: the function under test, ``fn(*args)`` returning an array or a
            pytree of floating arrays; typically a ``jax.custom_vjp``.
        args: a tuple of positional arguments (pytrees allowed, e.g.
            :class:`LinearParams`). Floating leaves are differentiated; other
            leaves (integer labels, say) are held fixed.
        reference: a plain formula with ``fn``'s signature and output, whose
            ``jax.vjp`` by autodiff the rule must match. ``None`` skips the
            ``reference`` and ``forward`` rows.
        dtypes: cast every floating leaf to each dtype in turn; ``None`` keeps the
            args' own dtypes. float64 runs inside ``jax.enable_x64(True)``,
            scoped to this call.
        devices: the devices to run on; ``None`` means every device JAX sees
            (every backend's).
        tolerances: ``{dtype: Tolerance}`` overriding :data:`TOLERANCES` entries.
            A run's tolerance is that of its least precise floating input or
            output dtype.
        checks: a subset of ``("reference", "fd", "vmap", "dtype", "retrace")``;
            ``None`` runs them all.
        seed: fixes the cotangents, directions and batch copies, which are the
            same for every device and dtype.
        num_directions: random directions per floating leaf (``fd-direction``).
        elementwise_max_size: leaves of at most this many elements are also
            differenced one element at a time (``fd-element``); 0 turns it off.
        vmap_in_axes: how the ``vmap`` check forms its batch. ``None``: stack
            ``vmap_size`` perturbed copies of every argument along a new leading
            axis (an ensemble; the rule sees the shapes of ``args``). Otherwise
            ``jax.vmap``'s ``in_axes`` for ``args``, mapping over axes that
            ``args`` already have: ``(None, 0)`` gives per-example gradients of
            ``fn(params, x)``, and the rule sees one example (e.g. a 1-D x).
        vmap_size: the number of copies when ``vmap_in_axes`` is ``None``.
        precision: the default matmul precision of every evaluation (``"highest"``
            keeps GPUs from using TF32 in the comparisons); ``None`` leaves it.
        name: the report's name, default ``fn.__name__``.

    Returns:
        a :class:`CheckReport`. A mismatch, or an exception raised by the rule
        under a check, is a failing row, never an exception.

    Compiled checks are reused when the same ``fn`` is checked again on the
    same shapes, keyed on a digest of its jaxpr and constants, so a rule
    redefined in place is always checked afresh.

    Non-smooth functions (relu and its kinks) in bfloat16 or float16 can fail
    the finite differences honestly: the low-precision forward may put a value
    on the other side of a kink than the float64 one does. Check them in
    float32 and float64, or on inputs away from the kinks.

    Raises:
        TypeError, ValueError: for bad arguments, including ``fn(*args)`` failing
        at the args' own dtypes before any check runs.

    Example (a hand-derived rule for f(x) = x·sin x, f' = sin x + x cos x):

    >>> import jax, jax.numpy as jnp, jaxlinear
    >>> @jax.custom_vjp
    ... def xsin(x):
    ...     return x * jnp.sin(x)
    >>> xsin.defvjp(lambda x: (xsin(x), x), lambda x, g: (g * (jnp.sin(x) + x * jnp.cos(x)),))
    >>> report = jaxlinear.check_vjp(xsin, (jnp.linspace(-2.0, 2.0, 5),),
    ...                              reference=lambda x: x * jnp.sin(x))
    >>> report.ok
    True
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable; got {type(fn).__name__}.")
    if not isinstance(args, tuple):
        raise TypeError(
            "`args` must be a tuple of fn's positional arguments, e.g. (params, x) or "
            f"(x,) for one; got {type(args).__name__}."
        )
    if reference is not None and not callable(reference):
        raise TypeError(f"`reference` must be callable or None; got {type(reference).__name__}.")
    table = _check_tolerances(tolerances)
    run_dtypes = _check_dtypes(dtypes, table)
    run_devices = _check_devices(devices)
    if checks is None:
        selected = frozenset(CHECKS)
    else:
        if isinstance(checks, str) or not isinstance(checks, Sequence | frozenset | set):
            raise TypeError(f"`checks` must be a sequence of names from {CHECKS}; got {checks!r}.")
        unknown = [c for c in checks if c not in CHECKS]
        if unknown or not checks:
            raise ValueError(f"`checks` must be non-empty names from {CHECKS}; got {checks!r}.")
        selected = frozenset(checks)
    if precision is not None:
        try:
            with jax.default_matmul_precision(precision):
                pass
        except (TypeError, ValueError) as err:
            raise ValueError(
                "`precision` must be None or a default matmul precision such as 'highest', "
                f"'float32' or 'bfloat16'; got {precision!r}."
            ) from err
    seed = _check_int("seed", seed, 0)
    num_directions = _check_int("num_directions", num_directions, 1)
    elementwise_max_size = _check_int("elementwise_max_size", elementwise_max_size, 0)
    vmap_size = _check_int("vmap_size", vmap_size, 2)

    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(args)
    host = [_host(leaf) for _, leaf in paths_leaves]
    for (path, _), h in zip(paths_leaves, host, strict=True):
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
    arg_names = _arg_names(fn, len(args))
    names = _leaf_names(arg_names, [p for p, _ in paths_leaves])

    needs_x64 = any(h.dtype == np.float64 for h in host)
    with _scoped(needs_x64, precision):
        try:
            out_shape = jax.eval_shape(fn, *args)
        except Exception as err:
            raise ValueError(
                f"`fn(*args)` failed before any check could run: {_short(err)}"
            ) from err
        out_flat = jax.tree_util.tree_flatten_with_path(out_shape)[0]
        out_paths = [p for p, _ in out_flat]
        for p, o in out_flat:
            if not jnp.issubdtype(o.dtype, jnp.floating):
                raise TypeError(
                    f"`fn` must return floating arrays; output{jax.tree_util.keystr(p)} "
                    f"has dtype {o.dtype}."
                )
        if reference is not None and "reference" in selected:
            try:
                ref_shape = jax.eval_shape(reference, *args)
            except Exception as err:
                raise ValueError(f"`reference(*args)` failed: {_short(err)}") from err
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
                    f"`vmap_in_axes` ({vmap_in_axes!r}) does not fit `args`: {_short(err)}"
                ) from err

    ctx = _Context(
        spec=_Spec(fn, treedef, float_idx, other_idx),
        ref_spec=None if reference is None else _Spec(reference, treedef, float_idx, other_idx),
        host_leaves=host,
        float_names=[names[i] for i in float_idx],
        out_names=_output_names(out_paths),
        table=table,
        checks=selected,
        seed=seed,
        num_directions=num_directions,
        elementwise_max_size=elementwise_max_size,
        vmap_in_axes=vmap_in_axes,
        vmap_size=vmap_size,
        precision=precision,
    )
    rows: list[CheckRow] = []
    for device in run_devices:
        for dtype in run_dtypes:
            rows.extend(_run(ctx, device, dtype))
    report_name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
    return CheckReport(name=report_name, rows=tuple(rows))


@contextlib.contextmanager
def _scoped(x64: bool, precision):
    """x64 on if asked and the default matmul precision, both undone on exit."""
    with contextlib.ExitStack() as stack:
        if x64:
            stack.enter_context(jax.enable_x64(True))
        if precision is not None:
            stack.enter_context(jax.default_matmul_precision(precision))
        yield


def _tolerance_for_run(table, dtypes) -> Tolerance:
    """The tolerance of the least precise dtype in ``dtypes`` that the table covers."""
    known = [np.dtype(d) for d in dtypes if np.dtype(d) in table]
    loosest = max(known, key=lambda d: float(jnp.finfo(d).eps))
    return table[loosest]


def _run(ctx: _Context, device, dtype) -> list[CheckRow]:
    host = list(ctx.host_leaves)
    for i in ctx.spec.float_idx:
        if dtype is not None:
            host[i] = host[i].astype(dtype)
    x64 = any(host[i].dtype == np.float64 for i in ctx.spec.float_idx)
    with _scoped(x64, ctx.precision):
        rows = _Run(ctx, device, host).rows
    return sorted(rows, key=lambda r: _ROW_ORDER.index(r.check))  # stable within a check


class _Run:
    """All checks for one device and one dtype assignment of the float leaves."""

    def __init__(self, ctx: _Context, device, host: list[np.ndarray]):
        self.ctx, self.device, self.host = ctx, device, host
        self.dev = device_name(device)
        self.rows: list[CheckRow] = []
        spec = ctx.spec
        self.float_host = [host[i] for i in spec.float_idx]
        self.other_host = [host[i] for i in spec.other_idx]
        self.args = spec.assemble(self.float_host, self.other_host)
        self.label = ",".join(sorted({str(h.dtype) for h in self.float_host}))
        self.rng = np.random.default_rng(ctx.seed)
        try:
            out_shape = jax.eval_shape(spec.fn, *self.args)
        except Exception as err:
            self._error("vjp", err, "fn(*args) raised")
            return
        self.out_shape_leaves, self.out_treedef = jax.tree.flatten(out_shape)
        dts = [h.dtype for h in self.float_host] + [o.dtype for o in self.out_shape_leaves]
        self.tol = _tolerance_for_run(ctx.table, dts)
        # Draw everything random up front, so what is drawn never depends on
        # which checks run or fail: u, u₂, the directions, the vmap copies.
        self.u_host = self._normal_like(self.out_shape_leaves)
        self.u2_host = self._normal_like(self.out_shape_leaves)
        k = ctx.num_directions
        self.directions = [self.rng.standard_normal((k,) + h.shape) for h in self.float_host]
        self.copy_noise = [
            [self.rng.standard_normal(h.shape) * _COPY_NOISE for h in self.float_host]
            for _ in range(ctx.vmap_size - 1)
        ]
        self.vmap_seed = int(self.rng.integers(2**31))

        fl, ol = self._put(self.float_host), self._put(self.other_host)
        u = self._put_tree(self.out_treedef, self.u_host)
        try:
            self.spec = spec.with_fingerprint(functools.partial(_vjp, spec), fl, ol, u)
            out, cts = jax.block_until_ready(_vjp_jit(self.spec, fl, ol, u))
        except Exception as err:
            self._error("vjp", err, "the rule raised")
            return
        traces_first = self.spec.traces
        self.out_host = [np.asarray(o) for o in jax.tree.leaves(out)]
        self.cts_host = [np.asarray(c) for c in cts]
        if "dtype" in ctx.checks:
            self._dtype(cts)
        if "retrace" in ctx.checks:
            self._retrace(ol, traces_first)
        if "reference" in ctx.checks and ctx.ref_spec is not None:
            self._reference(fl, ol, u)
        if "fd" in ctx.checks:
            self._finite_differences()
        if "vmap" in ctx.checks:
            self._vmap()

    # ----------------------------------------------------------------- helpers

    def _put(self, leaves, device=None):
        return [jax.device_put(h, device or self.device) for h in leaves]

    def _put_tree(self, treedef, leaves, device=None):
        return jax.tree.unflatten(treedef, self._put(leaves, device))

    def _normal_like(self, shapes, batch: tuple[int, ...] = ()) -> list[np.ndarray]:
        return [self.rng.standard_normal(batch + tuple(o.shape)).astype(o.dtype) for o in shapes]

    def _add(self, check, dtype, argument, errs, tol, detail=""):
        max_abs, max_rel, passed = errs
        self.rows.append(
            CheckRow(check, self.dev, str(dtype), argument, max_abs, max_rel, tol, passed, detail)
        )

    def _error(self, check, err, what, argument="-", dtype=None):
        dtype = self.label if dtype is None else dtype
        self._add(check, dtype, argument, (None, None, False), None, f"{what}: {_short(err)}")

    def _add_compare(
        self, check, dtype, argument, actual, expected, tol, detail="", magnitude=None
    ):
        max_abs, max_rel, passed, why = _compare(actual, expected, tol, magnitude)
        self._add(check, dtype, argument, (max_abs, max_rel, passed), tol, why or detail)

    # ----------------------------------------------------------------- checks

    def _dtype(self, cts):
        for name, primal, ct in zip(self.ctx.float_names, self.float_host, cts, strict=True):
            ok = ct.dtype == primal.dtype and ct.shape == primal.shape
            detail = (
                "cotangent dtype = primal dtype"
                if ok
                else f"cotangent {ct.dtype}{list(ct.shape)} for a primal "
                f"{primal.dtype}{list(primal.shape)}"
            )
            self._add("dtype", primal.dtype, name, (None, None, ok), None, detail)

    def _retrace(self, ol, traces_first):
        """Call 2 gets what SGD would feed back, x₂ = x − lr·dx in JAX's standard
        promotion (so a cotangent of another dtype changes x₂'s dtype), and a new u."""
        spec = self.spec
        fl2_host = [
            (np.asarray(x, np.float64) - _RETRACE_LR * np.asarray(c, np.float64)).astype(
                accumulation_dtype(x.dtype, c.dtype)
            )
            for x, c in zip(self.float_host, self.cts_host, strict=True)
        ]
        changed = [
            f"{n}: {a.dtype} -> {b.dtype}"
            for n, a, b in zip(self.ctx.float_names, self.float_host, fl2_host, strict=True)
            if a.dtype != b.dtype
        ]
        changed = "; x changed dtype: " + ", ".join(changed) if changed else ""
        try:
            # fn's output may change dtype with x₂ (it does under standard promotion).
            args2 = spec.assemble(fl2_host, self.other_host)
            out2 = jax.tree.leaves(jax.eval_shape(spec.fn, *args2))
            u2 = [u.astype(o.dtype) for u, o in zip(self.u2_host, out2, strict=True)]
            u2 = self._put_tree(self.out_treedef, u2)
            before = spec.traces
            jax.block_until_ready(_vjp_jit(spec, self._put(fl2_host), ol, u2))
            again = spec.traces - before
        except Exception as err:
            detail = f"call 2 (x - {_RETRACE_LR}*dx) raised {_short(err)}{changed}"
            self._add("retrace", self.label, "-", (None, None, False), None, detail)
            return
        detail = f"call 1 traced {traces_first}x, call 2 (x - {_RETRACE_LR}*dx) traced {again}x"
        detail += changed
        self._add("retrace", self.label, "-", (None, None, again == 0), None, detail)

    def _reference(self, fl, ol, u):
        try:
            ref = self.ctx.ref_spec
            ref = ref.with_fingerprint(functools.partial(_vjp, ref), fl, ol, u)
            ref_out, ref_cts = jax.block_until_ready(_vjp_jit(ref, fl, ol, u))
        except Exception as err:
            self._error("reference", err, "reference raised")
            return
        tol = self.tol.autodiff
        ref_out = jax.tree.leaves(ref_out)
        for name, a, e in zip(self.ctx.out_names, self.out_host, ref_out, strict=True):
            self._add_compare("forward", a.dtype, name, a, np.asarray(e), tol)
        magnitude = _magnitude(ref_cts)
        for name, a, e, p in zip(
            self.ctx.float_names, self.cts_host, ref_cts, self.float_host, strict=True
        ):
            self._add_compare("reference", p.dtype, name, a, np.asarray(e), tol, "", magnitude)

    def _finite_differences(self):
        ctx = self.ctx
        tol = self.tol.fd
        rtol, atol = tol
        k = ctx.num_directions
        # float64 everywhere but on TPUs, which have no native float64.
        fd_device = self.device if self.device.platform != "tpu" else jax.devices("cpu")[0]
        with jax.enable_x64(True):
            fl64 = self._put([np.asarray(h, np.float64) for h in self.float_host], fd_device)
            ol = self._put(self.other_host, fd_device)
            u64 = [np.asarray(u, np.float64) for u in self.u_host]
            u64 = self._put_tree(self.out_treedef, u64, fd_device)
            try:
                out64 = jax.eval_shape(ctx.spec.fn, *ctx.spec.assemble(fl64, ol))
            except Exception as err:
                self._error("fd-direction", err, "fn raised on float64 inputs")
                return
            # The step for the dtype the differences are computed in: float64,
            # unless fn computes in a narrower dtype whatever its inputs.
            fd_dtype = max(
                (np.dtype(o.dtype) for o in jax.tree.leaves(out64)),
                key=lambda d: float(jnp.finfo(d).eps),
            )
            step = float(jnp.finfo(fd_dtype).eps) ** (1.0 / 3.0)
            note = (
                ""
                if fd_dtype == np.float64
                else f"fn returns {fd_dtype} for float64 inputs: differences only that accurate"
            )
            plan = []
            for x, d in zip(self.float_host, self.directions, strict=True):
                x64 = np.asarray(x, np.float64)
                scale = np.maximum(1.0, np.abs(x64))  # h_i = t * max(1, |x_i|)
                d = d * scale  # (k, *shape): directions scaled like the step
                stack = [step * d]
                elementwise = 0 < x64.size <= ctx.elementwise_max_size
                if elementwise:
                    h = (step * scale).reshape(-1)
                    stack.append((np.eye(x64.size) * h[:, None]).reshape((x64.size,) + x64.shape))
                plan.append((d, scale, elementwise, np.concatenate(stack)))
            try:
                perturbations = self._put([p for *_, p in plan], fd_device)
                spec = ctx.spec.with_fingerprint(
                    lambda fl, ol: ctx.spec.fn(*ctx.spec.assemble(fl, ol)), fl64, ol
                )
                diffs = _fd_jit(spec, fl64, ol, u64, perturbations)
                diffs = [np.asarray(v, np.float64) for v in diffs]
            except Exception as err:
                self._error("fd-direction", err, "fn raised under lax.map in float64")
                return
        # atol scaled to the rule's whole gradient (see _magnitude).
        magnitude = _magnitude(self.cts_host)
        for name, x, g, (d, scale, elementwise, _), diff in zip(
            ctx.float_names, self.float_host, self.cts_host, plan, diffs, strict=True
        ):
            g64 = np.asarray(g, np.float64)
            # Along d: <g, d> against (φ(x + t d) − φ(x − t d)) / 2t.
            a = np.tensordot(d, g64, axes=g64.ndim) if g64.size else np.zeros(k)
            e = diff[:k] / (2 * step)
            abs_d = np.abs(d).reshape(k, -1)
            bound = atol * magnitude * abs_d.sum(1)
            bound = bound + rtol * (abs_d * np.abs(g64).reshape(-1)).sum(1)
            errs = _compare_directional(a, e, bound)
            detail = f"{k} random directions" + (f"; {note}" if note else "")
            self._add("fd-direction", x.dtype, name, errs, tol, detail)
            if elementwise:
                fd = (diff[k:] / (2 * step * scale.reshape(-1))).reshape(g64.shape)
                self._add_compare("fd-element", x.dtype, name, g64, fd, tol, note, magnitude)

    def _vmap(self):
        ctx, spec = self.ctx, self.spec
        if ctx.vmap_in_axes is None:
            in_axes = 0
            copies = [self.float_host]
            for noise in self.copy_noise:
                copies.append(
                    [
                        (np.asarray(h, np.float64) + n).astype(h.dtype)
                        for h, n in zip(self.float_host, noise, strict=True)
                    ]
                )
            examples = [spec.assemble(c, self.other_host) for c in copies]
            batched_args = jax.tree.map(lambda *a: np.stack(a), *examples)
            detail = f"{len(examples)} perturbed copies stacked on a new axis 0"
        else:
            in_axes = ctx.vmap_in_axes
            batched_args = self.args
            moved = jax.vmap(lambda *a: a, in_axes=in_axes)(*self.args)
            moved = jax.tree.map(np.asarray, moved)
            size = jax.tree.leaves(moved)[0].shape[0]
            examples = [jax.tree.map(lambda a, i=i: a[i], moved) for i in range(size)]
            detail = f"in_axes={in_axes!r}, {size} examples"

        try:
            example_shape = jax.eval_shape(spec.fn, *examples[0])
            rng = np.random.default_rng(self.vmap_seed)
            u_leaves = [
                rng.standard_normal((len(examples),) + tuple(o.shape)).astype(o.dtype)
                for o in jax.tree.leaves(example_shape)
            ]
            U = jax.tree.unflatten(jax.tree.structure(example_shape), u_leaves)
            fl, ol = spec.split(examples[0])
            jax.eval_shape(functools.partial(_vjp, spec), fl, ol, jax.tree.map(lambda a: a[0], U))
        except Exception as err:
            self._error("vmap", err, "the rule raised on one example")
            return
        put = functools.partial(jax.device_put, device=self.device)
        try:
            hash(in_axes)
            vmapped = functools.partial(_vmapped_jit, spec, in_axes)
        except TypeError:  # unhashable in_axes (lists): compile a fresh closure
            vmapped = jax.jit(functools.partial(_vmapped, spec, in_axes))
        try:
            v_out, v_cts = jax.block_until_ready(
                vmapped(jax.tree.map(put, batched_args), jax.tree.map(put, U))
            )
        except Exception as err:
            self._error("vmap", err, "the rule raised under vmap")
            return
        loop = []  # the same rule, compiled, one example at a time
        try:
            for i, ex in enumerate(examples):
                fl, ol = spec.split(ex)
                u_i = jax.tree.map(lambda a, i=i: put(a[i]), U)
                loop.append(
                    jax.block_until_ready(_vjp_jit(spec, self._put(fl), self._put(ol), u_i))
                )
        except Exception as err:
            self._error("vmap", err, f"the rule raised on example {len(loop)}")
            return
        tol = self.tol.autodiff
        for j, name in enumerate(ctx.float_names):
            expected = np.stack([np.asarray(c[j]) for _, c in loop])
            got = np.asarray(v_cts[j])
            self._add_compare("vmap", self.float_host[j].dtype, name, got, expected, tol, detail)
        for j, (name, got) in enumerate(zip(ctx.out_names, jax.tree.leaves(v_out), strict=True)):
            expected = np.stack([np.asarray(jax.tree.leaves(o)[j]) for o, _ in loop])
            self._add_compare("vmap", got.dtype, name, np.asarray(got), expected, tol, detail)
