"""jaxlinear.check_vjp: every library rule passes; the report; scoping; arguments."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlinear
from jaxlinear import CheckReport, LinearParams, check_vjp, linear_apply, softmax_cross_entropy
from jaxlinear.check import (
    Tolerance,
    library_cases,
    plain_linear,
    plain_softmax_cross_entropy,
    tolerance_for,
    unit_roundoff,
)
from tests.test_check_catalogue import LIBRARY_RULES as CATALOGUE_LIBRARY_RULES, ROW_CHECKS

CPU = jax.devices("cpu")
CPU0 = CPU[:1]
VARIANTS_X = {"args", "x[:1]", "stack(x,x[::-1])", "-args", "4*args"}


def linear_case(seed=0, batch=(5,), dtype=np.float32, bias=True, layout="in_out"):
    """Well-scaled NumPy inputs: W ~ N(0, 1/in), b, x ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((6, 4)) / np.sqrt(6)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype) if bias else None
    x = rng.standard_normal(batch + (6,)).astype(dtype)
    return LinearParams(W if layout == "in_out" else W.T, b, layout), x


# ----------------------------------------------------------------- the library passes


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [c for c in library_cases() if c.name not in CATALOGUE_LIBRARY_RULES],
    ids=lambda c: c.name,
)
def test_every_library_rule_passes(case):
    """Every library rule, explored, in float32. ``python -m jaxlinear.check``, a step
    of its own in CI, asserts the same cases in all four dtypes; in the suite,
    test_check_catalogue's correct rules take four of them (left out here, so they
    are not compiled twice) through all four dtypes and test_accuracy holds every
    rule to autodiff's accuracy in each dtype."""
    dtypes = ["float32"]
    report = check_vjp(
        case.fn,
        case.args,
        reference=case.reference,
        dtypes=dtypes,
        devices=CPU0,
        vmap_in_axes=case.vmap_in_axes,
    )
    assert report.ok, str(report)
    assert {r.dtype for r in report.rows} >= set(dtypes)
    assert ROW_CHECKS <= {r.check for r in report.rows} <= ROW_CHECKS | {"explore"}
    assert {"args", "-args", "4*args"} <= {r.variant for r in report.rows}


# ----------------------------------------------------------------- the report


def test_report_rows_table_and_json():
    params, x = linear_case()
    report = check_vjp(linear_apply, (params, x), reference=plain_linear, devices=CPU0)
    assert isinstance(report, CheckReport)
    assert report.ok and not report.failures and report.failed_checks == frozenset()
    assert report.name == "linear_apply" and report.failed_variants == frozenset()
    # One row per check and argument, named from fn's signature and the pytree path.
    args = {"params.W", "params.b", "x"}
    for check in ("reference", "fd-element", "fd-direction", "dtype"):
        assert {r.argument for r in report.select(check, variant="args")} == args
    assert {r.argument for r in report.select("vmap")} == args | {"output"}
    assert [r.argument for r in report.select("forward", variant="args")] == ["output"]
    assert len(report.select("retrace")) == 1
    assert {(r.device, r.dtype) for r in report.rows} == {("cpu:0", "float32")}
    # explore: the value checks again on N = 1, an extra axis, -args and 4*args.
    assert {r.variant for r in report.rows} == VARIANTS_X
    for variant in VARIANTS_X - {"args"}:
        assert {r.check for r in report.select(variant=variant)} == {
            "forward",
            "reference",
            "fd-element",
            "fd-direction",
        }
    # Bounds: autodiff's error, its scatter and the margin; fd_units of roundoff
    # (K = 30 elements).
    f32 = tolerance_for(np.float32)
    unit = unit_roundoff(np.float32, 30)
    scatter = 1 + f32.autodiff_scatter
    for r in report.select("reference", variant="args") + report.select("vmap"):
        assert r.bound == pytest.approx(scatter * r.autodiff_error + f32.margin_units * unit)
        assert 0 <= r.error <= r.bound
    for r in report.select("fd-direction", variant="args"):
        assert r.autodiff_error is not None  # the reference is the yardstick here too
        assert r.bound == pytest.approx(r.autodiff_error + f32.fd_units * unit)


def test_report_table_and_json():
    params, x = linear_case()
    report = check_vjp(linear_apply, (params, x), reference=plain_linear, devices=CPU0)
    # The table: a summary, a header, then one line per row.
    lines = str(report).splitlines()
    assert lines[0] == f"check_vjp(linear_apply): PASS, {len(report.rows)} rows, 0 failed"
    assert lines[1].split() == [
        "check",
        "variant",
        "device",
        "dtype",
        "argument",
        "error",
        "autodiff",
        "bound",
        "max",
        "abs",
        "err",
        "result",
        "detail",
    ]
    assert len(lines) == 2 + len(report.rows)
    assert all(" PASS" in line for line in lines[2:])
    # JSON, strict (no NaN or Infinity literals), the same content.
    data = json.loads(report.to_json(), parse_constant=pytest.fail)
    assert data == report.to_dict()
    assert data["ok"] is True and len(data["rows"]) == len(report.rows)
    assert set(data["rows"][0]) == {
        "check",
        "variant",
        "device",
        "dtype",
        "argument",
        "error",
        "autodiff_error",
        "bound",
        "max_abs_err",
        "passed",
        "status",
        "detail",
    }
    assert (
        repr(report)
        == f"CheckReport(name='linear_apply', ok=True, rows={len(report.rows)}, failed=0)"
    )


def test_non_finite_errors_stay_valid_json():
    @jax.custom_vjp
    def f(x):
        return 2 * x

    f.defvjp(lambda x: (2 * x, None), lambda _, g: (g * jnp.nan,))
    report = check_vjp(
        f, (np.ones(3, np.float32),), reference=lambda x: 2 * x, devices=CPU0, explore=False
    )
    # Under vmap each example is compared with its float64 truth: NaN fails there too.
    assert report.failed_checks == {"reference", "fd-element", "fd-direction", "vmap"}
    (row,) = report.select("reference")
    assert re.fullmatch(r"worst at \(0,\): got nan, float64 (\S+), autodiff \1", row.detail)
    assert row.error == np.inf
    data = json.loads(report.to_json(), parse_constant=pytest.fail)
    assert data["rows"][[r.check for r in report.rows].index("reference")]["error"] == "inf"


def test_rows_per_device_and_dtype():
    params, x = linear_case()
    report = check_vjp(
        linear_apply,
        (params, x),
        reference=plain_linear,
        devices=CPU[:2],
        dtypes=[jnp.float32, "bfloat16"],
        checks=["reference", "dtype"],
    )
    assert report.ok
    seen = {(r.device, r.dtype) for r in report.rows}
    assert seen == {(d, t) for d in ("cpu:0", "cpu:1") for t in ("float32", "bfloat16")}
    bf16 = tolerance_for(jnp.bfloat16)
    margin = bf16.margin_units * unit_roundoff(jnp.bfloat16, 30)
    for r in report.select("reference", dtype="bfloat16"):
        assert r.bound == pytest.approx((1 + bf16.autodiff_scatter) * r.autodiff_error + margin)
    assert {r.check for r in report.rows} == {"forward", "reference", "dtype"}


def test_default_devices_are_every_device():
    params, x = linear_case()
    report = check_vjp(linear_apply, (params, x), checks=["dtype"])
    assert {r.device for r in report.rows} == {f"cpu:{d.id}" for d in jax.devices("cpu")}
    assert len(jax.devices("cpu")) == 8  # conftest's simulated devices


def test_runs_on_the_device_it_names():
    seen = []

    def f(x):
        seen.append(None)
        return jnp.sin(x)

    # The computation is committed to each device in turn: one compilation each.
    report = check_vjp(f, (np.ones(3, np.float32),), devices=CPU[2:4], checks=["dtype"])
    assert {r.device for r in report.rows} == {"cpu:2", "cpu:3"}
    assert report.ok and len(seen) >= 2


def test_float64_is_scoped_and_real():
    traced_dtypes = []

    def f(x):
        traced_dtypes.append(x.dtype)
        return jnp.sin(x) * x

    x = np.linspace(-1, 1, 5, dtype=np.float32)
    report = check_vjp(
        f, (x,), reference=lambda x: jnp.sin(x) * x, dtypes=["float64"], devices=CPU0
    )
    assert report.ok, report
    assert not jax.config.jax_enable_x64  # never leaked (conftest checks it too)
    assert np.dtype("float64") in traced_dtypes
    assert {r.dtype for r in report.rows} == {"float64"}
    for r in report.select("fd-element"):
        assert r.max_abs_err < 1e-8  # float64 differences, not float32 ones


def test_matmul_precision_is_highest_inside_and_restored():
    seen = []

    def f(x):
        seen.append(jax.config.jax_default_matmul_precision)
        return x * x

    x = np.ones(2, np.float32)
    check_vjp(f, (x,), devices=CPU0, checks=["dtype"])
    assert set(seen) == {"highest"}
    seen.clear()
    check_vjp(f, (x,), devices=CPU0, checks=["dtype"], precision=None)
    assert set(seen) == {None}
    assert jax.config.jax_default_matmul_precision is None


def test_integer_leaves_are_held_fixed():
    logits = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    labels = np.array([0, 3, 1, 4], np.int32)
    report = check_vjp(
        softmax_cross_entropy,
        (logits, labels),
        reference=plain_softmax_cross_entropy,
        devices=CPU0,
    )
    assert report.ok, report
    assert {r.argument for r in report.rows} <= {"logits", "output", "-"}


def test_mixed_dtypes_use_the_least_precise_tolerance():
    def f(x, w):
        return x * w.astype(x.dtype)

    x = np.ones(3, np.float32)
    w = np.ones(3, jnp.bfloat16)
    report = check_vjp(f, (x, w), reference=f, devices=CPU0, checks=["reference", "dtype"])
    assert report.ok
    bf16 = tolerance_for(jnp.bfloat16)
    margin = bf16.margin_units * unit_roundoff(jnp.bfloat16, 3)
    for r in report.select("reference", variant="args"):
        assert r.bound == pytest.approx((1 + bf16.autodiff_scatter) * r.autodiff_error + margin)
    assert {r.argument: r.dtype for r in report.select("dtype")} == {
        "x": "float32",
        "w": "bfloat16",
    }


def test_tolerance_override_is_used():
    params, x = linear_case()
    loose = Tolerance(
        autodiff=(0.5, 0.5), fd=(0.25, 0.25), margin_units=1e3, fd_units=2e3, reason="a test"
    )
    report = check_vjp(
        linear_apply,
        (params, x),
        reference=plain_linear,
        devices=CPU0,
        tolerances={"float32": loose},
        explore=False,
    )
    assert report.ok
    unit = unit_roundoff(np.float32, 30)
    for r in report.select("reference"):  # autodiff_scatter keeps its default, 1
        assert r.bound == pytest.approx(2 * r.autodiff_error + 1e3 * unit)
    for r in report.select("fd-direction"):
        assert r.bound == pytest.approx(r.autodiff_error + 2e3 * unit)


def test_deterministic_given_the_seed():
    params, x = linear_case()

    def run(seed):
        report = check_vjp(
            linear_apply, (params, x), devices=CPU0, seed=seed, checks=["fd", "vmap"]
        )
        return [(r.check, r.variant, r.argument, r.max_abs_err, r.error) for r in report.rows]

    assert run(3) == run(3)
    assert run(3) != run(4)  # other directions, other rounding


def test_checks_can_be_selected():
    params, x = linear_case()
    report = check_vjp(linear_apply, (params, x), devices=CPU0, checks=("vmap",))
    assert {r.check for r in report.rows} == {"vmap"}
    assert {r.variant for r in report.rows} == {"args"}  # variants run value checks only
    # Without a reference there are no reference rows, the rest run.
    report = check_vjp(linear_apply, (params, x), devices=CPU0)
    assert {r.check for r in report.rows} == ROW_CHECKS - {"forward", "reference"}
    assert {r.variant for r in report.rows} == VARIANTS_X


_RNG = np.random.default_rng(0)
_W, _B = _RNG.standard_normal((3, 4), np.float32), _RNG.standard_normal(4, np.float32)
_X = _RNG.standard_normal((5, 2, 3), np.float32)
_LAYER = (LinearParams(_W, _B), _X)


@pytest.mark.parametrize(
    ("in_axes", "args"),
    [
        ((None, 0), _LAYER),
        ((None, 1), _LAYER),
        ((None, -2), _LAYER),
        ([None, 0], _LAYER),
        (0, (np.stack([_W] * 5), _X)),
        (((None, 0),), ((_W, _X),)),
        ((LinearParams(None, 0), None), (LinearParams(_W, np.stack([_B] * 5)), _X[:, 0])),
    ],
    ids=["x0", "x1", "x-2", "list", "all", "nested", "params.b"],
)
def test_vmap_examples_are_split_on_the_host_as_jax_vmap_splits_them(in_axes, args):
    """The vmap check moves each batch axis first in NumPy (no program compiled per
    leaf): the same arrays as ``jax.vmap(lambda *a: a, in_axes)``."""
    from jaxlinear._check_vmap import _batch_axis_first

    want = jax.jit(jax.vmap(lambda *a: a, in_axes=in_axes))(*args)
    got = _batch_axis_first(in_axes, args)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_per_example_vmap_shows_the_rule_one_example():
    ndims = set()

    def f(params, x):
        ndims.add(x.ndim)
        return linear_apply(params, x)

    params, x = linear_case(batch=(5,))
    report = check_vjp(f, (params, x), devices=CPU0, vmap_in_axes=(None, 0), checks=["vmap"])
    assert report.ok
    assert 1 in ndims  # the rule ran on a single (in,) example
    detail = "in_axes=(None, 0), 5 examples; float64 differences per example"
    assert {r.detail for r in report.rows} == {detail}
    # Per-example gradients of W are (5, in, out): compared example by example.
    ensemble = check_vjp(f, (params, x), devices=CPU0, checks=["vmap"], vmap_size=4)
    detail = "4 perturbed copies stacked on a new axis 0; float64 differences per example"
    assert {r.detail for r in ensemble.rows} == {detail}


def test_a_rule_redefined_in_place_is_checked_afresh():
    """Compiled checks are reused for the same function, but never when what it
    computes changed: no stale verdict after ``defvjp`` on the same object."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
    x = np.linspace(-1, 1, 5, dtype=np.float32)
    first = check_vjp(f, (x,), reference=jnp.sin, devices=CPU0, explore=False)
    assert first.ok
    again = check_vjp(f, (x,), reference=jnp.sin, devices=CPU0, explore=False)
    (retrace,) = again.select("retrace")
    assert retrace.detail.startswith("call 1 traced 0x")  # reused
    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (2 * g * jnp.cos(x),))
    fixed_wrongly = check_vjp(f, (x,), reference=jnp.sin, devices=CPU0, explore=False)
    assert fixed_wrongly.failed_checks == {"reference", "fd-element", "fd-direction", "vmap"}


def test_an_exception_in_the_rule_is_a_failing_row():
    @jax.custom_vjp
    def f(x):
        return x

    def bwd(_, g):
        if g.dtype == jnp.bfloat16:
            raise NotImplementedError("no bfloat16 rule yet")
        return (g,)

    f.defvjp(lambda x: (x, None), bwd)
    report = check_vjp(
        f, (np.ones(3, np.float32),), dtypes=["float32", "bfloat16"], devices=CPU0, explore=False
    )
    assert not report.ok
    (row,) = report.failures
    assert (row.check, row.dtype) == ("vjp", "bfloat16")
    assert row.detail == "the rule raised: NotImplementedError: no bfloat16 rule yet"
    assert all(r.passed for r in report.rows if r.dtype == "float32")


def test_with_a_reference_an_error_is_blamed_on_whichever_raised():
    """The rule and the reference run in one compiled program per dtype (and one
    under vmap); when it fails, each runs alone, so a row names the one that raised
    and the other's checks still run."""

    def refusing_bfloat16(what):
        def check(x):
            if x.dtype == jnp.bfloat16:
                raise NotImplementedError(f"no bfloat16 {what}")

        return check

    @jax.custom_vjp
    def rule(x):
        return jnp.sin(x)

    def bwd(x, g):
        refusing_bfloat16("rule")(g)
        return (g * jnp.cos(x),)

    rule.defvjp(lambda x: (jnp.sin(x), x), bwd)

    def reference(x):
        refusing_bfloat16("reference")(x)
        return jnp.sin(x)

    args = (np.linspace(-1.0, 1.0, 3, dtype=np.float32),)
    options = dict(dtypes=["float32", "bfloat16"], devices=CPU0, explore=False)
    report = check_vjp(rule, args, reference=jnp.sin, **options)
    (failed,) = report.failures
    assert (failed.check, failed.dtype) == ("vjp", "bfloat16")
    assert failed.detail == "the rule raised: NotImplementedError: no bfloat16 rule"

    report = check_vjp(jnp.sin, args, reference=reference, **options)
    details = {(r.check, r.dtype): r.detail for r in report.failures}
    assert details == {
        ("reference", "bfloat16"): "reference raised: NotImplementedError: no bfloat16 reference",
        ("vmap", "bfloat16"): "the truth raised under vmap: "
        "NotImplementedError: no bfloat16 reference",
    }
    # The rule's own checks ran in bfloat16 and passed, the retrace check included.
    assert {r.check for r in report.rows if r.dtype == "bfloat16" and r.passed} == {
        "dtype",
        "retrace",
        "fd-direction",
        "fd-element",
    }
    assert all(r.passed for r in report.rows if r.dtype == "float32")


def test_the_float64_truths_blame_whichever_raised():
    """The reference's float64 VJP and fn's float64 differences share one compiled
    program too; when one raises, the other's rows still come out."""

    def refusing_float64(f):
        def g(x):
            if x.dtype == jnp.float64:
                raise NotImplementedError("no float64")
            return f(x)

        return g

    rule = jax.custom_vjp(refusing_float64(jnp.sin))
    rule.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
    args = (np.linspace(-1.0, 1.0, 3, dtype=np.float32),)
    options = dict(dtypes=["float32"], devices=CPU0, explore=False, checks=["reference", "fd"])

    report = check_vjp(jnp.sin, args, reference=refusing_float64(jnp.sin), **options)
    (failed,) = report.failures
    assert (failed.check, failed.detail) == (
        "reference",
        "reference raised: NotImplementedError: no float64",
    )
    assert {r.check for r in report.rows if r.passed} == {"fd-direction", "fd-element"}

    report = check_vjp(rule, args, reference=jnp.sin, **options)
    (failed,) = report.failures
    assert (failed.check, failed.detail) == (
        "fd-direction",
        "fn raised in float64: NotImplementedError: no float64",
    )
    assert {r.check for r in report.rows if r.passed} == {"forward", "reference"}


def test_a_function_computing_in_float32_is_flagged_in_the_differences():
    def f(x):
        return jnp.sin(x.astype(jnp.float32))  # float32 whatever the input

    report = check_vjp(f, (np.ones(3, np.float32),), devices=CPU0, checks=["fd"])
    assert report.ok
    for r in report.rows:
        assert "fn returns eps 1.2e-07 for float64 inputs" in r.detail


def tanh_layer(params, x):
    return jaxlinear.tanh(linear_apply(params, x))


def plain_tanh_layer(params, x):
    return jnp.tanh(plain_linear(params, x))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(50))
def test_no_false_failures_on_well_scaled_inputs(seed):
    """The check itself is sound: a right rule passes whatever the seed (module-level
    functions, so the compiled checks are reused from seed to seed)."""
    params, x = linear_case(seed=seed, batch=(3, 5) if seed % 2 else (5,))
    report = check_vjp(
        tanh_layer,
        (params, x),
        reference=plain_tanh_layer,
        dtypes=["float32", "float64"],
        devices=CPU0,
        seed=seed,
        vmap_in_axes=None if seed % 2 else (None, 0),
    )
    assert report.ok, str(report)


# ----------------------------------------------------------------- bad arguments


def _ok_args():
    return linear_case()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fn": 3}, TypeError, r"`fn` must be callable; got int"),
        ({"args": [1.0]}, TypeError, r"`args` must be a tuple .* got list"),
        ({"args": np.ones(3)}, TypeError, r"`args` must be a tuple .* got ndarray"),
        ({"reference": "plain"}, TypeError, r"`reference` must be callable or None; got str"),
        ({"dtypes": ["float8"]}, ValueError, r"`dtypes`: 'float8' is not a dtype"),
        ({"dtypes": ["int32"]}, ValueError, r"`dtypes`: int32 is not a real floating dtype"),
        ({"dtypes": ["float8_e4m3fn"]}, ValueError, r"`dtypes`: no tolerance for float8_e4m3fn"),
        ({"dtypes": []}, TypeError, r"`dtypes` must be None .* non-empty sequence"),
        ({"devices": ["cpu:0"]}, TypeError, r"`devices` entries must be jax.Device objects"),
        ({"devices": "cpu"}, TypeError, r"`devices` must be None .* got 'cpu'"),
        ({"tolerances": [1e-3]}, TypeError, r"`tolerances` must be a mapping"),
        ({"tolerances": {"float32": (1e-3, 1e-3)}}, TypeError, r"`tolerances\[float32\]`"),
        ({"checks": ["fd", "grad"]}, ValueError, r"`checks` must be non-empty names from"),
        ({"checks": "fd"}, TypeError, r"`checks` must be a sequence"),
        ({"seed": -1}, ValueError, r"`seed` must be an int >= 0; got -1"),
        ({"num_directions": 0}, ValueError, r"`num_directions` must be an int >= 1; got 0"),
        ({"vmap_size": 1}, ValueError, r"`vmap_size` must be an int >= 2; got 1"),
        ({"explore": "yes"}, TypeError, r"`explore` must be True or False; got 'yes'"),
        ({"precision": "fastest"}, ValueError, r"`precision` must be None or a default matmul"),
        ({"vmap_in_axes": (0, 0)}, ValueError, r"`vmap_in_axes` \(\(0, 0\)\) does not fit `args`"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    params, x = _ok_args()
    call = {"fn": linear_apply, "args": (params, x), "devices": CPU0} | kwargs
    fn, args = call.pop("fn"), call.pop("args")
    with pytest.raises(error, match=match):
        check_vjp(fn, args, **call)


def test_a_device_not_present_raises(monkeypatch):
    import jaxlinear._check_args as module

    monkeypatch.setattr(module, "all_devices", lambda: CPU[:2])
    with pytest.raises(
        ValueError, match=r"`devices` entry .* is not present; available: cpu:0, cpu:1"
    ):
        check_vjp(jnp.sin, (np.ones(2, np.float32),), devices=[CPU[5]])


def test_arguments_that_do_not_fit_fn_raise():
    params, x = linear_case()
    with pytest.raises(ValueError, match=r"`fn\(\*args\)` failed before any check could run: "):
        check_vjp(linear_apply, (params, x[:, :3]), devices=CPU0)
    with pytest.raises(ValueError, match=r"`args` has no floating-point leaves"):
        check_vjp(lambda i: i * 1.0, (np.arange(3),), devices=CPU0)
    with pytest.raises(
        TypeError, match=r"`fn` must return floating arrays; output has dtype int32"
    ):
        check_vjp(lambda x: jnp.argmax(x).astype(jnp.int32), (np.ones(3, np.float32),))
    with pytest.raises(TypeError, match=r"`args` leaf \[0\] is complex"):
        check_vjp(jnp.abs, (np.ones(3, np.complex64),))
    with pytest.raises(ValueError, match=r"no tolerance for the args' dtype float8_e4m3fn"):
        check_vjp(jnp.sin, (np.ones(3, jnp.float8_e4m3fn),))
    with pytest.raises(ValueError, match=r"`reference` must return what `fn` returns"):
        check_vjp(linear_apply, (params, x), reference=lambda p, x: x, devices=CPU0)


# ----------------------------------------------------------------- the redesign's guarantees


@jax.custom_vjp
def _sin_one_percent_off(x):
    return jnp.sin(x)


_sin_one_percent_off.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (1.01 * g * jnp.cos(x),))


def test_finite_difference_power_does_not_fall_with_size():
    """The error is relative to the RMS directional derivative: a 1 % bug reads
    ~1e-2 on 64 and on 4096 elements alike, far above float32's bound."""
    errors = []
    for n in (64, 4096):
        x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
        report = check_vjp(_sin_one_percent_off, (x,), devices=CPU0, checks=["fd"], explore=False)
        (row,) = report.select("fd-direction")
        assert not row.passed and row.bound < 1e-3
        errors.append(row.error)
    assert all(5e-3 < e < 2e-2 for e in errors), errors


@jax.custom_vjp
def _linear_db_float32(W, b, x):
    return plain_linear(LinearParams(W, b), x)


def _db_float32_bwd(res, g):
    W, x = res
    dx = jnp.einsum("no,io->ni", g, W)
    dW = jnp.einsum("ni,no->io", x, g, preferred_element_type=jnp.float32).astype(W.dtype)
    return dW, jnp.sum(g.astype(jnp.float32), axis=0).astype(g.dtype), dx


_linear_db_float32.defvjp(lambda W, b, x: (_linear_db_float32(W, b, x), (W, x)), _db_float32_bwd)


def test_a_rule_more_accurate_than_autodiff_never_fails():
    """db summed in float32 over N = 1024 bfloat16 rows: judged against float64
    truth, the rule passes whether or not autodiff in bfloat16 is as accurate."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((4, 4)) / 2).astype(np.float32)
    b, x = rng.standard_normal(4).astype(np.float32), rng.standard_normal((1024, 4))
    report = check_vjp(
        _linear_db_float32,
        (W, b, x.astype(np.float32)),
        reference=lambda W, b, x: plain_linear(LinearParams(W, b), x),
        dtypes=["bfloat16"],
        devices=CPU0,
        checks=["reference"],
        explore=False,
    )
    assert report.ok, str(report)
    (row,) = report.select("reference", argument="b")
    assert row.error <= row.autodiff_error + 2 * unit_roundoff(jnp.bfloat16, 4096)


def test_explore_notes_what_it_cannot_vary_and_skips_non_finite_regions():
    M = np.eye(3, dtype=np.float32) * 2

    def fixed_shape(x):  # accepts exactly x of shape (3,)
        return jnp.log(x) @ M.astype(x.dtype)

    x = np.array([0.5, 1.0, 2.0], np.float32)
    report = check_vjp(fixed_shape, (x,), devices=CPU0, checks=["fd"])
    assert report.ok, str(report)
    notes = [r.detail for r in report.select("explore")]
    assert any(n.startswith("no variant with a leading-axis slice of size 1") for n in notes)
    assert any(n.startswith("no variant with an extra axis") for n in notes)
    # log(-x) is NaN: that variant is outside fn's domain, skipped and said so.
    assert "fn is not finite at -args in float32: variant skipped" in notes
    assert {r.variant for r in report.select("fd-direction")} == {"args", "4*args"}
