r"""No hand-derived rule is less accurate than autodiff of the plain formula.

For every rule (the linear layer's dx, dW, db and its tangent ẏ in both layouts,
with and without ``preferred_element_type=float32`` for 16-bit operands; relu,
sigmoid, tanh; ``mse_loss`` and ``softmax_cross_entropy`` in each reduction, VJP
and JVP) and every dtype (float64, float32, bfloat16, float16), a seeded sweep
over shapes up to N = 4096 rows asserts

    err(rule) <= err(autodiff) + eps(output dtype) + κ · eps(accumulation dtype),

where both run in the same dtype on the same (dtype-rounded) inputs and
cotangents/tangents, and autodiff is ``jax.vjp``/``jax.jvp`` of the plain
formula (``einsum`` plus a broadcast bias, ``jax.nn`` activations,
``jax.nn.log_softmax``, ``jnp.sum``/``jnp.mean``).

**Truth.** The same derivative formula evaluated in NumPy's ``longdouble`` from
the rounded inputs: float64 or better everywhere (80-bit extended, eps 1.1e-19,
on x86-64), so for the 16-bit dtypes and float32 it is exact to far below their
rounding, and for float64 the rule's and autodiff's own float64 roundings are
measured rather than compared with themselves.

**Error measure: normwise,** ``max|result − truth| / max|truth|`` over one
output array. Per-element relative error is not meaningful here: an entry that
cancels to near zero (a dot product of random signs, a saturated sigmoid's
derivative) has a relative error of order one in *any* finite-precision
computation, autodiff included, so it would measure cancellation, not the rule.
The normwise error is what a user of the gradient sees (an update's error relative
to the update), it is the measure :func:`jaxlinear.check_vjp` uses, and it is
invariant to the arrays' size, so N = 4096 and N = 1 are judged alike.

**The margin: one ulp, of the output and of the sums.** One unit in the last
place of a number m of dtype is ``2^floor(log2 |m|) · eps ≤ |m| · eps``, with
``eps = jnp.finfo(dtype).eps``; scaled by ``max|truth|`` it is at most eps. So
``eps(output dtype)`` lets the rule's result differ from autodiff's by one final
rounding at its largest entry. An output that is a *sum* (a dot product, db, a
reduced loss's tangent) carries the rounding of its partial sums too, whose unit
is one ulp of the accumulation dtype (float32; float64 for float64) at the scale
of the summed terms, ``eps(acc) · max Σ|terms|``: relative to ``max|truth|`` that
is ``κ · eps(acc)`` with κ = max Σ|terms| / max|truth| ≥ 1, the condition of the
sum (κ = 1 for element-wise outputs). Two correct summation orders differ by
that much at random: the tangent of a mean loss over 40,960 terms that cancel to
1 % of their magnitude (κ ~ 100) is 1.5 ulps off in float64 in one order and 0.2
in another. For 16-bit outputs κ · eps(float32) is far below eps(output), so the
margin stays one ulp of the output. One ulp is too coarse to see the bug issue 11
found, a sum accumulated in the output's own dtype: XLA reduces pairwise, which
keeps that error near one ulp of the largest entry (db over N = 4,096 bfloat16
rows: 0.0087 against 0.0013 with float32 accumulation, eps = 0.0078). So the
16-bit db over 4,096 rows is also checked with *no* margin against
``jnp.sum(g, axis=0)``, and a planted bfloat16-accumulating sum shows that this
check catches the bug.

Cost: one ``jax.jit`` program per (rule family, dtype) that evaluates the rule
and autodiff on every shape at once (24 programs: 12 linear variants, 4
activation and 8 loss programs, each covering all of its rules and reductions).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear as jl
from tests.helpers import dtype_context

# Slow (a randomized sweep up to N = 4096 rows, four dtypes): not in -m "not slow".
pytestmark = pytest.mark.slow

TRUTH = np.longdouble  # float64 or wider: see the module docstring
DTYPES = {"f64": jnp.float64, "f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
LOW = ("bf16", "f16")

# (x.shape, out_features): one row; a 3-D x with a long dx contraction; N = 4096 rows.
LINEAR_SHAPES = [((1, 8), 4), ((4, 16, 128), 256), ((4096, 32), 16)]
# Element-wise shapes: z ~ N(0, 3²) reaches the saturated tails (|z| > 3).
ACTIVATION_SHAPES = [(1,), (3, 4, 5), (4096, 8)]
# (*rows, features): one row, 3-D inputs, N = 4096 rows.
LOSS_SHAPES = [(1, 5), (3, 4, 7), (4096, 10)]
REDUCTIONS = ("mean", "sum", "none")


@dataclasses.dataclass(frozen=True)
class Result:
    """One output of one rule: its normwise error and autodiff's, and its dtype."""

    name: str
    rule: float
    autodiff: float
    dtype: np.dtype
    condition: float  # κ = max Σ|terms| / max|truth| (1 for outputs that are not sums)

    @property
    def margin(self) -> float:
        """One ulp of the output, plus one ulp of the accumulation dtype at the
        scale of the summed terms (module docstring), relative to max|truth|."""
        acc = np.float64 if self.dtype == np.float64 else np.float32
        return float(jnp.finfo(self.dtype).eps) + self.condition * float(jnp.finfo(acc).eps)

    @property
    def ok(self) -> bool:
        return self.rule <= self.autodiff + self.margin


def _error(result, truth) -> float:
    """max|result − truth| / max|truth| (the absolute error when the truth is 0)."""
    a = np.asarray(result, np.float64).astype(TRUTH)
    scale = np.max(np.abs(truth), initial=0)
    err = np.max(np.abs(a - truth), initial=0)
    return float(err / scale) if scale > 0 else float(err)


def _draws(seed: int, shapes, scales, dtypes):
    """float32 N(0, scale²) draws rounded to each dtype (as NumPy arrays)."""
    rng = np.random.default_rng(seed)
    return [
        (s * rng.standard_normal(shape)).astype(np.float32).astype(d)
        for shape, s, d in zip(shapes, scales, dtypes, strict=True)
    ]


def _ld(a) -> np.ndarray:
    return np.asarray(a, np.float64).astype(TRUTH)


def _condition(truth, magnitude) -> float:
    """κ = max Σ|terms| / max|truth| ≥ 1: how much a sum cancels."""
    scale = np.max(np.abs(truth), initial=0)
    return max(1.0, float(np.max(magnitude, initial=0) / scale)) if scale > 0 else 1.0


def _results(prefix, computed, truths, magnitudes, names):
    """Pair each (rule, autodiff) output with its truth and its terms' magnitude."""
    rule, plain = computed
    return [
        Result(f"{prefix} {n}", _error(r, t), _error(p, t), np.dtype(r.dtype), _condition(t, m))
        for n, r, p, t, m in zip(names, rule, plain, truths, magnitudes, strict=True)
    ]


def _run(program, dtype, args):
    with dtype_context(dtype):
        return jax.device_get(jax.jit(program)(*args))


# --------------------------------------------------------------------- linear layer


def _plain_linear(layout, pet):
    spec = "...i,io->...o" if layout == "in_out" else "...i,oi->...o"

    def f(x, W, b):
        y = jnp.einsum(spec, x, W, preferred_element_type=pet)
        return y + jnp.broadcast_to(b.astype(y.dtype), y.shape)

    return f


def _rule_linear(layout, pet):
    def f(x, W, b):
        return jl.linear_apply(jl.LinearParams(W, b, layout), x, preferred_element_type=pet)

    return f


def _linear_program(layout, pet):
    """All shapes at once: (dx, dW, db, ẏ) for the rule and for autodiff."""

    def both(f, case):
        x, W, b, g, tx, tW, tb = case
        _, vjp = jax.vjp(f, x, W, b)
        _, y_dot = jax.jvp(f, (x, W, b), (tx, tW, tb))
        return (*vjp(g), y_dot)

    def program(cases):
        return tuple(
            (both(_rule_linear(layout, pet), c), both(_plain_linear(layout, pet), c)) for c in cases
        )

    return program


def _linear_truth(case, layout):
    x, W, b, g, tx, tW, tb = (_ld(a) for a in case)
    Win = W if layout == "in_out" else W.T  # (in, out)
    tWin = tW if layout == "in_out" else tW.T
    xf, gf = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dW = xf.T @ gf
    return (
        g @ Win.T,
        dW if layout == "in_out" else dW.T,
        gf.sum(axis=0),
        tx @ Win + x @ tWin + tb,
    )


def _linear_results(layout, dtype_id, pet):
    dtype = DTYPES[dtype_id]
    g_dtype = dtype if pet is None else pet
    cases = []
    for i, (x_shape, out) in enumerate(LINEAR_SHAPES):
        n_in = x_shape[-1]
        w_shape = (n_in, out) if layout == "in_out" else (out, n_in)
        y_shape = x_shape[:-1] + (out,)
        shapes = [x_shape, w_shape, (out,), y_shape, x_shape, w_shape, (out,)]
        scales = [1, 1 / math.sqrt(n_in), 1, 1, 1, 1 / math.sqrt(n_in), 1]
        dtypes = [dtype] * 3 + [g_dtype] + [dtype] * 3
        cases.append(tuple(_draws(i, shapes, scales, dtypes)))
    computed = _run(_linear_program(layout, pet), dtype, (cases,))
    out = []
    for (x_shape, n_out), case, pair in zip(LINEAR_SHAPES, cases, computed, strict=True):
        prefix = f"linear {layout}{'' if pet is None else ' pet=f32'} {x_shape}->{n_out}"
        # Every output is a sum of products: the same formula on |inputs| is Σ|terms|.
        truths = _linear_truth(case, layout)
        magnitudes = _linear_truth(tuple(np.abs(_ld(a)) for a in case), layout)
        out += _results(prefix, pair, truths, magnitudes, ["dx", "dW", "db", "y_dot"])
    return out


# --------------------------------------------------------------------- activations

ACTIVATIONS = {
    "relu": (jl.relu, jax.nn.relu, lambda z: (z > 0).astype(TRUTH)),
    "sigmoid": (
        jl.sigmoid,
        jax.nn.sigmoid,
        lambda z: (1 / (1 + np.exp(-z))) * (1 - 1 / (1 + np.exp(-z))),
    ),
    "tanh": (jl.tanh, jnp.tanh, lambda z: 1 - np.tanh(z) ** 2),
}


def _activation_program(cases):
    def both(f, z, g, t):
        _, vjp = jax.vjp(f, z)
        return vjp(g)[0], jax.jvp(f, (z,), (t,))[1]

    return {
        name: tuple((both(rule, *c), both(plain, *c)) for c in cases)
        for name, (rule, plain, _) in ACTIVATIONS.items()
    }


def _activation_results(dtype_id):
    dtype = DTYPES[dtype_id]
    cases = [
        tuple(_draws(i, [s] * 3, [3, 1, 1], [dtype] * 3)) for i, s in enumerate(ACTIVATION_SHAPES)
    ]
    computed = _run(_activation_program, dtype, (cases,))
    out = []
    for name, (_, _, derivative) in ACTIVATIONS.items():
        for shape, (z, g, t), pair in zip(ACTIVATION_SHAPES, cases, computed[name], strict=True):
            d = derivative(_ld(z))
            truths = (_ld(g) * d, _ld(t) * d)  # element-wise: nothing is summed, κ = 1
            out += _results(f"{name} {shape}", pair, truths, truths, ["vjp", "jvp"])
    return out


# --------------------------------------------------------------------- losses


def _reduce(per_row, reduction):
    if reduction == "none":
        return per_row
    total = jnp.sum(per_row)
    return total if reduction == "sum" else total / per_row.size


def _plain_mse(reduction):
    return lambda y, t: _reduce(0.5 * jnp.sum((y - t) ** 2, axis=-1), reduction)


def _plain_xent(reduction):
    def f(logits, labels):
        logp = jax.nn.log_softmax(logits)
        return _reduce(-jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0], reduction)

    return f


def _row_weights(g, rows, reduction):
    """Each row's weight in the reduced loss, times the cotangent g (longdouble)."""
    if reduction == "none":
        return g
    w = g / math.prod(rows) if reduction == "mean" else g
    return np.broadcast_to(w, rows)


def _reduce_truth(per_row, reduction):
    if reduction == "none":
        return per_row
    return per_row.sum() / (per_row.size if reduction == "mean" else 1)


def _mse_truth(case, reduction):
    """(dy, dt, ℓ̇) and the magnitudes of their terms."""
    y, t, g, ty, tt = (_ld(a) for a in case)
    diff, diff_dot = y - t, ty - tt
    dy = _row_weights(g, diff.shape[:-1], reduction)[..., None] * diff
    dot = _reduce_truth(np.sum(diff * diff_dot, axis=-1), reduction)
    dot_terms = _reduce_truth(np.sum(np.abs(diff * diff_dot), axis=-1), reduction)
    return (dy, -dy, dot), (np.abs(dy), np.abs(dy), dot_terms)


def _xent_truth(case, reduction):
    """(dlogits, ℓ̇) and the magnitudes of their terms."""
    logits, labels, g, tz = case
    z = _ld(logits)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    delta = e / e.sum(axis=-1, keepdims=True)  # p, then p − onehot
    picked = labels[..., None]
    np.put_along_axis(delta, picked, np.take_along_axis(delta, picked, -1) - 1, -1)
    dz = _row_weights(_ld(g), z.shape[:-1], reduction)[..., None] * delta
    dot = _reduce_truth(np.sum(delta * _ld(tz), axis=-1), reduction)
    dot_terms = _reduce_truth(np.sum(np.abs(delta * _ld(tz)), axis=-1), reduction)
    return (dz, dot), (np.abs(dz), dot_terms)


LOSSES = {
    "mse_loss": (jl.mse_loss, _plain_mse, _mse_truth, ("dy", "dt", "loss_dot")),
    "softmax_cross_entropy": (
        jl.softmax_cross_entropy,
        _plain_xent,
        _xent_truth,
        ("dlogits", "loss_dot"),
    ),
}


def _loss_cases(name, dtype):
    cases = []
    for i, shape in enumerate(LOSS_SHAPES):
        rows = shape[:-1]
        if name == "mse_loss":
            y, t, ty, tt = _draws(i, [shape] * 4, [1, 1, 1, 1], [dtype] * 4)
            cases.append((y, t, ty, tt))
        else:
            (z, tz) = _draws(i, [shape] * 2, [2, 1], [dtype] * 2)
            labels = np.random.default_rng(100 + i).integers(0, shape[-1], rows).astype(np.int32)
            cases.append((z, labels, tz))
    return cases


def _loss_program(name, cases, cotangents):
    rule, plain_of, _, _ = LOSSES[name]

    def both(f, case, g):
        if name == "mse_loss":
            y, t, ty, tt = case
            _, vjp = jax.vjp(f, y, t)
            return (*vjp(g), jax.jvp(f, (y, t), (ty, tt))[1])
        z, labels, tz = case
        fz = lambda z: f(z, labels)  # noqa: E731
        _, vjp = jax.vjp(fz, z)
        return (*vjp(g), jax.jvp(fz, (z,), (tz,))[1])

    out = {}
    for reduction in REDUCTIONS:
        ours = lambda a, b, r=reduction: rule(a, b, reduction=r)  # noqa: E731
        out[reduction] = tuple(
            (both(ours, c, g), both(plain_of(reduction), c, g))
            for c, g in zip(cases, cotangents[reduction], strict=True)
        )
    return out


def _loss_results(name, dtype_id):
    dtype = DTYPES[dtype_id]
    cases = _loss_cases(name, dtype)
    cotangents = {
        r: [
            _draws(200 + i, [() if r != "none" else s[:-1]], [1], [dtype])[0]
            for i, s in enumerate(LOSS_SHAPES)
        ]
        for r in REDUCTIONS
    }
    computed = _run(lambda c, g: _loss_program(name, c, g), dtype, (cases, cotangents))
    _, _, truth, names = LOSSES[name]
    out = []
    for reduction in REDUCTIONS:
        for shape, case, g, pair in zip(
            LOSS_SHAPES, cases, cotangents[reduction], computed[reduction], strict=True
        ):
            truths, magnitudes = truth((*case[:2], g, *case[2:]), reduction)
            out += _results(f"{name} {reduction} {shape}", pair, truths, magnitudes, names)
    return out


# --------------------------------------------------------------------- the tests


def _assert_no_worse(results):
    bad = [r for r in results if not r.ok]
    assert not bad, "rules less accurate than autodiff (+ margin):\n" + "\n".join(
        f"  {r.name} [{r.dtype}]: rule {r.rule:.3g} > autodiff {r.autodiff:.3g} + {r.margin:.3g}"
        for r in bad
    )


@pytest.fixture(scope="module")
def linear_results():
    """Each linear variant measured once per module, shared by the tests below."""
    cache = {}

    def get(layout, dtype_id, pet):
        key = (layout, dtype_id, pet)
        if key not in cache:
            cache[key] = _linear_results(layout, dtype_id, None if pet is None else jnp.float32)
        return cache[key]

    return get


def test_truth_is_wider_than_float64():
    """The float64 rows need a truth with more digits than float64 itself (NumPy's
    80-bit long double on x86-64, quad precision on aarch64 Linux)."""
    assert np.finfo(TRUTH).eps < np.finfo(np.float64).eps / 100


LINEAR_VARIANTS = [(d, None) for d in DTYPES] + [(d, "f32") for d in LOW]


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize(
    ("dtype_id", "pet"), LINEAR_VARIANTS, ids=[f"{d}-pet{p}" for d, p in LINEAR_VARIANTS]
)
def test_linear_no_less_accurate_than_autodiff(linear_results, layout, dtype_id, pet):
    results = linear_results(layout, dtype_id, pet)
    _assert_no_worse(results)
    # Cotangents keep their primal's dtype; ẏ has the product's dtype.
    for r in results:
        y_dot_f32 = pet is not None and r.name.endswith("y_dot")
        assert r.dtype == np.dtype(jnp.float32 if y_dot_f32 else DTYPES[dtype_id]), r.name


@pytest.mark.parametrize("dtype_id", list(DTYPES))
def test_activations_no_less_accurate_than_autodiff(dtype_id):
    _assert_no_worse(_activation_results(dtype_id))


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_no_less_accurate_than_autodiff(name, dtype_id):
    _assert_no_worse(_loss_results(name, dtype_id))


@pytest.mark.parametrize("dtype_id", LOW)
def test_db_over_4096_rows_no_worse_than_jnp_sum(linear_results, dtype_id):
    """Issue 11's case, with no margin at all: db over N = 4096 rows in a 16-bit
    dtype is no less accurate than ``jnp.sum(g, axis=0)`` (which upcasts to
    float32), while db summed in the 16-bit dtype itself (``jnp.sum(g, axis=0,
    dtype=...)``, the old rule) is measurably worse: the check has the power to
    see the bug it guards against."""
    dtype = DTYPES[dtype_id]
    (x_shape, n_out), seed = LINEAR_SHAPES[-1], len(LINEAR_SHAPES) - 1
    by_name = {r.name: r for r in linear_results("in_out", dtype_id, None)}
    db = by_name[f"linear in_out {x_shape}->{n_out} db"]
    # The same cotangent g as that case: the 4th of its draws.
    shapes = [x_shape, (x_shape[-1], n_out), (n_out,), (x_shape[0], n_out)]
    g = _draws(seed, shapes, [1, 1 / math.sqrt(x_shape[-1]), 1, 1], [dtype] * 4)[3]
    truth = _ld(g).sum(axis=0)
    upcast, in_dtype = jax.device_get(
        jax.jit(lambda g: (jnp.sum(g, axis=0), jnp.sum(g, axis=0, dtype=g.dtype)))(g)
    )
    assert db.rule <= _error(upcast, truth), (db.rule, _error(upcast, truth))
    assert _error(in_dtype, truth) > db.rule, (_error(in_dtype, truth), db.rule)


def accuracy_table() -> str:
    """Every measured row as a Markdown table (``python -m tests.test_accuracy``)."""
    rows = [
        "| rule output | dtype | rule error | autodiff error | margin | ok |",
        "|---|---|---|---|---|---|",
    ]
    groups = [
        _linear_results(layout, d, None if p is None else jnp.float32)
        for layout in ("in_out", "out_in")
        for d, p in LINEAR_VARIANTS
    ]
    groups += [_activation_results(d) for d in DTYPES]
    groups += [_loss_results(n, d) for n in LOSSES for d in DTYPES]
    for results in groups:
        rows += [
            f"| {r.name} | {r.dtype} | {r.rule:.3g} | {r.autodiff:.3g} | {r.margin:.3g} "
            f"| {'yes' if r.ok else 'NO'} |"
            for r in results
        ]
    return "\n".join(rows)


if __name__ == "__main__":
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        print(accuracy_table())
