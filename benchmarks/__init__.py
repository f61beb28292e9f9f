"""jaxlinear's benchmark suite (not part of the test suite): run ``python benchmarks/run.py``."""
