"""The train stage interrupted (Ctrl-C, ``kill``, killed before its first epoch) under ``dvc repro``.

Each test sends the signal from inside the stage at a given epoch (tests/faults.py), so the
interruption lands at the same point however fast the machine is. What they show:

* SIGINT and SIGTERM end the stage with one error line, no traceback, exit 130 / 143, and
  a backup the next run resumes from; the training curves then hold every epoch;
* a backup with nothing to resume does not block a run with other settings;
* a backup holding more epochs than ``train.epochs`` now asks for is discarded, not resumed
  (before: ``output 'dvclive/train/plots' does not exist``, and a model of the wrong length).

What DVC does meanwhile: it deletes a stage's outputs before running it, so after an
interrupted ``dvc repro`` ``models/model.keras`` is missing until the stage completes or
``dvc checkout`` puts the recorded one back from the cache.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import run, set_params
from tests.faults import signal_train_in_epoch

pytestmark = pytest.mark.slow
BACKUP = ".tlp/backup/train"


def copy_of(built_project: Path, tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    return project


def epochs_started(output: str) -> list[int]:
    """The epoch numbers Keras announced ("Epoch 3/6"), in order."""
    return [int(n) for n in re.findall(r"^Epoch (\d+)/\d+$", output, re.MULTILINE)]


def curve_length(project: Path) -> int:
    """Epochs in the dvclive curve of the training loss."""
    tsv = project / "dvclive/train/plots/metrics/train/loss.tsv"
    return len(tsv.read_text().splitlines()) - 1  # the header


def interrupted(project: Path, tmp_path: Path, epoch: int, signal_name: str) -> str:
    """``dvc repro`` with the train stage signalling itself in ``epoch``; its output."""
    env = signal_train_in_epoch(
        tmp_path / f"hook-{signal_name}-{epoch}", project, epoch, signal_name
    )
    result = run(["dvc", "repro"], project, check=False, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert f"FAULT INJECTION: {signal_name} in epoch {epoch}" in output
    return output


def test_ctrl_c_stops_train_cleanly_and_the_next_repro_resumes_with_whole_curves(
    built_project, tmp_path
):
    project = copy_of(built_project, tmp_path)
    set_params(project, {"train": {"epochs": 4}})

    output = interrupted(project, tmp_path, 3, "SIGINT")

    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    errors = [line for line in output.splitlines() if line.startswith("ERROR: train:")]
    assert len(errors) == 1 and "stopped by SIGINT" in errors[0], output[-3000:]
    assert "exited with 130" in output  # DVC's report of the command
    backup = project / BACKUP
    assert sorted(p.name for p in (backup / "head").iterdir()) == [
        "epoch-0002.json", "epoch-0002.weights.h5",
    ]  # fmt: skip
    assert json.loads((backup / "best-head.json").read_text())["epoch"] <= 1
    assert not (project / "models/model.keras").exists()  # DVC removed it before the run
    run(["dvc", "checkout", "models/model.keras"], project)  # the recorded one, from the cache
    assert (project / "models/model.keras").is_file()

    resumed = run(["dvc", "repro"], project)
    output = resumed.stdout + resumed.stderr
    assert "resuming from the backup of epoch 2" in output
    assert epochs_started(output) == [3, 4]
    assert json.loads((project / "models/model.json").read_text())["epochs_run"] == 4
    assert curve_length(project) == 4  # the two epochs before the interruption too
    assert not backup.exists()


def test_a_run_killed_before_its_first_epoch_ended_does_not_block_other_settings(
    built_project, tmp_path
):
    project = copy_of(built_project, tmp_path)
    set_params(project, {"train": {"epochs": 2}})

    output = interrupted(project, tmp_path, 1, "SIGTERM")

    assert "Traceback" not in output and "exited with 143" in output
    assert "ERROR: train: stopped by SIGTERM" in output
    assert sorted(p.name for p in (project / BACKUP).iterdir()) == ["fingerprint.txt"]
    set_params(project, {"train": {"learning_rate": 0.002}})  # another fingerprint
    rerun = run(["dvc", "repro"], project)  # before: "holds a backup ... other settings"
    assert "left nothing to resume" in rerun.stderr
    assert epochs_started(rerun.stdout + rerun.stderr) == [1, 2]


def test_a_backup_with_more_epochs_than_train_epochs_is_discarded_not_resumed(
    built_project, tmp_path
):
    project = copy_of(built_project, tmp_path)
    set_params(project, {"train": {"epochs": 6}})
    interrupted(project, tmp_path, 5, "SIGKILL")
    assert (project / BACKUP / "head/epoch-0004.weights.h5").is_file()

    set_params(project, {"train": {"epochs": 2}})
    rerun = run(["dvc", "repro"], project)  # before: output 'dvclive/train/plots' does not exist
    output = rerun.stdout + rerun.stderr
    assert "it holds 4 trained epochs, more than train.epochs 2" in output
    assert epochs_started(output) == [1, 2]  # trained from the start, as if never interrupted
    info = json.loads((project / "models/model.json").read_text())
    assert info["epochs_run"] == 2 and info["best_epoch"] <= 2
    assert curve_length(project) == 2
