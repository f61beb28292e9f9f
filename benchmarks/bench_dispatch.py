"""Dispatch overhead: a jitted ``linear_apply`` on tiny inputs against the jitted
plain expression ``x @ W + b``.

With a 2×4 input and a 4×4 weight the computation is a few dozen flops, so
the time of a call is almost all dispatch: flattening the arguments (a
``LinearParams`` pytree and x), looking up the compiled program, launching it
and wrapping its output. jaxlinear's validation runs at trace time only, so a
jitted call should cost what the plain expression costs. The eager rows (no
``jax.jit``) are for information: there every call runs the validation and the
``custom_vjp`` machinery in Python.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jaxlinear
from benchmarks._common import aa_noise
from benchmarks._report import Section, Table, Target, fmt_ratio, fmt_time
from benchmarks._timing import paired

SECTION = "dispatch"
ORDER = 40

ROUNDS = (41, 11)  # full, --quick
MIN_SAMPLE_S = 0.01


def _plain(p, x):
    return x @ p.W + p.b


def _sq(apply):
    def loss(p, x):
        return jnp.sum(apply(p, x) ** 2)

    return loss


def run(quick: bool) -> Section:
    """Time jitted (and eager) calls on tiny inputs."""
    rounds = ROUNDS[1 if quick else 0]
    kp, kx = jax.random.split(jax.random.key(0))
    params = jaxlinear.linear_init(kp, 4, 4)
    x = jax.random.normal(kx, (2, 4))

    groups = {
        "jitted forward": (jax.jit(jaxlinear.linear_apply), jax.jit(_plain), jax.jit(_plain)),
        "jitted grad": tuple(
            jax.jit(jax.grad(_sq(f))) for f in (jaxlinear.linear_apply, _plain, _plain)
        ),
        "eager forward (no jit)": (jaxlinear.linear_apply, _plain, _plain),
    }
    rows, targets = [], []
    for name, (jl, ad, ad_repeat) in groups.items():
        t = paired(
            {
                "plain": lambda f=ad: f(params, x),
                "jaxlinear": lambda f=jl: f(params, x),
                "plain (repeat)": lambda f=ad_repeat: f(params, x),
            },
            baseline="plain",
            rounds=rounds,
            min_sample_s=MIN_SAMPLE_S,
        )
        noise = aa_noise(t["plain (repeat)"], rounds, t["jaxlinear"])
        rows.append(
            [
                name,
                fmt_time(t["jaxlinear"].seconds),
                fmt_time(t["plain"].seconds),
                fmt_ratio(t["jaxlinear"].ratio, t["jaxlinear"].ratio_iqr),
                fmt_ratio(t["plain (repeat)"].ratio, t["plain (repeat)"].ratio_iqr),
            ]
        )
        if name.startswith("jitted"):
            targets.append(
                Target(
                    f"dispatch, {name}, tiny inputs: jaxlinear ÷ plain",
                    t["jaxlinear"].ratio,
                    1.10,
                    noise=noise,
                )
            )
    return Section(
        title="Dispatch overhead on tiny inputs",
        intro=__doc__.split("\n\n", 1)[1].replace("\n", " "),
        tables=[
            Table(
                ["call", "jaxlinear", "x @ W + b", "jaxlinear ÷ plain", "plain again (A/A)"],
                rows,
                "x is 2×4 and W 4×4, float32; one call per timed call, each result blocked on.",
            )
        ],
        targets=targets,
    )
