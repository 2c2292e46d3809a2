"""The train stage's Keras callbacks: what makes a killed run resume as if never stopped.

Keras' own callbacks fall short of that in three ways (see docs/reliability.md):
``ModelCheckpoint`` forgets its best value on restart, ``BackupAndRestore`` overwrites its
backup in place (a kill mid-write leaves one that cannot be loaded) and leaves out the
random-generator state, and ``EarlyStopping`` restarts its patience. The classes here keep
their state in the backup folder (:mod:`tasks.backup`) or read it from there; every file
is written under a temporary name and renamed when complete:

* :class:`BestCheckpoint`: the best epoch of a phase, with its value;
* :class:`EpochBackup`: weights, optimizer and generator state after every epoch, and the
  logs of the epochs so far (:func:`tasks.backup.restore_backup` loads them);
* :class:`ResumableEarlyStopping`: patience that counts the epochs before a resume;
* :class:`NanGuard`: stop at the first NaN/inf loss, naming the cause;
* :class:`EpochClockCallback`: tells the dataset which epoch it is (its shuffle order).
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np

from tasks.backup import rng_states
from tasks.common import StageError, log, read_json, save_model, write_json
from tasks.dataset import EpochClock


class DivergedError(StageError):
    """The loss or the monitored metric became NaN or infinite."""


def monitor_mode(monitor: str) -> str:
    """``"max"`` for an accuracy, ``"min"`` for a loss."""
    return "max" if "acc" in monitor else "min"


def is_better(value: float | None, best: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` (``None``: nothing yet); NaN/inf never does."""
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class BestCheckpoint(keras.callbacks.Callback):
    """``ModelCheckpoint(save_best_only=True)``, crash-safe, with its best value persisted.

    Keras' own callback forgets its best value when a run restarts, so after a resume a
    worse epoch could overwrite the best file. Here each improvement is written to its own
    file, ``best-<phase>-e<epoch>.keras`` (to a temporary name, then renamed), and only then
    ``best-<phase>.json`` is replaced atomically to point at it, with the value. The JSON is
    the single source of truth: whenever the process dies, the file it names is complete
    and its value is the one recorded.

    Args:
        folder: the backup folder.
        monitor: the logged metric to compare epochs by (``train.monitor``).
        phase: ``head`` or ``fine_tune``; each phase has its own best.
    """

    def __init__(self, folder: Path, monitor: str, phase: str):
        super().__init__()
        self.folder, self.monitor, self.phase = folder, monitor, phase
        self.state_path = folder / f"best-{phase}.json"
        self.mode = monitor_mode(monitor)
        self.best: float | None = None
        self.best_epoch = -1
        self.path: Path | None = None
        state = read_json(self.state_path) if self.state_path.exists() else {}
        if state.get("file") and (folder / state["file"]).is_file():
            self.best, self.best_epoch = state["best"], state["epoch"]
            self.path = folder / state["file"]
        for stale in folder.glob(f"best-{phase}-e*.keras"):
            if stale != self.path:  # written, but the process died before the JSON moved
                stale.unlink()
        for stale in folder.glob(f".best-{phase}-*"):
            stale.unlink()  # temporary files of a write that was killed

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise StageError(
                f"train.monitor {self.monitor!r} is not a logged metric: {sorted(logs or {})}"
            )
        value = float(value)
        if not is_better(value, self.best, self.mode):
            return
        log.info("epoch %d: %s improved to %.5f, saving checkpoint", epoch + 1, self.monitor, value)
        target = self.folder / f"best-{self.phase}-e{epoch + 1:04d}.keras"
        save_model(self.model, target)
        write_json(
            self.state_path,
            {"best": value, "epoch": epoch, "phase": self.phase, "file": target.name},
        )
        previous, self.path = self.path, target
        self.best, self.best_epoch = value, epoch
        if previous is not None and previous != target:
            previous.unlink(missing_ok=True)


class EpochBackup(keras.callbacks.Callback):
    """A crash-safe ``keras.callbacks.BackupAndRestore``.

    Keras' callback overwrites ``latest.weights.h5`` in place and writes the epoch number to
    a second file: a kill during the write leaves a corrupt backup (the rerun crashes) or
    weights one epoch ahead of the recorded epoch (the rerun trains an extra epoch). Here
    the weights, optimizer state included, go to a temporary file renamed to
    ``epoch-<n>.weights.h5`` only when complete; the epoch number is in the name, and the
    logs of all epochs so far and the random-generator states are written beside it first.
    :func:`tasks.backup.restore_backup` loads it before ``fit`` (which then gets ``initial_epoch``).

    Args:
        folder: the phase's folder in the backup folder.
        history: the logs of the epochs before this run (from ``restore_backup``);
            extended in place with every epoch's logs.
    """

    def __init__(self, folder: Path, history: dict[str, list[float]]):
        super().__init__()
        self.folder = folder
        self.history = history

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.folder.mkdir(parents=True, exist_ok=True)
        done = epoch + 1
        state = {
            "history": self.history,
            "rng_states": [v.numpy().tolist() for v in rng_states(self.model)],
        }
        write_json(self.folder / f"epoch-{done:04d}.json", state)
        tmp = self.folder / f".epoch-{done:04d}.tmp.weights.h5"
        self.model.save_weights(tmp)
        tmp.replace(self.folder / f"epoch-{done:04d}.weights.h5")  # the commit point
        for old in self.folder.iterdir():
            if not old.name.startswith(f"epoch-{done:04d}."):
                old.unlink()


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``keras.callbacks.EarlyStopping`` that counts the epochs before a resume.

    Keras' callback starts from scratch in every ``fit``: after a resume its patience would
    restart, and a run killed and resumed could train longer than one left alone. Here the
    logged values of the earlier epochs (from the backup) are replayed first, so the
    stopping epoch is the one an uninterrupted run would reach.

    Args:
        earlier: the logs of the epochs before the resume.
        **kwargs: as for ``keras.callbacks.EarlyStopping``.
    """

    def __init__(self, earlier: dict[str, list[float]], **kwargs):
        super().__init__(**kwargs)
        self.earlier = earlier

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for epoch, value in enumerate(self.earlier.get(self.monitor, [])):
            super().on_epoch_end(epoch, {self.monitor: value})


class NanGuard(keras.callbacks.Callback):
    """Stop at the first NaN/inf loss with a message that names the cause.

    Args:
        learning_rate: the phase's learning rate, for the message.
    """

    def __init__(self, learning_rate: float):
        super().__init__()
        self.learning_rate = learning_rate

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise DivergedError(
                f"training diverged: the loss became {float(loss)} at batch {batch}. Lower "
                f"train.learning_rate (now {self.learning_rate}) or check the data; no model "
                "was written, and the previous model and the resume backup were left as "
                "they were"
            )


class EpochClockCallback(keras.callbacks.Callback):
    """Keeps an :class:`~tasks.dataset.EpochClock` at the epoch Keras is starting."""

    def __init__(self, clock: EpochClock):
        super().__init__()
        self.clock = clock

    def on_epoch_begin(self, epoch, logs=None):
        self.clock.epoch = epoch
