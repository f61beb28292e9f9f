"""Run jaxlinear's benchmark suite and write ``RESULTS.md`` and ``results.png``.

Usage::

    python benchmarks/run.py                      # every section, full sweep (< 5 min)
    python benchmarks/run.py --quick              # a smaller sweep, for development
    python benchmarks/run.py --sections linear,memory --out /tmp/bench

Not part of the test suite: timings depend on the machine and on whatever else
runs on it. Every timing is a median of paired ratios from ``_timing.paired``.
The optional peers come from the ``bench`` extra (Flax, Equinox, matplotlib);
PyTorch rows need the ``torch`` extra and are skipped, with a note, without it.

Adding a section
----------------
A section is a module ``benchmarks/bench_<name>.py``; the driver finds every
such file, imports it and calls it. The module defines:

``SECTION: str``
    The name ``--sections`` selects it by (e.g. ``"dp"``), unique.
``ORDER: int``
    Its position in the report; sections run and print in increasing ``ORDER``
    (``linear`` 10, ``mlp`` 20, ``memory`` 30, ``dispatch`` 40; pick a free number).
``run(quick: bool) -> _report.Section``
    Measures and returns a :class:`_report.Section`: a title, an intro saying what
    is measured and how, :class:`_report.Table` s of formatted cells,
    :class:`_report.Target` s (value, limit, direction, the A/A noise for timing
    targets, and a note with the evidence), bullet ``notes`` (skips and their
    reasons) and optionally a :class:`_report.Chart` of grouped bars. With
    ``quick=True`` it should take well under a minute. The full suite has a
    budget of 5 minutes on 2 CPU cores: keep a section's full run near a minute.

A section times with ``_timing.paired`` (interleaved rounds, warm-up excluded,
``block_until_ready``, median of per-round ratios) and puts an A/A control
(the baseline's program compiled twice) beside its candidates so ``_common.aa_noise``
can say how far from 1.0 a ratio lands by chance; it guards optional
dependencies with ``importlib.util.find_spec`` and says in a note what it skipped.
Modules that start with ``_`` are helpers, never sections; import them as
``from benchmarks._timing import paired`` (the driver puts the repository root
on ``sys.path``). A minimal section::

    # benchmarks/bench_dp.py (its module docstring: what is measured and how)
    from benchmarks._common import aa_noise
    from benchmarks._report import Section, Table, Target, fmt_ratio, fmt_time
    from benchmarks._timing import paired

    SECTION = "dp"
    ORDER = 50

    def run(quick: bool) -> Section:
        rounds = 5 if quick else 21
        t = paired(
            {"reference": ref, "candidate": cand, "reference (repeat)": ref_again},
            baseline="reference",
            rounds=rounds,
        )  # each value: a zero-argument callable returning JAX arrays
        c = t["candidate"]
        return Section(
            title="Per-example gradient norms",
            intro="…",
            tables=[
                Table(
                    ["case", "time", "÷ reference"],
                    [["…", fmt_time(c.seconds), fmt_ratio(c.ratio, c.ratio_iqr)]],
                )
            ],
            targets=[
                Target(
                    "candidate ÷ reference",
                    c.ratio,
                    1.0,
                    noise=aa_noise(t["reference (repeat)"], rounds, c),
                )
            ],
        )

Memory comes from ``jax.jit(f).lower(*args).compile().memory_analysis()``
(``temp_size_in_bytes``), as ``bench_memory.py`` does.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402

from benchmarks._report import Chart, Section, Table, Target  # noqa: E402


def discover() -> list:
    """Every ``bench_*.py`` module beside this file, checked and sorted by ``ORDER``."""
    modules = []
    for path in sorted(HERE.glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        for attr in ("SECTION", "ORDER", "run"):
            if not hasattr(module, attr):
                raise TypeError(f"{path.name} is a benchmark section but defines no `{attr}`.")
        modules.append(module)
    names = [m.SECTION for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"section names must be unique; got {names}.")
    return sorted(modules, key=lambda m: m.ORDER)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    device = jax.devices()[0]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "device": f"{device.platform}: {device.device_kind} ({jax.device_count()} device(s))",
        "JAX": f"jax {jax.__version__}, jaxlib {_version('jaxlib')}",
        "peers": ", ".join(
            f"{d} {_version(d)}" for d in ("flax", "equinox", "optax", "torch", "jaxlinear")
        ),
        "Python": f"{platform.python_version()} on {platform.system()} {platform.release()}",
    }


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def summary_table(targets: list[Target]) -> Table:
    rows = [
        [t.name, t.shown or f"{t.value:.3f}", f"{t.direction} {t.limit:g}", t.status, t.note]
        for t in targets
    ]
    return Table(["target", "measured", "limit", "status", "evidence / reason"], rows)


def write_chart(charts: list[Chart], path: Path) -> bool:
    """One subplot per chart, grouped bars; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(charts), 1, figsize=(10, 3.6 * len(charts)), squeeze=False)
    for ax, chart in zip(axes[:, 0], charts, strict=True):
        groups = list(chart.bars)
        series = list(dict.fromkeys(s for g in groups for s in chart.bars[g]))
        width = 0.8 / max(len(series), 1)
        for k, s in enumerate(series):
            xs = [j + (k - (len(series) - 1) / 2) * width for j in range(len(groups))]
            ys = [chart.bars[g].get(s, float("nan")) for g in groups]
            bars = ax.bar(xs, ys, width, label=s)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        if chart.reference is not None:
            ax.axhline(chart.reference, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(chart.title)
        ax.set_ylabel(chart.ylabel, fontsize=8)
        ax.legend(fontsize=7, ncol=min(len(series), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep, fewer rounds")
    parser.add_argument(
        "--out", type=Path, default=HERE, help="folder for RESULTS.md and results.png"
    )
    parser.add_argument(
        "--sections", default="", help="comma-separated section names (default: all)"
    )
    args = parser.parse_args(argv)

    modules = discover()
    known = [m.SECTION for m in modules]
    if args.sections:
        wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            parser.error(f"unknown section(s) {unknown}; choose from {known}.")
        modules = [m for m in modules if m.SECTION in wanted]

    info = machine()
    load_before = _load()
    start = time.perf_counter()
    sections: list[Section] = []
    timings = []
    for module in modules:
        print(f"[{module.SECTION}] running…", flush=True)
        t0 = time.perf_counter()
        section = module.run(args.quick)
        timings.append((module.SECTION, time.perf_counter() - t0))
        print(f"[{module.SECTION}] done in {timings[-1][1]:.0f} s", flush=True)
        sections.append(section)
    total = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    charts = [s.chart for s in sections if s.chart is not None]
    png = args.out / "results.png"
    drew = bool(charts) and write_chart(charts, png)

    targets = [t for s in sections for t in s.targets]
    header = [
        "# jaxlinear benchmark results",
        "",
        f"Written by `python benchmarks/run.py{' --quick' if args.quick else ''}"
        f"{' --sections ' + args.sections if args.sections else ''}` "
        f"in {total:.0f} s ({', '.join(f'{n} {s:.0f} s' for n, s in timings)}).",
        "",
        *(f"- **{k}**: {v}" for k, v in info.items()),
        f"- **load average** (1, 5, 15 min) before: {load_before}; after: {_load()}",
        "",
        "The machine is shared: other processes (other developers' test runs) may "
        "have been running on its cores during this run, so absolute times are noisy. "
        "Every comparison is therefore a median of paired ratios from interleaved "
        "rounds, and timing sections carry an A/A control whose distance from 1.000 "
        "shows the noise of this run; a target missed by less than that is marked "
        "*missed (within noise)*. Absolute times are medians over rounds and drift "
        "with the load between groups: compare the ratios, not the times of rows "
        "from different groups.",
    ]
    if jax.default_backend() == "cpu":
        header += [
            "",
            "No GPU on this machine: every row is float32 on the CPU. On an accelerator "
            "the suite also times bfloat16 and adds those rows.",
        ]
    if drew:
        header += ["", f"![results]({png.name})"]
    parts = ["\n".join(header)]
    if targets:
        parts.append("## Targets\n\n" + summary_table(targets).markdown())
    parts += [s.markdown() for s in sections]
    text = "\n\n".join(parts) + "\n"
    (args.out / "RESULTS.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {args.out / 'RESULTS.md'}" + (f" and {png}" if drew else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
