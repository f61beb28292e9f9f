"""The compiled backward passes do the work their derivation says, and no more.

For y = x W + b the derivation needs one product for dW (xᵀ g) and one for dx
(g Wᵀ), so a jitted gradient program holds, per layer, the forward's dot and
two backward dots, one fewer for a first layer whose input needs no gradient
(XLA removes the unused dx). On top of that, the optimised HLO must hold no
``transpose`` or ``copy`` that XLA's autodiff of the plain expression does not
also need: the rule names the contracted axes in ``dot_general`` instead of
materialising transposes.

These are structure checks on the CPU compiler's output, not timings.
"""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import pytest

import jaxlinear
from jaxlinear import linear_apply, linear_backward, mlp_apply, softmax_cross_entropy
from tests.helpers import mlp_params

# Slow (compiled HLO of every layer and network configuration): not in the quick
# subset, -m "not slow".
pytestmark = pytest.mark.slow

LAYOUTS = ["in_out", "out_in"]
LEADING = [(6,), (3, 5)]
LEADING_IDS = ["B", "BT"]
ARGNUMS = {"params": 0, "params_and_x": (0, 1)}
MLP_SIZES = (7, 16, 12, 4)

_METADATA = re.compile(r", metadata=\{[^{}]*\}")


def compiled_hlo(fn, *args) -> str:
    """Optimised HLO text of ``jax.jit(fn)`` at ``args``, without source metadata
    (whose op names, such as ``transpose(jvp())``, would read as ops)."""
    return _METADATA.sub("", jax.jit(fn).lower(*args).compile().as_text())


def count(hlo: str, opcode: str) -> int:
    """Instructions with this opcode, in every computation (fused ones included)."""
    return len(re.findall(rf"\s{re.escape(opcode)}\(", hlo))


def ops(hlo: str, opcode: str) -> str:
    """The lines with ``opcode``, for failure messages."""
    return "\n".join(line for line in hlo.splitlines() if f" {opcode}(" in line)


def autodiff_linear(p, x):
    """The plain expression XLA differentiates itself (explicit broadcast of b,
    as the test configuration raises on rank promotion)."""
    y = jnp.matmul(x, p.W if p.layout == "in_out" else p.W.T)
    return y + jnp.broadcast_to(p.b, y.shape)


def autodiff_mlp(params, x):
    h = x
    for p in params[:-1]:
        h = jax.nn.relu(autodiff_linear(p, h))
    return autodiff_linear(params[-1], h)


def autodiff_xent(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def linear_loss(apply):
    def loss(p, x):
        return jnp.sum(jnp.tanh(apply(p, x)))

    return loss


def mlp_loss(apply, xent, labels):
    def loss(params, x):
        return xent(apply(params, x), labels)

    return loss


def _linear_case(layout, leading):
    params = jaxlinear.linear_init(jax.random.key(0), 7, 9, layout=layout)
    return params, jnp.ones(leading + (7,), jnp.float32)


def _mlp_case(layout, leading):
    params = mlp_params(1, MLP_SIZES, layout=layout)
    return params, jnp.ones(leading + (MLP_SIZES[0],), jnp.float32)


@functools.cache
def grad_hlo(kind: str, impl: str, layout: str, leading: tuple, wrt: str) -> str:
    """Compiled ``jax.grad`` of the linear or MLP loss, for jaxlinear or autodiff."""
    if kind == "linear":
        params, x = _linear_case(layout, leading)
        loss = linear_loss(linear_apply if impl == "jaxlinear" else autodiff_linear)
    else:
        params, x = _mlp_case(layout, leading)
        labels = jnp.zeros(leading, jnp.int32)
        loss = (
            mlp_loss(mlp_apply, softmax_cross_entropy, labels)
            if impl == "jaxlinear"
            else mlp_loss(autodiff_mlp, autodiff_xent, labels)
        )
    return compiled_hlo(jax.grad(loss, argnums=ARGNUMS[wrt]), params, x)


def expected_backward_dots(layers: int, x_needs_grad: bool) -> int:
    """2 per layer (dW and dx), minus the first layer's dx when x needs none."""
    return 2 * layers - (0 if x_needs_grad else 1)


CASES = list(itertools.product(LAYOUTS, zip(LEADING, LEADING_IDS, strict=True), ARGNUMS))


def _ids(case):
    layout, (_, lead_id), wrt = case
    return f"{layout}-{lead_id}-{wrt}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_linear_grad_has_the_derived_dot_count(case):
    layout, (leading, _), wrt = case
    params, x = _linear_case(layout, leading)
    loss = linear_loss(linear_apply)
    forward = count(compiled_hlo(loss, params, x), "dot")
    assert forward == 1, compiled_hlo(loss, params, x)
    hlo = grad_hlo("linear", "jaxlinear", layout, leading, wrt)
    expected = forward + expected_backward_dots(1, x_needs_grad=wrt == "params_and_x")
    assert count(hlo, "dot") == expected, (
        f"expected {forward} forward + {expected - forward} backward dots; got:\n" + ops(hlo, "dot")
    )


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_mlp_grad_has_the_derived_dot_count(case):
    layout, (leading, _), wrt = case
    params, x = _mlp_case(layout, leading)
    labels = jnp.zeros(leading, jnp.int32)
    loss = mlp_loss(mlp_apply, softmax_cross_entropy, labels)
    layers = len(params)
    forward = count(compiled_hlo(loss, params, x), "dot")
    assert forward == layers
    hlo = grad_hlo("mlp", "jaxlinear", layout, leading, wrt)
    expected = forward + expected_backward_dots(layers, x_needs_grad=wrt == "params_and_x")
    assert count(hlo, "dot") == expected, (
        f"expected {forward} forward + {expected - forward} backward dots; got:\n" + ops(hlo, "dot")
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("leading", LEADING, ids=LEADING_IDS)
def test_linear_backward_alone_is_two_dots(layout, leading):
    params, x = _linear_case(layout, leading)
    g = jnp.ones(leading + (params.out_features,), jnp.float32)

    def backward(g, x, W):
        return linear_backward(g, x, W, layout=layout)

    hlo = compiled_hlo(backward, g, x, params.W)
    assert count(hlo, "dot") == 2, ops(hlo, "dot")
    # The same through the custom VJP: the residuals in, the cotangents out.
    _, vjp = jax.vjp(linear_apply, params, x)
    hlo = compiled_hlo(lambda vjp, g: vjp(g), vjp, g)
    assert count(hlo, "dot") == 2, ops(hlo, "dot")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_grad_adds_no_transpose_or_copy(case, kind):
    layout, (leading, _), wrt = case
    ours = grad_hlo(kind, "jaxlinear", layout, leading, wrt)
    theirs = grad_hlo(kind, "autodiff", layout, leading, wrt)
    for opcode in ("transpose", "copy"):
        assert count(ours, opcode) <= count(theirs, opcode), (
            f"{opcode}: jaxlinear has\n{ops(ours, opcode)}\nautodiff has\n{ops(theirs, opcode)}"
        )


def test_counter_ignores_metadata():
    """The counter must not read the ``transpose(jvp())`` of an op name in the
    source metadata as a transpose."""
    raw = jax.jit(jax.grad(linear_loss(autodiff_linear))).lower(*_linear_case("in_out", (3, 5)))
    text = raw.compile().as_text()
    assert "transpose(jvp" in text  # the metadata the counter must ignore
    stripped = _METADATA.sub("", text)
    assert "transpose(jvp" not in stripped
    assert count(stripped, "dot") == 2
