"""Forward+backward of one linear layer: jaxlinear's custom VJP against XLA's
autodiff of the plain expression, Flax NNX, Equinox and PyTorch, and the
backward against its physical limit, two matmuls of the forward's shape.

Every JAX implementation is timed as one jitted program computing
``y, vjp = jax.vjp(f, params, x); vjp(g)`` for a fixed cotangent ``g``: the
forward, and the gradients with respect to W, b and x. The backward alone is
the jitted ``vjp(g)`` with the residuals as its inputs, so nothing of the
forward can hide in it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear
from benchmarks._common import (
    HAVE_TORCH,
    TORCH_SKIPPED,
    aa_noise,
    bench_dtypes,
    canonical_hlo,
    hlo_entry_diff,
    torch_device,
)
from benchmarks._report import Chart, Section, Table, Target, fmt_ratio, fmt_time
from benchmarks._timing import paired, ratio_between

SECTION = "linear"
ORDER = 10

#: name -> (leading axes of x, in_features, out_features). The issue's three
#: 2-D shapes, and a (batch, time) input whose two leading axes the backward
#: contracts at once (a different dot_general from the 2-D one).
SHAPES = {
    "small": ((64,), 256, 256),
    "medium": ((512,), 1024, 1024),
    "large": ((2048,), 2048, 2048),
    "sequence": ((16, 128), 512, 512),
}
#: shape name -> (rounds of a full run, rounds of --quick, seconds per sample,
#: warm-up calls): fewer rounds where one call is long; a sample is the fastest
#: of as many calls as fit in its seconds (at least one).
TIMING = {
    "small": (31, 7, 0.01, 2),
    "medium": (21, 5, 0.05, 2),
    "large": (9, 3, 0.0, 1),
    "sequence": (15, 5, 0.05, 2),
}
QUICK_SHAPES = ("small", "medium", "sequence")


def _plain(p, x):
    return x @ p.W + p.b


def _fwd_bwd(apply):
    def step(params, x, g):
        y, vjp = jax.vjp(apply, params, x)
        return y, vjp(g)

    return jax.jit(step)


def _backward_only(apply, params, x):
    """The jitted backward of ``apply`` at (params, x): residuals in, cotangents out."""
    _, vjp = jax.vjp(apply, params, x)
    run = jax.jit(lambda vjp, g: vjp(g))
    return lambda g: run(vjp, g)


def _flax_case(i, o, dtype):
    from flax import nnx

    model = nnx.Linear(i, o, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    return (lambda state, x: nnx.merge(graphdef, state)(x)), state


def _equinox_case(i, o, dtype):
    import equinox as eqx

    model = eqx.nn.Linear(i, o, dtype=dtype, key=jax.random.key(0))

    def apply(model, x):  # eqx.nn.Linear takes one example: vmap every leading axis
        for _ in range(x.ndim - 1):
            model = jax.vmap(model)
        return model(x)

    return apply, model


def _torch_case(lead, i, o, dtype):
    import torch

    device = torch_device()
    tdtype = {np.dtype(jnp.float32): torch.float32, np.dtype(jnp.bfloat16): torch.bfloat16}[
        np.dtype(dtype)
    ]
    torch.manual_seed(0)
    lin = torch.nn.Linear(i, o, device=device, dtype=tdtype)
    x = torch.randn(*lead, i, device=device, dtype=tdtype, requires_grad=True)
    g = torch.randn(*lead, o, device=device, dtype=tdtype)

    def step():
        lin.weight.grad = lin.bias.grad = x.grad = None
        lin(x).backward(g)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def _one_shape(lead, i, o, dtype, rounds, min_sample_s, warmup):
    kp, kx, kg = jax.random.split(jax.random.key(0), 3)
    params = jaxlinear.linear_init(kp, i, o, dtype=dtype)
    x = jax.random.normal(kx, (*lead, i), dtype)
    g = jax.random.normal(kg, (*lead, o), dtype)

    jl, ad, ad_repeat = _fwd_bwd(jaxlinear.linear_apply), _fwd_bwd(_plain), _fwd_bwd(_plain)
    flax_apply, flax_state = _flax_case(i, o, dtype)
    eqx_apply, eqx_model = _equinox_case(i, o, dtype)
    fx, fe = _fwd_bwd(flax_apply), _fwd_bwd(eqx_apply)
    matmul = jax.jit(lambda x, W: x @ W)
    bwd_jl = _backward_only(jaxlinear.linear_apply, params, x)
    bwd_ad = _backward_only(_plain, params, x)

    # Three small groups rather than one big round: a pair timed back to back
    # sees the same machine, so each comparison gets its own interleaved run.
    t = paired(
        {
            "autodiff": lambda: ad(params, x, g),
            "jaxlinear": lambda: jl(params, x, g),
            "autodiff (repeat)": lambda: ad_repeat(params, x, g),
        },
        baseline="autodiff",
        rounds=rounds,
        min_sample_s=min_sample_s,
        warmup=warmup,
    )
    peers = {
        "autodiff": lambda: ad(params, x, g),
        "flax.nnx.Linear": lambda: fx(flax_state, x, g),
        "equinox.nn.Linear": lambda: fe(eqx_model, x, g),
    }
    if HAVE_TORCH:
        peers["torch.nn.Linear"] = _torch_case(lead, i, o, dtype)
    t_peers = paired(
        peers, baseline="autodiff", rounds=rounds, min_sample_s=min_sample_s, warmup=warmup
    )
    t_limit = paired(
        {
            "matmul": lambda: matmul(x, params.W),
            "backward jaxlinear": lambda: bwd_jl(g),
            "backward autodiff": lambda: bwd_ad(g),
        },
        baseline="matmul",
        rounds=rounds,
        min_sample_s=min_sample_s,
        warmup=warmup,
    )
    t.update({k: v for k, v in t_peers.items() if k != "autodiff"})
    t.update(t_limit)

    def hlo(fn, *args):
        return fn.lower(*args).compile().as_text()

    reference, ours = hlo(ad, params, x, g), hlo(jl, params, x, g)
    same_hlo = {
        "jaxlinear": canonical_hlo(ours) == canonical_hlo(reference),
        "flax.nnx.Linear": canonical_hlo(hlo(fx, flax_state, x, g)) == canonical_hlo(reference),
        "equinox.nn.Linear": canonical_hlo(hlo(fe, eqx_model, x, g)) == canonical_hlo(reference),
    }
    return t, same_hlo, hlo_entry_diff(ours, reference)


def run(quick: bool) -> Section:
    """Time every shape (``--quick``: small and medium, fewer rounds)."""
    names = QUICK_SHAPES if quick else tuple(SHAPES)
    peers = ["flax.nnx.Linear", "equinox.nn.Linear"] + (["torch.nn.Linear"] if HAVE_TORCH else [])
    fb_rows, bwd_rows, targets, bars, notes = [], [], [], {}, []
    for dtype in bench_dtypes():
        dname = np.dtype(dtype).name
        for name in names:
            lead, i, o = SHAPES[name]
            full, short, min_sample_s, warmup = TIMING[name]
            rounds = short if quick else full
            t, same_hlo, (only_jl, only_ad) = _one_shape(
                lead, i, o, dtype, rounds, min_sample_s, warmup
            )
            label = f"{name} {'×'.join(map(str, lead))}×{i}→{o} {dname}"
            noise = aa_noise(t["autodiff (repeat)"], rounds, t["jaxlinear"])
            jl = t["jaxlinear"]
            fb_rows.append(
                [label, fmt_time(t["autodiff"].seconds)]
                + [fmt_ratio(t[k].ratio, t[k].ratio_iqr) for k in ["jaxlinear", *peers]]
                + [
                    fmt_ratio(t["autodiff (repeat)"].ratio, t["autodiff (repeat)"].ratio_iqr),
                    ", ".join(k.split(".")[0] for k, same in same_hlo.items() if same) or "none",
                    str(rounds),
                ]
            )
            bars[f"{name} {dname}"] = {k: t[k].ratio for k in ["jaxlinear", *peers]}
            if not same_hlo["jaxlinear"]:
                notes.append(
                    f"{label}: the compiled programs differ. Only in jaxlinear's: "
                    + "; ".join(f"`{op}`" for op in only_jl)
                    + ". Only in autodiff's: "
                    + "; ".join(f"`{op}`" for op in only_ad)
                    + "."
                    + (
                        " That is: jaxlinear materialises xᵀ and contracts it in XLA:CPU's "
                        "YNNPACK kernel (`ynn`); autodiff materialises gᵀ and runs XLA's "
                        "generic `dot` with a transposed operand."
                        if any(op.endswith("ynn") for op in only_jl)
                        and any(" dot(" in op for op in only_ad)
                        else ""
                    )
                )
            targets.append(
                Target(
                    f"fwd+bwd jaxlinear ÷ autodiff, {name} {dname}",
                    jl.ratio,
                    1.00,
                    noise=noise,
                    note=(
                        "compiled HLO identical to autodiff's (up to names and metadata)"
                        if same_hlo["jaxlinear"]
                        else "compiled HLO differs from autodiff's"
                    ),
                )
            )
            mm = t["matmul"]
            bj, bj_iqr = ratio_between(t["backward jaxlinear"], mm)
            ba, ba_iqr = ratio_between(t["backward autodiff"], mm)
            bwd_rows.append(
                [
                    label,
                    fmt_time(mm.seconds),
                    fmt_time(t["backward jaxlinear"].seconds),
                    fmt_time(t["backward autodiff"].seconds),
                    fmt_ratio(bj / 2, (bj_iqr[0] / 2, bj_iqr[1] / 2)),
                    fmt_ratio(ba / 2, (ba_iqr[0] / 2, ba_iqr[1] / 2)),
                ]
            )
            if name == "large":
                targets.append(
                    Target(
                        f"backward ÷ (2 × matmul), large {dname}",
                        bj / 2,
                        1.05,
                        noise=1.57 * (bj_iqr[1] - bj_iqr[0]) / 2 / rounds**0.5,
                        note=f"autodiff's backward: {ba / 2:.3f}",
                    )
                )
    columns = ["shape", "autodiff time", "jaxlinear", *peers, "autodiff again (A/A)"]
    section = Section(
        title="One linear layer: forward + backward",
        intro=(
            "Each cell is the median over rounds of (implementation ÷ autodiff) timed "
            "back to back in the same round, with the interquartile range of the "
            "per-round ratios in brackets. *autodiff* is `jax.vjp` of `x @ W + b` "
            "(jitted, gradients for W, b and x); *autodiff again (A/A)* is the same "
            "program compiled a second time and timed as a candidate: its distance "
            "from 1.000 is this run's noise floor. Flax NNX is timed through "
            "`nnx.split`/`nnx.merge` under `jax.jit` (its functional API), Equinox as "
            "`jax.vmap(model)` under `jax.jit`; both are initialised with their own "
            "defaults. Each group (jaxlinear with the A/A control; the peers; the "
            "backward with the matmul) is its own interleaved run, so the two sides "
            "of a ratio are timed back to back. *same HLO as autodiff* lists the "
            "implementations whose optimised HLO equals autodiff's once names and "
            "source metadata are dropped."
        ),
        tables=[
            Table(
                columns + ["same HLO as autodiff", "rounds"],
                fb_rows,
                "**Forward + backward ÷ autodiff** (lower is faster)",
            ),
            Table(
                [
                    "shape",
                    "one matmul x@W",
                    "backward jaxlinear",
                    "backward autodiff",
                    "jaxlinear bwd ÷ 2 matmuls",
                    "autodiff bwd ÷ 2 matmuls",
                ],
                bwd_rows,
                "**The backward against its physical limit**: dx = g Wᵀ and dW = xᵀ g "
                "each cost one matmul of the forward's shape, so 2 × (one matmul) is "
                "what the backward cannot beat.",
            ),
        ],
        targets=targets,
        chart=Chart("Linear fwd+bwd ÷ autodiff", "time ÷ autodiff (lower is faster)", bars),
    )
    section.notes += notes
    if not HAVE_TORCH:
        section.notes.append(TORCH_SKIPPED)
    return section
