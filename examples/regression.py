"""Fit y = sin(x) on [-π, π] with a 1-32-32-1 jaxlinear MLP, mse_loss and Adam.

The training set is ``--points`` inputs drawn uniformly from [-π, π] (by
``--seed``) with their exact sines; training is full batch, every step inside
one jitted ``lax.scan``.

    python examples/regression.py            # prints the loss falling, first and final
    python examples/regression.py --steps 500 --out /tmp/regression

Writes ``OUT/regression.png``: the loss curve and the fitted function. Needs
the examples' extras: ``pip install "jaxlinear[examples]"``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from collections.abc import Sequence

import jax
import numpy as np
import optax
from _cli import (
    add_out_argument,
    fit_full_batch,
    output_path,
    positive_float,
    positive_int,
    pyplot,
    save_figure,
    seed,
)

import jaxlinear

DEFAULT_STEPS = 2000
DEFAULT_POINTS = 256
DEFAULT_HIDDEN = 32
DEFAULT_LEARNING_RATE = 1e-2
PLOT_NAME = "regression.png"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="regression.py",
        description="Fit sin(x) on [-pi, pi] with a 1-H-H-1 jaxlinear MLP (tanh), MSE and Adam.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--steps", type=positive_int, default=DEFAULT_STEPS, help="full-batch Adam steps"
    )
    parser.add_argument(
        "--points", type=positive_int, default=DEFAULT_POINTS, help="training points"
    )
    parser.add_argument(
        "--hidden", type=positive_int, default=DEFAULT_HIDDEN, help="units H per hidden layer"
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=DEFAULT_LEARNING_RATE,
        help="peak Adam learning rate, decayed to 0 over the run by a cosine schedule",
    )
    parser.add_argument(
        "--seed", type=seed, default=0, help="seed of the training inputs and the initialisation"
    )
    add_out_argument(parser, "PNG")
    return parser.parse_args(argv)


@jax.jit
def predict(params, x):
    """``(*batch, 1)`` predictions for inputs ``(*batch, 1)``."""
    return jaxlinear.mlp_apply(params, x, activation=jaxlinear.tanh)


def train(key: jax.Array, sizes, optimizer: optax.GradientTransformation, steps: int, x, y):
    """Initialise an MLP of ``sizes`` and take ``steps`` full-batch steps, in one jitted call.

    ``x`` and ``y`` are ``(points, 1)``; the loss is ``mse_loss``,
    1/(2N) Σᵢ (f(xᵢ) − yᵢ)². Returns the trained parameters and the
    ``(steps,)`` losses.
    """

    def loss_fn(params, x, y):
        return jaxlinear.mse_loss(predict(params, x), y)

    return fit_full_batch(key, sizes, loss_fn, optimizer, steps, x, y)


def plot_results(params, losses, x, y, path: pathlib.Path) -> None:
    plt = pyplot()
    grid = np.linspace(-math.pi, math.pi, 401, dtype=np.float32)[:, None]
    fit = np.asarray(predict(params, grid))
    fig, (ax_loss, ax_fit) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_loss.plot(np.arange(len(losses)), losses)
    ax_loss.set(xlabel="step", ylabel="mse_loss", yscale="log", title="training loss")
    ax_fit.plot(grid[:, 0], np.sin(grid[:, 0]), color="grey", label="sin(x)")
    ax_fit.plot(grid[:, 0], fit[:, 0], linestyle="--", label="MLP")
    ax_fit.scatter(x[:, 0], y[:, 0], s=6, color="k", label="training points")
    ax_fit.set(xlabel="x", ylabel="y", title="fit")
    ax_fit.legend()
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, print the losses, write the plot; return the results as a dict.

    Keys: ``first_loss``, ``final_loss``, ``losses`` (per step),
    ``max_abs_error`` (of the fit on a 401-point grid over [-π, π]),
    ``plot`` (the PNG's path).
    """
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(-math.pi, math.pi, (args.points, 1)).astype(np.float32)
    y = np.sin(x)
    sizes = (1, args.hidden, args.hidden, 1)
    print(
        f"regression: sin(x) at {args.points} points, MLP {sizes}, tanh hidden, mse_loss, "
        f"Adam (lr {args.lr}, cosine decay), {args.steps} steps, seed {args.seed}"
    )
    # Decaying the step size (cosine, to 0 at the last step) damps the loss
    # spikes that Adam at a constant 1e-2 shows once the fit is close, so the
    # final loss is the settled one, ~0.4x that of a constant rate here.
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps))
    params, losses = train(jax.random.key(args.seed), sizes, optimizer, args.steps, x, y)
    losses = np.asarray(losses)
    for i in sorted({*range(0, args.steps, max(1, args.steps // 5)), args.steps - 1}):
        print(f"step {i:5d}: loss {losses[i]:.3e}")

    grid = np.linspace(-math.pi, math.pi, 401, dtype=np.float32)[:, None]
    max_abs_error = float(np.max(np.abs(np.asarray(predict(params, grid)) - np.sin(grid))))
    plot = output_path(args.out, PLOT_NAME)
    plot_results(params, losses, x, y, plot)
    print(f"first loss: {losses[0]:.3e}")
    print(f"final loss: {losses[-1]:.3e}")
    print(f"max abs error on [-pi, pi]: {max_abs_error:.3e}")
    print(f"plot: {plot}")
    return {
        "first_loss": float(losses[0]),
        "final_loss": float(losses[-1]),
        "losses": losses.tolist(),
        "max_abs_error": max_abs_error,
        "plot": plot,
    }


if __name__ == "__main__":
    main()
