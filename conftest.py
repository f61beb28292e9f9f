"""Test-session configuration shared by tests/, the library's doctests and README.md.

* Eight simulated CPU devices, for the sharding tests. XLA_FLAGS must be set
  before JAX initialises its backends; an explicit count from the caller wins.
* No test may leak JAX configuration (x64 is only ever switched on with the
  ``jax.enable_x64`` context manager).

tests/conftest.py adds strict dtype and rank promotion for the tests proper;
doctests run under JAX's defaults, as a user's code does.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def _config():
    return (
        jax.config.jax_enable_x64,
        jax.config.jax_default_matmul_precision,
        jax.config.jax_numpy_dtype_promotion,
        jax.config.jax_numpy_rank_promotion,
    )


@pytest.fixture(autouse=True)
def _no_config_leaks():
    before = _config()
    yield
    after = _config()
    assert before == after, f"a test leaked JAX config: {before} -> {after}"


def pytest_collection_modifyitems(items):
    """The guide pages' doctests (docs/*.md) train small models: slow, so they are
    left out of the quick subset (``pytest -m "not slow"``); the README's stay in."""
    for item in items:
        if item.path.parent.name == "docs" and item.path.suffix == ".md":
            item.add_marker(pytest.mark.slow)
