"""Run every benchmark script and write ``RESULTS.md`` and ``results.png`` beside it.

    python benchmarks/run.py            # full suite, about 10 minutes on 2 cores
    python benchmarks/run.py --quick    # smoke run, under a minute
    python benchmarks/run.py --only dp,linear --out /tmp/bench

Each script also runs alone (``python benchmarks/bench_dp.py [--quick]``) and
prints its section. Not part of the test suite: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import bench_dp
import bench_linear
import bench_mlp
import bench_overhead
from _harness import SUMMARY_COLUMNS, environment, md_table

SCRIPTS = {"linear": bench_linear, "mlp": bench_mlp, "dp": bench_dp, "overhead": bench_overhead}
HERE = Path(__file__).resolve().parent

HOW_TO_READ = (
    "Times are medians of per-round ratios to a baseline timed in the same interleaved "
    "rounds. *A/A noise*: how far the baseline, compiled again and timed as a candidate, "
    "strays from 1 (or the 95% notch of the median, if larger); a timing target missed by "
    "less is *fail (within noise)*. Memory: XLA's `temp_size_in_bytes` of the compiled "
    "program. [docs/performance.md](../docs/performance.md) explains each benchmark."
)


def write_chart(sections, path: Path) -> bool:
    """One figure, a panel per section with a chart; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    charts = [s.chart for s in sections if s.chart]
    fig, axes = plt.subplots(len(charts), 1, figsize=(10, 3.4 * len(charts)), squeeze=False)
    for ax, (title, ylabel, bars, log) in zip(axes[:, 0], charts, strict=True):
        series = list(dict.fromkeys(k for group in bars.values() for k in group))
        width = 0.8 / len(series)
        for k, name in enumerate(series):
            xs = [j + (k - (len(series) - 1) / 2) * width for j in range(len(bars))]
            ys = [group.get(name, float("nan")) for group in bars.values()]
            ax.bar_label(ax.bar(xs, ys, width, label=name), fmt="%.2f", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(bars)), list(bars), fontsize=8)
        ax.set(title=title, ylabel=ylabel, yscale="log" if log else "linear")
        ax.legend(fontsize=7, ncol=min(len(series), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, few rounds")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {list(SCRIPTS)}")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for RESULTS.md and PNG")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SCRIPTS)
    if unknown := sorted(set(names) - set(SCRIPTS)):
        parser.error(f"unknown script(s) {unknown}; choose from {list(SCRIPTS)}.")
    env, start, sections, took = environment(), time.perf_counter(), [], []
    for name in names:
        t0 = time.perf_counter()
        sections.append(SCRIPTS[name].run(args.quick))
        took.append(f"{name} {time.perf_counter() - t0:.0f} s")
        print(f"[{name}] done in {took[-1]}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    drew = write_chart(sections, args.out / "results.png")
    targets = [t for s in sections for t in s.targets]
    command = " ".join(["python benchmarks/run.py", *sys.argv[1:]])
    header = [
        "# jaxlinear benchmark results",
        f"`{command}`, {time.perf_counter() - start:.0f} s ({', '.join(took)}).",
        f"**Environment**: {env}.",
        HOW_TO_READ,
        "## Summary\n\n" + md_table(SUMMARY_COLUMNS, [t.row() for t in targets]),
    ]
    if drew:
        header.append("![benchmark results](results.png)")
    text = "\n\n".join(header + [s.markdown() for s in sections]) + "\n"
    (args.out / "RESULTS.md").write_text(text, encoding="utf-8")
    passed = sum(t.status == "pass" for t in targets)
    print(f"{passed}/{len(targets)} targets pass; wrote {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
