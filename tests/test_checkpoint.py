"""examples/train_digits.py --checkpoint-dir DIR [--resume]: an interrupted run, resumed,
ends exactly where an uninterrupted one does.

Each run is a subprocess (``python -W error``), as in tests/test_examples.py. A
short driver calls the example's ``main`` and saves the trained parameters to
an ``.npz`` file, so the runs' parameters can be compared bit for bit; it also
reports whether Orbax was imported (it must be only with ``--checkpoint-dir``).
The test-only option ``--stop-after K`` stops a run after epoch K as an
interruption would, with the cosine schedule still set for ``--epochs``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import CACHE_WARNINGS
from tests.test_examples import EXAMPLES, ROOT, TIMEOUT_S, _env, printed

# Small and fast: 3 epochs of a 64-32-10 MLP, interrupted after epoch 1.
EPOCHS, STOP_AFTER = 2, 1
# Slow (train_digits.py runs in subprocesses): not in the quick subset, -m "not slow".
pytestmark = pytest.mark.slow

SETTINGS = ("--epochs", str(EPOCHS), "--hidden", "32", "--no-progress")

DRIVER = """
import sys
import jax
import numpy as np
sys.path.insert(0, sys.argv[1])
import train_digits
results = train_digits.main(sys.argv[3:])
leaves = jax.tree.leaves(results["params"])
np.savez(sys.argv[2], *[np.asarray(leaf) for leaf in leaves])
print("orbax imported:", any(name.split(".")[0] == "orbax" for name in sys.modules))
"""


def _start(npz, *args: str) -> subprocess.Popen:
    """Start train_digits.py with ``args``; its parameters will go to ``npz``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-W",
            "error",
            *CACHE_WARNINGS,
            "-c",
            DRIVER,
            str(EXAMPLES),
            str(npz),
            *args,
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stdout(proc: subprocess.Popen) -> str:
    """Wait for ``proc``; its stdout, once it has exited with status 0."""
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.args[7:]} exited with {proc.returncode}\n{stderr}"
    return stdout


def _leaves(npz) -> list[np.ndarray]:
    with np.load(npz) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run interrupted after STOP_AFTER epochs and resumed.

    The interrupted run and its resumption use one command line (``--resume``
    on an empty directory starts afresh), as a job restarted after a crash would.
    The uninterrupted run goes on beside them, on the other core.
    """
    tmp = tmp_path_factory.mktemp("checkpoint")
    ckpt = tmp / "ckpt"
    plain = _start(tmp / "plain.npz", *SETTINGS, "--out", str(tmp / "plain"))
    resumable = (*SETTINGS, "--out", str(tmp / "out"), "--checkpoint-dir", str(ckpt), "--resume")
    try:
        interrupted = _stdout(
            _start(tmp / "interrupted.npz", *resumable, "--stop-after", str(STOP_AFTER))
        )
        resumed = _stdout(_start(tmp / "resumed.npz", *resumable))
    except BaseException:
        plain.kill()
        plain.communicate()
        raise
    return {
        "ckpt": ckpt,
        "tmp": tmp,
        "plain": _stdout(plain),
        "interrupted": interrupted,
        "resumed": resumed,
    }


def test_resumed_run_ends_with_the_uninterrupted_parameters_and_accuracy(runs):
    tmp, ckpt = runs["tmp"], runs["ckpt"]
    assert f"no checkpoint in {ckpt.resolve()}: starting at epoch 0" in runs["interrupted"]
    assert f"resumed from {ckpt.resolve()} after epoch {STOP_AFTER} of {EPOCHS}" in runs["resumed"]
    plain, resumed = _leaves(tmp / "plain.npz"), _leaves(tmp / "resumed.npz")
    assert len(plain) == len(resumed) == 4  # W and b of two layers
    for want, got in zip(plain, resumed, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)  # exact: same program, same inputs
    for label in ("final loss", "train accuracy", "test accuracy"):
        assert printed(runs["resumed"], label) == printed(runs["plain"], label)
    # The interruption was real: after one epoch the parameters and loss differ.
    interrupted = _leaves(tmp / "interrupted.npz")
    assert not all(np.array_equal(a, b) for a, b in zip(interrupted, plain, strict=True))
    assert printed(runs["interrupted"], "final loss") != printed(runs["plain"], "final loss")


def test_orbax_is_imported_only_with_a_checkpoint_dir(runs):
    assert printed(runs["plain"], "orbax imported") == "False"
    assert printed(runs["resumed"], "orbax imported") == "True"


@pytest.fixture(scope="module")
def train_digits():
    """The example as a module (it imports `_cli` and `_digits` from its own folder)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))
        yield importlib.import_module("train_digits")


def _exit_status(capsys, function, *args) -> tuple[int, str]:
    """``function(*args)``'s exit status (it must exit) and what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        function(*args)
    return exit_info.value.code, capsys.readouterr().err


# These three call the example in this process: its argument checks and the
# restore happen before any training, so a subprocess would only add start-up time.
def test_resume_refuses_a_checkpoint_of_other_settings(runs, train_digits, capsys):
    args = [*SETTINGS, "--out", str(runs["tmp"] / "out"), "--checkpoint-dir", str(runs["ckpt"])]
    args += ["--resume", "--epochs", str(EPOCHS + 1)]
    status, err = _exit_status(capsys, train_digits.main, args)
    assert status == 2
    assert (
        f"train_digits.py: error: the checkpoint in {runs['ckpt'].resolve()} was written by "
        f"a run with --epochs {EPOCHS} (now {EPOCHS + 1}); resume with the same settings"
    ) in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--resume"], "--resume needs --checkpoint-dir DIR"),
        (
            ["--checkpoint-dir", "{full}"],
            "--checkpoint-dir {full} is not empty; pass --resume to continue",
        ),
        (["--checkpoint-dir", "{file}"], "--checkpoint-dir must be a directory; {file} is a file"),
    ],
)
def test_bad_checkpoint_arguments_exit_2(tmp_path, train_digits, capsys, args, message):
    paths = {"full": tmp_path / "full", "file": tmp_path / "file"}
    paths["full"].mkdir()
    (paths["full"] / "something").write_text("")
    paths["file"].write_text("")
    args = [a.format(**paths) for a in args]
    status, err = _exit_status(capsys, train_digits.parse_args, args)
    assert status == 2
    assert message.format(**paths) in err
