"""The train stage's resume backup: what a killed run picks up from, and what guards it.

The folder (``--backup``, ``.tlp/backup/train`` in dvc.yaml)::

    fingerprint.txt                 settings, backbone and data the backup belongs to
    best-<phase>.json               {best, epoch, file}: the best value and its checkpoint
    best-<phase>-e<epoch>.keras     that checkpoint
    <phase>/epoch-<n>.weights.h5    weights + optimizer after n complete epochs
    <phase>/epoch-<n>.json          the logs of those n epochs, the random-generator states
    <phase>.done.json               the phase finished (a rerun skips it), its logs and budget
    diverged.txt                    the run diverged: a rerun with other settings discards it

The callbacks of :mod:`tasks.callbacks` write the best and epoch files during ``fit``;
this module reads them back (:func:`restore_backup`) and refuses a backup that another
run's settings, backbone or data made (:func:`check_backup`), so two trainings never mix.
The train stage deletes the folder once its model is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from tasks.common import StageError, atomic_path, log, model_digest, read_json
from tasks.dataset import Prepared
from tasks.params import TrainParams

DIVERGED_MARK = "diverged.txt"


def fingerprint(params: TrainParams, backbone_file: Path, prepared: Prepared) -> str:
    """What a resume must match: everything but the epoch budget and patience."""
    settings = params.model_dump(exclude={"epochs", "early_stopping_patience"})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(model_digest(backbone_file))
    digest.update(json.dumps(prepared.classes).encode())
    digest.update(prepared.digest())
    return digest.hexdigest()


def budget(params: TrainParams) -> dict[str, int]:
    """What a resume may change, but a finished phase must match: epochs and patience."""
    return {"epochs": params.epochs, "early_stopping_patience": params.early_stopping_patience}


def check_backup(
    backup: Path, run_fingerprint: str, run_budget: dict[str, int] | None = None
) -> None:
    """Refuse a backup made with other settings; stamp the folder with this run's fingerprint.

    Three kinds of backup are discarded instead, with a log line, since resuming them could
    not give what this run asks for: one with nothing to resume (the run was killed before
    its first epoch ended), one of a run that diverged (its settings must change anyway,
    usually the learning rate), and one that went past this run's budget (more epochs
    done than ``train.epochs``, or a finished phase run with another epoch budget or
    patience; :func:`budget`). A resume with more epochs simply goes on.

    Args:
        backup: the backup folder.
        run_fingerprint: this run's :func:`fingerprint`.
        run_budget: this run's :func:`budget`; ``None`` skips that check.

    Raises:
        StageError: ``backup`` holds the backup of a run with another fingerprint.
    """
    stamp = backup / "fingerprint.txt"
    if backup.exists() and any(backup.iterdir()):
        same = stamp.exists() and stamp.read_text().strip() == run_fingerprint
        past_budget = _past_budget(backup, run_budget) if same else None
        if not _has_progress(backup):
            log.info("discarding %s: the interrupted run left nothing to resume", backup)
            shutil.rmtree(backup)
        elif not same and (backup / DIVERGED_MARK).exists():
            log.warning("discarding the backup of a run that diverged, in %s", backup)
            shutil.rmtree(backup)
        elif not same:
            raise StageError(
                f"{backup} holds a backup of an interrupted run made with other settings "
                "(learning rate, backbone, classes or data changed). Resuming would mix two "
                f"trainings; delete it to start over (rm -rf {backup}) or restore the "
                "settings to resume"
            )
        elif past_budget:
            log.warning(
                "discarding the backup in %s: %s; training starts over", backup, past_budget
            )
            shutil.rmtree(backup)
        else:
            log.info("resuming the interrupted run from its backup in %s", backup)
    backup.mkdir(parents=True, exist_ok=True)
    with atomic_path(stamp) as tmp:  # a kill mid-write must not leave a stamp that mismatches
        tmp.write_text(run_fingerprint + "\n")


def _has_progress(backup: Path) -> bool:
    """Whether ``backup`` holds a best checkpoint, a finished phase or an epoch backup."""
    return (
        any(backup.glob("best-*.json"))
        or any(backup.glob("*.done.json"))
        or any(latest_backup(folder)[0] for folder in backup.iterdir() if folder.is_dir())
    )


def _past_budget(backup: Path, run_budget: dict[str, int] | None) -> str | None:
    """Why the backup cannot give this run's model, or ``None`` when it can."""
    if run_budget is None:
        return None
    for done in sorted(backup.glob("*.done.json")):
        if read_json(done).get("budget") != run_budget:
            return (
                f"its {done.name.removesuffix('.done.json')} phase finished with "
                f"{read_json(done).get('budget')}, this run asks for {run_budget}"
            )
    epochs = latest_backup(backup / "head")[0]
    if epochs > run_budget["epochs"]:
        return f"it holds {epochs} trained epochs, more than train.epochs {run_budget['epochs']}"
    return None


def mark_diverged(backup: Path) -> None:
    """Mark the backup as coming from a diverged run (see :func:`check_backup`)."""
    backup.mkdir(parents=True, exist_ok=True)
    (backup / DIVERGED_MARK).write_text("this run diverged (NaN/inf loss)\n")


def latest_backup(folder: Path) -> tuple[int, Path | None]:
    """The newest complete epoch backup in ``folder``: ``(epochs completed, weights file)``.

    A backup file gets its final name only once fully written (see
    :class:`tasks.callbacks.EpochBackup`), so a run killed mid-write leaves at worst a
    hidden temporary file, which is ignored.
    """
    best: tuple[int, Path | None] = (0, None)
    if folder.is_dir():
        for file in folder.glob("epoch-*.weights.h5"):
            number = file.name.removeprefix("epoch-").removesuffix(".weights.h5")
            if number.isdigit() and int(number) > best[0]:
                best = (int(number), file)
    return best


def restore_backup(model, folder: Path) -> tuple[int, dict[str, list[float]]]:
    """Load the newest epoch backup of ``folder`` into ``model`` (compiled).

    Returns:
        ``(epochs completed, logs of those epochs)``; ``(0, {})`` when there is no backup.

    Raises:
        StageError: the backup file cannot be loaded into this model.
    """
    done, weights = latest_backup(folder)
    if weights is None:
        return 0, {}
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # so its state can be loaded too
    try:
        model.load_weights(weights)
    except (OSError, ValueError) as exc:
        raise StageError(
            f"the resume backup {weights} cannot be loaded ({exc}); delete {folder.parent} to "
            "start the training over"
        ) from None
    state = read_json(weights.with_name(f"epoch-{done:04d}.json"))
    variables = rng_states(model)
    if len(variables) == len(state["rng_states"]):
        for variable, value in zip(variables, state["rng_states"], strict=True):
            variable.assign(np.asarray(value, dtype=variable.dtype))
    log.info("resuming from the backup of epoch %d in %s", done, folder)
    return done, state["history"]


def rng_states(model) -> list:
    """The model's random-generator states (e.g. Dropout's): variables, but not weights.

    ``save_weights`` leaves them out; restoring them too makes a resumed run draw the same
    dropout masks as an uninterrupted one, so it ends with the same weights.
    """
    weight_ids = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weight_ids]
