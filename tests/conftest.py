"""Strict JAX configuration for the whole test session.

Strict dtype promotion and rank-promotion errors catch a silently promoted
dtype or a mis-shaped bias that broadcasting would hide. They are set once for
the session (the Equinox way) and x64 is only ever switched on with the
``jax.enable_x64`` context manager, so no test leaks global configuration.
"""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _no_config_leaks():
    before = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
    yield
    after = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
    assert before == after, f"a test leaked JAX config: {before} -> {after}"
