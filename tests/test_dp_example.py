"""examples/dp_sgd.py: a short DP-SGD run end to end, and its privacy accountant."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest

import jaxlinear
from tests.test_examples import EXAMPLES, printed, run_example

# Test accuracy after 3 epochs with the defaults (σ = 1.5, C = 1, expected batch
# 32, Adam 1e-2). Measured with seeds 0..9: 0.700 to 0.839 (seed 0, the one run
# here: 0.742, 267 of 360). 0.60 leaves 50 images of slack for float differences
# between CPUs, and still fails a training that does not learn (chance is 0.10).
SMOKE_EPOCHS = 3
SMOKE_FLOOR = 0.60


@pytest.fixture(scope="module")
def dp_sgd():
    """The example as a module (it imports `_digits` from its own folder)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))
        yield importlib.import_module("dp_sgd")


def test_short_run_learns_and_reports_its_privacy(tmp_path, dp_sgd):
    proc = run_example("dp_sgd.py", "--epochs", str(SMOKE_EPOCHS), "--out", str(tmp_path))
    out = proc.stdout
    accuracy = float(printed(out, "test accuracy"))
    assert accuracy >= SMOKE_FLOOR, out
    steps = int(printed(out, "steps"))
    q = float(printed(out, "sampling rate (q)"))
    assert steps == SMOKE_EPOCHS * round(1437 / 32)
    assert q == pytest.approx(32 / 1437, rel=1e-4)
    assert float(printed(out, "noise multiplier (sigma)")) == 1.5
    assert float(printed(out, "l2 clip (C)")) == 1.0
    assert int(printed(out, "expected batch size")) == 32
    assert float(printed(out, "delta")) == 1e-5
    eps = float(printed(out, "epsilon"))
    assert eps == pytest.approx(dp_sgd.epsilon(32 / 1437, 1.5, steps, 1e-5)[0], abs=1e-3)
    assert 0.5 < eps < 1.5
    results = json.loads((tmp_path / "dp_sgd.json").read_text())
    assert results["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert len(results["history"]["epsilon"]) == SMOKE_EPOCHS
    assert results["history"]["epsilon"] == sorted(results["history"]["epsilon"])


def test_help_lists_the_privacy_options():
    out = run_example("dp_sgd.py", "--help").stdout
    for option in ("--epochs", "--seed", "--out", "--noise-multiplier", "--l2-clip", "--delta"):
        assert option in out


def test_bad_options_are_refused():
    proc = run_example("dp_sgd.py", "--l2-clip", "0", expect_rc=2)
    assert "expected a positive number; got 0" in proc.stderr
    proc = run_example("dp_sgd.py", "--noise-multiplier", "-1", expect_rc=2)
    assert "expected a number >= 0; got -1" in proc.stderr


# ε at δ for (q, σ, steps, δ), computed with Google's dp_accounting 0.6.0
# (RdpAccountant(orders=range(2, 257)), PoissonSampledDpEvent(q, GaussianDpEvent(σ)),
# get_epsilon_and_optimal_order): the same orders and conversion, an independent code.
DP_ACCOUNTING = [
    ((128 / 1437, 1.0, 440, 1e-5), 15.691621364127258, 3),
    ((0.01, 1.1, 1000, 1e-5), 1.7252908180449444, 9),
    ((256 / 60000, 1.1, 14063, 1e-5), 2.5970795196566616, 8),
    ((0.5, 3.0, 50, 1e-6), 6.782801933971339, 5),
    ((1.0, 5.0, 10, 1e-5), 2.814109167845533, 8),
    ((0.05, 0.6, 200, 1e-5), 17.529537692236932, 2),
]


@pytest.mark.parametrize(("args", "eps", "order"), DP_ACCOUNTING)
def test_accountant_matches_dp_accounting(dp_sgd, args, eps, order):
    got, got_order = dp_sgd.epsilon(*args)
    assert got == pytest.approx(eps, rel=1e-10)
    assert got_order == order


def test_accountant_limits(dp_sgd):
    orders = np.arange(2, 10)
    # q = 1 is the plain Gaussian mechanism: RDP(α) = α / (2σ²).
    # float64 arithmetic against the closed form: the table's float64 entry.
    rtol, atol = jaxlinear.tolerance_for(np.float64).autodiff
    np.testing.assert_allclose(
        dp_sgd.rdp_sampled_gaussian(1.0, 2.0, orders), orders / 8.0, rtol=rtol, atol=atol
    )
    np.testing.assert_array_equal(dp_sgd.rdp_sampled_gaussian(0.0, 1.0, orders), 0.0)
    assert math.isinf(dp_sgd.epsilon(0.1, 0.0, 10, 1e-5)[0])
    # More noise, or fewer steps, never costs more privacy.
    assert dp_sgd.epsilon(0.02, 2.0, 100, 1e-5)[0] < dp_sgd.epsilon(0.02, 1.0, 100, 1e-5)[0]
    assert dp_sgd.epsilon(0.02, 1.0, 50, 1e-5)[0] < dp_sgd.epsilon(0.02, 1.0, 100, 1e-5)[0]


def test_accountant_matches_numerical_integration(dp_sgd):
    """A_α = E_{z~N(0,σ²)}[((1−q) + q e^{(2z−1)/(2σ²)})^α], by quadrature, for α = 2..6."""
    q, sigma = 0.1, 0.8
    z = np.linspace(-40.0, 40.0, 400_001)
    density = np.exp(-(z**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    ratio = (1 - q) + q * np.exp((2 * z - 1) / (2 * sigma**2))
    for alpha in range(2, 7):
        # Uniform grid, integrand ~0 at both ends: the rectangle rule is the trapezoid
        # rule, and for a smooth, fast-decaying integrand exact to rounding.
        a_alpha = np.sum(density * ratio**alpha) * (z[1] - z[0])
        expected = math.log(a_alpha) / (alpha - 1)
        got = dp_sgd.rdp_sampled_gaussian(q, sigma, [alpha])[0]
        assert got == pytest.approx(expected, rel=1e-9)


def test_accountant_refuses_bad_arguments(dp_sgd):
    with pytest.raises(ValueError, match=r"the sampling rate `q` must lie in \[0, 1\]; got 1.5"):
        dp_sgd.rdp_sampled_gaussian(1.5, 1.0)
    with pytest.raises(ValueError, match=r"`delta` must lie in \(0, 1\); got 0.0"):
        dp_sgd.epsilon(0.1, 1.0, 10, 0.0)
