"""Fixed costs: compile time, eager (un-jitted) calls, and dispatch of jitted calls.

*Compile time*: ``jax.jit(jax.value_and_grad(loss)).trace(params, x, y)`` (trace)
and the same followed by ``.lower().compile()`` (trace+compile) for MLPs of width
256 and depth 2, 8 and 32 (batch 128, softmax cross-entropy), written with
jaxlinear, for autodiff, Flax NNX and Equinox (the networks of ``bench_mlp.py``).
Every measurement builds a new loss closure and a new ``jax.jit``, so no jit
cache holds it; caches inside the libraries (of their own rule functions) are
warm after the first round, as in any program that builds a second model.
*Eager*: ``linear_apply`` (128×64→256), ``mlp_apply`` (64-256-256-10) and
``jax.grad`` of the digits loss called without ``jit``, against the plain
expressions. *Dispatch*: jitted calls on a 2×4 input and a 4×4 weight, where
the time is almost all call overhead.

    python benchmarks/bench_overhead.py [--quick]
"""

from __future__ import annotations

import _harness as h
import jax
import jax.numpy as jnp
from bench_mlp import BATCH, SIZES, models

import jaxlinear

ft, fr = h.fmt_time, h.fmt_ratio


def plain(p, x):
    return x @ p.W + p.b


def plain_mlp(params, x):
    for p in params[:-1]:
        x = jax.nn.relu(plain(p, x))
    return plain(params[-1], x)


def compile_rows(depth, rounds, targets, bars):
    impls = models((256,) * depth + (10,))
    impls["autodiff (A/A)"] = impls["autodiff"]
    kx, ky = jax.random.split(jax.random.key(depth))
    x, y = jax.random.normal(kx, (BATCH, 256)), jax.random.randint(ky, (BATCH,), 0, 10)

    def trace(make_loss, params):  # a new closure and a new jit: no cache holds it
        return jax.jit(jax.value_and_grad(make_loss())).trace(params, x, y)

    rows, peers = [], [n for n in impls if n != "autodiff"]
    for what, finish in (("trace", lambda t: t), ("trace+compile", lambda t: t.lower().compile())):
        fns = {n: lambda m=m, p=p, f=finish: f(trace(m, p)) for n, (m, p) in impls.items()}
        t = h.paired(fns, "autodiff", rounds, min_sample_s=0.0, warmup=1)
        rows.append(
            [f"depth {depth}, {what}", ft(t["autodiff"].seconds), *(fr(t[n]) for n in peers)]
        )
    noise = h.aa_noise(t["autodiff (A/A)"], rounds, t["jaxlinear"])
    name = f"compile time ÷ autodiff, depth {depth}"
    targets.append(h.Target(name, t["jaxlinear"].ratio, 1.0, "<=", noise))
    bars[f"depth {depth}"] = {n: t[n].ratio for n in peers}
    return rows, peers


def call_rows(rounds, targets):
    """Eager and jitted calls of jaxlinear against the plain expressions."""
    kp, kx, ky = jax.random.split(jax.random.key(0), 3)
    layer, mlp = jaxlinear.linear_init(kp, 64, 256), jaxlinear.mlp_init(kp, SIZES)
    x, y = jax.random.normal(kx, (BATCH, 64)), jax.random.randint(ky, (BATCH,), 0, 10)
    impls = models(SIZES)
    jl_loss, ad_loss = impls["jaxlinear"][0](), impls["autodiff"][0]()
    tiny, xt = jaxlinear.linear_init(kp, 4, 4), jnp.ones((2, 4))

    def jit_grad(f):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) ** 2)))

    cases = [  # name, wrap, jaxlinear's function, the plain one, args, target
        ("eager linear_apply", lambda f: f, jaxlinear.linear_apply, plain, (layer, x), 1.2),
        ("eager mlp_apply", lambda f: f, jaxlinear.mlp_apply, plain_mlp, (mlp, x), 1.2),
        ("eager jax.grad", jax.grad, jl_loss, ad_loss, (mlp, x, y), 1.0),
        ("jitted linear_apply, 2×4", jax.jit, jaxlinear.linear_apply, plain, (tiny, xt), 1.1),
        ("jitted grad, 2×4", jit_grad, jaxlinear.linear_apply, plain, (tiny, xt), 1.1),
    ]
    rows = []
    for name, wrap, jl, ad, args, limit in cases:
        fns = {"plain": wrap(ad), "jaxlinear": wrap(jl), "A/A": wrap(ad)}
        t = h.paired({n: lambda f=f, a=args: f(*a) for n, f in fns.items()}, "plain", rounds, 0.01)
        jt, aa = t["jaxlinear"], t["A/A"]
        rows.append([name, ft(jt.seconds), ft(t["plain"].seconds), fr(jt), fr(aa)])
        targets.append(
            h.Target(f"{name} ÷ plain", jt.ratio, limit, "<=", h.aa_noise(aa, rounds, jt))
        )
    return rows


def run(quick: bool) -> h.Section:
    targets, bars, compile_table = [], {}, []
    for depth in (2,) if quick else (2, 8, 32):
        rows, peers = compile_rows(depth, 3 if quick else 7, targets, bars)
        compile_table += rows
    calls = call_rows(5 if quick else 31, targets)
    call_columns = ["call", "jaxlinear", "plain", "jaxlinear ÷ plain", "plain again (A/A)"]
    return h.Section(
        "Compile time, eager calls and dispatch",
        __doc__.split("\n\n")[1].replace("\n", " "),
        [
            ("**Compile time ÷ autodiff**", ["program", "autodiff", *peers], compile_table),
            ("**Calls: jaxlinear ÷ the plain expression**", call_columns, calls),
        ],
        targets,
        ("Compile time ÷ autodiff", "trace+compile ratio", bars, False),
    )


if __name__ == "__main__":
    h.main(run)
