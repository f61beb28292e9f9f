"""examples/dp_sgd.py: a short DP-SGD run end to end, and its privacy accounting.

The example accounts with Google's dp_accounting (the ``dp`` extra). Its
printed epsilons are checked against dp_accounting called directly here, and
dp_accounting's Rényi DP against two values published with the moments
accountant.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest

from tests.test_examples import EXAMPLES, printed, run_example, run_probes

# Slow (runs the DP-SGD example): not in the quick subset, -m "not slow".
pytestmark = pytest.mark.slow

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


# dp_accounting is imported inside the functions that use it: every pytest-xdist
# worker imports this file to collect it, and importing dp_accounting takes about 1.5 s.


def _event(q, sigma, steps):
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _direct(q, sigma, steps, delta):
    """(ε RDP, its order, ε PLD) from dp_accounting's accountants, called here directly."""
    import dp_accounting

    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(_event(q, sigma, steps))
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(_event(q, sigma, steps))
    return (*rdp.get_epsilon_and_optimal_order(delta), pld.get_epsilon(delta))


def test_short_run_learns_and_reports_its_privacy(tmp_path):
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
    eps_rdp, order, eps_pld = _direct(32 / 1437, 1.5, steps, 1e-5)
    assert printed(out, "epsilon (RDP)") == f"{eps_rdp:.3f}"  # 0.919
    assert printed(out, "best RDP order") == f"{order:g}"  # 15
    assert printed(out, "epsilon (PLD)") == f"{eps_pld:.3f}"  # 0.804
    assert 0.5 < eps_pld < eps_rdp < 1.5
    results = json.loads((tmp_path / "dp_sgd.json").read_text())
    # The same calls on the same numbers: equal to the last bit.
    assert (results["epsilon_rdp"], results["rdp_order"]) == (eps_rdp, order)
    assert results["epsilon_pld"] == eps_pld
    assert results["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    history = results["history"]["epsilon_rdp"]
    assert len(history) == SMOKE_EPOCHS
    assert history == sorted(history) and history[-1] == eps_rdp


def test_help_and_refused_options():
    """``--help`` lists the privacy options; bad ones exit 2 with a clear message (one
    probing subprocess for the three command lines)."""
    help_, clip, noise = run_probes(
        "dp_sgd.py", ["--help"], ["--l2-clip", "0"], ["--noise-multiplier", "-1"]
    )
    assert help_.returncode == 0, help_.stderr
    out = help_.stdout
    for option in ("--epochs", "--seed", "--out", "--noise-multiplier", "--l2-clip", "--delta"):
        assert option in out
    assert "directory for the results file dp_sgd.json" in " ".join(out.split())
    assert "PNG" not in out
    assert clip.returncode == noise.returncode == 2
    assert "expected a positive number; got 0" in clip.stderr
    assert "expected a number >= 0; got -1" in noise.stderr


# (q, σ, steps, δ): the example's defaults, TF Privacy's MNIST tutorial (batch 256
# of 60000, 60 epochs), a large sampling rate with a smaller δ.
CASES = [
    (32 / 1437, 1.5, 900, 1e-5),
    (256 / 60000, 1.1, 14063, 1e-5),
    (0.5, 3.0, 50, 1e-6),
]


@pytest.mark.parametrize("case", CASES)
def test_accountants_are_dp_accountings(dp_sgd, case):
    eps_rdp, order, eps_pld = _direct(*case)
    assert dp_sgd.epsilon_rdp(*case) == (eps_rdp, order)
    assert dp_sgd.epsilon_pld(*case) == eps_pld
    assert eps_pld <= eps_rdp  # PLD accounting is the tighter of the two here


def _moments_accountant_epsilon(q, sigma, steps, delta, orders):
    """ε by dp_accounting's Rényi DP with the conversion the moments accountant used.

    Abadi et al. (2016) and TF Privacy until 2020 converted RDP(α) to
    ε = min_α RDP(α) − log δ / (α − 1) (Mironov 2017, Prop. 3); dp_accounting
    now uses the tighter ε = RDP(α) + log((α − 1)/α) − (log δ + log α)/(α − 1).
    One order at a time, the difference is the closed form
    log α/(α − 1) − log((α − 1)/α), so the older ε follows from the newer.
    """
    import dp_accounting

    older = []
    for alpha in orders:
        accountant = dp_accounting.rdp.RdpAccountant(orders=[alpha])
        accountant.compose(_event(q, sigma, steps))
        newer = accountant.get_epsilon(delta)
        older.append(newer + math.log(alpha) / (alpha - 1) - math.log1p(-1 / alpha))
    return min(older)


# Published (ε, δ = 1e-5) of the moments accountant, to the two decimals given:
# Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1: q = 0.01,
# σ = 4, T = 10000 gives ε ≈ 1.26; Bu, Dong, Long and Su 2020, "Deep Learning with
# Gaussian Differential Privacy", Fig. 4: q = 256/60000, σ = 0.7, 70 epochs gives 8.68.
PUBLISHED = [
    ((0.01, 4.0, 10_000, 1e-5), "1.26"),
    ((256 / 60000, 0.7, 70 * 60000 // 256, 1e-5), "8.68"),
]


@pytest.mark.parametrize(("case", "published"), PUBLISHED)
def test_dp_accounting_reproduces_published_moments_accountant_values(dp_sgd, case, published):
    import dp_accounting

    orders = dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    assert f"{_moments_accountant_epsilon(*case, orders):.2f}" == published
    # The example's tighter conversion, and the PLD accountant, only improve on it.
    assert dp_sgd.epsilon_pld(*case) < dp_sgd.epsilon_rdp(*case)[0] < float(published)


def test_accountant_limits(dp_sgd):
    # No noise: no privacy. Nothing sampled: no privacy spent.
    assert math.isinf(dp_sgd.epsilon_rdp(0.1, 0.0, 10, 1e-5)[0])
    assert math.isinf(dp_sgd.epsilon_pld(0.1, 0.0, 10, 1e-5))
    assert dp_sgd.epsilon_rdp(0.0, 1.0, 10, 1e-5)[0] == 0.0
    # More noise, or fewer steps, never costs more privacy.
    assert dp_sgd.epsilon_rdp(0.02, 2.0, 100, 1e-5)[0] < dp_sgd.epsilon_rdp(0.02, 1.0, 100, 1e-5)[0]
    assert dp_sgd.epsilon_rdp(0.02, 1.0, 50, 1e-5)[0] < dp_sgd.epsilon_rdp(0.02, 1.0, 100, 1e-5)[0]


def test_accountant_refuses_bad_arguments(dp_sgd):
    with pytest.raises(ValueError, match=r"the sampling rate `q` must lie in \[0, 1\]; got 1.5"):
        dp_sgd.epsilon_rdp(1.5, 1.0, 10, 1e-5)
    with pytest.raises(ValueError, match=r"the noise multiplier `sigma` must be >= 0; got -1.0"):
        dp_sgd.epsilon_pld(0.1, -1.0, 10, 1e-5)
    with pytest.raises(ValueError, match=r"`steps` must be >= 0; got -1"):
        dp_sgd.epsilon_rdp(0.1, 1.0, -1, 1e-5)
    with pytest.raises(ValueError, match=r"`delta` must lie in \(0, 1\); got 0.0"):
        dp_sgd.epsilon_pld(0.1, 1.0, 10, 0.0)
