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
import os, sys, threading

if "tasks.train" in sys.orig_argv:
    import keras

    original = keras.callbacks.CallbackList.on_train_batch_end

    def on_train_batch_end(self, batch, logs=None):
        original(self, batch, logs)
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
    folder: Path, project: Path, release: Path | None = None
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
    return env, marker
