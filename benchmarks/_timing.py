"""Interleaved, paired timing: the one timer every benchmark section uses.

Absolute times on a shared machine drift (other processes, frequency scaling,
thermal state), but two functions timed back to back see nearly the same
machine. So every candidate is timed in *rounds*: one round times each
function once, back to back, and the ratio candidate ÷ baseline is taken
within the round. The order inside a round alternates (A B, then B A, …; with
more than two the order rotates, and reverses every other cycle),
so neither function systematically runs first, after the other has warmed
the caches, or last, when a co-tenant has woken up. The reported ratio is the
**median of the per-round ratios**; absolute times are the median over rounds.

One *sample* calls the function ``number`` times back to back, calling
``jax.block_until_ready`` on every result before the next call (latency, not
pipelined throughput), timing each call, and keeps the **fastest** call
(``statistic="min"``, the default) or the mean (``"mean"``). Interference from
other processes only ever adds time, so on a shared machine the fastest of a
few calls is the closest estimate of the program's own cost, and the median
over rounds then discards the rounds in which every call was disturbed.
``number`` is calibrated once per run and is the same for every function
(the fastest of k calls is biased low by more as k grows), chosen so that the
slowest function's sample lasts at least ``min_sample_s``. Warm-up calls
(compilation, first-touch of buffers, thread-pool start) run before any round
and are never recorded.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

__all__ = ["Timing", "paired", "ratio_between", "time_once"]


@dataclasses.dataclass(frozen=True)
class Timing:
    """The result for one function of a :func:`paired` run.

    Attributes:
        seconds: median over the rounds of the seconds per call of each sample.
        ratio: median over rounds of (this function's time ÷ the baseline's
            time in the same round); 1.0 for the baseline itself.
        ratio_iqr: (25th, 75th) percentile of the per-round ratios, the spread
            a reader needs to judge a ratio of 1.01.
        number: calls per sample.
        samples: seconds per call in each round, in round order, so any two
            functions of the same run can be compared with :func:`ratio_between`.
    """

    seconds: float
    ratio: float
    ratio_iqr: tuple[float, float]
    number: int
    samples: tuple[float, ...]


def ratio_between(a: Timing, b: Timing) -> tuple[float, tuple[float, float]]:
    """Median and interquartile range of the per-round ratios a ÷ b.

    ``a`` and ``b`` must come from the same :func:`paired` run (same rounds).
    """
    if len(a.samples) != len(b.samples):
        raise ValueError("`a` and `b` must come from the same paired run.")
    ratios = [x / y for x, y in zip(a.samples, b.samples, strict=True)]
    return statistics.median(ratios), _quartiles(ratios)


def time_once(fn: Callable[[], Any], number: int, statistic: str = "min") -> float:
    """Seconds per call of ``fn``: the fastest (``"min"``) or the mean (``"mean"``)
    of ``number`` calls, each result blocked on before the next call."""
    if statistic not in ("min", "mean"):
        raise ValueError(f"`statistic` must be 'min' or 'mean'; got {statistic!r}.")
    clock = time.perf_counter
    if statistic == "mean":
        start = clock()
        for _ in range(number):
            jax.block_until_ready(fn())
        return (clock() - start) / number
    best = float("inf")
    for _ in range(number):
        start = clock()
        jax.block_until_ready(fn())
        best = min(best, clock() - start)
    return best


def _calibrate(fn: Callable[[], Any], min_sample_s: float) -> int:
    number = 1
    if min_sample_s <= 0:  # one call per sample: no need to time one first
        return number
    while True:
        t = time_once(fn, number, "mean")
        if t * number >= min_sample_s or number >= 1 << 20:
            return number
        # Aim slightly above the target so one more doubling is rarely needed.
        number = max(number * 2, int(1.2 * min_sample_s / max(t, 1e-9)))


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[0], q[2])


def paired(
    fns: Mapping[str, Callable[[], Any]],
    *,
    baseline: str,
    rounds: int = 15,
    warmup: int = 2,
    min_sample_s: float = 0.02,
    statistic: str = "min",
) -> dict[str, Timing]:
    """Time ``fns`` interleaved and return each one's :class:`Timing`.

    Args:
        fns: name -> a zero-argument callable returning JAX arrays (a jitted
            function with its arguments bound). Every callable is called
            ``warmup`` times first, unrecorded.
        baseline: the name in ``fns`` whose time is the denominator of every ratio.
        rounds: paired samples per function.
        warmup: unrecorded calls per function before the first round.
        min_sample_s: a sample repeats the call until it lasts at least this long.
        statistic: ``"min"`` (fastest call of a sample) or ``"mean"``.
    """
    if baseline not in fns:
        raise ValueError(f"`baseline` {baseline!r} is not one of {sorted(fns)}.")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            jax.block_until_ready(fns[name]())
    # One call count for every function: the fastest of k calls is biased low
    # by more as k grows, so a ratio of minimums needs the same k on both sides.
    # The slowest function sets it, so every sample lasts at least min_sample_s.
    common = min(_calibrate(fns[name], min_sample_s) for name in names)
    number = dict.fromkeys(names, common)
    samples: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        # Rotate by one each round, so each function is first equally often,
        # and reverse every other cycle of rotations, so each one also
        # precedes and follows every other: A B C, B C A, C A B, C B A, …
        # (with two functions A B, B A, B A, A B).
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if (r // len(names)) % 2:
            order = order[::-1]
        this_round = {name: time_once(fns[name], number[name], statistic) for name in order}
        for name in names:
            samples[name].append(this_round[name])
            ratios[name].append(this_round[name] / this_round[baseline])
    return {
        name: Timing(
            seconds=statistics.median(samples[name]),
            ratio=statistics.median(ratios[name]),
            ratio_iqr=_quartiles(ratios[name]),
            number=number[name],
            samples=tuple(samples[name]),
        )
        for name in names
    }
