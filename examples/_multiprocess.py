"""Run a JAX program as several processes on one machine: start, supervise and stop them.

The launcher side (everything but :func:`initialize_worker`) never starts JAX:
it picks a free loopback port for the coordinator, starts one subprocess per
JAX process (each in its own session, so its process group is its PID), waits
for them, and, the moment one fails, stops the others. The worker side,
:func:`initialize_worker`, is the first thing a worker does: it joins JAX's
distributed runtime with short timeouts and makes the CPU collectives (gloo)
listen on the loopback address.

Public API::

    from _multiprocess import free_port, worker_environment, run_workers     # launcher
    from _multiprocess import WorkerFailed, RpcServerFailed, Timeouts
    from _multiprocess import initialize_worker                              # worker

Why subprocesses and not threads or ``multiprocessing``: each JAX process needs
its own runtime, started by ``jax.distributed.initialize`` before any JAX
operation, and a failure inside the runtime is a C++ abort (SIGABRT) that no
``try`` can catch; only a separate process contains it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence

__all__ = [
    "LOOPBACK",
    "Timeouts",
    "WorkerFailed",
    "RpcServerFailed",
    "free_port",
    "worker_environment",
    "run_workers",
    "initialize_worker",
]

LOOPBACK = "127.0.0.1"
#: What the coordinator (process 0) prints when it cannot bind its port: gRPC's
#: log line (then, in JAX 0.10.2, a SIGSEGV) and the coordination service's error.
RPC_SERVER_FAILURES = ("Failed to add port to server", "Failed to start RPC server")
TAIL_LINES = 15


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds, passed to ``jax.distributed.initialize`` (all short, so nothing hangs).

    Attributes:
        initialization: how long a process waits for all the others to connect.
        heartbeat: how long the coordinator waits for a silent process before
            declaring it dead (and the others abort).
        shutdown: how long ``jax.distributed.shutdown`` waits for the others.
    """

    initialization: int = 30
    heartbeat: int = 15
    shutdown: int = 10


class WorkerFailed(RuntimeError):
    """A worker failed or the run timed out; every worker has been stopped.

    Attributes:
        failed: ``(process_id, pid)`` of each process found failed, first first.
        pids: the PIDs of every worker the launcher started.
    """

    def __init__(self, message: str, failed: Sequence[tuple[int, int]], pids: Sequence[int]):
        super().__init__(message)
        self.failed = tuple(failed)
        self.pids = tuple(pids)


class RpcServerFailed(WorkerFailed):
    """The coordinator could not start its RPC server (its port was taken): retry."""


# --- launcher ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it: bind to port 0).

    Another program may take it before the coordinator binds it; the
    coordinator then fails to start its RPC server and
    :func:`run_workers` raises :class:`RpcServerFailed`, so the caller retries.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def worker_environment(drop: Sequence[str] = ()) -> dict[str, str]:
    """This process's environment for a worker: CPU only, unbuffered output, no ``XLA_FLAGS``.

    ``XLA_FLAGS`` is removed so that a flag meant for the launcher (such as a
    simulated device count) does not leak into the workers; a worker sets its
    device count itself. ``drop`` names further variables to remove.
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and k not in drop}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # a killed worker's last lines are in its log
    return env


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    if returncode == 0:
        return "exited with status 0 before finishing its work"
    return f"exited with status {returncode}"


def _tail(path: os.PathLike, lines: int = TAIL_LINES) -> str:
    with open(path, errors="replace") as f:
        text = f.read().splitlines()[-lines:]
    return "\n".join("    | " + line for line in text) or "    | (no output)"


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGKILL the process group of every worker still running, then reap them all.

    Each worker was started with ``start_new_session=True``, so its process
    group id is its PID; nothing else is signalled.
    """
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended between poll and killpg
                pass
    for p in processes:
        p.wait()


def _failure_message(failed, processes, logs, stopped) -> str:
    parts = []
    for n, i in enumerate(failed):
        p = processes[i]
        after = f" after process {failed[0]}" if n else ""
        parts.append(
            f"process {i} (pid {p.pid}) {_describe_exit(p.returncode)}{after}; "
            f"last lines of its output ({logs[i]}):\n{_tail(logs[i])}"
        )
    if stopped:
        parts.append(
            "stopped the other workers: "
            + ", ".join(f"process {i} (pid {processes[i].pid})" for i in stopped)
        )
    return "\n".join(parts)


def _watch(processes: Sequence[subprocess.Popen]) -> tuple[dict[int, float], threading.Event]:
    """One thread per process records when it exits and sets the event.

    The exit times order the failures: when one worker dies, the others soon
    fail too (a gloo read error), and the first to go is the one to report.
    """
    exits: dict[int, float] = {}
    changed = threading.Event()

    def watch(i: int, p: subprocess.Popen) -> None:
        p.wait()
        exits[i] = time.monotonic()
        changed.set()

    for i, p in enumerate(processes):
        threading.Thread(target=watch, args=(i, p), daemon=True).start()
    return exits, changed


def _wait(processes, done, deadline: float) -> list[int]:
    """Wait until every worker has exited, one has failed, or the deadline passes.

    A worker fails when it exits with a non-zero status or a signal, or exits
    with status 0 without having written its ``done`` file. Returns the ids of
    the failed processes in the order they exited (empty when all succeeded);
    raises ``TimeoutError``.
    """
    exits, changed = _watch(processes)
    while True:
        changed.clear()
        ended = sorted((t, i) for i, t in list(exits.items()))
        failed = [
            i for _, i in ended if processes[i].returncode != 0 or not os.path.exists(done[i])
        ]
        if failed or len(ended) == len(processes):
            return failed
        if not changed.wait(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError


def _start(command: Sequence[str], log: os.PathLike, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in a new session (its process group id is its PID), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def run_workers(
    commands: Sequence[Sequence[str]],
    logs: Sequence[os.PathLike],
    done: Sequence[os.PathLike],
    env: dict[str, str],
    timeout: float,
) -> list[int]:
    """Run one subprocess per command and wait for all of them; stop them all on any failure.

    Args:
        commands: the command line of process 0, 1, ...
        logs: where each process's stdout and stderr go.
        done: the file each process writes when it has finished its work.
        env: their environment (see :func:`worker_environment`).
        timeout: seconds after which the run counts as hung and is stopped.

    Returns:
        The PIDs of the processes, all of which exited with status 0.

    Raises:
        RpcServerFailed: process 0 could not bind the coordinator's port.
        WorkerFailed: a process failed or the run timed out. Every process has
            been stopped (SIGKILL to its process group) and reaped.
    """
    processes: list[subprocess.Popen] = []
    try:
        for command, log in zip(commands, logs, strict=True):
            processes.append(_start(command, log, env))
        try:
            failed = _wait(processes, done, time.monotonic() + timeout)
        except TimeoutError:
            _stop(processes)
            message = f"the run did not finish within {timeout:g} s; stopped every worker:\n"
            message += "\n".join(
                f"process {i} (pid {p.pid}); last lines of its output ({log}):\n{_tail(log)}"
                for i, (p, log) in enumerate(zip(processes, logs, strict=True))
            )
            raise WorkerFailed(message, [], [p.pid for p in processes]) from None
        if failed:
            _stop(processes)
            stopped = [i for i in range(len(processes)) if i not in failed]
            error = RpcServerFailed if _rpc_server_failed(logs[0]) else WorkerFailed
            raise error(
                _failure_message(failed, processes, logs, stopped),
                [(i, processes[i].pid) for i in failed],
                [p.pid for p in processes],
            )
        return [p.pid for p in processes]
    finally:
        _stop(processes)  # also on KeyboardInterrupt or SystemExit


def _rpc_server_failed(log: os.PathLike) -> bool:
    with open(log, errors="replace") as f:
        text = f.read()
    return any(failure in text for failure in RPC_SERVER_FAILURES)


# --- worker ------------------------------------------------------------------------------


def initialize_worker(
    coordinator_port: int,
    num_processes: int,
    process_id: int,
    local_devices: int,
    timeouts: Timeouts = Timeouts(),
) -> None:
    """Join JAX's distributed runtime on 127.0.0.1; call before any JAX operation.

    Sets the CPU device count of this process (``jax_num_cpu_devices``), makes
    the gloo collectives listen on 127.0.0.1 (see :func:`_use_loopback_gloo`),
    and calls ``jax.distributed.initialize`` with process 0 as the coordinator
    at ``127.0.0.1:coordinator_port``, bound to that address only.
    """
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _use_loopback_gloo()
    address = f"{LOOPBACK}:{coordinator_port}"
    jax.distributed.initialize(
        coordinator_address=address,
        coordinator_bind_address=address,
        num_processes=num_processes,
        process_id=process_id,
        cluster_detection_method="deactivate",  # no SLURM/MPI guessing: all is given
        initialization_timeout=timeouts.initialization,
        heartbeat_timeout_seconds=timeouts.heartbeat,
        shutdown_timeout_seconds=timeouts.shutdown,
    )


def _use_loopback_gloo() -> None:
    """Make the CPU backend's gloo collectives listen on 127.0.0.1.

    JAX 0.10.2 builds them with ``make_gloo_tcp_collectives(distributed_client=...)``
    and no address, so gloo resolves the machine's hostname and listens on
    whatever address that gives (on many machines not a loopback address, and
    on some not even a reachable one). No public option sets it, so this
    re-registers the CPU backend factory with ``hostname="127.0.0.1"``; the
    factory runs when the backend is first used, after ``initialize``.
    """
    from jax._src import distributed, xla_bridge
    from jax._src.lib import _jax

    def make_cpu_client():
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname=LOOPBACK
        )
        return xla_bridge.make_cpu_client(collectives=collectives)

    xla_bridge.register_backend_factory("cpu", make_cpu_client, priority=0, fail_quietly=False)
