"""``python -m jaxlinear.check``: verify every hand-derived VJP in jaxlinear here.

Runs :func:`jaxlinear.check_vjp` over each rule the library derives by hand
(the linear layer in both layouts, with and without bias, with one and with
several leading axes, and with float32 accumulation for low-precision operands;
the activations; the losses; whole MLPs), on every device present and in every
dtype of the tolerance table. It prints one table per rule, ends with a single
summary line, and exits with status 1 if any row failed (2 for bad flags).

Flags: ``--device cpu`` / ``--device gpu:0`` narrows the devices, ``--dtype
bfloat16`` the dtypes, ``--rule linear`` the rules (by name; ``--list`` lists
them), all repeatable or comma-separated; ``--json`` prints one JSON document
instead of the tables; ``--quiet`` silences the progress indicator (which goes
to stderr, so it never mixes with ``--json`` output); ``--seed`` changes the
inputs, cotangents and directions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from ._activations import relu, sigmoid, tanh
from ._check import check_vjp
from ._check_args import all_devices, device_name
from ._check_report import CheckReport, CheckRow, format_rows
from ._linear import LinearParams, linear_apply
from ._losses import mse_loss, softmax_cross_entropy
from ._mlp import mlp_apply
from ._tolerances import (
    FD_RELATIVE_STEP,
    TOLERANCES,
    Tolerance,
    tolerance_for,
    unit_roundoff,
)

__all__ = [
    "FD_RELATIVE_STEP",
    "TOLERANCES",
    "Case",
    "CheckRow",
    "Tolerance",
    "library_cases",
    "main",
    "tolerance_for",
    "unit_roundoff",
]

DTYPE_ALIASES = {
    "float32": "float32",
    "f32": "float32",
    "float64": "float64",
    "f64": "float64",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "f16": "float16",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One hand-derived rule to check: ``check_vjp(fn, args, reference=reference, ...)``.

    ``dtypes`` restricts the dtypes the rule is checked in (``None``: all asked
    for), with the reason in ``why``.
    """

    name: str
    fn: Callable
    args: tuple
    reference: Callable
    vmap_in_axes: Any = None
    dtypes: tuple[str, ...] | None = None
    why: str = ""


# ----------------------------------------------------------------- plain formulas


def sum_dtype(dtype) -> np.dtype:
    """The dtype sums accumulate in: float32 for 16-bit floats, the dtype otherwise."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt.itemsize < 4 else dt


def plain_linear(params: LinearParams, x, preferred_element_type=None):
    """y = x W + b written for autodiff: one einsum and an explicit broadcast."""
    spec = "...i,io->...o" if params.layout == "in_out" else "...i,oi->...o"
    y = jnp.einsum(spec, x, params.W, preferred_element_type=preferred_element_type)
    if params.b is not None:
        y = y + jnp.broadcast_to(params.b.astype(y.dtype), y.shape)
    return y


def linear_accumulate_f32(params: LinearParams, x):
    """:func:`linear_apply` with ``preferred_element_type`` float32 for bfloat16 or
    float16 operands (float32 output, float32 g in the backward), the operands'
    dtype otherwise."""
    return linear_apply(params, x, preferred_element_type=sum_dtype(x.dtype))


def plain_linear_accumulate_f32(params: LinearParams, x):
    return plain_linear(params, x, preferred_element_type=sum_dtype(x.dtype))


def plain_mse(y, t):
    d = (y - t).astype(sum_dtype(y.dtype))
    n = math.prod(y.shape[:-1])
    return (jnp.sum(d * d) / (2 * n)).astype(y.dtype)


def plain_softmax_cross_entropy(logits, labels):
    z = logits.astype(sum_dtype(logits.dtype))
    logp = jax.nn.log_softmax(z, axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return (-jnp.mean(picked)).astype(logits.dtype)


def plain_mlp(params, x, activation=jax.nn.relu):
    h = x
    for p in params[:-1]:
        h = activation(plain_linear(p, h))
    return plain_linear(params[-1], h)


def mlp_tanh_cross_entropy(params, x, labels):
    """The library's MLP (tanh) into its cross-entropy: every rule chained."""
    return softmax_cross_entropy(mlp_apply(params, x, activation=tanh), labels)


def plain_mlp_tanh_cross_entropy(params, x, labels):
    return plain_softmax_cross_entropy(plain_mlp(params, x, jnp.tanh), labels)


# ----------------------------------------------------------------- the cases


def _linear_params(rng, fan_in, fan_out, *, layout="in_out", bias=True):
    """W ~ N(0, 1/fan_in) (well scaled), b ~ N(0, 1), float32."""
    W = (rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)).astype(np.float32)
    if layout == "out_in":
        W = np.ascontiguousarray(W.T)
    b = rng.standard_normal(fan_out).astype(np.float32) if bias else None
    return LinearParams(W, b, layout)


def _normal(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _linear_cases(rng) -> list[Case]:
    """Both layouts, with and without bias; a 2-D x (per-example vmap: the rule sees
    a 1-D x) and a 3-D x (an ensemble of perturbed copies)."""
    cases = []
    for layout in ("in_out", "out_in"):
        for bias in (True, False):
            for batch in ((5,), (2, 3)):
                params = _linear_params(rng, 6, 4, layout=layout, bias=bias)
                x = _normal(rng, *batch, 6)
                label = f"linear {layout} {'bias' if bias else 'no-bias'} x{(*batch, 6)}"
                axes = (None, 0) if len(batch) == 1 else None
                cases.append(Case(label, linear_apply, (params, x), plain_linear, axes))
    cases.append(
        Case(
            "linear in_out bias x(5, 6), accumulating in at least float32",
            linear_accumulate_f32,
            (_linear_params(rng, 6, 4), _normal(rng, 5, 6)),
            plain_linear_accumulate_f32,
            vmap_in_axes=(None, 0),
        )
    )
    return cases


def _activation_and_loss_cases(rng) -> list[Case]:
    cases = [
        Case(f"{act.__name__} z(4, 5)", act, (_normal(rng, 4, 5, scale=2.0),), ref)
        for act, ref in ((relu, jax.nn.relu), (sigmoid, jax.nn.sigmoid), (tanh, jnp.tanh))
    ]
    y, t = _normal(rng, 4, 3), _normal(rng, 4, 3)
    cases.append(Case("mse_loss y(4, 3)", mse_loss, (y, t), plain_mse, vmap_in_axes=(0, 0)))
    for batch in ((4,), (2, 3)):
        labels = rng.integers(0, 5, size=batch).astype(np.int32)
        cases.append(
            Case(
                f"softmax_cross_entropy logits{(*batch, 5)}",
                softmax_cross_entropy,
                (_normal(rng, *batch, 5, scale=2.0), labels),
                plain_softmax_cross_entropy,
                vmap_in_axes=(0, 0) if len(batch) == 1 else None,
            )
        )
    return cases


def _mlp_cases(rng) -> list[Case]:
    mlp = (_linear_params(rng, 6, 8), _linear_params(rng, 8, 3))
    relu_mlp = Case(
        "mlp_apply relu 6-8-3 x(5, 6)",
        mlp_apply,
        (mlp, _normal(rng, 5, 6)),
        plain_mlp,
        vmap_in_axes=(None, 0),
        dtypes=("float32", "float64"),
        why=(
            "a low-precision forward can put a hidden unit on the other side of "
            "relu's kink than float64 does, which no derivative check can allow for"
        ),
    )
    mlp2 = (_linear_params(rng, 6, 8), _linear_params(rng, 8, 8), _linear_params(rng, 8, 4))
    chained = Case(
        "mlp_apply tanh 6-8-8-4 -> softmax_cross_entropy x(5, 6)",
        mlp_tanh_cross_entropy,
        (mlp2, _normal(rng, 5, 6), rng.integers(0, 4, size=5).astype(np.int32)),
        plain_mlp_tanh_cross_entropy,
    )
    return [relu_mlp, chained]


def library_cases(seed: int = 0) -> list[Case]:
    """Every hand-derived rule of the library, on small well-scaled float32 inputs."""
    rng = np.random.default_rng(seed)
    return _linear_cases(rng) + _activation_and_loss_cases(rng) + _mlp_cases(rng)


# ----------------------------------------------------------------- command line


class _Progress:
    """A one-line indicator on a terminal; one line per rule otherwise. Never on stdout."""

    def __init__(self, stream: TextIO, total: int, enabled: bool):
        self.stream, self.total, self.enabled = stream, total, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.done_steps = 0
        self.width = 0

    def step(self, text: str) -> None:
        self.done_steps += 1
        if self.tty:
            line = f"[{self.done_steps}/{self.total}] {text}"[:110]
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.stream.flush()

    def rule_done(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.stream.write(f"[{self.done_steps}/{self.total}] {text}\n")
        self.stream.flush()


def _parse_devices(parser: argparse.ArgumentParser, values: Sequence[str] | None) -> list:
    available = all_devices()
    if not values:
        return available
    names = ", ".join(device_name(d) for d in available)
    chosen = []
    for token in (t.strip() for v in values for t in v.split(",")):
        if ":" in token:
            match = [d for d in available if device_name(d) == token]
        else:  # JAX calls CUDA and ROCm devices' platform "gpu"
            platform = "gpu" if token in ("cuda", "rocm") else token
            match = [d for d in available if d.platform == platform]
        if not match:
            parser.error(f"--device {token!r} matches no device present; available: {names}")
        chosen.extend(match)
    return list(dict.fromkeys(chosen))


def _parse_dtypes(parser: argparse.ArgumentParser, values: Sequence[str] | None) -> list[str]:
    if not values:
        return [str(d) for d in TOLERANCES]
    chosen = []
    for token in (t.strip() for v in values for t in v.split(",")):
        if token not in DTYPE_ALIASES:
            parser.error(f"--dtype {token!r} is not one of {', '.join(sorted(set(DTYPE_ALIASES)))}")
        chosen.append(DTYPE_ALIASES[token])
    return list(dict.fromkeys(chosen))


def _run_case(case: Case, dtypes: list[str], device, seed: int) -> CheckReport:
    """Every dtype of one case on one device in a single check (so the float64
    truth and the shape variants compile once)."""
    try:
        return check_vjp(
            case.fn,
            case.args,
            reference=case.reference,
            dtypes=dtypes,
            devices=[device],
            vmap_in_axes=case.vmap_in_axes,
            seed=seed,
            name=case.name,
        )
    except Exception as err:  # a broken case is a failure to report, not a crash
        row = CheckRow(
            check="error",
            device=device_name(device),
            dtype=",".join(dtypes),
            argument="-",
            passed=False,
            detail=repr(err)[:300],
        )
        return CheckReport(case.name, (row,))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlinear.check",
        description=(
            "Check every hand-derived VJP in jaxlinear against float64 truth (autodiff "
            "of a plain formula, finite differences, per example under vmap), no less "
            "accurate than autodiff in the same dtype, on the arguments and on variants "
            "of them (N = 1, an extra axis, -x, 4x), on every device present."
        ),
    )
    parser.add_argument(
        "--device",
        action="append",
        help="a platform (cpu, gpu, tpu) or one device (cpu:0); repeat or comma-separate. "
        "Default: every device present.",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        help="float32, float64, bfloat16 or float16 (or f32, f64, bf16, f16); repeat or "
        "comma-separate. Default: all four.",
    )
    parser.add_argument(
        "--rule",
        action="append",
        help="only the rules whose name contains this text (case-insensitive); repeatable",
    )
    parser.add_argument("--list", action="store_true", help="list the rules and exit")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--quiet", action="store_true", help="no progress indicator on stderr")
    parser.add_argument("--seed", type=int, default=0, help="inputs and directions (default 0)")
    return parser


def _select_cases(parser, ns) -> list[Case]:
    cases = library_cases(ns.seed)
    if ns.rule:
        wanted = [r.lower() for r in ns.rule]
        cases = [c for c in cases if any(w in c.name.lower() for w in wanted)]
        if not cases:
            parser.error(f"--rule {ns.rule} matches no rule; --list shows them")
    return cases


def _run_all(cases, dtypes, devices, ns):
    """``[(case, report, skipped dtypes)]`` and the seconds it took."""
    plan = [(c, [d for d in dtypes if c.dtypes is None or d in c.dtypes]) for c in cases]
    total = sum(1 for _, ds in plan if ds) * len(devices)
    progress = _Progress(sys.stderr, total, enabled=not ns.quiet)
    start = time.perf_counter()
    results = []
    for case, case_dtypes in plan:
        rows: list[CheckRow] = []
        case_start = time.perf_counter()
        for device in devices if case_dtypes else []:
            progress.step(f"{case.name} | {', '.join(case_dtypes)} | {device_name(device)}")
            rows.extend(_run_case(case, case_dtypes, device, ns.seed).rows)
        report = CheckReport(case.name, tuple(rows))
        results.append((case, report, [d for d in dtypes if d not in case_dtypes]))
        if case_dtypes:
            verdict = "PASS" if report.ok else "FAIL"
            progress.rule_done(f"{case.name}: {verdict} ({time.perf_counter() - case_start:.1f} s)")
    return results, time.perf_counter() - start


def _summary(results, cases, dtypes, devices, elapsed) -> tuple[bool, str]:
    all_rows = [r for _, rep, _ in results for r in rep.rows]
    failed = [r for r in all_rows if not r.passed]
    ok = bool(all_rows) and not failed
    skips = sum(len(s) for _, _, s in results)
    summary = (
        f"jaxlinear.check: {'PASS' if ok else 'FAIL'}: {len(cases)} rules, "
        f"{len(all_rows)} checks, {len(failed)} failed, on "
        f"{', '.join(device_name(d) for d in devices)} in {', '.join(dtypes)}"
        + (f", {skips} rule-dtype pairs skipped" if skips else "")
        + ("" if all_rows else ": nothing was checked")
        + f" ({elapsed:.1f} s)"
    )
    return ok, summary


def _print_json(results, ok, summary, dtypes, devices, elapsed) -> None:
    document = {
        "ok": ok,
        "summary": summary,
        "elapsed_s": round(elapsed, 3),
        "devices": [device_name(d) for d in devices],
        "dtypes": dtypes,
        "rules": [
            {
                "name": case.name,
                "ok": report.ok if report.rows else None,
                "skipped_dtypes": skipped,
                "skip_reason": case.why if skipped else "",
                "rows": [r.to_dict() for r in report.rows],
            }
            for case, report, skipped in results
        ],
    }
    print(json.dumps(document, indent=1))


def _print_text(results, summary) -> None:
    for case, report, skipped in results:
        if report.rows:
            verdict = "PASS" if report.ok else "FAIL"
            print(f"## {case.name}: {verdict}, {len(report.rows)} checks")
            print("\n".join(format_rows(report.rows)))
        if skipped:
            print(f"## {case.name}: skipped in {', '.join(skipped)}: {case.why}")
        print()
    print(summary)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks; return 0 if every row passed, 1 otherwise."""
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.seed < 0:
        parser.error(f"--seed must be >= 0; got {ns.seed}")
    devices = _parse_devices(parser, ns.device)
    dtypes = _parse_dtypes(parser, ns.dtype)
    if ns.list:
        for case in library_cases(ns.seed):
            only = f"  (only {', '.join(case.dtypes)}: {case.why})" if case.dtypes else ""
            print(case.name + only)
        return 0
    cases = _select_cases(parser, ns)
    results, elapsed = _run_all(cases, dtypes, devices, ns)
    ok, summary = _summary(results, cases, dtypes, devices, elapsed)
    if ns.json:
        _print_json(results, ok, summary, dtypes, devices, elapsed)
    else:
        _print_text(results, summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
