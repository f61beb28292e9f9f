"""Smoke test of ``examples/data_parallel.py`` in one process: run it on 8
simulated CPU devices in a child process and check what it prints. The
``--processes`` mode is tested in ``tests/test_multiprocess.py``."""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxlinear
import jaxlinear.check
from tests.helpers import needs

# Slow (the example in a subprocess on 8 devices): not in the quick subset, -m "not slow".
pytestmark = [
    pytest.mark.slow,
    needs("sklearn", "matplotlib", reason="the example needs the examples extra"),
]

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPT = EXAMPLES / "data_parallel.py"


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m[1])


@pytest.fixture(scope="module")
def example_output(tmp_path_factory) -> tuple[str, pathlib.Path]:
    out = tmp_path_factory.mktemp("data_parallel")
    env = dict(os.environ)
    # 8 CPU devices in the child, whatever accelerator or flags this process has.
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", "2", "--seed", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, out


def test_loss_curves_agree_and_decrease(example_output):
    text, out = example_output
    assert number(r"^devices: (\d+)$", text) == 8
    rtol, atol = jaxlinear.check.tolerance_for(jnp.float32).autodiff
    assert f"float32 tolerance (rtol={rtol:g}, atol={atol:g}): True" in text
    # Losses are printed with 4 decimals: equal up to the last printed digit.
    first = number(r"^single-device first loss: (\S+)$", text)
    assert number(r"^data-parallel first loss: (\S+)$", text) == pytest.approx(first, abs=1e-4)
    final = number(r"^single-device final loss: (\S+)$", text)
    assert number(r"^data-parallel final loss: (\S+)$", text) == pytest.approx(final, abs=1e-4)
    # Element-wise, each step's difference is within atol + rtol*|loss|, and no
    # loss exceeds about the first (log 10 ≈ 2.3 for 10 classes, plus init noise).
    assert number(r"^max \|loss difference\|: (\S+)$", text) <= atol + rtol * 2 * first
    assert final < 0.5 * first, "two epochs should more than halve the loss"
    assert (out / "data_parallel.png").stat().st_size > 0


def test_one_all_reduce_per_step(example_output):
    text, _ = example_output
    assert number(r"^all-reduces per step: (\d+)$", text) == 1
    assert number(r"^other collectives per epoch: (\d+)$", text) == 0


@pytest.fixture
def example(monkeypatch):
    """The example as a module (it imports ``_digits`` from its own folder)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("data_parallel")


def test_help_and_argument_errors(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--epochs", "--seed", "--out", "--devices", "--batch-size", "--processes"):
        assert option in help_text
    assert "--devices-per-process D" in help_text
    assert "(default: None)" not in help_text  # issue 13: no "(default: ...) (default: None)"
    assert "--worker" not in help_text  # the launcher's own option stays hidden

    n = len(jax.devices())
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--devices", str(n + 1)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--devices {n + 1} asks for more than the {n} {jax.default_backend()} device(s)" in err
    assert f"xla_force_host_platform_device_count={n + 1}" in err

    with pytest.raises(SystemExit) as exit_info:
        example.main(["--devices", "1", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "expected a positive integer; got 0" in capsys.readouterr().err

    if n > 1:
        with pytest.raises(SystemExit) as exit_info:
            example.main(["--devices", str(n), "--batch-size", str(n + 1)])
        assert exit_info.value.code == 2
        assert f"--batch-size ({n + 1}) must be a multiple of --devices ({n})" in (
            capsys.readouterr().err
        )
