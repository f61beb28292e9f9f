"""Trace-time taps on :func:`jaxlinear.linear_apply`, scoped and thread-safe.

:func:`jaxlinear.per_example_grad_norms` and :func:`jaxlinear.clipped_grad` trace
the user's ``loss_fn`` with a *tap* active: an object every ``linear_apply`` call
hands its validated arguments to, at trace time, instead of binding the layer
itself. The active taps live in a :class:`contextvars.ContextVar` holding an
immutable tuple, set by :func:`tapping` and restored when it exits, so a tap is
seen only by the thread (and context) that pushed it and never outlives it.
Nothing here runs at run time, and outside those two functions no tap is active.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

_ACTIVE: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar(
    "jaxlinear_linear_taps", default=()
)


def active() -> tuple[Any, ...]:
    """The taps active in this context, outermost first."""
    return _ACTIVE.get()


def innermost() -> Any | None:
    taps = _ACTIVE.get()
    return taps[-1] if taps else None


@contextlib.contextmanager
def tapping(tap: Any):
    """Make ``tap`` the innermost active tap for the duration of the block."""
    token = _ACTIVE.set(_ACTIVE.get() + (tap,))
    try:
        yield tap
    finally:
        _ACTIVE.reset(token)
