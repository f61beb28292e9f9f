"""Strict promotion for the tests proper.

Strict dtype promotion and rank-promotion errors catch a silently promoted
dtype or a mis-shaped bias that broadcasting would hide. They are scoped with
JAX's context managers around every test, so nothing leaks into the doctests.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield
