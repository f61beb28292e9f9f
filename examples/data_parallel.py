"""Data-parallel training of the digits MLP: the batch split across devices.

The same training runs twice, from the same initialisation and with the same
shuffled minibatches: once on a single device, and once on a
``jax.sharding.Mesh`` of N devices with one axis, ``"data"``, where every
minibatch is split along its rows (``NamedSharding(mesh, P(None, "data"))`` on
the epoch's ``(steps, batch, 64)`` stack) and the parameters and Adam state are
replicated (``P()``). Nothing else changes: the loss, the hand-derived
backward passes and the Optax update are the single-device code, and the
compiler (``jax.jit`` with sharding annotations) partitions it, adding one
all-reduce per step that sums the loss and the gradients over the devices.

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
Needs the examples' extras: ``pip install "jaxlinear[examples]"``.
"""

from __future__ import annotations

import argparse
import pathlib
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cli import (
    accuracy,
    add_out_argument,
    optimizer_step,
    output_path,
    positive_int,
    pyplot,
    save_figure,
)
from _digits import NUM_CLASSES, NUM_FEATURES, TRAIN_SIZE, epoch_batches, load_digits
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxlinear

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-3
HIDDEN = 256
PLOT_NAME = "data_parallel.png"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="data_parallel.py",
        description=(
            "Train the digits MLP on one device and, data-parallel, on a mesh of "
            "devices (batch split, parameters replicated); compare the loss curves."
        ),
        epilog=(
            "On a CPU, simulate devices with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before starting)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        help="devices in the mesh (default: all of the default backend's)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initialisation and the shuffling"
    )
    add_out_argument(parser, "PNG")
    args = parser.parse_args(argv)
    available = len(jax.devices())
    if args.devices is None:
        args.devices = available
    if args.devices > available:
        parser.error(
            f"--devices {args.devices} asks for more than the {available} "
            f"{jax.default_backend()} device(s) present; on a CPU, start with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}"
        )
    if args.batch_size > TRAIN_SIZE:
        parser.error(f"--batch-size must be at most {TRAIN_SIZE}; got {args.batch_size}")
    if args.batch_size % args.devices:
        parser.error(
            f"--batch-size ({args.batch_size}) must be a multiple of --devices "
            f"({args.devices}) so every device gets the same number of rows"
        )
    return args


def loss_fn(params, x, y):
    return jaxlinear.softmax_cross_entropy(jaxlinear.mlp_apply(params, x), y)


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


def plot_curves(single, parallel, devices, path: pathlib.Path) -> None:
    plt = pyplot()
    steps = np.arange(1, len(single) + 1)
    fig, (ax_loss, ax_diff) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_loss.plot(steps, single, label="1 device")
    ax_loss.plot(steps, parallel, linestyle="--", label=f"{devices} devices, data parallel")
    ax_loss.set(xlabel="step", ylabel="minibatch loss", yscale="log", title="loss")
    ax_loss.legend()
    difference = np.abs(parallel.astype(np.float64) - single)
    nonzero = difference > 0
    ax_diff.plot(steps[nonzero], difference[nonzero], ".")
    ax_diff.set(
        xlabel="step",
        ylabel="|difference| (log scale)",
        yscale="log",
        title=f"difference (exactly 0 at {np.sum(~nonzero)} of {len(steps)} steps)",
    )
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train on one device and data-parallel, print the comparison, write the
    plot; return the results as a dict.

    Keys: ``devices``, ``single_device_losses`` and ``data_parallel_losses``
    (per-step minibatch losses, NumPy arrays), ``max_abs_difference``,
    ``max_rel_difference``, ``tolerance`` (``(rtol, atol)`` for float32 from
    :data:`jaxlinear.TOLERANCES`), ``within_tolerance``, ``collectives`` (per
    kind, in the compiled data-parallel epoch), ``all_reduces_per_step``,
    ``test_accuracy`` (``(single, data_parallel)``), ``plot``.
    """
    args = parse_args(argv)
    data = load_digits()
    sizes = (NUM_FEATURES, HIDDEN, NUM_CLASSES)
    steps = data.x_train.shape[0] // args.batch_size

    init_key, shuffle_key = jax.random.split(jax.random.key(args.seed))
    params = jaxlinear.mlp_init(init_key, sizes, init="he_normal")
    optimizer = optax.adam(DEFAULT_LEARNING_RATE)
    opt_state = optimizer.init(params)
    epoch_keys = jax.random.split(shuffle_key, args.epochs)
    print(
        f"digits: MLP {sizes}, Adam lr={DEFAULT_LEARNING_RATE}, global batch "
        f"{args.batch_size} ({args.batch_size // args.devices} rows per device), "
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

    rtol, atol = jaxlinear.tolerance_for(jnp.float32).autodiff
    difference = np.abs(parallel.astype(np.float64) - single)
    max_abs = float(difference.max())
    max_rel = float((difference / np.abs(single)).max())
    within = bool(np.all(difference <= atol + rtol * np.abs(single)))
    collectives = count_collectives(compiled)
    # The epoch is one scan; the only all-reduce is the one inside its body.
    all_reduces_per_step = collectives["all-reduce"]
    other = sum(n for kind, n in collectives.items() if kind != "all-reduce")
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    test_accuracy = (
        float(accuracy(single_params, x_test, y_test)),
        float(accuracy(jax.device_put(parallel_params, device), x_test, y_test)),
    )

    plot = output_path(args.out, PLOT_NAME)
    plot_curves(single, parallel, args.devices, plot)

    print(f"devices: {args.devices}")
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
        "devices": args.devices,
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


if __name__ == "__main__":
    main()
