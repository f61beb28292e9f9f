"""The 8×8 digits data set for the examples: a fixed split and shuffled minibatches.

The data is scikit-learn's bundled copy of the UCI optical digits test set
(``sklearn.datasets.load_digits``: 1797 images of 8×8 pixels, 16 grey levels,
10 classes of about 180 each). It ships inside scikit-learn, so nothing is
downloaded.

Public API: two functions, a named tuple and four constants::

    from _digits import Digits, epoch_batches, load_digits
    from _digits import NUM_CLASSES, NUM_FEATURES, TEST_SIZE, TRAIN_SIZE  # 10, 64, 360, 1437

    data = load_digits()            # Digits(x_train, y_train, x_test, y_test)
    xb, yb = epoch_batches(key, data.x_train, data.y_train, batch_size=64)

Examples import it as ``from _digits import ...``: ``python examples/NAME.py``
puts ``examples/`` first on ``sys.path``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Digits",
    "load_digits",
    "epoch_batches",
    "NUM_FEATURES",
    "NUM_CLASSES",
    "TEST_SIZE",
    "TRAIN_SIZE",
]

NUM_FEATURES = 64  # 8×8 pixels, flattened row by row
NUM_CLASSES = 10
#: Sizes of the split: 360 of the 1797 images (≈ 20 %, 35 to 37 per class) for
#: testing, the other 1437 for training.
TEST_SIZE = 360
TRAIN_SIZE = 1797 - TEST_SIZE


class Digits(NamedTuple):
    """A train/test split of the digits.

    Attributes:
        x_train: ``(1437, 64)`` float32 pixels in [0, 1].
        y_train: ``(1437,)`` int32 classes in [0, 10).
        x_test: ``(360, 64)`` float32 pixels in [0, 1].
        y_test: ``(360,)`` int32 classes in [0, 10).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(split_seed: int = 0) -> Digits:
    """Load the digits, scaled to [0, 1], with a fixed stratified train/test split.

    Args:
        split_seed: seeds the split (``random_state`` of scikit-learn's
            ``train_test_split``). The examples keep the default 0 whatever
            their training ``--seed``, so every run is scored on the same
            360 test images.

    Returns:
        :class:`Digits`: 1437 training and 360 test images, stratified so both
        parts have the same class proportions. Pixels are the original grey
        levels 0..16 divided by 16 (float32); labels are int32.
    """
    from sklearn.datasets import load_digits as _sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = _sklearn_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # grey levels 0..16 -> [0, 1]
    y = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=split_seed
    )
    return Digits(x_train, y_train, x_test, y_test)


def epoch_batches(
    key: jax.Array, x: jax.Array, y: jax.Array, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """One epoch of shuffled minibatches, stacked for ``lax.scan``.

    Args:
        key: a JAX PRNG key; the same key gives the same order.
        x: ``(n, *features)`` inputs (NumPy or JAX arrays, or tracers inside ``jit``).
        y: ``(n, *label)`` targets with the same ``n``.
        batch_size: a static positive int no larger than ``n``.

    Returns:
        ``(xb, yb)`` of shapes ``(steps, batch_size, *features)`` and
        ``(steps, batch_size, *label)`` with ``steps = n // batch_size``: a
        random permutation of the rows, with the last ``n % batch_size``
        rows of the permutation dropped (a different remainder every epoch,
        and every batch has the same shape, so a scan compiles once).

    >>> import jax, jax.numpy as jnp
    >>> xb, yb = epoch_batches(jax.random.key(0), jnp.zeros((10, 3)), jnp.arange(10), 4)
    >>> xb.shape, yb.shape, len(set(yb.ravel().tolist()))
    ((2, 4, 3), (2, 4), 8)
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(
            f"`x` and `y` must have the same number of rows; got x.shape={x.shape}, "
            f"y.shape={y.shape}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"`batch_size` must be an int in [1, {n}] (the rows); got {batch_size!r}.")
    steps = n // batch_size
    order = jax.random.permutation(key, n)[: steps * batch_size]
    xb = jnp.take(jnp.asarray(x), order, axis=0)
    yb = jnp.take(jnp.asarray(y), order, axis=0)
    return (
        xb.reshape((steps, batch_size) + xb.shape[1:]),
        yb.reshape((steps, batch_size) + yb.shape[1:]),
    )
