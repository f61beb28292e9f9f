"""Training the digits MLP: jaxlinear against the same network written for
autodiff, Flax NNX and Equinox, and the peak temporary memory of one step.

64-256-256-10, ReLU, softmax cross-entropy, Adam (1e-3), batch 128, digits from
``examples/_digits.py``. A timed call runs one epoch (11 steps) as one jitted
``lax.scan`` from the same initial parameters. The networks share the step and
differ in the loss only: *autodiff* is ``x @ W + b`` on the same ``LinearParams``;
Flax NNX is ``nnx.Sequential`` of ``nnx.Linear`` through ``nnx.split``/``merge``;
Equinox is ``jax.vmap`` of ``eqx.nn.MLP`` through ``eqx.partition``/``combine``.

    python benchmarks/bench_mlp.py [--quick]
"""

from __future__ import annotations

import _harness as h
import jax
import optax

import jaxlinear

ft, fr, fb = h.fmt_time, h.fmt_ratio, h.fmt_bytes

SIZES = (64, 256, 256, 10)
BATCH = 128
xent = optax.softmax_cross_entropy_with_integer_labels


def models(sizes):
    """name -> (make_loss, params): ``make_loss()`` returns a new loss(params, x, y)
    closure each call (so a fresh ``jax.jit`` of it finds no cache)."""
    import equinox as eqx
    from flax import nnx

    key = jax.random.key(0)
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    flax_layers = [nnx.Linear(a, b, rngs=nnx.Rngs(0)) for a, b in pairs]
    graphdef, flax_params = nnx.split(
        nnx.Sequential(*[f for lyr in flax_layers for f in (lyr, jax.nn.relu)][:-1])
    )
    mlp = eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], len(pairs) - 1, jax.nn.relu, key=key)
    eqx_params, static = eqx.partition(mlp, eqx.is_array)

    def jaxlinear_loss():
        return lambda p, x, y: jaxlinear.softmax_cross_entropy(jaxlinear.mlp_apply(p, x), y)

    def autodiff_loss():
        def loss(p, x, y):
            for layer in p[:-1]:
                x = jax.nn.relu(x @ layer.W + layer.b)
            return xent(x @ p[-1].W + p[-1].b, y).mean()

        return loss

    def flax_loss():
        return lambda p, x, y: xent(nnx.merge(graphdef, p)(x), y).mean()

    def eqx_loss():
        return lambda p, x, y: xent(jax.vmap(eqx.combine(p, static))(x), y).mean()

    params = jaxlinear.mlp_init(key, sizes)
    return {
        "jaxlinear": (jaxlinear_loss, params),
        "autodiff": (autodiff_loss, params),
        "Flax NNX": (flax_loss, flax_params),
        "Equinox": (eqx_loss, eqx_params),
    }


def make_step(loss, tx):
    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def make_epoch(step):
    def epoch(params, opt_state, xb, yb):
        def body(carry, batch):
            *carry, value = step(*carry, *batch)
            return tuple(carry), value

        return jax.lax.scan(body, (params, opt_state), (xb, yb))

    return jax.jit(epoch)


def run(quick: bool) -> h.Section:
    from _digits import epoch_batches, load_digits  # examples/, put on sys.path by _harness

    data = load_digits()
    xb, yb = epoch_batches(jax.random.key(0), data.x_train, data.y_train, BATCH)
    steps, rounds, tx = xb.shape[0], 5 if quick else 15, optax.adam(1e-3)
    calls, temps, impls = {}, {}, models(SIZES)
    impls["autodiff (A/A)"] = impls["autodiff"]
    for name, (make_loss, params) in impls.items():
        step, opt_state = make_step(make_loss(), tx), tx.init(params)
        epoch = make_epoch(step)
        calls[name] = lambda e=epoch, p=params, o=opt_state: e(p, o, xb, yb)
        compiled = jax.jit(step).lower(params, opt_state, xb[0], yb[0]).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
    t = h.paired(calls, baseline="autodiff", rounds=rounds, min_sample_s=0.05)
    rows = [[n, ft(t[n].seconds / steps), fr(t[n]), fb(temps[n])] for n in impls]
    jl, aa = t["jaxlinear"], t["autodiff (A/A)"]
    tj, ta = temps["jaxlinear"], temps["autodiff"]
    columns = ["implementation", "time per step", "÷ autodiff", "temp memory of one step"]
    bars = {"digits MLP": {n: t[n].ratio for n in impls if n != "autodiff"}}
    shown = f"{tj / ta:.3f} ({tj - ta:+,} B)"
    mem = h.Target("MLP step temp memory ÷ autodiff", tj / ta, 1, shown=shown)
    return h.Section(
        "Digits MLP training: jaxlinear, autodiff, Flax NNX, Equinox",
        __doc__.split("\n\n")[1].replace("\n", " "),
        [(f"**One epoch as one `lax.scan`, {rounds} rounds**", columns, rows)],
        [h.Target("MLP epoch ÷ autodiff", jl.ratio, 1, "<=", h.aa_noise(aa, rounds, jl)), mem],
        ("Digits MLP epoch ÷ autodiff", "time ratio", bars, False),
    )


if __name__ == "__main__":
    h.main(run)
