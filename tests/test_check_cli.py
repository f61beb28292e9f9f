"""``python -m jaxlinear.check``: output, exit status, flags, progress."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear.check as cli
from jaxlinear.check import Case, library_cases, main

# Slow (the checker's command line over whole rules, and a subprocess): not in the
# quick subset, -m "not slow".
pytestmark = pytest.mark.slow


def test_json_is_one_document_on_stdout_and_progress_goes_to_stderr(capsys):
    rc = main(
        ["--rule", "sigmoid", "--device", "cpu:0", "--dtype", "f32", "--dtype", "bf16", "--json"]
    )
    out, err = capsys.readouterr()
    assert rc == 0
    data = json.loads(out, parse_constant=pytest.fail)
    assert data["ok"] is True
    assert data["devices"] == ["cpu:0"] and data["dtypes"] == ["float32", "bfloat16"]
    (rule,) = data["rules"]
    assert rule["name"] == "sigmoid z(4, 5)" and rule["ok"] is True
    assert rule["skipped_dtypes"] == []
    assert {r["dtype"] for r in rule["rows"]} == {"float32", "bfloat16"}
    assert {r["status"] for r in rule["rows"]} == {"PASS"}
    assert data["summary"].startswith("jaxlinear.check: PASS: 1 rules, ")
    # Progress (not a terminal here: one line per rule) only on stderr.
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("[")]
    assert "[1/1] sigmoid z(4, 5): PASS" in err


def test_text_output_is_tables_then_one_summary_line(capsys):
    rc = main(["--rule", "tanh z", "--device", "cpu:0,cpu:1", "--dtype", "float64", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    lines = out.rstrip("\n").splitlines()
    assert lines[0].startswith("## tanh z(4, 5): PASS, ")
    assert lines[1].split()[:4] == ["check", "variant", "device", "dtype"]
    assert {line.split()[2] for line in lines[2:-2]} == {"cpu:0", "cpu:1"}
    assert {line.split()[1] for line in lines[2:-2]} >= {"args", "z[:1]", "-args", "4*args"}
    summary = lines[-1]
    assert summary.startswith("jaxlinear.check: PASS: 1 rules, ")
    assert "0 failed, on cpu:0, cpu:1 in float64 (" in summary
    assert sum(line.startswith("jaxlinear.check:") for line in lines) == 1


@jax.custom_vjp
def _doubled_backward(z):
    return jnp.sin(z)


_doubled_backward.defvjp(lambda z: (jnp.sin(z), z), lambda z, g: (2 * g * jnp.cos(z),))


def test_a_failure_exits_nonzero(monkeypatch, capsys):
    z = np.linspace(-1, 1, 6, dtype=np.float32)
    broken = Case("sin with a doubled backward", _doubled_backward, (z,), jnp.sin)
    monkeypatch.setattr(cli, "library_cases", lambda seed: [broken])
    rc = main(["--device", "cpu:0", "--dtype", "f32"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "## sin with a doubled backward: FAIL" in out
    assert out.rstrip().splitlines()[-1].startswith("jaxlinear.check: FAIL: 1 rules, ")
    assert "[1/1] sin with a doubled backward: FAIL" in err
    failing = [line.split()[:2] for line in out.splitlines() if " FAIL " in line]
    assert {check for check, _ in failing} == {"reference", "fd-element", "fd-direction", "vmap"}
    assert {variant for _, variant in failing} >= {"args", "z[:1]", "-args", "4*args"}


def test_a_rule_restricted_to_some_dtypes_is_skipped_with_its_reason(capsys):
    rc = main(["--rule", "mlp_apply relu", "--device", "cpu:0", "--dtype", "bf16", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1  # nothing was checked: not a pass
    (rule,) = data["rules"]
    assert rule["ok"] is None and rule["rows"] == []
    assert rule["skipped_dtypes"] == ["bfloat16"] and "relu's kink" in rule["skip_reason"]
    assert "1 rule-dtype pairs skipped: nothing was checked" in data["summary"]


def test_progress_on_a_terminal_rewrites_one_line(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["--rule", "relu z", "--device", "cpu:0", "--dtype", "f32,f64"]) == 0
    shown = terminal.getvalue()
    assert "\r[1/1] relu z(4, 5) | float32, float64 | cpu:0" in shown
    assert shown.endswith("[1/1] relu z(4, 5): PASS (" + shown.rsplit("(", 1)[1])
    assert "\r" not in capsys.readouterr().out


def test_list_names_every_rule(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split("  (only")[0] for line in listed] == [c.name for c in library_cases()]
    names = " ".join(listed)
    for rule in ("linear in_out", "linear out_in", "no-bias", "x(2, 3, 6)", "relu", "sigmoid"):
        assert rule in names
    for rule in ("tanh", "mse_loss", "softmax_cross_entropy", "mlp_apply"):
        assert rule in names


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "tpu"], "--device 'tpu' matches no device present; available: cpu:0"),
        (["--device", "cpu:99"], "--device 'cpu:99' matches no device present"),
        (["--dtype", "int8"], "--dtype 'int8' is not one of bf16, bfloat16, f16, f32, f64"),
        (["--rule", "conv2d"], "--rule ['conv2d'] matches no rule; --list shows them"),
        (["--seed", "-1"], "--seed must be >= 0; got -1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_runs_green():
    """The module runs as a program: one CPU device (no simulated ones), as in CI."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlinear.check", "--rule", "relu z", "--dtype", "f32"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.rstrip().splitlines()[-1]
    assert summary.startswith("jaxlinear.check: PASS: 1 rules, ")
    assert " on cpu:0 in float32 (" in summary
    assert proc.stderr.startswith("[1/1] relu z(4, 5): PASS (")
