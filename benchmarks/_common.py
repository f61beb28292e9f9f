"""Pieces several sections share: optional peers, dtypes per backend, HLO text, noise."""

from __future__ import annotations

import importlib.util
import math
import re

import jax
import jax.numpy as jnp

from benchmarks._timing import Timing

__all__ = [
    "HAVE_TORCH",
    "TORCH_SKIPPED",
    "aa_noise",
    "bench_dtypes",
    "canonical_hlo",
    "hlo_entry_diff",
    "hlo_op_counts",
    "on_accelerator",
    "torch_device",
]

HAVE_TORCH = importlib.util.find_spec("torch") is not None
TORCH_SKIPPED = (
    "PyTorch rows skipped: torch not installed (`pip install -e .[torch]` adds them; "
    "it is kept out of the `bench` extra because its wheel pulls in gigabytes of CUDA packages)."
)


def on_accelerator() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def bench_dtypes() -> list:
    """float32 everywhere; bfloat16 too on an accelerator (on a CPU bfloat16
    matmuls are emulated and say nothing about the backward's design)."""
    return [jnp.float32, jnp.bfloat16] if on_accelerator() else [jnp.float32]


def torch_device() -> str:
    """The torch device matching JAX's backend."""
    import torch

    return "cuda" if on_accelerator() and torch.cuda.is_available() else "cpu"


_METADATA = re.compile(r", metadata=\{[^{}]*\}")
_NAME = re.compile(r"%[\w.\-]+")
_HEADER_PARAM = re.compile(r"[\w.\-]+: ")
_NOT_CODE = re.compile(r"^(HloModule |FileNames|FunctionNames|FileLocations|StackFrames|\d+ )")


def canonical_hlo(text: str) -> str:
    """Optimised HLO text (``compiled.as_text()``) with the source information
    dropped and every name numbered in order of appearance, so two programs
    that differ only in where they were written compare equal."""
    lines = []
    for line in text.splitlines():
        if not line.strip() or _NOT_CODE.match(line):
            continue
        line = _METADATA.sub("", line)
        if not line.startswith(" "):  # a computation header: drop parameter names
            line = _HEADER_PARAM.sub("", line)
        lines.append(line)
    names: dict[str, str] = {}
    return _NAME.sub(lambda m: names.setdefault(m.group(0), f"%v{len(names)}"), "\n".join(lines))


def hlo_op_counts(text: str) -> dict[str, int]:
    """Instructions of an optimised HLO module: ``kernels`` (the entry
    computation's instructions that run, i.e. not parameters, constants,
    bitcasts or tuples) and the number of dots, transposes and copies anywhere
    (fused computations included)."""
    text = _METADATA.sub("", text)
    entry = text[text.index("\nENTRY") :].split("\n}\n")[0]
    skip = ("parameter(", "constant(", "bitcast(", "tuple(", "get-tuple-element(")
    kernels = [
        line
        for line in entry.splitlines()[1:]
        if " = " in line and not any(f" {op}" in line for op in skip)
    ]
    counts = {"kernels": len(kernels)}
    for op in ("dot", "transpose", "copy"):
        counts[op] = len(re.findall(rf"\s{op}\(", text))
    return counts


_LAYOUT = re.compile(r"\{[^}]*\}")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\S+) ([\w\-]+)\((.*?)\)(.*)$")


def _entry_instructions(text: str) -> list[str]:
    """The entry computation's instructions as ``shape opcode(operands) attributes``,
    with parameters shown by name and other operands by their opcode."""
    text = _METADATA.sub("", text)
    entry = text[text.index("\nENTRY") :].split("\n}\n")[0].splitlines()[1:]
    parsed = [m.groups() for m in map(_INSTRUCTION.match, entry) if m]
    label = {
        name: re.sub(r"\.\d+$", "", name[1:]) if opcode == "parameter" else f"%{opcode}"
        for name, _, opcode, _, _ in parsed
    }
    out = []
    for _, shape, opcode, operands, rest in parsed:
        if opcode in ("parameter", "tuple", "bitcast", "constant"):
            continue
        args = ", ".join(label.get(a.strip(), a.strip()) for a in operands.split(",") if a.strip())
        attrs = [a.strip() for a in rest.split(", ") if a.strip()]
        keep = [a for a in attrs if a.startswith(("kind=", "lhs_", "rhs_", "dimensions="))]
        if "__ynn_fusion" in rest:
            keep.append("ynn")
        shape = _LAYOUT.sub("", shape)
        out.append(f"{shape} {opcode}({args}) {' '.join(keep)}".strip())
    return out


def hlo_entry_diff(a: str, b: str) -> tuple[list[str], list[str]]:
    """Entry instructions only in optimised HLO ``a`` and only in ``b``."""
    ia, ib = _entry_instructions(a), _entry_instructions(b)
    only_a = [x for x in ia if x not in ib]
    only_b = [x for x in ib if x not in ia]
    return only_a, only_b


def aa_noise(repeat: Timing, rounds: int, candidate: Timing | None = None) -> float:
    """How far from 1.0 a ratio can land by chance in this run.

    ``repeat`` is the A/A control: the baseline's program compiled a second
    time and timed as if it were a candidate, so its true ratio is 1. The noise
    is the largest of: its observed distance from 1 (a bias of the run, such
    as the baseline's buffers being placed better), and the half-width of the
    95% confidence interval of a median of ``rounds`` ratios (1.57 × IQR /
    √rounds, the notch of a box plot) for the control and, when given, for
    the ``candidate`` itself.
    """

    def notch(t: Timing) -> float:
        q1, q3 = t.ratio_iqr
        return 1.57 * (q3 - q1) / math.sqrt(rounds)

    spread = [notch(repeat)] + ([notch(candidate)] if candidate is not None else [])
    return max(abs(repeat.ratio - 1.0), *spread)
