"""A catalogue of bad calls to every public function, each run eagerly and under ``jax.jit``.

Every entry must end in the exact exception type it names, raised at trace time,
with a message containing the entry's fragment, which names the argument (in
backticks) and what was expected: never a raw Python/JAX error, never a silent
result. (The messages go on to show what came; ``tests/test_errors.py`` pins some
in full.) Under
``jit`` the arrays among an entry's ``args`` are traced and everything else
(strings, callables, sizes, layouts) is closed over, i.e. static, as a user's
``jit`` would see them.

Two kinds of bad *values* cannot be seen at trace time, because under ``jit`` the
value does not exist yet: out-of-range labels and a non-positive or non-finite
``l2_clip``. Those entries raise eagerly and, traced, return the documented NaN
(the loss of that row; every clipped gradient) instead of a silently wrong number.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear as jl
from jaxlinear import LinearParams
from tests.helpers import assert_tree_close, cast, host, ones

W = ones((3, 4))
b = ones(4)
x = ones((2, 3))
P = LinearParams(W, b)
KEY = jax.random.key(0)
MLP = (
    LinearParams(host(np.ones((3, 4), np.float32) / np.float32(3)), host(np.zeros(4, np.float32))),
    LinearParams(host(np.ones((4, 2), np.float32) / np.float32(4))),
)
BATCH = (ones((5, 3)), host(np.zeros((5, 2), np.float32)))
LABELS = host([0, 1], np.int32)


def per_example_losses(params, batch):
    inputs, targets = batch
    return jl.mse_loss(jl.mlp_apply(params, inputs), targets, reduction="none")


@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad call: ``fn(*args)``; under ``jit``, ``jax.jit(fn)(*args)``.

    ``match`` is a fragment of the expected message (it names the argument).
    ``traced_nan``: under ``jit`` the bad value is traced, so the call returns and
    ``nan_in(result)`` must hold instead.
    """

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    exc: type[Exception] = TypeError
    match: str = ""
    traced_nan: Callable[[Any], bool] | None = None


def _all_nan(tree) -> bool:
    return all(bool(np.all(np.isnan(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree))


def _grads_all_nan(result) -> bool:
    grads, norms = result
    return _all_nan(grads) and bool(np.all(np.isfinite(np.asarray(norms))))


def _clipped(l2_clip):
    return jl.clipped_grad(per_example_losses, MLP, BATCH, l2_clip)


def _loss_returning(make):
    """A per_example_grad_norms call whose loss_fn returns ``make(losses)``."""
    return lambda: jl.per_example_grad_norms(
        lambda p, batch: make(per_example_losses(p, batch)), MLP, BATCH
    )


KEYS = [
    Bad("linear_init key None", lambda k: jl.linear_init(k, 3, 2), (None,), match="`key`"),
    Bad("linear_init key int", lambda k: jl.linear_init(k, 3, 2), (0,), match="`key`"),
    Bad("linear_init key str", lambda: jl.linear_init("seed", 3, 2), match="`key`"),
    Bad(
        "linear_init key float",
        lambda k: jl.linear_init(k, 3, 2),
        (host(np.zeros(2, np.float32)),),
        match="`key`",
    ),
    Bad(
        "linear_init raw key of 3 words",
        lambda k: jl.linear_init(k, 3, 2),
        (host(np.zeros(3, np.uint32)),),
        ValueError,
        "`key`",
    ),
    Bad(
        "linear_init a batch of keys",
        lambda k: jl.linear_init(k, 3, 2),
        (jax.random.split(KEY, 3),),
        ValueError,
        "`key` must be a single PRNG key",
    ),
    Bad("mlp_init key int", lambda k: jl.mlp_init(k, (3, 2)), (0,), match="`key`"),
    Bad("mlp_init key None", lambda k: jl.mlp_init(k, (3, 2)), (None,), match="`key`"),
    Bad("mlp_init key list", lambda: jl.mlp_init([1, 2], (3, 2)), match="`key`"),
]

INIT = [
    Bad("in_features 0", lambda: jl.linear_init(KEY, 0, 2), exc=ValueError, match="`in_features`"),
    Bad("in_features 2.5", lambda: jl.linear_init(KEY, 2.5, 2), match="`in_features`"),
    Bad("in_features True", lambda: jl.linear_init(KEY, True, 2), match="`in_features`"),
    Bad("out_features '3'", lambda: jl.linear_init(KEY, 3, "3"), match="`out_features`"),
    Bad("out_features -1", lambda: jl.linear_init(KEY, 3, -1), exc=ValueError, match="`out_"),
    Bad("dtype int32", lambda: jl.linear_init(KEY, 3, 2, dtype=jnp.int32), match="`dtype`"),
    Bad("dtype 'nope'", lambda: jl.linear_init(KEY, 3, 2, dtype="nope"), match="`dtype`"),
    Bad(
        "dtype float64 without x64",
        lambda: jl.linear_init(KEY, 3, 2, dtype=jnp.float64),
        exc=ValueError,
        match="`dtype` float64 needs 64-bit JAX",
    ),
    Bad(
        "layout 'torch'",
        lambda: jl.linear_init(KEY, 3, 2, layout="torch"),
        exc=ValueError,
        match="`layout` must be one of",
    ),
    Bad(
        "init 'xavier'",
        lambda: jl.linear_init(KEY, 3, 2, init="xavier"),
        exc=ValueError,
        match="`init` must be one of",
    ),
    Bad("init 3", lambda: jl.linear_init(KEY, 3, 2, init=3), match="`init` must be a name"),
    Bad(
        "init of the wrong shape",
        lambda: jl.linear_init(KEY, 3, 2, init=lambda k, s, d: jnp.zeros(s[::-1], d)),
        exc=ValueError,
        match="`init` must return an array of shape",
    ),
    Bad("bias 'yes'", lambda: jl.linear_init(KEY, 3, 2, bias="yes"), match="`bias` must be"),
    Bad("bias None", lambda: jl.mlp_init(KEY, (3, 2), bias=None), match="`bias` must be"),
    Bad("sizes int", lambda: jl.mlp_init(KEY, 4), match="`sizes` must be a sequence"),
    Bad("sizes None", lambda: jl.mlp_init(KEY, None), match="`sizes` must be a sequence"),
    Bad("sizes str", lambda: jl.mlp_init(KEY, "42"), match="`sizes` must be a sequence"),
    Bad("sizes one entry", lambda: jl.mlp_init(KEY, (4,)), exc=ValueError, match="`sizes` must"),
    Bad("sizes with a 0", lambda: jl.mlp_init(KEY, (4, 0, 2)), exc=ValueError, match="`sizes[1]`"),
    Bad("sizes with a float", lambda: jl.mlp_init(KEY, (4, 2.5, 2)), match="`sizes[1]`"),
    Bad("LinearParams layout", lambda: LinearParams(W, b, "io"), (), ValueError, "`layout`"),
]

LINEAR = [
    Bad("params dict", lambda w, v: jl.linear_apply({"W": w, "b": b}, v), (W, x), match="`params`"),
    Bad("params None", lambda v: jl.linear_apply(None, v), (x,), match="`params`"),
    Bad("W None", lambda v: jl.linear_apply(LinearParams(None), v), (x,), match="`W`"),
    Bad("W 1-D", lambda w, v: jl.linear_apply(LinearParams(w), v), (b, x), ValueError, "`W` must"),
    Bad(
        "W complex",
        lambda w, v: jl.linear_apply(LinearParams(w), v),
        (host(np.full((3, 4), 1j, np.complex64)), x),
        match="`W`",
    ),
    Bad(
        "b of the wrong shape",
        lambda w, c, v: jl.linear_apply(LinearParams(w, c), v),
        (W, ones(3), x),
        ValueError,
        "`b` must have shape",
    ),
    Bad("x None", lambda p: jl.linear_apply(p, None), (P,), match="`x`"),
    Bad("x str", lambda p: jl.linear_apply(p, "abc"), (P,), match="`x`"),
    Bad("x int", lambda p, v: jl.linear_apply(p, v), (P, ones((2, 3), np.int32)), match="`x`"),
    Bad("x scalar", lambda p, v: jl.linear_apply(p, v), (P, ones(())), ValueError, "`x` must"),
    Bad(
        "x feature size",
        lambda p, v: jl.linear_apply(p, v),
        (P, ones((2, 5))),
        ValueError,
        "`x.shape[-1]` (=5)",
    ),
    Bad(
        "x bfloat16 with float32 W",
        lambda p, v: jl.linear_apply(p, v),
        (P, cast(x, jnp.bfloat16)),
        match="`x`, `W`, `b` must share one dtype",
    ),
    Bad(
        "precision 'bogus'",
        lambda p, v: jl.linear_apply(p, v, precision="bogus"),
        (P, x),
        ValueError,
        "`precision` must be",
    ),
    Bad(
        "precision 3.5",
        lambda p, v: jl.linear_apply(p, v, precision=3.5),
        (P, x),
        ValueError,
        "`precision` must be",
    ),
    Bad(
        "preferred_element_type int32",
        lambda p, v: jl.linear_apply(p, v, preferred_element_type=jnp.int32),
        (P, x),
        match="`preferred_element_type` must be a real floating dtype",
    ),
    Bad(
        "preferred_element_type 'nonsense'",
        lambda p, v: jl.linear_apply(p, v, preferred_element_type="nonsense"),
        (P, x),
        match="`preferred_element_type` must be a floating dtype",
    ),
    Bad(
        "preferred_element_type bfloat16 for float32",
        lambda p, v: jl.linear_apply(p, v, preferred_element_type=jnp.bfloat16),
        (P, x),
        ValueError,
        "`preferred_element_type` must be a dtype that holds every float32",
    ),
    Bad(
        "preferred_element_type float16 for bfloat16",
        lambda p, v: jl.linear_apply(p, v, preferred_element_type=jnp.float16),
        cast((P, x), jnp.bfloat16),
        ValueError,
        "holds every bfloat16 operand value exactly",
    ),
    Bad(
        "preferred_element_type float64 without x64",
        lambda p, v: jl.linear_apply(p, v, preferred_element_type=jnp.float64),
        (P, x),
        ValueError,
        "`preferred_element_type` float64 needs 64-bit JAX",
    ),
    Bad(
        "linear_backward grad_out shape",
        lambda g, v, w: jl.linear_backward(g, v, w),
        (ones((2, 3)), x, W),
        ValueError,
        "`grad_out` must have the shape",
    ),
    Bad(
        "linear_backward grad_out int",
        lambda g, v, w: jl.linear_backward(g, v, w),
        (ones((2, 4), np.int32), x, W),
        match="`grad_out` must have a real floating dtype",
    ),
    Bad(
        "linear_backward layout",
        lambda g, v, w: jl.linear_backward(g, v, w, layout="OI"),
        (ones((2, 4)), x, W),
        ValueError,
        "`layout` must be one of",
    ),
    Bad(
        "linear_backward precision",
        lambda g, v, w: jl.linear_backward(g, v, w, precision="fast"),
        (ones((2, 4)), x, W),
        ValueError,
        "`precision` must be",
    ),
]

ACTIVATIONS = [
    Bad("relu None", lambda: jl.relu(None), match="`z`"),
    Bad("relu str", lambda: jl.relu("abc"), match="`z`"),
    Bad(
        "sigmoid int",
        lambda z: jl.sigmoid(z),
        (host(np.arange(3, dtype=np.int32)),),
        match="`z` must have a real",
    ),
    Bad(
        "tanh complex",
        lambda z: jl.tanh(z),
        (host(np.full(3, 1j, np.complex64)),),
        match="`z` must have a real",
    ),
    Bad("relu bool", lambda z: jl.relu(z), (ones(3, bool),), match="`z` must have a real"),
]

LOSSES = [
    Bad("mse shapes", lambda y, t: jl.mse_loss(y, t), (x, W), ValueError, "`y` and `t` must"),
    Bad(
        "mse dtypes",
        lambda y, t: jl.mse_loss(y, t),
        (x, cast(x, jnp.float16)),
        match="`y`, `t` must share one dtype",
    ),
    Bad("mse t None", lambda y: jl.mse_loss(y, None), (x,), match="`t`"),
    Bad("mse y int", lambda y: jl.mse_loss(y, y), (ones((2, 3), np.int32),), match="`y`"),
    Bad("mse y scalar", lambda y: jl.mse_loss(y, y), (ones(()),), ValueError, "`y` must"),
    Bad("mse no rows", lambda y: jl.mse_loss(y, y), (ones((0, 3)),), ValueError, "no rows"),
    Bad(
        "mse reduction 'avg'",
        lambda y: jl.mse_loss(y, y, reduction="avg"),
        (x,),
        ValueError,
        "`reduction` must be one of ('mean', 'sum', 'none')",
    ),
    Bad(
        "mse reduction None",
        lambda y: jl.mse_loss(y, y, reduction=None),
        (x,),
        ValueError,
        "`reduction` must be one of",
    ),
    Bad("xent labels None", lambda z: jl.softmax_cross_entropy(z, None), (x,), match="`labels`"),
    Bad("xent labels str", lambda z: jl.softmax_cross_entropy(z, "ab"), (x,), match="`labels`"),
    Bad(
        "xent labels float",
        lambda z, lab: jl.softmax_cross_entropy(z, lab),
        (x, host(np.zeros(2, np.float32))),
        match="`labels` must have an integer dtype",
    ),
    Bad(
        "xent one-hot labels",
        lambda z, lab: jl.softmax_cross_entropy(z, lab),
        (x, host(np.eye(2, 3, dtype=np.int32))),
        ValueError,
        "`labels` must have shape",
    ),
    Bad(
        "xent labels out of range",
        lambda z, lab: jl.softmax_cross_entropy(z, lab),
        (x, host([0, 3], np.int32)),
        ValueError,
        "`labels` must lie in [0, 3)",
        traced_nan=_all_nan,
    ),
    Bad(
        "xent negative labels",
        lambda z, lab: jl.softmax_cross_entropy(z, lab, reduction="none"),
        (x, host([-1, -1], np.int32)),
        ValueError,
        "`labels` must lie in [0, 3)",
        traced_nan=_all_nan,
    ),
    Bad(
        "xent logits int",
        lambda lab: jl.softmax_cross_entropy(lab, lab),
        (LABELS,),
        match="`logits` must have a real floating dtype",
    ),
    Bad(
        "xent reduction 'max'",
        lambda z, lab: jl.softmax_cross_entropy(z, lab, reduction="max"),
        (x, LABELS),
        ValueError,
        "`reduction` must be one of",
    ),
]

MLP_APPLY = [
    Bad(
        "activation 'relu'",
        lambda p, v: jl.mlp_apply(p, v, activation="relu"),
        (MLP, x),
        match="`activation` must be a callable",
    ),
    Bad(
        "activation None",
        lambda p, v: jl.mlp_apply(p, v, activation=None),
        (MLP, x),
        match="`activation` must be a callable",
    ),
    Bad(
        "final_activation 'softmax'",
        lambda p, v: jl.mlp_apply(p, v, final_activation="softmax"),
        (MLP, x),
        match="`final_activation` must be a callable or None",
    ),
    Bad(
        "activation changing the shape",
        lambda p, v: jl.mlp_apply(p, v, activation=jnp.sum),
        (MLP, x),
        ValueError,
        "`activation` must return an array of its input's shape",
    ),
    Bad(
        "activation changing the dtype",
        lambda p, v: jl.mlp_apply(p, v, activation=lambda z: z.astype(jnp.float16)),
        (MLP, x),
        ValueError,
        "`activation` must return an array of its input's shape and dtype",
    ),
    Bad("mlp params empty", lambda v: jl.mlp_apply((), v), (x,), match="`params` must be"),
    Bad("mlp params dicts", lambda v: jl.mlp_apply([{"W": W}], v), (x,), match="`params[0]`"),
    Bad(
        "mlp params not chaining",
        lambda v: jl.mlp_apply((P, P), v),
        (x,),
        ValueError,
        "layer sizes do not chain",
    ),
    Bad(
        "mlp precision",
        lambda p, v: jl.mlp_apply(p, v, precision="bogus"),
        (MLP, x),
        ValueError,
        "`precision` must be",
    ),
]

PER_EXAMPLE = [
    Bad(
        "loss_fn not callable",
        lambda: jl.per_example_grad_norms(3, MLP, BATCH),
        match="`loss_fn` must be a callable",
    ),
    Bad(
        "loss_fn returns the mean",
        _loss_returning(jnp.mean),
        exc=ValueError,
        match="`loss_fn(params, batch)` must return",
    ),
    Bad(
        "loss_fn returns a dict",
        _loss_returning(lambda losses: {"loss": losses}),
        match="`loss_fn(params, batch)` must return one array",
    ),
    Bad(
        "loss_fn returns (losses, aux)",
        _loss_returning(lambda losses: (losses, losses)),
        match="`loss_fn(params, batch)` must return one array",
    ),
    Bad(
        "loss_fn returns None",
        _loss_returning(lambda losses: None),
        match="`loss_fn(params, batch)` must return one array",
    ),
    Bad(
        "loss_fn returns ints",
        _loss_returning(lambda losses: losses.astype(jnp.int32)),
        match="`loss_fn(params, batch)` must return a float array",
    ),
    Bad(
        "loss_fn returns B + 1 losses",
        _loss_returning(lambda losses: jnp.concatenate([losses, losses[:1]])),
        exc=ValueError,
        match="`loss_fn(params, batch)` must return",
    ),
    Bad(
        "loss_fn returns (B, 1)",
        _loss_returning(lambda losses: losses[:, None]),
        exc=ValueError,
        match="`loss_fn(params, batch)` must return",
    ),
    Bad(
        "batch without leaves",
        lambda: jl.per_example_grad_norms(per_example_losses, MLP, ()),
        exc=ValueError,
        match="`batch` must contain",
    ),
    Bad(
        "batch leaves of two sizes",
        lambda u, v: jl.per_example_grad_norms(per_example_losses, MLP, (u, v)),
        (ones((5, 3)), ones((4, 2))),
        ValueError,
        "every leaf of `batch` must have the same leading",
    ),
    Bad(
        "params with an int leaf",
        lambda: jl.per_example_grad_norms(per_example_losses, (*MLP, host(np.int32(1))), BATCH),
        match="every leaf of `params` must be a real floating array",
    ),
    Bad("l2_clip None", lambda: _clipped(None), match="`l2_clip` must be a real number"),
    Bad("l2_clip '0.5'", lambda: _clipped("0.5"), match="`l2_clip` must be a real number"),
    Bad("l2_clip True", lambda: _clipped(True), match="`l2_clip` must be a real number"),
    Bad("l2_clip complex", _clipped, (0.5 + 1j,), match="`l2_clip` must be a real"),
    Bad(
        "l2_clip a vector",
        _clipped,
        (ones(2),),
        ValueError,
        "`l2_clip` must be a positive scalar",
    ),
    *(
        Bad(
            f"l2_clip {value}",
            _clipped,
            (value,),
            ValueError,
            "`l2_clip` must be a positive, finite",
            traced_nan=_grads_all_nan,
        )
        for value in (-1.0, 0.0, float("inf"), float("nan"))
    ),
]

CATALOGUE = KEYS + INIT + LINEAR + ACTIVATIONS + LOSSES + MLP_APPLY + PER_EXAMPLE


def run(bad: Bad, mode: str):
    """Call ``bad`` eagerly or under ``jit``; return its result (or raise)."""
    if mode == "eager":
        return bad.fn(*bad.args)
    return jax.jit(bad.fn)(*bad.args)


def outcome(bad: Bad, mode: str) -> str:
    """'ok', 'raw: ...' (another exception or a message not naming the argument) or
    'silent: ...' (a result where an error, or the documented NaN, was due)."""
    try:
        result = run(bad, mode)
    except Exception as err:  # noqa: BLE001 - classifying every error is the point
        if type(err) is bad.exc and bad.match in str(err):
            return "ok"
        return f"raw: {type(err).__name__}: {str(err)[:160]}"
    if mode == "jit" and bad.traced_nan is not None and bad.traced_nan(result):
        return "ok"
    return "silent: returned " + type(result).__name__


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("bad", CATALOGUE, ids=[b.name for b in CATALOGUE])
def test_bad_call(bad, mode):
    if mode == "jit" and bad.traced_nan is not None:
        assert bad.traced_nan(run(bad, mode)), f"{bad.name}: traced, expected NaN"
        return
    with pytest.raises(bad.exc, match=re.escape(bad.match)) as info:
        run(bad, mode)
    assert type(info.value) is bad.exc, f"{type(info.value).__name__}: {info.value}"


def test_sizes_must_be_static_under_jit():
    """Sizes fix shapes, so they cannot be traced: a clear error, not a tracer's."""
    with pytest.raises(TypeError, match=re.escape("`in_features` must be a static positive int")):
        jax.jit(lambda n: jl.linear_init(KEY, n, 2))(np.int32(3))
    with pytest.raises(TypeError, match=re.escape("`sizes[0]` must be a static positive int")):
        jax.jit(lambda s: jl.mlp_init(KEY, s))(host([3, 2], np.int32))
    # Eagerly, NumPy and concrete JAX integers are sizes like any int.
    shapes = [p.W.shape for p in jl.mlp_init(KEY, host([3, 2], np.int32))]
    assert shapes == [(3, 2)] and jl.linear_init(KEY, np.int32(3), 2).W.shape == (3, 2)


def test_a_traced_valid_l2_clip_still_clips():
    """The run-time NaN guard leaves good values alone: traced C equals concrete C
    (a Python float closed over, so concrete inside one compiled program)."""
    (grads, norms), (grads_jit, norms_jit) = (
        jax.jit(lambda: _clipped(0.1))(),
        jax.jit(_clipped)(0.1),
    )
    assert_tree_close((grads_jit, norms_jit), (grads, norms), jnp.float32)
    total = np.sqrt(sum(float(np.sum(np.asarray(g) ** 2)) for g in jax.tree.leaves(grads_jit)))
    assert 0 < total <= 0.1 * (1 + 1e-6) and np.all(np.asarray(norms_jit) > 0.1)


def test_catalogue_size_and_names():
    names = [bad.name for bad in CATALOGUE]
    assert len(set(names)) == len(names) >= 60


if __name__ == "__main__":
    counts: dict[str, int] = {}
    for bad in CATALOGUE:
        for mode in ("eager", "jit"):
            with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
                result = outcome(bad, mode)
            kind = result.split(":")[0]
            counts[kind] = counts.get(kind, 0) + 1
            if kind != "ok":
                print(f"{bad.name} [{mode}]: {result}")
    print(len(CATALOGUE), "bad calls x 2 modes:", counts)
