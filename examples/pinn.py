r"""Solve u''(x) = -π² sin(πx) on [0, 1], u(0) = u(1) = 0, with a physics-informed MLP.

The exact solution is u(x) = sin(πx). A 1-H-H-1 jaxlinear MLP with tanh hidden
layers is the trial function u_θ(x), and nothing tells it the solution: it is
trained only to satisfy the equation at ``--points`` interior collocation points
and the two boundary conditions,

    L(θ) = 1/N Σᵢ ((u_θ''(xᵢ) + π² sin(πxᵢ)) / π²)² + u_θ(0)² + u_θ(1)².

The residual is divided by π² so that both terms start near 1. The second
derivative u_θ'' is taken in forward mode, a ``jax.jvp`` of a ``jax.jvp`` of the
scalar function x ↦ u_θ(x), through jaxlinear's hand-derived JVP rules (the
linear layer's ẏ = ẋ W, tanh's ż (1 − t²)), and ``jax.grad`` of the loss then runs
reverse mode over that forward-mode program. The run also compares u_θ'' with
``jax.hessian`` on the 1,000 evaluation points. Adam (Optax) with a cosine-decayed
step size trains full batch, in jitted chunks of up to 500 steps, each one
``lax.scan``.

    python examples/pinn.py                  # prints the loss falling and the error
    python examples/pinn.py --steps 1000 --seed 1 --out /tmp/pinn

Prints the relative L2 error ‖u_θ − u‖₂ / ‖u‖₂ against the exact solution on
1,000 evenly spaced points of [0, 1] and writes ``OUT/pinn.png``: u_θ beside
sin(πx), the pointwise error, and the loss curve. Needs the examples' extras:
``pip install "jaxlinear[examples]"``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _cli import (
    add_out_argument,
    optimizer_step,
    output_path,
    positive_float,
    positive_int,
    pyplot,
    save_figure,
    seed,
)
from jax import lax

import jaxlinear

DEFAULT_STEPS = 4000
DEFAULT_POINTS = 64
DEFAULT_HIDDEN = 32
DEFAULT_LEARNING_RATE = 1e-2
CHUNK_STEPS = 500  # steps per jitted lax.scan: one dispatch, and one progress line, each
EVAL_POINTS = 1000
PLOT_NAME = "pinn.png"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pinn.py",
        description=(
            "Solve u''(x) = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0, with a physics-informed "
            "1-H-H-1 jaxlinear MLP (tanh); u'' by forward mode (jvp of jvp); Adam."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--steps", type=positive_int, default=DEFAULT_STEPS, help="full-batch Adam steps"
    )
    parser.add_argument(
        "--points",
        type=positive_int,
        default=DEFAULT_POINTS,
        help="interior collocation points (midpoints of equal cells of [0, 1])",
    )
    parser.add_argument(
        "--hidden", type=positive_int, default=DEFAULT_HIDDEN, help="units H per hidden layer"
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=DEFAULT_LEARNING_RATE,
        help="peak Adam learning rate, decayed to 1%% of it over the run by a cosine schedule",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the initialisation")
    add_out_argument(parser, "PNG")
    return parser.parse_args(argv)


# --- the problem -------------------------------------------------------------------------


def exact_solution(x):
    """u(x) = sin(πx), the solution of the boundary-value problem, any shape."""
    return jnp.sin(math.pi * x)


def source(x):
    """f(x) = −π² sin(πx), the right-hand side of u'' = f, any shape."""
    return -(math.pi**2) * jnp.sin(math.pi * x)


def u(params, x: jax.Array) -> jax.Array:
    """The network as a scalar function: u_θ(x) = mlp_apply(θ, [x])[0], x and result ``()``."""
    return jaxlinear.mlp_apply(params, x[None], activation=jaxlinear.tanh)[0]


def u_xx(params, x: jax.Array) -> jax.Array:
    """u_θ''(x) in forward mode, x and result ``()``.

    The inner ``jax.jvp`` pushes the tangent ẋ = 1 through the network and
    returns u_θ'(x); the outer one differentiates that function of x again:
    d/dx (d/dx u_θ)(x) · 1 · 1 = u_θ''(x). Both run jaxlinear's JVP rules (and
    the outer one the JVPs of the inner one's tangent computation).
    """
    one = jnp.ones_like(x)

    def u_x(x):
        return jax.jvp(lambda x: u(params, x), (x,), (one,))[1]

    return jax.jvp(u_x, (x,), (one,))[1]


def loss_fn(params, x):
    """Mean squared equation residual at the interior points ``x`` ``(N,)``, plus the boundaries.

    L = 1/N Σᵢ ((u_θ''(xᵢ) − f(xᵢ)) / π²)² + u_θ(0)² + u_θ(1)², a scalar; u_θ''
    is ``vmap`` of :func:`u_xx` over the points.
    """
    residual = (jax.vmap(u_xx, in_axes=(None, 0))(params, x) - source(x)) / math.pi**2
    boundary = jax.vmap(u, in_axes=(None, 0))(params, jnp.array([0.0, 1.0], x.dtype))
    return jnp.mean(residual**2) + jnp.sum(boundary**2)


# --- training and evaluation -------------------------------------------------------------


def make_train_chunk(optimizer: optax.GradientTransformation):
    """A jitted ``train_chunk(params, opt_state, x, length) -> (params, opt_state, losses)``.

    It takes ``length`` (static) Adam steps on :func:`loss_fn` inside one
    ``lax.scan``; ``losses`` ``(length,)`` are the losses before each step. The
    optimiser state carries the step count, so the step-size schedule runs on
    across chunks.
    """
    step = optimizer_step(loss_fn, optimizer)

    def train_chunk(params, opt_state, x, length):
        (params, opt_state), losses = lax.scan(
            lambda carry, _: step(carry, (x,)), (params, opt_state), length=length
        )
        return params, opt_state, losses

    return jax.jit(train_chunk, static_argnames="length")


@jax.jit
def evaluate(params, x):
    """u_θ, u_θ'' by :func:`u_xx` and u_θ'' by ``jax.hessian``, each ``(N,)``, at ``x`` ``(N,)``."""
    values = jax.vmap(u, in_axes=(None, 0))(params, x)
    second = jax.vmap(u_xx, in_axes=(None, 0))(params, x)
    hessian = jax.vmap(jax.hessian(u, argnums=1), in_axes=(None, 0))(params, x)
    return values, second, hessian


def train(params, optimizer: optax.GradientTransformation, steps: int, x):
    """Take ``steps`` Adam steps from ``params``, in chunks of at most ``CHUNK_STEPS``.

    Prints the loss after each chunk. Returns the trained parameters and the
    ``(steps,)`` losses.
    """
    train_chunk = make_train_chunk(optimizer)
    opt_state = optimizer.init(params)
    losses = []
    done = 0
    while done < steps:
        length = min(CHUNK_STEPS, steps - done)  # a shorter last chunk compiles once more
        params, opt_state, chunk_losses = train_chunk(params, opt_state, x, length)
        losses.append(np.asarray(chunk_losses))
        done += length
        print(f"step {done:5d}: loss {losses[-1][-1]:.3e}")
    return params, np.concatenate(losses)


def plot_results(x, values, losses, path: pathlib.Path) -> None:
    plt = pyplot()
    exact = np.sin(np.pi * x)
    fig, (ax_u, ax_err, ax_loss) = plt.subplots(1, 3, figsize=(13.5, 4), layout="constrained")
    ax_u.plot(x, exact, color="grey", linewidth=4, alpha=0.5, label="sin(πx), exact")
    ax_u.plot(x, values, linestyle="--", label="MLP u_θ(x)")
    ax_u.set(xlabel="x", ylabel="u", title="solution of u'' = −π² sin(πx), u(0) = u(1) = 0")
    ax_u.legend()
    ax_err.plot(x, values - exact)
    ax_err.axhline(0.0, color="grey", linewidth=0.5)
    ax_err.set(xlabel="x", ylabel="u_θ(x) − sin(πx)", title="pointwise error")
    ax_err.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_loss.plot(np.arange(1, len(losses) + 1), losses)
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, print the losses and the error, write the plot; return the results as a dict.

    Keys: ``relative_l2_error`` (on 1,000 points of [0, 1]), ``hessian_max_abs_difference``
    (between u_θ'' by jvp of jvp and by ``jax.hessian`` there), ``first_loss``,
    ``final_loss``, ``losses`` (per step), ``train_seconds`` (compilation
    included), ``plot`` (the PNG's path).
    """
    args = parse_args(argv)
    sizes = (1, args.hidden, args.hidden, 1)
    x = ((np.arange(args.points) + 0.5) / args.points).astype(np.float32)
    print(
        f"pinn: u'' = -pi^2 sin(pi x) on [0, 1], u(0) = u(1) = 0; MLP {sizes}, tanh hidden, "
        f"{args.points} collocation points, Adam (lr {args.lr}, cosine decay), "
        f"{args.steps} steps, seed {args.seed}"
    )
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.01))
    params = jaxlinear.mlp_init(jax.random.key(args.seed), sizes)
    start = time.perf_counter()
    params, losses = train(params, optimizer, args.steps, x)
    train_seconds = time.perf_counter() - start

    x_eval = np.linspace(0.0, 1.0, EVAL_POINTS, dtype=np.float32)
    values, second, hessian = (np.asarray(a, np.float64) for a in evaluate(params, x_eval))
    exact = np.sin(np.pi * x_eval.astype(np.float64))
    error = float(np.linalg.norm(values - exact) / np.linalg.norm(exact))
    hessian_difference = float(np.max(np.abs(second - hessian)))
    plot = output_path(args.out, PLOT_NAME)
    plot_results(x_eval, values, losses, plot)
    print(f"first loss: {losses[0]:.3e}")
    print(f"final loss: {losses[-1]:.3e}")
    print(f"training time: {train_seconds:.2f} s (compilation included)")
    print(f"max |u'' (jvp of jvp) - u'' (jax.hessian)|: {hessian_difference:.2e}")
    print(f"relative L2 error on {EVAL_POINTS} points: {error:.3e}")
    print(f"plot: {plot}")
    return {
        "relative_l2_error": error,
        "hessian_max_abs_difference": hessian_difference,
        "first_loss": float(losses[0]),
        "final_loss": float(losses[-1]),
        "losses": losses.tolist(),
        "train_seconds": train_seconds,
        "plot": plot,
    }


if __name__ == "__main__":
    main()
