"""Per-example gradient norms and the clipped mean gradient (DP-SGD): jaxlinear's
ghost clipping against ``vmap(grad)`` computing the same thing, and against one
ordinary backward pass.

Models: one 1024→1024 layer, and a 3-layer ReLU MLP of width 1024
(1024→1024→1024→1024), at batch 256, float32, with the per-example loss
Lᵢ = ½‖f(xᵢ) − tᵢ‖². Programs, each compiled once with ``jax.jit``:

* *backward*: ``jax.grad`` of the mean loss (forward and backward, no clipping);
* *ghost norms* / *ghost clipped*: ``jaxlinear.per_example_grad_norms`` and
  ``jaxlinear.clipped_grad`` (C = 1);
* *vmap(grad) norms* / *vmap(grad) clipped*: ``jax.vmap(jax.grad)`` of the loss of
  one example, then the norms (and the clipped mean) from the materialised
  per-example gradients.

Times are medians of paired per-round ratios (``_timing.paired``), the fast
programs with an A/A control (the backward compiled twice). ``vmap(grad)``
takes seconds a call, so each ghost program is compared with its ``vmap(grad)``
counterpart in a separate paired run of three rounds, one call each a round,
with an untimed 1 s rest after every ``vmap(grad)`` call that has gigabytes of
temporaries: the first program to run after one pays 0.3 to 0.4 s while the
runtime hands them back to the OS in the background (measured; a 1 s pause
absorbs it), a cost that would otherwise land on the ghost program. Temporary
memory is ``compiled.memory_analysis().temp_size_in_bytes``; *matmuls* counts
the ``dot`` instructions in the optimised HLO.
"""

from __future__ import annotations

import re
import statistics
import time

import jax
import jax.numpy as jnp

import jaxlinear
from benchmarks._common import aa_noise
from benchmarks._report import Chart, Section, Table, Target, fmt_bytes, fmt_ratio, fmt_time
from benchmarks._timing import Timing, paired, ratio_between, time_once

SECTION = "dp"
ORDER = 50

#: (batch, width) of a full run and of --quick (the issue's sizes, then a small stand-in).
SIZES = {False: (256, 1024), True: (64, 256)}
DEPTHS = {"layer": 1, "3-layer MLP": 3}
#: rounds: (fast programs, vmap(grad) programs), full and quick.
ROUNDS = {False: {1: (15, 3), 3: (15, 3)}, True: {1: (5, 3), 3: (5, 3)}}
L2_CLIP = 1.0
#: Untimed pause after each vmap(grad) call with at least 1 GiB of temporaries
#: (see `_paired_with_rest`).
REST_S = 1.0


def _loss_fn(params, batch):
    x, t = batch
    y = jaxlinear.mlp_apply(params, x)
    return 0.5 * jnp.sum((y - t) ** 2, axis=-1)


def _backward(params, batch):
    return jax.grad(lambda p: jnp.mean(_loss_fn(p, batch)))(params)


def _ghost_norms(params, batch):
    return jaxlinear.per_example_grad_norms(_loss_fn, params, batch)


def _ghost_clipped(params, batch):
    return jaxlinear.clipped_grad(_loss_fn, params, batch, L2_CLIP)


def _per_example_grads(params, batch):
    def one(example):
        single = jax.tree.map(lambda a: a[None], example)
        return jax.grad(lambda p: _loss_fn(p, single)[0])(params)

    return jax.vmap(one)(batch)


def _norms_of(grads):
    leaves = jax.tree.leaves(grads)
    B = leaves[0].shape[0]
    return jnp.sqrt(sum(jnp.sum(g.reshape(B, -1) ** 2, axis=1) for g in leaves))


def _vmap_norms(params, batch):
    return _norms_of(_per_example_grads(params, batch))


def _vmap_clipped(params, batch):
    grads = _per_example_grads(params, batch)
    norms = _norms_of(grads)
    scale = jnp.minimum(1.0, L2_CLIP / norms)
    B = norms.shape[0]
    return jax.tree.map(lambda g: jnp.tensordot(scale, g, 1) / B, grads), norms


PROGRAMS = {
    "backward": _backward,
    "backward (repeat)": _backward,
    "ghost norms": _ghost_norms,
    "ghost clipped": _ghost_clipped,
    "vmap(grad) norms": _vmap_norms,
    "vmap(grad) clipped": _vmap_clipped,
}
_DOT = re.compile(r"= \S+ dot\(")


def _model(depth, batch, width):
    kp, kx, kt = jax.random.split(jax.random.key(0), 3)
    params = jaxlinear.mlp_init(kp, (width,) * (depth + 1))
    data = (jax.random.normal(kx, (batch, width)), jax.random.normal(kt, (batch, width)))
    return params, data


def _paired_with_rest(baseline, candidate, rounds: int, rest_s: float):
    """``paired`` for two programs, one call each a round, with an untimed rest after
    every call of ``baseline``.

    The first program to run after a ``vmap(grad)`` call pays 0.3 to 0.4 s while
    the runtime hands its gigabytes of temporaries back to the OS, in the
    background after ``block_until_ready`` has returned (measured on the 2-core
    machine: whatever program comes next, and not after a 1 s pause). Without the
    rest that cost lands on the ghost program. The order alternates as in
    ``paired`` (B C, C B, C B, B C, …); the ratio is the median of the per-round
    ratios. Returns ``(Timing of baseline, Timing of candidate)``, ratios as
    candidate ÷ baseline.
    """
    times = {"b": [], "c": []}
    for r in range(rounds):
        order = ("b", "c") if r % 4 in (0, 3) else ("c", "b")
        for who in order:
            times[who].append(time_once(baseline if who == "b" else candidate, 1))
            if who == "b":
                time.sleep(rest_s)
    ratios = [c / b for b, c in zip(times["b"], times["c"], strict=True)]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if rounds > 1 else ratios * 3
    return tuple(
        Timing(
            seconds=statistics.median(times[who]),
            ratio=1.0 if who == "b" else statistics.median(ratios),
            ratio_iqr=(1.0, 1.0) if who == "b" else (q[0], q[2]),
            number=1,
            samples=tuple(times[who]),
        )
        for who in ("b", "c")
    )


def _one_model(depth, batch, width, rounds):
    params, data = _model(depth, batch, width)
    compiled = {name: jax.jit(fn).lower(params, data).compile() for name, fn in PROGRAMS.items()}
    temp = {name: c.memory_analysis().temp_size_in_bytes for name, c in compiled.items()}
    dots = {name: len(_DOT.findall(c.as_text())) for name, c in compiled.items()}
    call = {name: (lambda c=c: c(params, data)) for name, c in compiled.items()}
    fast_rounds, slow_rounds = rounds
    fast = paired(
        {k: call[k] for k in ("backward", "ghost norms", "ghost clipped", "backward (repeat)")},
        baseline="backward",
        rounds=fast_rounds,
        min_sample_s=0.05,
    )
    slow = {}
    for what in ("norms", "clipped"):
        vmap_name, ghost_name = f"vmap(grad) {what}", f"ghost {what}"
        # Only gigabytes of temporaries leave a cost behind (none at --quick sizes).
        rest_s = REST_S if temp[vmap_name] >= 1 << 30 else 0.0
        jax.block_until_ready(call[vmap_name]())  # warm-up (the ghost ones are warm)
        time.sleep(rest_s)
        slow[vmap_name], slow[ghost_name] = _paired_with_rest(
            call[vmap_name], call[ghost_name], slow_rounds, rest_s
        )
    return fast, slow, temp, dots, fast_rounds


def _markdown(text: str) -> str:
    """Docstring paragraphs and ``*`` bullets as markdown: each on one line."""
    blocks = []
    for paragraph in text.strip().split("\n\n"):
        items, current = [], []
        for line in paragraph.splitlines():
            if line.startswith("* ") and current:
                items.append(" ".join(current))
                current = []
            current.append(line.strip())
        items.append(" ".join(current))
        blocks.append("\n".join(items))
    return "\n\n".join(blocks)


def run(quick: bool) -> Section:
    """Both models at the issue's sizes (``--quick``: batch 64, width 256, fewer rounds)."""
    batch, width = SIZES[quick]
    rows, targets, bars, notes = [], [], {}, []
    for label, depth in DEPTHS.items():
        model = f"{label} {width}" + ("→" + str(width)) * depth
        fast, slow, temp, dots, fast_rounds = _one_model(depth, batch, width, ROUNDS[quick][depth])
        norms_speedup, norms_iqr = ratio_between(slow["vmap(grad) norms"], slow["ghost norms"])
        clip_speedup, clip_iqr = ratio_between(slow["vmap(grad) clipped"], slow["ghost clipped"])
        vmap_vs_backward = {
            # vmap(grad) was timed in its own run: its time ÷ the backward's median time.
            name: slow[name].seconds / fast["backward"].seconds
            for name in ("vmap(grad) norms", "vmap(grad) clipped")
        }
        for name in PROGRAMS:
            if name == "backward (repeat)":
                ratio = fmt_ratio(fast[name].ratio, fast[name].ratio_iqr) + " (A/A)"
            elif name in fast:
                ratio = fmt_ratio(fast[name].ratio, fast[name].ratio_iqr)
            else:
                ratio = f"≈ {vmap_vs_backward[name]:.1f} (separate run)"
            seconds = fast[name].seconds if name in fast else slow[name].seconds
            rows.append(
                [model, name, fmt_time(seconds), ratio, fmt_bytes(temp[name]), str(dots[name])]
            )
        memory_ratio = temp["vmap(grad) clipped"] / max(temp["ghost clipped"], 1)
        noise = aa_noise(fast["backward (repeat)"], fast_rounds)
        targets += [
            Target(
                f"{model}: per-example norms, vmap(grad) ÷ ghost time",
                norms_speedup,
                30.0,
                ">=",
                shown=fmt_ratio(norms_speedup, norms_iqr),
                note=(
                    f"{fmt_time(slow['vmap(grad) norms'].seconds)} against "
                    f"{fmt_time(slow['ghost norms'].seconds)}, paired"
                ),
            ),
            Target(
                f"{model}: clipped mean gradient, vmap(grad) ÷ ghost time",
                clip_speedup,
                30.0,
                ">=",
                shown=fmt_ratio(clip_speedup, clip_iqr),
                note=(
                    f"{fmt_time(slow['vmap(grad) clipped'].seconds)} against "
                    f"{fmt_time(slow['ghost clipped'].seconds)}, paired"
                ),
            ),
            Target(
                f"{model}: clipped mean gradient, vmap(grad) ÷ ghost temporary memory",
                memory_ratio,
                100.0,
                ">=",
                shown=f"{memory_ratio:,.0f}",
                note=(
                    f"{fmt_bytes(temp['vmap(grad) clipped'])} against "
                    f"{fmt_bytes(temp['ghost clipped'])}"
                ),
            ),
            Target(
                f"{model}: clipped mean gradient ÷ one backward pass, time",
                fast["ghost clipped"].ratio,
                2.5,
                noise=noise,
                shown=fmt_ratio(fast["ghost clipped"].ratio, fast["ghost clipped"].ratio_iqr),
                note=(
                    f"{dots['ghost clipped']} matmuls against the backward's "
                    f"{dots['backward']}; A/A noise {noise:.3f}"
                ),
            ),
        ]
        bars[model] = {
            "ghost norms": fast["ghost norms"].ratio,
            "ghost clipped": fast["ghost clipped"].ratio,
            "vmap(grad) norms": vmap_vs_backward["vmap(grad) norms"],
            "vmap(grad) clipped": vmap_vs_backward["vmap(grad) clipped"],
        }
    if quick:
        targets = []  # stated for the sizes only
        notes.append(
            f"--quick: batch {batch}, width {width} instead of the issue's batch 256, width "
            "1024, so no targets are checked (at these small sizes XLA fuses vmap(grad)'s "
            "norms well and the speed-ups are smaller); the targets are checked by the full "
            "run, `python benchmarks/run.py --sections dp`."
        )
    notes.append(
        "The ghost programs run one forward pass, one backward pass that stops at the "
        "layers' output gradients (no weight-gradient matmuls; the first layer's input "
        "gradient is not needed either), the norms from ‖xᵢ‖²‖gᵢ‖², and, for the "
        "clipped mean, one matmul xᵀ(s ⊙ g)/B per layer: the matmul counts in the table. "
        "vmap(grad) forms B per-example weight gradients of in×out each."
    )
    return Section(
        title="Per-example gradient norms and clipping (DP-SGD)",
        intro=_markdown(__doc__.split("\n\n", 1)[1]),
        tables=[
            Table(
                ["model", "program", "time", "÷ backward", "temp memory", "matmuls"],
                rows,
                f"**Batch {batch}, float32, C = {L2_CLIP:g}**",
            )
        ],
        targets=targets,
        notes=notes,
        chart=Chart("DP: time ÷ one backward pass (batch " + str(batch) + ")", "ratio", bars),
    )


if __name__ == "__main__":  # standalone: python -m benchmarks.bench_dp [--quick]
    import sys

    section = run("--quick" in sys.argv[1:])
    print(section.markdown())
    for target in section.targets:
        print(f"{target.status:>22}  {target.name}: {target.shown or target.value}")
