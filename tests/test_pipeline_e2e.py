"""The whole pipeline through ``dvc repro`` in a temporary copy of the repo."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from flows import reports
from tests.conftest import make_project, run, set_params
from tests.prefect_server import STAGES


def ran_stages(output: str) -> list[str]:
    """Stage names that ``dvc repro`` actually ran (not skipped)."""
    return re.findall(r"Running stage '([a-z_]+)'", output)


def onnx_keras_agreement(project):
    """Top-1 agreement and max |diff| between models/model.onnx and models/model.keras."""
    code = """
import json, numpy as np, onnxruntime as ort
from tasks.dataset import Prepared
from tasks.safety import load_model_safely
images, labels = Prepared.open('data/prepared').load('test')
session = ort.InferenceSession('models/model.onnx', providers=['CPUExecutionProvider'])
onnx_p = session.run(None, {'pixels': images.astype('float32')})[0]
keras_p = load_model_safely('models/model.keras', compile=False).predict(images.astype('float32'), verbose=0)
meta = session.get_modelmeta().custom_metadata_map
print(json.dumps({'agree': float((onnx_p.argmax(1) == keras_p.argmax(1)).mean()),
                  'diff': float(np.abs(onnx_p - keras_p).max()),
                  'acc': float((onnx_p.argmax(1) == labels).mean()),
                  'classes': json.loads(meta['classes'])}))
"""
    return json.loads(run(["python", "-c", code], project).stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_default_pipeline_accuracy_caching_and_partial_rerun(tmp_path):
    project = make_project(tmp_path / "project")  # the shipped defaults, unshrunk

    first = run(["dvc", "repro"], project)
    assert ran_stages(first.stdout) == STAGES

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert metrics["accuracy"] >= 0.95, metrics
    # The quality guards' figures, and the pictures a person looks at (issue: results you
    # can trust): explanations and errors are real pictures, not blanks.
    quality = metrics["quality"]
    assert quality["baseline_accuracy"] < 0.2 and quality["prediction_majority_share"] < 0.2
    assert set(reports.per_class_scores(project / "plots/per_class.csv")) == {
        str(d) for d in range(10)
    }
    for name in ("confusion_matrix.png", "explain.png", "errors.png"):
        picture = np.asarray(Image.open(project / "plots" / name).convert("L"))
        assert picture.shape[0] >= 250 and picture.std() > 20, name  # a row of tiles at least

    parity = onnx_keras_agreement(project)
    assert parity["agree"] == 1.0 and parity["diff"] < 1e-4
    assert parity["acc"] == pytest.approx(metrics["accuracy"])
    assert parity["classes"] == [str(d) for d in range(10)]

    second = run(["dvc", "repro"], project)
    assert ran_stages(second.stdout) == []
    status = run(["dvc", "status"], project)
    assert "up to date" in status.stdout

    set_params(project, {"train": {"epochs": 2}})
    third = run(["dvc", "repro"], project)
    assert sorted(ran_stages(third.stdout)) == ["evaluate", "export", "train", "train_other"]
    assert json.loads((project / "models/model.json").read_text())["epochs_run"] == 2


@pytest.mark.slow
def test_shrunk_pipeline_outputs(built_project):
    project = built_project
    prepared = project / "data/prepared"
    report = json.loads((prepared / "report.json").read_text())
    assert report["images"] == 1797 and report["rejected"] == 0
    assert sorted(p.name for p in (prepared / "shards").iterdir()) == [
        "test-00000.npy",
        "train-00000.npy",
        "val-00000.npy",
    ]
    shard = np.load(prepared / "shards/train-00000.npy")
    assert shard.dtype == np.uint8 and shard.shape[1:] == (16, 16, 3)

    info = json.loads((project / "models/model.json").read_text())
    assert info["classes"] == [str(d) for d in range(10)]
    assert info["backbone"]["arch"] == "simple_cnn" and info["epochs_run"] == 3
    export = json.loads((project / "metrics/export.json").read_text())
    assert export["top1_agreement"] == 1.0 and export["max_abs_diff"] < 1e-4
    plots_dir = project / "dvclive/train/plots/metrics"
    plots = {str(p.relative_to(plots_dir)) for p in plots_dir.glob("**/*.tsv")}
    assert plots >= {"train/loss.tsv", "eval/loss.tsv", "train/accuracy.tsv", "eval/accuracy.tsv"}
    assert len((plots_dir / "train/loss.tsv").read_text().splitlines()) == 1 + 3  # header + epochs
    shown = run(["dvc", "metrics", "show", "--json"], project)
    assert "accuracy" in shown.stdout
