"""``train.distribute: mirrored``: one training on several devices (tasks/devices.py).

No GPU here: the test splits the CPU into 2 logical devices
(``tf.config.set_logical_device_configuration``), which must happen before TensorFlow
starts, so the trainings run in a child process.
"""

from __future__ import annotations

import json
import sys

import pytest

from tasks.common import StageError
from tasks.devices import for_replicas, strategy_for
from tasks.params import with_changes
from tests.conftest import PARAMS, SHRUNK, run

# Accuracy on the test split may differ by this much between 1 and 2 replicas: the same
# data and epochs, but twice the batch (half the steps) at twice the learning rate.
TOLERANCE = 0.1

CHILD = """
import json, sys
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np
from tasks.common import read_json
from tasks.dataset import Prepared
from tasks.devices import for_replicas, strategy_for
from tasks.params import TrainParams
from tasks.safety import load_model_safely
from tasks.training import TrainPaths, train

project, out = Path(sys.argv[1]), Path(sys.argv[2])
prepared = Prepared.open(project / "data" / "prepared")
figures = {}
for name, section in json.loads(sys.argv[3]).items():
    params = TrainParams.model_validate(section)
    strategy = strategy_for(params)
    with strategy.scope():  # as tasks.train.main does
        backbone = load_model_safely(project / "models" / "backbone.keras", compile=False)
        run = for_replicas(params, strategy.num_replicas_in_sync)
        paths = TrainPaths(out / name / "model.keras", out / name / "backup", out / "features")
        result = train(run, backbone, read_json(project / "models" / "backbone.json"),
                       prepared, paths, project / "models" / "backbone.keras")
    right = total = 0
    for images, labels in prepared.batches("test", 64):
        predicted = result.model.predict(images.astype(np.float32), verbose=0).argmax(axis=1)
        right, total = right + int((predicted == labels).sum()), total + len(labels)
    weights = result.model.trainable_variables[0]
    figures[name] = {
        "replicas": strategy.num_replicas_in_sync, "batch_size": run.batch_size,
        "learning_rate": run.learning_rate, "accuracy": right / total,
        "best_epoch": result.best_epoch, "variable": type(weights.value).__name__,
    }
print(json.dumps(figures))
"""


def test_mirrored_scales_the_global_batch_and_the_learning_rates_by_the_replicas():
    params = with_changes(PARAMS.train, distribute="mirrored")
    assert for_replicas(params, 1) == params
    doubled = for_replicas(params, 2)
    assert doubled.batch_size == 2 * params.batch_size
    assert doubled.learning_rate == pytest.approx(2 * params.learning_rate)
    assert doubled.fine_tune.learning_rate == pytest.approx(2 * params.fine_tune.learning_rate)
    assert doubled.epochs == params.epochs


def test_a_device_that_is_not_there_is_refused_naming_those_that_are():
    params = with_changes(PARAMS.train, distribute="mirrored", devices=["GPU:7"])
    with pytest.raises(StageError, match=r"train.devices \['GPU:7'\] not found.*CPU:0"):
        strategy_for(params)


@pytest.mark.slow
def test_mirrored_on_two_cpu_devices_trains_as_well_as_one_device(built_project, tmp_path):
    section = with_changes(PARAMS.train, **SHRUNK["train"]).model_dump(mode="json")
    runs = {
        "one": section,
        "mirrored": {**section, "distribute": "mirrored", "devices": ["CPU:0", "CPU:1"]},
    }
    done = run([sys.executable, "-c", CHILD, str(built_project), str(tmp_path), json.dumps(runs)],
               built_project)  # fmt: skip
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    one, mirrored = figures["one"], figures["mirrored"]
    assert (one["replicas"], mirrored["replicas"]) == (1, 2)
    assert mirrored["batch_size"] == 2 * one["batch_size"]
    assert mirrored["learning_rate"] == pytest.approx(2 * one["learning_rate"])
    assert mirrored["variable"].startswith("Mirrored")  # one copy per device, kept in sync
    assert one["accuracy"] > 0.5 and mirrored["accuracy"] > 0.5  # both learned (10 classes)
    assert abs(mirrored["accuracy"] - one["accuracy"]) <= TOLERANCE, figures
    assert 1 <= mirrored["best_epoch"] <= SHRUNK["train"]["epochs"]
