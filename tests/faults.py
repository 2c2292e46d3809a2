"""Fault injection that fires on an event, never on a timer, for tests that kill stages.

A test that kills a process after a sleep depends on the machine: on a fast one the work
is over before the kill, on a slow one it has not begun. The hooks here make the process
under test reach a known point and wait there (or die there) by itself.
"""

from __future__ import annotations

import os
from pathlib import Path

# Imported by Python at start-up as ``sitecustomize`` (see pause_train_after_first_batch).
# Only the train stage's process (``python -m tasks.train``) is touched.
_PAUSE_TRAIN_AFTER_FIRST_BATCH = r"""
import os, signal, sys, threading

if "tasks.train" in sys.orig_argv:
    import keras

    original = keras.callbacks.CallbackList.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        original(self, batch, logs)
        if os.environ.get("TLP_TEST_IGNORE_SIGTERM"):  # as a process that hangs on its way out
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        marker = os.environ["TLP_TEST_PAUSED"]
        with open(marker + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        release = os.environ.get("TLP_TEST_RELEASE")
        for _ in range(9000):  # 900 s, longer than any test waits: a kill (or release) ends it
            if release and os.path.exists(release):
                keras.callbacks.CallbackList.on_train_batch_end = original  # pause only once
                return
            threading.Event().wait(0.1)

    keras.callbacks.CallbackList.on_train_batch_end = on_train_batch_end
"""


def pause_train_after_first_batch(
    folder: Path, project: Path, release: Path | None = None, ignore_sigterm: bool = False
) -> tuple[dict[str, str], Path]:
    """An environment in which the train stage stops after its first batch and says so.

    Give the environment to whatever starts the stage (``dvc repro``, ``tlp run``): it puts
    a ``sitecustomize.py`` on ``PYTHONPATH`` (before ``project``), so in the process that
    runs ``python -m tasks.train``, wherever it is started from, the first training batch
    writes that process's PID to the marker file and then waits until it is killed. Every
    other Python process (dvc, Prefect) runs as usual.

    Args:
        folder: a new folder for the hook.
        project: the project the command runs in (its code must stay importable).
        release: a file the test creates to let training go on (without it, only a kill
            ends the pause).
        ignore_sigterm: from the pause on, the stage ignores SIGTERM, as a process that
            hangs on its way out would (a TensorFlow one can): only SIGKILL ends it.

    Returns:
        ``(environment variables to add, marker file)``: wait for the marker to exist,
        then kill.
    """
    folder.mkdir(parents=True)
    (folder / "sitecustomize.py").write_text(_PAUSE_TRAIN_AFTER_FIRST_BATCH)
    marker = folder / "train-paused"
    env = {"PYTHONPATH": f"{folder}{os.pathsep}{project}", "TLP_TEST_PAUSED": str(marker)}
    if release is not None:
        env["TLP_TEST_RELEASE"] = str(release)
    if ignore_sigterm:
        env["TLP_TEST_IGNORE_SIGTERM"] = "1"
    return env, marker


# Python source defining ``_on_first_batches(hook)``: Keras then calls ``hook(epoch)`` after
# the first batch of every epoch (counted from 1, as Keras prints them). Keras is imported
# only when it is called, so other processes that load the source stay as they were.
FIRST_BATCH_HOOK = r"""
def _on_first_batches(hook):
    import keras

    callbacks = keras.callbacks.CallbackList
    original_epoch_begin, original_batch_end = callbacks.on_epoch_begin, callbacks.on_train_batch_end
    current = [0]

    def on_epoch_begin(self, epoch, logs=None):
        current[0] = epoch + 1
        return original_epoch_begin(self, epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        original_batch_end(self, batch, logs)
        if batch == 0:
            hook(current[0])

    callbacks.on_epoch_begin, callbacks.on_train_batch_end = on_epoch_begin, on_train_batch_end
"""

# Imported as ``sitecustomize`` in the train stage's process only: at the first batch of
# epoch $TLP_TEST_SIGNAL_EPOCH the process sends itself $TLP_TEST_SIGNAL (what a Ctrl-C or
# a `kill` would deliver there).
_SIGNAL_TRAIN_AT_EPOCH = (
    FIRST_BATCH_HOOK
    + r"""
import os, signal, sys

if "tasks.train" in sys.orig_argv:
    # As in a terminal's foreground job: a shell starts background jobs (a test run with
    # `&`) with SIGINT ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def signal_in(epoch):
        if epoch == int(os.environ["TLP_TEST_SIGNAL_EPOCH"]):
            print(f"FAULT INJECTION: {os.environ['TLP_TEST_SIGNAL']} in epoch {epoch}", flush=True)
            os.kill(os.getpid(), getattr(signal, os.environ["TLP_TEST_SIGNAL"]))

    _on_first_batches(signal_in)
"""
)


def signal_train_in_epoch(
    folder: Path, project: Path, epoch: int, signal_name: str
) -> dict[str, str]:
    """An environment in which the train stage sends itself a signal inside ``epoch``.

    As :func:`pause_train_after_first_batch`, through a ``sitecustomize.py`` on
    ``PYTHONPATH``: at the first batch of epoch ``epoch`` (counted from 1, as Keras prints
    them), the train stage's process signals itself, so epochs ``1 .. epoch - 1`` are
    complete and backed up, whatever the machine's speed.

    Args:
        folder: a new folder for the hook.
        project: the project the command runs in (its code must stay importable).
        epoch: the epoch to stop in.
        signal_name: ``SIGINT``, ``SIGTERM`` or ``SIGKILL``.

    Returns:
        The environment variables to add.
    """
    folder.mkdir(parents=True)
    (folder / "sitecustomize.py").write_text(_SIGNAL_TRAIN_AT_EPOCH)
    return {
        "PYTHONPATH": f"{folder}{os.pathsep}{project}",
        "TLP_TEST_SIGNAL_EPOCH": str(epoch),
        "TLP_TEST_SIGNAL": signal_name,
    }
