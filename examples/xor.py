"""Learn XOR with a 2-8-2 jaxlinear MLP and Adam (Optax).

XOR is the classic function no single linear layer can compute: its two
classes are not linearly separable. One tanh hidden layer bends the plane
enough. The network outputs two logits (classes 0 and 1) trained with
softmax cross-entropy, full batch, every step inside one jitted ``lax.scan``.

    python examples/xor.py                   # prints the four predictions and the accuracy
    python examples/xor.py --seed 3 --out /tmp/xor

Writes ``OUT/xor.png``: the learned p(class 1) over the plane, with the four
points. Needs the examples' extras: ``pip install "jaxlinear[examples]"``.
"""

from __future__ import annotations

import argparse
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

INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
TARGETS = np.array([0, 1, 1, 0], np.int32)  # a XOR b
DEFAULT_STEPS = 300
DEFAULT_HIDDEN = 8
DEFAULT_LEARNING_RATE = 0.05
PLOT_NAME = "xor.png"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="xor.py",
        description="Learn XOR with a 2-H-2 jaxlinear MLP (tanh hidden layer) and Adam.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--steps", type=positive_int, default=DEFAULT_STEPS, help="full-batch Adam steps"
    )
    parser.add_argument(
        "--hidden", type=positive_int, default=DEFAULT_HIDDEN, help="hidden units H"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=DEFAULT_LEARNING_RATE, help="Adam learning rate"
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the initialisation")
    add_out_argument(parser, "PNG")
    return parser.parse_args(argv)


def logits_fn(params, x):
    """``(*batch, 2)`` logits of classes 0 and 1 for inputs ``(*batch, 2)``."""
    return jaxlinear.mlp_apply(params, x, activation=jaxlinear.tanh)


@jax.jit
def probability_of_1(params, x):
    """p(class 1) = softmax(logits)[..., 1], shape ``(*batch,)``, for inputs ``(*batch, 2)``."""
    return jax.nn.softmax(logits_fn(params, x), axis=-1)[..., 1]


def train(key: jax.Array, hidden: int, optimizer: optax.GradientTransformation, steps: int):
    """Initialise a 2-``hidden``-2 MLP and take ``steps`` full-batch steps, in one jitted call.

    Returns the trained parameters and the ``(steps,)`` losses.
    """

    def loss_fn(params, x, y):
        return jaxlinear.softmax_cross_entropy(logits_fn(params, x), y)

    return fit_full_batch(key, (2, hidden, 2), loss_fn, optimizer, steps, INPUTS, TARGETS)


def plot_decision_boundary(params, path: pathlib.Path) -> None:
    plt = pyplot()
    grid = np.linspace(-0.5, 1.5, 201, dtype=np.float32)
    gx, gy = np.meshgrid(grid, grid)
    points = np.stack([gx, gy], axis=-1)  # (201, 201, 2): mlp_apply takes any leading axes
    p1 = np.asarray(probability_of_1(params, points))

    fig, ax = plt.subplots(figsize=(5, 4.5), layout="constrained")
    filled = ax.contourf(gx, gy, p1, levels=np.linspace(0, 1, 11), cmap="RdBu_r")
    ax.contour(gx, gy, p1, levels=[0.5], colors="k", linewidths=1.5)
    fig.colorbar(filled, ax=ax, label="p(class 1)")
    for (a, b), t in zip(INPUTS, TARGETS, strict=True):
        ax.scatter(a, b, s=150, c="tab:red" if t else "tab:blue", edgecolors="k", zorder=3)
        ax.annotate(f"{int(a)} xor {int(b)} = {t}", (a, b), (6, 8), textcoords="offset points")
    ax.set(xlabel="a", ylabel="b", title="XOR: decision boundary (p = 0.5)", aspect="equal")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, print the predictions, write the plot; return the results as a dict.

    Keys: ``accuracy`` (float), ``predictions`` (list of four ints),
    ``probabilities`` (p(class 1) per input), ``first_loss``, ``final_loss``,
    ``losses`` (per step), ``plot`` (the PNG's path).
    """
    args = parse_args(argv)
    sizes = (2, args.hidden, 2)
    optimizer = optax.adam(args.lr)
    print(
        f"xor: MLP {sizes}, tanh hidden, softmax cross-entropy, Adam lr {args.lr}, "
        f"{args.steps} steps, seed {args.seed}"
    )
    params, losses = train(jax.random.key(args.seed), args.hidden, optimizer, args.steps)
    losses = np.asarray(losses)
    for i in sorted({0, *range(0, args.steps, max(1, args.steps // 5)), args.steps - 1}):
        print(f"step {i:5d}: loss {losses[i]:.5f}")

    probabilities = np.asarray(probability_of_1(params, INPUTS)).tolist()
    predictions = [int(p > 0.5) for p in probabilities]  # argmax of the two logits
    for (a, b), t, pred, p in zip(INPUTS, TARGETS, predictions, probabilities, strict=True):
        mark = "ok" if pred == t else "WRONG"
        print(f"({int(a)}, {int(b)}) -> {pred}  p(1)={p:.3f}  target {t}  {mark}")
    accuracy = float(np.mean(np.asarray(predictions) == TARGETS))

    plot = output_path(args.out, PLOT_NAME)
    plot_decision_boundary(params, plot)
    print(f"first loss: {losses[0]:.5f}")
    print(f"final loss: {losses[-1]:.5f}")
    print(f"accuracy: {accuracy}")
    print(f"plot: {plot}")
    return {
        "accuracy": accuracy,
        "predictions": predictions,
        "probabilities": probabilities,
        "first_loss": float(losses[0]),
        "final_loss": float(losses[-1]),
        "losses": losses.tolist(),
        "plot": plot,
    }


if __name__ == "__main__":
    main()
