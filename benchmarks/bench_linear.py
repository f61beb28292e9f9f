"""One linear layer: forward+backward against autodiff, the backward against two
matmuls, and peak temporary memory.

*fwd+bwd* is the jitted ``y, vjp = jax.vjp(f, params, x); vjp(g)`` (output and
gradients for W, b and x), f being ``jaxlinear.linear_apply`` or ``x @ W + b``
differentiated by JAX (*autodiff*). *backward* is the jitted ``vjp(g)`` alone,
residuals in; its floor is two matmuls of the forward's shape (g Wᵀ and xᵀ g).

    python benchmarks/bench_linear.py [--quick]
"""

from __future__ import annotations

import _harness as h
import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear

ft, fr, fb = h.fmt_time, h.fmt_ratio, h.fmt_bytes

#: name -> (leading axes of x, in, out, rounds, seconds per sample).
SHAPES = {
    "64×256→256": ((64,), 256, 256, 31, 0.01),
    "512×1024→1024": ((512,), 1024, 1024, 21, 0.05),
    "2048×2048→2048": ((2048,), 2048, 2048, 9, 0.0),
    "sequence 16×128×512→512": ((16, 128), 512, 512, 15, 0.05),
}
QUICK = ("64×256→256", "sequence 16×128×512→512")


def plain(p, x):
    return x @ p.W + p.b


def fwd_bwd(apply):
    def step(params, x, g):
        y, vjp = jax.vjp(apply, params, x)
        return y, vjp(g)

    return step


def backward_only(apply, params, x):
    run = jax.jit(lambda vjp, g: vjp(g))
    vjp = jax.vjp(apply, params, x)[1]
    return lambda g: run(vjp, g)


def one_shape(lead, i, o, dtype, rounds, min_sample_s):
    kp, kx, kg = jax.random.split(jax.random.key(0), 3)
    params = jaxlinear.linear_init(kp, i, o, dtype=dtype)
    x, g = jax.random.normal(kx, (*lead, i), dtype), jax.random.normal(kg, (*lead, o), dtype)
    jl, ad, ad2 = (jax.jit(fwd_bwd(f)) for f in (jaxlinear.linear_apply, plain, plain))
    bwd_jl, bwd_ad = (backward_only(f, params, x) for f in (jaxlinear.linear_apply, plain))
    matmul = jax.jit(lambda x, W: x @ W)
    kw = dict(rounds=rounds, min_sample_s=min_sample_s, warmup=1 if min_sample_s == 0 else 2)
    fns = {"autodiff": ad, "jaxlinear": jl, "autodiff (A/A)": ad2}
    t = h.paired({n: lambda f=f: f(params, x, g) for n, f in fns.items()}, "autodiff", **kw)
    bwd = {"matmul": lambda: matmul(x, params.W), "jl": lambda: bwd_jl(g), "ad": lambda: bwd_ad(g)}
    t |= {f"bwd {n}": v for n, v in h.paired(bwd, "matmul", **kw).items()}
    temps = [h.temp_bytes(fwd_bwd(f), params, x, g) for f in (jaxlinear.linear_apply, plain)]
    return t, temps


def run(quick: bool) -> h.Section:
    dtypes = [jnp.float32] + ([jnp.bfloat16] if jax.default_backend() != "cpu" else [])
    rows, bwd_rows, mem_rows, targets, bars, worst = [], [], [], [], {}, (0.0, 0)
    for dtype, name in ((d, n) for d in dtypes for n in (QUICK if quick else SHAPES)):
        lead, i, o, rounds, min_s = SHAPES[name]
        rounds = min(rounds, 5) if quick else rounds
        t, (tj, ta) = one_shape(lead, i, o, dtype, rounds, min_s)
        label, jl, aa = f"{name} {np.dtype(dtype).name}", t["jaxlinear"], t["autodiff (A/A)"]
        rows.append([label, ft(t["autodiff"].seconds), ft(jl.seconds), fr(jl), fr(aa), rounds])
        noise = h.aa_noise(aa, rounds, jl)
        targets.append(h.Target(f"linear fwd+bwd ÷ autodiff, {label}", jl.ratio, 1.02, "<=", noise))
        bars[label] = {"jaxlinear": jl.ratio, "autodiff (A/A)": aa.ratio}
        bj, ba = (h.ratio_between(t[k], t["bwd matmul"]) for k in ("bwd jl", "bwd ad"))
        bwd_rows.append([label, ft(t["bwd matmul"].seconds), fr(bj, 0.5), fr(ba, 0.5)])
        if lead == (2048,):
            noise = h.aa_noise(bj._replace(ratio=1.0), rounds) / 2
            name = f"linear backward ÷ 2 matmuls, {label}"
            targets.append(h.Target(name, bj.ratio / 2, 1.05, "<=", noise))
        mem_rows.append([label, fb(tj), fb(ta), f"{tj - ta:+,} B"])
        worst = max(worst, (tj / ta if ta else 1.0 if tj == 0 else np.inf, tj - ta))
    shown = f"{worst[0]:.3f} ({worst[1]:+,} B)"
    targets.append(h.Target("linear temp memory ÷ autodiff, worst shape", worst[0], 1, shown=shown))
    fwd_cols = ["shape", "autodiff", "jaxlinear", "jaxlinear ÷ autodiff", "A/A", "rounds"]
    return h.Section(
        "One linear layer",
        __doc__.split("\n\n")[1].replace("\n", " ") + " *A/A*: autodiff compiled again.",
        [
            ("**Forward + backward ÷ autodiff** (median, IQR)", fwd_cols, rows),
            ("**Backward ÷ 2 matmuls**", ["shape", "matmul", "jaxlinear", "autodiff"], bwd_rows),
            ("**Temporary memory**", ["shape", "jaxlinear", "autodiff", "difference"], mem_rows),
        ],
        targets,
        ("Linear fwd+bwd ÷ autodiff", "time ratio (lower is faster)", bars, False),
    )


if __name__ == "__main__":
    h.main(run)
