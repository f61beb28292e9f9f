"""Data-parallel training of the digits MLP: the batch split across devices, or across processes.

**One process** (the default). The same training runs twice, from the same
initialisation and with the same shuffled minibatches: once on a single
device, and once on a ``jax.sharding.Mesh`` of N devices with one axis,
``"data"``, where every minibatch is split along its rows
(``NamedSharding(mesh, P(None, "data"))`` on the epoch's ``(steps, batch, 64)``
stack) and the parameters and Adam state are replicated (``P()``). Nothing else
changes: the loss, the hand-derived backward passes and the Optax update are
the single-device code, and the compiler (``jax.jit`` with sharding
annotations) partitions it, adding one all-reduce per step that sums the loss
and the gradients over the devices.

On a machine with several GPUs or TPUs this uses all of them. On a CPU, simulate
devices (the flag must be set before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py
    python examples/data_parallel.py --devices 4 --epochs 5 --out /tmp/dp

Prints, at the end, lines such as::

    devices: 8
    single-device final loss: 0.0213
    data-parallel final loss: 0.0213
    max |loss difference|: 4.1e-07
    max relative loss difference: 2.2e-06
    loss curves agree within float32 tolerance (rtol=1e-05, atol=1e-05): True
    all-reduces per step: 1
    other collectives per epoch: 0

and writes ``OUT/data_parallel.png`` (both loss curves and their difference).

**Several processes** (``--processes N [--devices-per-process D]``): the launcher
starts N worker processes on this machine, which form one JAX distributed
runtime (process 0 is the coordinator at 127.0.0.1; the CPU collectives are
gloo over 127.0.0.1) and train on one global mesh of N*D CPU devices. Each
process computes the same shuffled order, loads only its own rows of every
minibatch and assembles the global batch with
``jax.make_array_from_process_local_data``; one jitted step per minibatch.
The launcher then runs the same training in one process on N*D devices and
prints the largest differences of the loss curves and of the final
parameters, the time per step of each run, and writes
``OUT/data_parallel_processes.png``. The digits (read once, by the
launcher), the workers' logs and their results go to
``OUT/data_parallel_run/``. If a worker fails (raises, exits, is killed, or
the run exceeds ``--timeout``), the launcher stops every other worker and
exits with status 1, naming the failed process and showing its last lines::

    python examples/data_parallel.py --processes 2 --devices-per-process 2 --epochs 1

For the tests only: ``JAXLINEAR_DP_FAULT=PROCESS:STEP:KIND`` makes worker
PROCESS fail after STEP steps, KIND being ``kill`` (SIGKILL itself), ``exit``
(exit at once with status 3) or ``raise`` (an exception).

Needs the examples' extras: ``pip install "jaxlinear[examples]"``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cli import (
    DefaultsHelpFormatter,
    accuracy,
    add_out_argument,
    optimizer_step,
    output_path,
    positive_float,
    positive_int,
    pyplot,
    save_figure,
)
from _digits import NUM_CLASSES, NUM_FEATURES, TRAIN_SIZE, Digits, epoch_batches, load_digits
from _multiprocess import (
    LOOPBACK,
    RpcServerFailed,
    WorkerFailed,
    free_port,
    initialize_worker,
    run_workers,
    worker_environment,
)
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

import jaxlinear
import jaxlinear.check

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_TIMEOUT = 300.0
HIDDEN = 256
PLOT_NAME = "data_parallel.png"
PROCESSES_PLOT_NAME = "data_parallel_processes.png"
RUN_DIR = "data_parallel_run"
#: The digits, written once by the launcher into the run directory for every worker.
DATA_FILE = "digits.npz"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
FAULT_VARIABLE = "JAXLINEAR_DP_FAULT"
PORT_ATTEMPTS = 3
#: Issue 12's target for N processes against one process with the same N*D
#: devices: the same program, whose all-reduces may sum the per-device partial
#: gradients in another order (gloo between processes, in-process within one):
#: a few float32 roundings (eps = 1.2e-7) of the O(1) losses and parameters per
#: step, which Adam's normalised updates keep from growing over a short run.
PROCESSES_TARGET = 1e-6


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="data_parallel.py",
        description=(
            "Train the digits MLP on one device and, data-parallel, on a mesh of "
            "devices (batch split, parameters replicated); compare the loss curves. "
            "With --processes, the mesh spans several processes on this machine "
            "(JAX's distributed runtime over 127.0.0.1), compared with one process."
        ),
        epilog=(
            "On a CPU, simulate devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before starting)."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="epochs")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help="global minibatch size, split evenly across the devices",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        metavar="N",
        help="devices in the one-process mesh; all of the default backend's if not given",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation and the shuffling"
    )
    _add_process_arguments(parser)
    add_out_argument(parser, "PNG (and, with --processes, the workers' logs)")
    args = parser.parse_args(argv)
    if args.batch_size > TRAIN_SIZE:
        parser.error(f"--batch-size must be at most {TRAIN_SIZE}; got {args.batch_size}")
    if args.worker is None and args.processes is None:
        _check_devices(parser, args)
    elif args.worker is None:
        _check_processes(parser, args)
    return args


def _add_process_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processes",
        type=positive_int,
        default=None,
        metavar="N",
        help=(
            "run data-parallel over N processes on this machine (JAX's distributed "
            "runtime, CPU devices, gloo collectives over 127.0.0.1) and compare with "
            "one process; one process if not given"
        ),
    )
    parser.add_argument(
        "--devices-per-process",
        type=positive_int,
        default=1,
        metavar="D",
        help="CPU devices of each process, with --processes",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="with --processes: stop every worker if a run takes longer",
    )
    # What the launcher passes to a worker (JSON); not for users.
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def _check_devices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    available = len(jax.devices())
    if args.devices is None:
        args.devices = available
    if args.devices > available:
        parser.error(
            f"--devices {args.devices} asks for more than the {available} "
            f"{jax.default_backend()} device(s) present; on a CPU, start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}"
        )
    if args.batch_size % args.devices:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --devices "
            f"({args.devices}) so every device gets the same number of rows"
        )


def _check_processes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """No JAX here: the launcher never starts a JAX backend of its own."""
    if args.devices is not None:
        parser.error("--devices is for one process; with --processes use --devices-per-process")
    total = args.processes * args.devices_per_process
    if args.batch_size % total:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --processes × "
            f"--devices-per-process ({args.processes} × {args.devices_per_process} = "
            f"{total}) so every device gets the same number of rows"
        )


def loss_fn(params, x, y):
    return jaxlinear.softmax_cross_entropy(jaxlinear.mlp_apply(params, x), y)


def initial_state(seed: int, epochs: int):
    """``(params, opt_state, optimizer, epoch_keys)``: the MLP, Adam and one
    shuffling key per epoch, all from ``seed`` (the same in every mode).

    One jitted call: run op by op, the initialisation would compile a small
    program for every operation.
    """
    optimizer = optax.adam(DEFAULT_LEARNING_RATE)

    @jax.jit
    def init(seed):
        init_key, shuffle_key = jax.random.split(jax.random.key(seed))
        sizes = (NUM_FEATURES, HIDDEN, NUM_CLASSES)
        params = jaxlinear.mlp_init(init_key, sizes, init="he_normal")
        return params, optimizer.init(params), jax.random.split(shuffle_key, epochs)

    params, opt_state, epoch_keys = init(seed)
    return params, opt_state, optimizer, epoch_keys


# --- one process ---------------------------------------------------------------------


def make_train_epoch(optimizer: optax.GradientTransformation, batch_size: int, mesh=None):
    """``train_epoch(params, opt_state, key, x, y) -> (params, opt_state, losses)``:
    one ``lax.scan`` of Adam steps over the epoch's shuffled minibatches, with
    ``losses`` the ``(steps,)`` minibatch losses.

    With a ``mesh``, the minibatches are constrained to be split along their
    rows over the mesh's ``"data"`` axis; the compiler propagates that through
    the scan, so each device computes the loss and gradient of its rows and an
    all-reduce sums them. Without one, this is the single-device code.
    """
    step = optimizer_step(loss_fn, optimizer)

    def train_epoch(params, opt_state, key, x, y):
        xb, yb = epoch_batches(key, x, y, batch_size)  # (steps, batch, 64), (steps, batch)
        if mesh is not None:
            xb = lax.with_sharding_constraint(xb, NamedSharding(mesh, P(None, "data", None)))
            yb = lax.with_sharding_constraint(yb, NamedSharding(mesh, P(None, "data")))

        (params, opt_state), losses = lax.scan(step, (params, opt_state), (xb, yb))
        return params, opt_state, losses

    return train_epoch


def count_collectives(compiled) -> dict[str, int]:
    """Collective ops in a compiled executable's HLO (an async start/done pair
    counts once)."""
    text = compiled.as_text()
    pattern = r" ({})(?:-start)?\(".format("|".join(COLLECTIVES))
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in re.finditer(pattern, text):
        counts[m[1]] += 1
    return counts


def train(params, opt_state, epoch_keys, data, train_epoch, placement):
    """Run every epoch; ``placement`` puts each input where the run keeps it.
    Returns the final parameters, the per-step losses, and the compiled epoch."""
    params, opt_state = placement(params), placement(opt_state)
    x, y = placement(jnp.asarray(data.x_train)), placement(jnp.asarray(data.y_train))
    keys = placement(epoch_keys)
    epoch = train_epoch.lower(params, opt_state, keys[0], x, y).compile()
    losses = []
    for key in keys:
        params, opt_state, epoch_losses = epoch(params, opt_state, key, x, y)
        losses.append(np.asarray(epoch_losses))
    return params, np.concatenate(losses), epoch


def plot_curves(single, parallel, labels: tuple[str, str], path: pathlib.Path) -> None:
    """Both loss curves (left) and their absolute difference (right).

    The difference is drawn on a log scale where it is non-zero; when the two
    curves are identical (one device: the same computation twice) the right
    panel shows the zeros on a linear scale and says so, rather than nothing.
    """
    plt = pyplot()
    steps = np.arange(1, len(single) + 1)
    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_loss.plot(steps, single, label=labels[0])
    ax_loss.plot(steps, parallel, linestyle="--", label=labels[1])
    ax_loss.set(xlabel="step", ylabel="minibatch loss", yscale="log", title="loss")
    ax_loss.legend()
    difference = np.abs(parallel.astype(np.float64) - single)
    nonzero = difference > 0
    title = f"difference (exactly 0 at {np.sum(~nonzero)} of {len(steps)} steps)"
    if nonzero.any():
        ax_diff.plot(steps[nonzero], difference[nonzero], ".")
        ax_diff.set(xlabel="step", ylabel="|difference| (log scale)", yscale="log", title=title)
    else:
        ax_diff.plot(steps, difference, ".")
        ax_diff.set(xlabel="step", ylabel="|difference|", ylim=(-1, 1), title=title)
        ax_diff.text(
            0.5, 0.75, "the curves are identical", transform=ax_diff.transAxes, ha="center"
        )
    save_figure(fig, path)


def single_process(args: argparse.Namespace) -> dict:
    """Train on one device and data-parallel on ``args.devices``; see :func:`main`."""
    data = load_digits()
    params, opt_state, optimizer, epoch_keys = initial_state(args.seed, args.epochs)
    steps = data.x_train.shape[0] // args.batch_size
    print(
        f"digits: MLP {(NUM_FEATURES, HIDDEN, NUM_CLASSES)}, Adam lr={DEFAULT_LEARNING_RATE}, "
        f"global batch {args.batch_size} ({args.batch_size // args.devices} rows per device), "
        f"{steps} steps/epoch, {args.epochs} epochs, seed {args.seed}"
    )
    if args.devices == 1:
        print(
            "note: one device, so both runs are the same computation; on a CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 to simulate 8."
        )

    # 1. One device.
    device = jax.devices()[0]
    single_params, single, _ = train(
        params,
        opt_state,
        epoch_keys,
        data,
        jax.jit(make_train_epoch(optimizer, args.batch_size)),
        lambda tree: jax.device_put(tree, device),
    )

    # 2. Data parallel: a 1-D mesh over the first N devices. Auto axes: the
    # compiler propagates the batch split from the constraint in train_epoch.
    mesh = jax.make_mesh(
        (args.devices,),
        ("data",),
        axis_types=(AxisType.Auto,),
        devices=jax.devices()[: args.devices],
    )
    replicated = NamedSharding(mesh, P())
    train_epoch = jax.jit(
        make_train_epoch(optimizer, args.batch_size, mesh),
        in_shardings=replicated,  # params, Adam state, key and the data set
        out_shardings=replicated,  # params and Adam state stay replicated
    )
    parallel_params, parallel, compiled = train(
        params,
        opt_state,
        epoch_keys,
        data,
        train_epoch,
        lambda tree: jax.device_put(tree, replicated),
    )
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    test_accuracy = (
        float(accuracy(single_params, x_test, y_test)),
        float(accuracy(jax.device_put(parallel_params, device), x_test, y_test)),
    )
    plot = output_path(args.out, PLOT_NAME)
    labels = ("1 device", f"{args.devices} device{'s' * (args.devices > 1)}, data parallel")
    plot_curves(single, parallel, labels, plot)
    return _report_single_process(args.devices, single, parallel, compiled, test_accuracy, plot)


def _report_single_process(devices, single, parallel, compiled, test_accuracy, plot) -> dict:
    rtol, atol = jaxlinear.check.tolerance_for(jnp.float32).autodiff
    difference = np.abs(parallel.astype(np.float64) - single)
    max_abs = float(difference.max())
    max_rel = float((difference / np.abs(single)).max())
    within = bool(np.all(difference <= atol + rtol * np.abs(single)))
    collectives = count_collectives(compiled)
    # The epoch is one scan; the only all-reduce is the one inside its body.
    all_reduces_per_step = collectives["all-reduce"]
    other = sum(n for kind, n in collectives.items() if kind != "all-reduce")
    print(f"devices: {devices}")
    print(f"single-device first loss: {single[0]:.4f}")
    print(f"single-device final loss: {single[-1]:.4f}")
    print(f"data-parallel first loss: {parallel[0]:.4f}")
    print(f"data-parallel final loss: {parallel[-1]:.4f}")
    print(f"max |loss difference|: {max_abs:.1e}")
    print(f"max relative loss difference: {max_rel:.1e}")
    print(f"loss curves agree within float32 tolerance (rtol={rtol:g}, atol={atol:g}): {within}")
    print(f"all-reduces per step: {all_reduces_per_step}")
    print(f"other collectives per epoch: {other}")
    print(
        f"test accuracy: {test_accuracy[0]:.4f} (1 device), {test_accuracy[1]:.4f} (data parallel)"
    )
    print(f"plot: {plot}")
    return {
        "devices": devices,
        "single_device_losses": single,
        "data_parallel_losses": parallel,
        "max_abs_difference": max_abs,
        "max_rel_difference": max_rel,
        "tolerance": (rtol, atol),
        "within_tolerance": within,
        "collectives": collectives,
        "all_reduces_per_step": all_reduces_per_step,
        "test_accuracy": test_accuracy,
        "plot": plot,
    }


# --- several processes: the worker ------------------------------------------------------


def _fault_hook(process_id: int) -> Callable[[int], None]:
    """``after_step(steps_done)`` that fails as ``JAXLINEAR_DP_FAULT`` says (tests only)."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return lambda steps_done: None
    m = re.fullmatch(r"(\d+):(\d+):(kill|exit|raise)", spec)
    if m is None:
        raise ValueError(f"{FAULT_VARIABLE} must be PROCESS:STEP:kill|exit|raise; got {spec!r}")
    target, step, kind = int(m[1]), int(m[2]), m[3]

    def after_step(steps_done: int) -> None:
        if process_id != target or steps_done != step:
            return
        print(f"process {process_id}: injected fault after step {step}: {kind}", flush=True)
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "exit":
            os._exit(3)
        raise RuntimeError(f"injected fault in process {process_id} after step {step}")

    return after_step


def _local_rows(rows: NamedSharding, batch_size: int) -> slice:
    """The rows of every global minibatch that this process's devices hold (contiguous)."""
    index_map = rows.addressable_devices_indices_map((batch_size, NUM_FEATURES))
    spans = sorted(index[0].indices(batch_size)[:2] for index in index_map.values())
    for (_, stop), (start, _) in itertools.pairwise(spans):
        if start != stop:
            raise RuntimeError(f"this process's rows are not contiguous: {spans}")
    return slice(spans[0][0], spans[-1][1])


def _make_step(optimizer, replicated: NamedSharding, rows: NamedSharding):
    """``step(params, opt_state, x, y) -> (params, opt_state, loss)`` on the global mesh."""
    body = optimizer_step(loss_fn, optimizer)

    def step(params, opt_state, x, y):
        (params, opt_state), loss = body((params, opt_state), (x, y))
        return params, opt_state, loss

    return jax.jit(
        step,
        in_shardings=(replicated, replicated, rows, rows),
        out_shardings=(replicated, replicated, replicated),
    )


def train_global(data: Digits, seed: int, epochs: int, batch_size: int, after_step) -> dict:
    """Train on one mesh over ``jax.devices()`` (every process's), one jitted step per minibatch.

    ``data`` is the whole (tiny) set. Every process draws the same shuffled
    order, takes only its own rows of each minibatch and builds the
    ``(batch, 64)`` global array with ``jax.make_array_from_process_local_data``.
    Returns NumPy results: the ``losses`` (one per step), the final parameters
    ``param_0``, ``param_1``, ... (``jax.tree.leaves`` order),
    ``seconds_per_step`` (wall time from the first step to the last, feeding
    the data included, the compilation excluded) and ``compile_seconds``.
    """
    mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params, opt_state, optimizer, epoch_keys = initial_state(seed, epochs)
    state = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, replicated, np.asarray(a).__getitem__),
        (params, opt_state),
    )
    mine = _local_rows(rows, batch_size)
    shapes = [
        jax.ShapeDtypeStruct((batch_size, *a.shape[1:]), a.dtype, sharding=rows)
        for a in (data.x_train, data.y_train)
    ]
    start = time.perf_counter()
    step = _make_step(optimizer, replicated, rows).lower(*state, *shapes).compile()
    compile_seconds, start = time.perf_counter() - start, time.perf_counter()
    losses = []
    # The order of epoch_batches: a permutation per epoch, the remainder dropped.
    orders = jax.jit(lambda keys: lax.map(lambda k: jax.random.permutation(k, TRAIN_SIZE), keys))
    for order in np.asarray(orders(epoch_keys)):
        for batch in order[: TRAIN_SIZE // batch_size * batch_size].reshape(-1, batch_size):
            x, y = (
                jax.make_array_from_process_local_data(rows, a[batch[mine]], s.shape)
                for a, s in zip((data.x_train, data.y_train), shapes, strict=True)
            )
            *state, loss = step(*state, x, y)
            # One step in flight at a time. Queued further ahead, the steps of a
            # process with several CPU devices deadlocked in XLA:CPU's collectives
            # (JAX 0.10.2, 2 processes × 2 devices, 2 cores: every run of 220 steps).
            losses.append(loss.block_until_ready())
            after_step(len(losses))
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / len(losses)
    leaves = {
        f"param_{i}": np.asarray(a.addressable_data(0))
        for i, a in enumerate(jax.tree.leaves(state[0]))
    }
    return dict(
        losses=np.array([np.asarray(loss.addressable_data(0)) for loss in losses]),
        seconds_per_step=seconds,
        compile_seconds=compile_seconds,
        **leaves,
    )


def worker(args: argparse.Namespace) -> None:
    """One process of a multi-process run (or the one-process reference), as the launcher
    asked in ``args.worker``: train, write the results, leave. Any failure ends the process
    at once with status 1 and the traceback (no waiting for the others at shutdown)."""
    spec = json.loads(args.worker)
    try:
        distributed = spec["coordinator_port"] is not None
        if distributed:  # first of all: before any JAX operation
            initialize_worker(
                spec["coordinator_port"], spec["num_processes"], spec["process_id"], spec["devices"]
            )
        else:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", spec["devices"])
        print(
            f"process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} local of {jax.device_count()} devices",
            flush=True,
        )
        after_step = _fault_hook(spec["process_id"]) if distributed else (lambda steps: None)
        with np.load(spec["data"]) as arrays:  # written by the launcher
            data = Digits(**arrays)
        result = train_global(data, args.seed, args.epochs, args.batch_size, after_step)
        partial = spec["result"] + ".partial.npz"
        np.savez(partial, **result)
        os.replace(partial, spec["result"])  # the launcher's sign that the work is done
        if distributed:
            jax.distributed.shutdown()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


# --- several processes: the launcher ----------------------------------------------------


def _worker_command(args, process_id, num_processes, port, devices, result) -> list[str]:
    spec = dict(
        process_id=process_id,
        num_processes=num_processes,
        coordinator_port=port,
        devices=devices,
        result=str(result),
        data=str(result.parent / DATA_FILE),
    )
    return [
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        *("--epochs", str(args.epochs), "--batch-size", str(args.batch_size)),
        *("--seed", str(args.seed), "--worker", json.dumps(spec)),
    ]


def _run(args, run_dir: pathlib.Path, name: str, processes: int, devices: int, port) -> dict:
    """Run ``processes`` workers (one, without the distributed runtime, when ``port`` is
    None); return ``pids`` and each process's ``results``."""
    paths = [run_dir / f"{name}_{i}" for i in range(processes)]
    results = [p.with_suffix(".npz") for p in paths]
    for r in results:
        r.unlink(missing_ok=True)
    commands = [
        _worker_command(args, i, processes, port, devices, results[i]) for i in range(processes)
    ]
    # The fault injection is for the multi-process workers only.
    env = worker_environment(drop=() if port else (FAULT_VARIABLE,))
    logs = [p.with_suffix(".log") for p in paths]
    pids = run_workers(commands, logs, results, env, args.timeout)
    return {"pids": pids, "results": [dict(np.load(r)) for r in results]}


def _run_distributed(args, run_dir: pathlib.Path) -> dict:
    """The N-process run, on a fresh coordinator port while the port turns out taken."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        print(
            f"starting {args.processes} processes × {args.devices_per_process} CPU device(s), "
            f"coordinator {LOOPBACK}:{port}",
            flush=True,
        )
        try:
            run = _run(args, run_dir, "process", args.processes, args.devices_per_process, port)
            return run | {"port": port}
        except RpcServerFailed:
            if attempt == PORT_ATTEMPTS:
                raise
            print(f"port {port} was taken before the coordinator bound it; retrying", flush=True)
    raise AssertionError("unreachable")


def _compare(reference: dict, runs: list[dict]) -> dict:
    """Largest differences of the losses and parameters: process 0 against the
    reference, and every process against process 0 (the replicas)."""
    names = sorted(k for k in reference if k.startswith("param_"))

    def largest(a: dict, b: dict, keys) -> float:
        return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in keys)

    return {
        "max_loss_difference": largest(runs[0], reference, ["losses"]),
        "max_param_difference": largest(runs[0], reference, names),
        "replicas_identical": all(
            all(np.array_equal(run[k], runs[0][k]) for k in [*names, "losses"]) for run in runs
        ),
    }


def launch(args: argparse.Namespace) -> dict:
    """The ``--processes`` mode: N workers, then one process on N*D devices; compare."""
    total = args.processes * args.devices_per_process
    run_dir = output_path(args.out, RUN_DIR)
    run_dir.mkdir(exist_ok=True)
    # The data set is read once, here; every worker loads this copy (rather than
    # importing scikit-learn, about a second of each worker's start).
    np.savez(run_dir / DATA_FILE, **load_digits()._asdict())
    print(
        f"digits: MLP {(NUM_FEATURES, HIDDEN, NUM_CLASSES)}, Adam lr={DEFAULT_LEARNING_RATE}, "
        f"global batch {args.batch_size} ({args.batch_size // total} rows per device), "
        f"{TRAIN_SIZE // args.batch_size} steps/epoch, {args.epochs} epochs, seed {args.seed}; "
        f"logs in {run_dir}",
        flush=True,
    )
    distributed = _run_distributed(args, run_dir)
    print(f"starting one process × {total} CPU devices (the reference)", flush=True)
    reference = _run(args, run_dir, "reference", 1, total, None)
    ref, runs = reference["results"][0], distributed["results"]
    comparison = _compare(ref, runs)
    plot = output_path(args.out, PROCESSES_PLOT_NAME)
    labels = (
        f"1 process × {total} devices",
        f"{args.processes} processes × {args.devices_per_process} device(s)",
    )
    plot_curves(ref["losses"], runs[0]["losses"], labels, plot)
    result = {
        "processes": args.processes,
        "devices_per_process": args.devices_per_process,
        "port": distributed["port"],
        "pids": distributed["pids"] + reference["pids"],
        "reference_losses": ref["losses"],
        "losses": runs[0]["losses"],
        "seconds_per_step": (float(ref["seconds_per_step"]), float(runs[0]["seconds_per_step"])),
        "target": PROCESSES_TARGET,
        "plot": plot,
        **comparison,
    }
    result["within_target"] = bool(
        max(result["max_loss_difference"], result["max_param_difference"]) <= PROCESSES_TARGET
    )
    _report_processes(result, total)
    return result


def _report_processes(r: dict, total: int) -> None:
    ref_ms, dist_ms = (1e3 * s for s in r["seconds_per_step"])
    n, d = r["processes"], r["devices_per_process"]
    print(f"processes: {n} × {d} device(s) = {total} devices, gloo over {LOOPBACK}")
    print(f"one-process final loss: {r['reference_losses'][-1]:.4f}")
    print(f"{n}-process final loss: {r['losses'][-1]:.4f}")
    print(f"max |loss difference| over {len(r['losses'])} steps: {r['max_loss_difference']:.1e}")
    print(f"max |parameter difference|: {r['max_param_difference']:.1e}")
    print(f"within {r['target']:g}: {r['within_target']}")
    if not r["within_target"]:
        print(
            "note: the runs add the devices' partial sums in different orders; the "
            "rounding differences grow with the number of steps (Adam divides by "
            "sqrt(v), so parameters with tiny gradients amplify them)"
        )
    procs = f"{n} process{'es' * (n > 1)}"
    print(f"replicas identical in all {procs}: {r['replicas_identical']}")
    print(f"time per step: {ref_ms:.2f} ms (1 process), {dist_ms:.2f} ms ({procs})")
    print(f"plot: {r['plot']}")


def _launch_or_exit(args: argparse.Namespace) -> dict:
    """:func:`launch`; on a failed worker, print why and exit with status 1.

    SIGTERM becomes ``SystemExit`` while it runs, so the launcher's ``finally``
    stops the workers then too (SIGKILL cannot be caught: the workers' short
    heartbeat timeout ends them).
    """
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return launch(args)
    except WorkerFailed as error:
        print(f"data_parallel.py: the multi-process run failed:\n{error}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Train on one device and data-parallel, print the comparison, write the
    plot; return the results as a dict.

    One process (no ``--processes``), keys: ``devices``,
    ``single_device_losses`` and ``data_parallel_losses`` (per-step minibatch
    losses, NumPy arrays), ``max_abs_difference``, ``max_rel_difference``,
    ``tolerance`` (``(rtol, atol)`` for float32 from
    :data:`jaxlinear.check.TOLERANCES`), ``within_tolerance``, ``collectives`` (per
    kind, in the compiled data-parallel epoch), ``all_reduces_per_step``,
    ``test_accuracy`` (``(single, data_parallel)``), ``plot``.

    With ``--processes N``, keys: ``processes``, ``devices_per_process``,
    ``port``, ``pids`` (every process started), ``reference_losses`` (one
    process) and ``losses`` (N processes), ``max_loss_difference``,
    ``max_param_difference``, ``replicas_identical``, ``seconds_per_step``
    (``(one process, N processes)``), ``target``, ``within_target``, ``plot``.
    A worker's own call returns ``None``.
    """
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    if args.processes is not None:
        return _launch_or_exit(args)
    return single_process(args)


if __name__ == "__main__":
    main()
