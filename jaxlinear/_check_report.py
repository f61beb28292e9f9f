"""The report of :func:`jaxlinear.check_vjp`: one :class:`CheckRow` per measurement."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["CheckReport", "CheckRow", "format_rows"]

#: The order of a run's rows in a report.
ROW_ORDER = (
    "vjp",
    "explore",
    "forward",
    "reference",
    "fd-element",
    "fd-direction",
    "vmap",
    "dtype",
    "retrace",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckRow:
    """One measurement of :func:`jaxlinear.check_vjp`.

    Errors are relative: divided by the size of what is compared (the largest
    true entry of the argument's gradient, or the RMS of its directional
    derivatives), so a 1 % bug reads 1e-2 whatever the array's size.

    Attributes:
        check: ``"forward"``, ``"reference"``, ``"fd-element"``,
            ``"fd-direction"``, ``"vmap"``, ``"dtype"``, ``"retrace"``,
            ``"explore"`` (which variant of the arguments ran, or why one did
            not), or ``"vjp"`` (the rule itself raised).
        variant: which arguments: ``"args"`` (the user's), or one that
            ``explore`` derived from them, e.g. ``"x[:1]"``, ``"-args"``.
        device: ``"platform:id"``, e.g. ``"cpu:0"``.
        dtype: the measured leaf's dtype in this run.
        argument: which leaf, e.g. ``"params.W"``, ``"x"`` or ``"output"``.
        error: the rule's relative error against float64 truth; ``None`` where
            nothing numeric is compared.
        autodiff_error: the relative error of autodiff of the reference in the
            same dtype, the yardstick (``forward``, ``reference``, ``vmap`` with a
            reference); ``None`` otherwise.
        bound: the largest ``error`` allowed: ``autodiff_error + margin`` or the
            finite differences' bound; ``None`` where nothing numeric is compared.
        max_abs_err: the largest absolute difference from float64 truth.
        passed: whether ``error <= bound`` (or the check's condition) held.
        detail: what was compared, or why it failed.
    """

    check: str
    variant: str = "args"
    device: str
    dtype: str
    argument: str
    error: float | None = None
    autodiff_error: float | None = None
    bound: float | None = None
    max_abs_err: float | None = None
    passed: bool
    detail: str = ""

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers become the strings ``"nan"``/``"inf"``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = str(value)
        out["status"] = self.status
        return out


_COLUMNS = (
    ("check", "check"),
    ("variant", "variant"),
    ("device", "device"),
    ("dtype", "dtype"),
    ("argument", "argument"),
    ("error", "error"),
    ("autodiff", "autodiff_error"),
    ("bound", "bound"),
    ("max abs err", "max_abs_err"),
    ("result", "status"),
    ("detail", "detail"),
)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)


def format_rows(rows: Sequence[CheckRow]) -> list[str]:
    """Rows as aligned text lines, the header first."""
    cells = [[_cell(getattr(r, attr)) for _, attr in _COLUMNS] for r in rows]
    heads = [h for h, _ in _COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]

    def line(values):
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    return [line(heads)] + [line(c) for c in cells]


@dataclasses.dataclass(frozen=True, repr=False)
class CheckReport:
    """What :func:`jaxlinear.check_vjp` measured: one :class:`CheckRow` per check,
    variant, device, dtype and argument. ``str(report)`` is a table;
    :meth:`to_json` is for machines.

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

    @property
    def failed_variants(self) -> frozenset[str]:
        """The variants of the arguments with at least one failing row."""
        return frozenset(r.variant for r in self.failures)

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
