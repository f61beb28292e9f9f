"""Per-example clipping for DP-SGD: jaxlinear against Google DeepMind's
``jax_privacy.clipped_grad``, a hand-written ``vmap(grad)`` and one backward pass.

Batch 256, float32, per-example loss ½‖f(xᵢ) − tᵢ‖² (summed over a sequence),
clipping norm 1, mean of the clipped gradients, each program compiled once.
*jax_privacy* is ``jax_privacy.clipped_grad(loss, l2_clip_norm=1, normalize_by=256)``
with its other defaults (one ``vmap`` over the batch), and with ``microbatch_size``
m, the largest power of two < 256 whose m per-example gradients fit in 64 MiB.
Memory is the compiled program's temporary bytes. The slow programs are timed
against jaxlinear in their own paired run (a sample: the mean of the calls in
50 ms, at least one; a 1 s rest after each when temporaries pass 1 GiB).

    python benchmarks/bench_dp.py [--quick]
"""

from __future__ import annotations

import _harness as h
import jax
import jax.numpy as jnp
import numpy as np

import jaxlinear

ft, fr, fb = h.fmt_time, h.fmt_ratio, h.fmt_bytes

B, CLIP, BUDGET = 256, 1.0, 64 << 20
#: name -> (MLP sizes, one example's input shape, in --quick).
MODELS = {
    "64-256-256-10": ((64, 256, 256, 10), (64,), True),
    "1024-1024-1024-10": ((1024, 1024, 1024, 10), (1024,), False),
    "sequence 32×64, 64-256-256-10": ((64, 256, 256, 10), (32, 64), True),
}


def loss_fn(params, batch):
    x, t = batch
    y = jaxlinear.mlp_apply(params, x)
    return 0.5 * jnp.sum((y - t) ** 2, axis=tuple(range(1, t.ndim)))


def vmap_grad(params, batch):
    def one(example):
        return jax.grad(lambda p: loss_fn(p, jax.tree.map(lambda a: a[None], example))[0])(params)

    grads = jax.vmap(one)(batch)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(B, -1) ** 2, 1) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, CLIP / norms) / B
    return jax.tree.map(lambda g: jnp.tensordot(scale, g, 1), grads), norms


def programs(n_params: int):
    import jax_privacy

    microbatch = 1 << int(np.log2(max(BUDGET // (4 * n_params), 1)))
    microbatch = min(microbatch, B // 2)

    def privacy(**kw):
        summed = jax_privacy.clipped_grad(
            lambda p, b: jnp.sum(loss_fn(p, b)), l2_clip_norm=CLIP, normalize_by=B, **kw
        )
        return summed.fun

    return microbatch, {
        "backward": lambda p, b: jax.grad(lambda p: jnp.mean(loss_fn(p, b)))(p),
        "backward (A/A)": lambda p, b: jax.grad(lambda p: jnp.mean(loss_fn(p, b)))(p),
        "jaxlinear": lambda p, b: jaxlinear.clipped_grad(loss_fn, p, b, CLIP),
        "jaxlinear norms": lambda p, b: jaxlinear.per_example_grad_norms(loss_fn, p, b),
        "jax_privacy": privacy(),
        f"jax_privacy, microbatch {microbatch}": privacy(microbatch_size=microbatch),
        "vmap(grad)": vmap_grad,
    }


def relative(a, b) -> float:
    diff = sum(
        jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    return float(jnp.sqrt(diff / sum(jnp.sum(y**2) for y in jax.tree.leaves(b))))


def norm_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b) / jnp.abs(b)))


def one_model(sizes, example_shape, quick):
    kp, kx, kt = jax.random.split(jax.random.key(0), 3)
    params = jaxlinear.mlp_init(kp, sizes)
    x = jax.random.normal(kx, (B, *example_shape))
    batch = (x, jax.random.normal(kt, (*x.shape[:-1], sizes[-1])))
    n_params = sum(a.size for a in jax.tree.leaves(params))
    microbatch, fns = programs(n_params)
    compiled = {n: jax.jit(f).lower(params, batch).compile() for n, f in fns.items()}
    temp = {n: c.memory_analysis().temp_size_in_bytes for n, c in compiled.items()}
    out = {n: c(params, batch) for n, c in compiled.items()}
    calls = {n: (lambda c=c: c(params, batch)) for n, c in compiled.items()}
    rounds = 3 if quick else 15
    fast_names = ("backward", "jaxlinear", "jaxlinear norms", "backward (A/A)")
    fast = h.paired({n: calls[n] for n in fast_names}, "backward", rounds, min_sample_s=0.05)
    mb = f"jax_privacy, microbatch {microbatch}"
    slow_names = ["jaxlinear", "jaxlinear norms", "jax_privacy", mb, "vmap(grad)"]
    rest = 1.0 if max(temp.values()) >= 1 << 30 else 0.0
    slow = {n: calls[n] for n in slow_names}
    slow = h.paired(slow, "jaxlinear", 3, 0.05, warmup=0, rest_s=rest, own_number=True)
    ref_grads, ref_norms = out["jax_privacy"], out["vmap(grad)"][1]
    agree = {
        mb: relative(out[mb], ref_grads),
        "vmap(grad)": relative(out["vmap(grad)"][0], ref_grads),
    }
    agree["jaxlinear norms"] = norm_diff(out["jaxlinear norms"], ref_norms)
    grads, norms = out["jaxlinear"]
    agree["jaxlinear"] = max(relative(grads, ref_grads), norm_diff(norms, ref_norms))
    return fast, slow, temp, agree, rounds


def run(quick: bool) -> h.Section:
    rows, targets, bars = [], [], {}
    for model, (sizes, example_shape, in_quick) in MODELS.items():
        if quick and not in_quick:
            continue
        fast, slow, temp, agree, rounds = one_model(sizes, example_shape, quick)
        for n in fast | slow:
            t, vs_bwd = (fast[n], fr(fast[n])) if n in fast else (slow[n], "—")
            vs_jl, err = fr(slow[n]) if n in slow else "—", f"{agree[n]:.1e}" if n in agree else "—"
            rows.append([model, n, ft(t.seconds), vs_bwd, vs_jl, fb(temp[n]), err])
        jl, err = fast["jaxlinear"], max(agree["jaxlinear"], agree["jaxlinear norms"])
        noise = h.aa_noise(fast["backward (A/A)"], rounds, jl)
        targets += [
            h.Target(f"DP {model}: clipped_grad ÷ one backward", jl.ratio, 2.5, "<=", noise),
            h.Target(f"DP {model}: rel. difference to jax_privacy", err, 1e-6, shown=f"{err:.1e}"),
        ]
        if not model.startswith("sequence"):  # the targets are for the two MLPs
            mem = temp["jax_privacy"] / max(temp["jaxlinear"], 1)
            speed = slow["jax_privacy"].ratio
            targets.append(h.Target(f"DP {model}: jax_privacy ÷ jaxlinear, time", speed, 50, ">="))
            name, shown = f"DP {model}: jax_privacy ÷ jaxlinear, temp", f"{mem:,.0f}"
            targets.append(h.Target(name, mem, 50, ">=", shown=shown))
        bars[model] = {n: slow[n].ratio for n in slow if n != "jaxlinear"}
    columns = ["model", "program", "time", "÷ backward", "÷ jaxlinear", "temp memory", "rel. diff."]
    caption = (
        f"**Batch {B}, float32, C = {CLIP:g}**: median of paired ratios (IQR); *rel. diff.*: "
        "gradients to jax_privacy's, norms to vmap(grad)'s"
    )
    return h.Section(
        "Per-example clipping (DP-SGD)",
        " ".join(__doc__.split("\n\n")[:2]).replace("\n", " "),
        [(caption, columns, rows)],
        targets,
        ("DP clipped gradient: time ÷ jaxlinear", "time ratio (log)", bars, True),
    )


if __name__ == "__main__":
    h.main(run)
