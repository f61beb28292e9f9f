"""Strict JAX configuration for the whole test session.

Strict dtype promotion and rank-promotion errors catch a silently promoted
dtype or a mis-shaped bias that broadcasting would hide. They are set once for
the session (the Equinox way) and x64 is only ever switched on with the
``jax.enable_x64`` context manager, so no test leaks global configuration.
"""

import os

# Eight simulated CPU devices for the sharding tests; must be set before JAX
# initialises its backends. An explicit XLA_FLAGS from the caller is respected.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _no_config_leaks():
    before = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
    yield
    after = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
    assert before == after, f"a test leaked JAX config: {before} -> {after}"
