"""Test-session configuration shared by tests/, the library's doctests and README.md.

* Eight simulated CPU devices, for the sharding tests. XLA_FLAGS must be set
  before JAX initialises its backends; an explicit count from the caller wins.
* One persistent compilation cache for the whole session, in a fresh temporary
  directory removed at the end: pytest-xdist's workers and the examples and
  workers the tests start as subprocesses inherit it through the environment,
  so a program compiled once (the digits MLP's epoch, a worker's train step) is
  not compiled again by the next process. Every program is still compiled in
  full the first time; a directory set by the caller is used and kept. JAX
  writes an entry in place, so a process may read one still being written: it
  warns and compiles the program itself. That warning is ignored here
  (pyproject.toml) and in the subprocesses the tests start with ``-W error``
  (``tests/helpers.py``'s ``CACHE_WARNINGS``).
* No test may leak JAX configuration (x64 is only ever switched on with the
  ``jax.enable_x64`` context manager).

tests/conftest.py adds strict dtype and rank promotion for the tests proper;
doctests run under JAX's defaults, as a user's code does.
"""

import os
import shutil
import tempfile

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# Set before JAX is imported, here and in every process that inherits the environment.
OWN_CACHE_DIR = (
    None
    if "JAX_COMPILATION_CACHE_DIR" in os.environ
    else tempfile.mkdtemp(prefix="jaxlinear-tests-xla-cache-")
)
if OWN_CACHE_DIR is not None:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = OWN_CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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


def pytest_unconfigure(config):
    if OWN_CACHE_DIR is not None:  # only the process that made it (xdist's controller)
        shutil.rmtree(OWN_CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The guide pages' doctests (docs/*.md) train small models: slow, so they are
    left out of the quick subset (``pytest -m "not slow"``); the README's stay in."""
    for item in items:
        if item.path.parent.name == "docs" and item.path.suffix == ".md":
            item.add_marker(pytest.mark.slow)
