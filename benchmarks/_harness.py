"""What every benchmark script shares: the paired timer, the A/A noise, memory, the report.

Timing. Times on a shared machine drift, but two programs timed back to back see
nearly the same machine. So programs are timed in *rounds*, each program once a
round, in an order that rotates every round and reverses every other cycle, and
the ratio candidate ÷ baseline is taken within the round: a ratio is the **median
of the per-round ratios**. A sample is the fastest of ``number`` calls, each
result blocked on (interference only adds time); ``number`` is calibrated once,
the same for every program, so the slowest sample lasts ``min_sample_s``.

Noise. Each timed comparison carries an *A/A control*: the baseline's program
built and compiled a second time and timed as a candidate. Its true ratio is 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))  # for _digits


class Timing(NamedTuple):
    """Median seconds per call, median per-round ratio to the baseline and its
    (25th, 75th) percentiles, and the seconds of each round's sample."""

    seconds: float
    ratio: float
    iqr: tuple[float, float]
    samples: tuple[float, ...]


def time_once(fn, number: int, mean: bool = False) -> float:
    """The fastest (or the mean) of ``number`` calls of ``fn``, each result blocked on."""
    times = []
    for _ in range(number):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.fmean(times) if mean else min(times)


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return (q[0], q[2])


def _calibrate(fn, min_sample_s: float) -> int:
    number = 1
    while min_sample_s > 0 and number < 1 << 16:
        t = time_once(fn, number, mean=True)
        if t * number >= min_sample_s:
            break
        number = max(2 * number, int(1.2 * min_sample_s / max(t, 1e-9)))
    return number


def paired(fns, baseline, rounds, min_sample_s=0.02, warmup=2, rest_s=0.0, own_number=False):
    """Time ``fns`` (name -> zero-argument callable) interleaved; ratios to ``baseline``.

    ``own_number``: each function gets its own calls per sample and a sample is
    their mean (for programs 100× apart, where one common count would leave the
    fast one a single noisy call). ``rest_s``: an untimed pause after every
    sample, for programs with gigabytes of temporaries, whose release would
    otherwise be paid by the next program.
    """
    names = list(fns)
    for name in names * warmup:
        jax.block_until_ready(fns[name]())
    number = {n: _calibrate(fns[n], min_sample_s) for n in names}
    if not own_number:  # the fastest of k calls is biased low by more as k grows
        number = dict.fromkeys(names, min(number.values()))
    samples = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order[::-1] if (r // len(names)) % 2 else order:
            samples[name].append(time_once(fns[name], number[name], own_number))
            time.sleep(rest_s)
    return {n: ratio_between(samples[n], samples[baseline]) for n in names}


def ratio_between(a, b) -> Timing:
    """``a``'s :class:`Timing` with ratios to ``b``: two sequences of per-round
    seconds (or two Timings) of the same paired run."""
    a, b = getattr(a, "samples", a), getattr(b, "samples", b)
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    median = statistics.median
    return Timing(median(a), median(ratios), _quartiles(ratios), tuple(a))


def aa_noise(repeat: Timing, rounds: int, candidate: Timing | None = None) -> float:
    """How far from 1 a ratio lands by chance: the A/A control's distance from 1,
    or the 95% notch of a median of ``rounds`` ratios (1.57 IQR / √rounds) of
    the control or the candidate, whichever is largest."""
    spread = [t.iqr[1] - t.iqr[0] for t in (repeat, candidate) if t is not None]
    return max(abs(repeat.ratio - 1.0), *(1.57 * s / math.sqrt(rounds) for s in spread))


def temp_bytes(fn, *args) -> int:
    """Peak temporary memory of ``jit(fn)(*args)``: XLA's buffer assignment for
    everything neither argument nor output (``memory_analysis().temp_size_in_bytes``)."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def fmt_time(s: float) -> str:
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} µs"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def fmt_ratio(t: Timing, scale: float = 1.0) -> str:
    """``1.003 (0.98–1.02)``: median ratio (× ``scale``) and its interquartile range."""
    return f"{t.ratio * scale:.3f} ({t.iqr[0] * scale:.2f}–{t.iqr[1] * scale:.2f})"


class Target(NamedTuple):
    """A measured ``value`` against ``limit`` (``direction`` "<=" or ">="); a miss
    by less than ``noise`` (the A/A noise, timing only) is "within noise"."""

    name: str
    value: float
    limit: float
    direction: str = "<="
    noise: float | None = None
    shown: str = ""

    @property
    def status(self) -> str:
        miss = (self.value - self.limit) * (1 if self.direction == "<=" else -1)
        near = self.noise is not None and miss <= self.noise
        return "pass" if miss <= 0 else "fail (within noise)" if near else "fail"

    def row(self) -> list[str]:
        noise = "—" if self.noise is None else f"±{self.noise:.3f}"
        limit = f"{self.direction} {self.limit:g}"
        return [self.name, limit, self.shown or f"{self.value:.3f}", noise, self.status]


class Section(NamedTuple):
    """One script's report: ``tables`` of (caption, columns, rows), :class:`Target` s,
    and a ``chart`` (title, ylabel, {group: {series: value}}, log scale) for the PNG."""

    title: str
    intro: str
    tables: list
    targets: list
    chart: tuple | None

    def markdown(self) -> str:
        tables = [md_table(cols, rows, caption) for caption, cols, rows in self.tables]
        return "\n\n".join([f"## {self.title}", self.intro, *tables])


def md_table(columns, rows, caption: str = "") -> str:
    lines = [caption, ""] if caption else []
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


SUMMARY_COLUMNS = ["benchmark", "target", "measured (median)", "A/A noise", "result"]


def environment() -> str:
    """One line: date, device and CPU, cores, versions, load average."""

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":")[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    dev, dists = jax.devices()[0], ("jaxlib", "flax", "equinox", "optax", "jax-privacy")
    return (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {dev.platform} "
        f"{dev.device_kind} ({cpu or platform.machine()}, {len(os.sched_getaffinity(0))} cores); "
        f"Python {platform.python_version()}; jax {jax.__version__}, "
        + ", ".join(f"{d} {version(d)}" for d in (*dists, "jaxlinear"))
        + f"; load {os.getloadavg()[0]:.2f}"
    )


def main(run) -> Section:
    """Standalone entry point of a script: ``--quick``, print the section."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few rounds")
    section = run(parser.parse_args().quick)
    print(environment(), section.markdown(), sep="\n\n")
    print("\n" + md_table(SUMMARY_COLUMNS, [t.row() for t in section.targets]))
    return section
