"""What a benchmark section hands the driver: tables, targets, notes and bars.

A section builds one :class:`Section`; the driver (``run.py``) renders every
section into ``RESULTS.md`` and draws every section's :class:`Chart` into one
PNG. Nothing here measures anything.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["Chart", "Section", "Table", "Target", "fmt_bytes", "fmt_ratio", "fmt_time"]


@dataclasses.dataclass(frozen=True)
class Table:
    """A markdown table: ``columns`` names and ``rows`` of already formatted cells."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""

    def markdown(self) -> str:
        lines = []
        if self.caption:
            lines += [self.caption, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Target:
    """One target of the issue, checked against a measured value.

    Attributes:
        name: what is compared, e.g. ``"fwd+bwd jaxlinear ÷ autodiff, large"``.
        value: the measured number (a ratio, bytes, …).
        limit: the target's bound.
        direction: ``"<="`` (value must not exceed limit) or ``">="``.
        noise: for timing targets, how far an identical pair of programs
            strays from 1.0 in the same run (the A/A control); a miss within
            it is reported as "within noise", not as met.
        note: the evidence or the reason for a miss, in one markdown sentence.
        shown: how the summary prints ``value`` (default: three decimals).
    """

    name: str
    value: float
    limit: float
    direction: Literal["<=", ">="] = "<="
    noise: float = 0.0
    note: str = ""
    shown: str = ""

    @property
    def status(self) -> str:
        if self.direction == "<=":
            met, near = self.value <= self.limit, self.value <= self.limit + self.noise
        else:
            met, near = self.value >= self.limit, self.value >= self.limit - self.noise
        if met:
            return "met"
        return "missed (within noise)" if near else "missed"


@dataclasses.dataclass(frozen=True)
class Chart:
    """Grouped bars for the PNG: ``bars[group][series] = value``.

    ``reference`` draws a horizontal line (1.0 for ratios to a baseline).
    """

    title: str
    ylabel: str
    bars: dict[str, dict[str, float]]
    reference: float | None = 1.0


@dataclasses.dataclass
class Section:
    """One section of the report.

    Attributes:
        title: the ``##`` heading.
        intro: markdown paragraph(s): what is measured and how.
        tables: rendered in order after the intro.
        targets: collected by the driver into the summary at the top.
        notes: markdown bullet points after the tables (skips, evidence).
        chart: bars for the PNG, or ``None``.
    """

    title: str
    intro: str = ""
    tables: list[Table] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    chart: Chart | None = None

    def markdown(self) -> str:
        parts = [f"## {self.title}"]
        if self.intro:
            parts.append(self.intro)
        parts += [t.markdown() for t in self.tables]
        if self.notes:
            parts.append("\n".join(f"- {n}" for n in self.notes))
        return "\n\n".join(parts)


def fmt_time(seconds: float) -> str:
    """Seconds in the unit that keeps three significant digits readable."""
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_ratio(ratio: float, iqr: tuple[float, float] | None = None) -> str:
    """``1.003 (0.98–1.02)``: a median ratio and its interquartile range."""
    if iqr is None:
        return f"{ratio:.3f}"
    return f"{ratio:.3f} ({iqr[0]:.2f}–{iqr[1]:.2f})"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"
