"""Multi-process data parallelism, for real: ``examples/data_parallel.py --processes N``.

The launcher starts N worker processes on this machine that form one JAX
distributed runtime (coordinator and gloo collectives on 127.0.0.1) and then
runs the same training in one process with the same N*D devices. Checked here:
the N-process run equals the one-process run (bit for bit with 2 × 1 devices,
within the issue's 1e-6 with 2 × 2), a killed worker ends the whole run fast
and leaves no process behind, and the supervision in ``examples/_multiprocess.py``
stops every worker on a failure or a hang (on plain Python subprocesses, cheaply).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import needs

# Slow (real worker processes and a fault test: about 30 s): not in the quick subset, -m "not slow".
pytestmark = [
    pytest.mark.slow,
    needs("sklearn", "matplotlib", reason="the example needs the examples extra"),
]

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPT = EXAMPLES / "data_parallel.py"
# The bound on how long a failed run may take to end.
FAULT_DEADLINE_S = 60


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


@pytest.fixture
def example(examples_path):
    return importlib.import_module("data_parallel")


@pytest.fixture
def multiprocess(examples_path):
    return importlib.import_module("_multiprocess")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_gone(pids, seconds: float = 5.0) -> list[int]:
    """The PIDs still alive after up to ``seconds`` (orphans are reaped by init, not at once)."""
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# --- the real thing ----------------------------------------------------------------------


@pytest.mark.parametrize("devices_per_process", [1, 2], ids=["2x1", "2x2"])
def test_processes_equal_one_process(example, devices_per_process, tmp_path, monkeypatch, capsys):
    args = ["--processes", "2", "--devices-per-process", str(devices_per_process)]
    args += ["--epochs", "1", "--out", str(tmp_path)]
    if devices_per_process == 1:
        # The first port offered is taken, so the coordinator cannot bind it and the
        # launcher must retry on a fresh one. (Once: the retry does not depend on the
        # devices per process, and each try starts two workers.)
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            ports = iter([taken])
            fresh = example.free_port
            monkeypatch.setattr(example, "free_port", lambda: next(ports, None) or fresh())
            result = example.main(args)
        text = capsys.readouterr().out
        assert f"port {taken} was taken before the coordinator bound it; retrying" in text
        assert result["port"] != taken
    else:
        result = example.main(args)
        text = capsys.readouterr().out

    steps = example.TRAIN_SIZE // example.DEFAULT_BATCH_SIZE
    losses, reference = result["losses"], result["reference_losses"]
    assert losses.shape == reference.shape == (steps,)
    assert losses[-1] < 0.8 * losses[0], "one epoch of Adam lowers the loss"
    assert result["replicas_identical"]  # every process holds the same parameters
    if devices_per_process == 1:
        # Two partial sums: a + b == b + a exactly, whichever process adds them,
        # so the runs are the same computation, bit for bit.
        np.testing.assert_array_equal(losses, reference)
        assert result["max_param_difference"] == 0.0
    else:
        # Four partial sums, added in another order across processes.
        assert result["max_loss_difference"] <= example.PROCESSES_TARGET
        assert result["max_param_difference"] <= example.PROCESSES_TARGET
    assert result["within_target"]
    assert f"within {example.PROCESSES_TARGET:g}: True" in text
    assert re.search(r"^time per step: \S+ ms \(1 process\), \S+ ms \(2 processes\)$", text, re.M)
    assert result["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert wait_gone(result["pids"]) == []


def test_killed_worker_ends_the_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXLINEAR_DP_FAULT"] = "1:2:kill"  # process 1 SIGKILLs itself after step 2
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--processes", "2", "--epochs", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3 * FAULT_DEADLINE_S,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert elapsed < FAULT_DEADLINE_S
    err = proc.stderr
    # The killed process is reported first, with the tail of its output.
    first = "data_parallel.py: the multi-process run failed:\nprocess 1 (pid "
    assert err.startswith(first), err
    killed = re.match(r"(\d+)\) was killed by SIGKILL; last lines", err[len(first) :])
    assert killed, err
    assert "| process 1: injected fault after step 2: kill" in err
    # Process 0 was stopped by the launcher, or failed on its own just after
    # (a gloo read error on the dead peer's connection).
    other = re.search(
        r"^(?:stopped the other workers: process 0 \(pid (\d+)\)$"
        r"|process 0 \(pid (\d+)\) .* after process 1;)",
        err,
        re.M,
    )
    assert other, err
    assert "one process" not in proc.stdout  # the reference never started
    assert wait_gone([int(killed[1]), int(other[1] or other[2])]) == []


def test_process_arguments(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--processes", "2", "--devices", "2"])
    assert exit_info.value.code == 2
    assert "with --processes use --devices-per-process" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--processes", "3", "--devices-per-process", "2"])
    assert exit_info.value.code == 2
    assert (
        "--batch-size (64) must be a multiple of --processes × --devices-per-process "
        "(3 × 2 = 6)" in capsys.readouterr().err
    )


# --- the supervision, on plain Python subprocesses ---------------------------------------


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


SLEEPER = "import time; print('sleeping', flush=True); time.sleep(120)"


def test_failed_worker_stops_the_others(multiprocess, tmp_path):
    # Process 0 starts a child of its own (same process group) and sleeps.
    parent = (
        "import subprocess, time; "
        "p = subprocess.Popen(['sleep', '120']); print('child', p.pid, flush=True); "
        "time.sleep(120)"
    )
    failing = "import time; time.sleep(0.5); print('boom', flush=True); raise SystemExit(3)"
    logs = [tmp_path / "0.log", tmp_path / "1.log"]
    done = [tmp_path / "0.done", tmp_path / "1.done"]
    start = time.monotonic()
    with pytest.raises(multiprocess.WorkerFailed) as info:
        env = multiprocess.worker_environment()
        multiprocess.run_workers([python(parent), python(failing)], logs, done, env, 60)
    assert time.monotonic() - start < 10
    error = info.value
    pid0, pid1 = error.pids
    assert error.failed == ((1, pid1),)
    message = str(error)
    assert f"process 1 (pid {pid1}) exited with status 3; last lines" in message
    assert "    | boom" in message
    assert message.endswith(f"stopped the other workers: process 0 (pid {pid0})")
    child = int(re.search(r"child (\d+)", logs[0].read_text())[1])
    assert wait_gone([pid0, pid1, child]) == []  # the whole process group went


def test_early_exit_and_hang_are_failures(multiprocess, tmp_path):
    logs, done = [tmp_path / "0.log"], [tmp_path / "0.done"]
    env = multiprocess.worker_environment()
    # Status 0 without the "done" file: the worker left before finishing.
    with pytest.raises(multiprocess.WorkerFailed, match="exited with status 0 before finishing"):
        multiprocess.run_workers([python("pass")], logs, done, env, 60)
    # A hang: stopped at the timeout, with its output shown.
    start = time.monotonic()
    with pytest.raises(multiprocess.WorkerFailed) as info:
        multiprocess.run_workers([python(SLEEPER)], logs, done, env, 1.0)
    assert 1.0 <= time.monotonic() - start < 10
    assert str(info.value).startswith("the run did not finish within 1 s; stopped every worker:")
    assert "    | sleeping" in str(info.value)
    assert wait_gone(info.value.pids) == []
    # Success: every worker writes its file and exits 0.
    write = f"open({str(done[0])!r}, 'w').close()"
    pids = multiprocess.run_workers([python(write)], logs, done, env, 60)
    assert wait_gone(pids) == []


def test_worker_environment(multiprocess, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv("JAXLINEAR_DP_FAULT", "0:1:kill")
    env = multiprocess.worker_environment(drop=["JAXLINEAR_DP_FAULT"])
    assert "XLA_FLAGS" not in env and "JAXLINEAR_DP_FAULT" not in env
    assert env["JAX_PLATFORMS"] == "cpu" and env["PYTHONUNBUFFERED"] == "1"
    port = multiprocess.free_port()
    with socket.socket() as sock:  # free now: it can be bound on the loopback address
        sock.bind((multiprocess.LOOPBACK, port))
