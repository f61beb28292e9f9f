"""Helpers the example scripts share: argparse types, the output folder, plots, training.

Public API::

    from _cli import positive_int, positive_float, seed         # argparse ``type=`` validators
    from _cli import DefaultsHelpFormatter                      # --help shows real defaults
    from _cli import add_out_argument, output_path              # the --out folder
    from _cli import pyplot, save_figure                        # plots
    from _cli import optimizer_step, fit_full_batch, accuracy   # training and evaluation

The validators raise :class:`argparse.ArgumentTypeError`, so a bad value ends
the run with exit status 2 and ``error: argument --NAME: expected ...``.

Examples import it as ``from _cli import ...``: ``python examples/NAME.py``
puts ``examples/`` first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import math
import pathlib

import jax
import jax.numpy as jnp
import optax
from jax import lax

import jaxlinear

__all__ = [
    "DefaultsHelpFormatter",
    "positive_int",
    "seed",
    "positive_float",
    "add_out_argument",
    "output_path",
    "pyplot",
    "save_figure",
    "optimizer_step",
    "fit_full_batch",
    "accuracy",
]


# --- argparse types ----------------------------------------------------------------------


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


def seed(text: str) -> int:
    """An integer seed in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed; got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32); got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number; got {text}")
    return value


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that adds "(default: ...)" only for a real default.

    An option whose default is ``None`` (its help says what happens when it is
    absent) gets no "(default: None)" appended.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


# --- output ------------------------------------------------------------------------------


def add_out_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--out``: the folder for the example's ``what`` (default ``out``)."""
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("out"), help=f"directory for the {what}"
    )


def output_path(out: pathlib.Path, name: str) -> pathlib.Path:
    """``out / name``, creating the folder ``out`` (from ``--out``) if need be, parents included."""
    out.mkdir(parents=True, exist_ok=True)
    return out / name


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Imported on demand, so that only drawing a plot needs matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: pathlib.Path) -> None:
    """Write ``fig`` to ``path`` at 100 dpi and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- training and evaluation -------------------------------------------------------------


def optimizer_step(loss_fn, optimizer: optax.GradientTransformation):
    """A ``lax.scan`` body: one optimiser step on a batch.

    Returns ``step((params, opt_state), batch) -> ((params, opt_state), loss)``,
    where ``batch`` is the tuple of ``loss_fn``'s arguments after ``params``
    and ``loss`` is the loss before the step.
    """

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def fit_full_batch(key: jax.Array, sizes, loss_fn, optimizer, steps: int, x, y):
    """Initialise an MLP of ``sizes`` and take ``steps`` full-batch steps, in one jitted call.

    Every step minimises ``loss_fn(params, x, y)`` on all of ``x`` and ``y``,
    inside one ``lax.scan``. Returns the trained parameters and the
    ``(steps,)`` losses.
    """
    step = optimizer_step(loss_fn, optimizer)

    @jax.jit
    def run(key, x, y):
        params = jaxlinear.mlp_init(key, sizes)
        (params, _), losses = lax.scan(
            lambda carry, _: step(carry, (x, y)), (params, optimizer.init(params)), length=steps
        )
        return params, losses

    # The data are arguments, not closed-over constants: constants would be
    # baked into the compiled program.
    return run(key, x, y)


def accuracy(params, x, y) -> jax.Array:
    """The fraction of rows of ``x`` whose largest MLP logit is at the class in ``y``."""
    predicted = jnp.argmax(jaxlinear.mlp_apply(params, x), axis=-1)
    return jnp.mean((predicted == y).astype(jnp.float32))
