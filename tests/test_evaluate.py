"""The evaluate stage: metrics that mean something, a guard against useless models, Grad-CAM."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from dvc.utils.flatten import flatten
from PIL import Image

from tasks.evaluate import compute_metrics, quality_problems
from tasks.params import with_changes
from tests.conftest import PARAMS, SHRUNK, make_project, run, set_params

CLASSES = ["cat", "dog"]


def one_hot(predicted: list[int], n_classes: int, confidence: float = 0.9) -> np.ndarray:
    rest = (1 - confidence) / (n_classes - 1)
    probabilities = np.full((len(predicted), n_classes), rest)
    probabilities[np.arange(len(predicted)), predicted] = confidence
    return probabilities


# ---------------------------------------------------------------- metrics (pure)


def test_metrics_lead_with_test_accuracy_and_macro_f1_and_report_the_baseline():
    y_true = np.array([0] * 6 + [1] * 3 + [2] * 1)
    predicted = [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]
    evaluation = compute_metrics(one_hot(predicted, 3), y_true, ["a", "b", "c"], top_k=2)
    m = evaluation.metrics
    assert list(m)[:2] == ["accuracy", "macro_f1"]  # the columns dvc exp show leads with
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["quality"]["baseline_accuracy"] == pytest.approx(0.6)  # always answering "a"
    assert m["quality"]["lift"] == pytest.approx(0.8 / 0.6)
    assert m["quality"]["prediction_majority_share"] == pytest.approx(0.5)  # five "b" of ten
    # `dvc metrics show` sorts the (dotted) names: none may come before the two that lead.
    assert sorted(flatten(m))[:2] == ["accuracy", "macro_f1"]  # flatten: DVC's dotted names
    assert "top_2_accuracy" in m and m["test_images"] == 10
    assert evaluation.per_class["b"] == {"precision": 0.6, "recall": 1.0, "f1": 0.75, "support": 3}
    assert "per_class" not in m  # per-class figures live in their own file


def test_top_k_accuracy_only_when_k_is_below_the_number_of_classes():
    y_true = np.array([0, 1, 0, 1])
    m = compute_metrics(one_hot([0, 1, 1, 1], 2), y_true, CLASSES, top_k=3).metrics
    assert not any(key.startswith("top_") for key in m)  # top-2 of 2 classes is always 1.0


def guards(**changes):
    return with_changes(PARAMS.evaluate, **changes)


def test_a_model_that_answers_one_class_is_named_a_collapse():
    """The report that started this: 2 balanced classes, every test image called 'cat'."""
    y_true = np.array([0] * 51 + [1] * 49)
    evaluation = compute_metrics(one_hot([0] * 100, 2), y_true, CLASSES, top_k=3)
    problems = quality_problems(evaluation, CLASSES, guards())
    assert len(problems) == 2
    assert "collapsed onto one class: 100% of the test predictions are 'cat'" in problems[0]
    assert "which is 51% of the test images" in problems[0]
    assert "0.510 is no better than the baseline 0.510" in problems[1]


def test_a_good_model_on_truly_imbalanced_data_passes():
    y_true = np.array([0] * 95 + [1] * 5)
    predicted = [0] * 95 + [1] * 3 + [0] * 2  # 97 % "cat", as the data says
    evaluation = compute_metrics(one_hot(predicted, 2), y_true, CLASSES, top_k=3)
    assert quality_problems(evaluation, CLASSES, guards()) == []


def test_optional_gates_name_the_param():
    y_true = np.array([0, 1] * 10)
    predicted = [0, 1] * 8 + [1, 0] * 2  # accuracy 0.8
    evaluation = compute_metrics(one_hot(predicted, 2), y_true, CLASSES, top_k=3)
    assert quality_problems(evaluation, CLASSES, guards(min_accuracy=0.8)) == []
    problems = quality_problems(evaluation, CLASSES, guards(min_accuracy=0.9, min_macro_f1=0.85))
    assert problems == [
        "test accuracy 0.800 is under evaluate.min_accuracy 0.9",
        "test macro F1 0.800 is under evaluate.min_macro_f1 0.85",
    ]


# ---------------------------------------------------------------- the stage, through DVC


def collapse(model_file: Path, favourite: int) -> None:
    """Rewrite a trained model so that it answers ``favourite`` for every image."""
    from tasks.safety import load_model_safely

    model = load_model_safely(model_file, compile=False)
    layer = model.get_layer("probabilities")
    kernel, bias = layer.get_weights()
    bias = np.zeros_like(bias)
    bias[favourite] = 50.0
    layer.set_weights([np.zeros_like(kernel), bias])
    model.save(model_file)


@pytest.mark.slow
def test_a_collapsed_model_fails_the_pipeline_naming_the_collapse(built_project, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    lock_before = (project / "dvc.lock").read_bytes()
    collapse(project / "models/model.keras", favourite=3)

    failed = run(["dvc", "repro", "--single-item", "evaluate"], project, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("ERROR: evaluate:")]
    assert len(errors) == 1, output[-3000:]
    assert "the model collapsed onto one class: 100% of the test predictions are '3'" in errors[0]
    assert "no better than the baseline" in errors[0]
    assert "evaluate.allow_weak: true" in errors[0]  # the way out, named
    assert (project / "dvc.lock").read_bytes() == lock_before

    set_params(project, {"evaluate": {"allow_weak": True}})
    weak = run(["dvc", "repro", "--single-item", "evaluate"], project)
    assert "WEAK MODEL" in weak.stdout + weak.stderr
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert metrics["quality"]["prediction_majority_share"] == 1.0
    assert any("collapsed" in warning for warning in metrics["warnings"])


@pytest.mark.slow
def test_evaluate_writes_per_class_figures_and_pictures(built_project):
    metrics = json.loads((built_project / "metrics/eval.json").read_text())
    assert {"baseline_accuracy", "prediction_majority_share", "lift"} <= set(metrics["quality"])
    with (built_project / "plots/per_class.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == [str(d) for d in range(10)]
    assert sum(int(row["support"]) for row in rows) == metrics["test_images"]
    for name in ("explain.png", "errors.png", "confusion_matrix.png"):
        picture = np.asarray(Image.open(built_project / "plots" / name).convert("L"))
        assert picture.shape[0] > 300 and picture.std() > 20, name  # a picture, not a blank
    lock = yaml.safe_load((built_project / "dvc.lock").read_text())
    outs = {out["path"] for out in lock["stages"]["evaluate"]["outs"]}
    assert {"plots/explain.png", "plots/errors.png", "plots/per_class.csv"} <= outs


# ---------------------------------------------------------------- Grad-CAM looks where it should

PATCH = 8
SIZE = 32


def patch_images(folder: Path, per_class: int, seed: int) -> None:
    """Four classes, each a bright 8x8 patch somewhere inside its own quadrant, on noise."""
    rng = np.random.default_rng(seed)
    for name, (qy, qx) in {"tl": (0, 0), "tr": (0, 1), "bl": (1, 0), "br": (1, 1)}.items():
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            image = rng.integers(0, 90, (SIZE, SIZE, 3), dtype=np.uint8)
            y = qy * SIZE // 2 + int(rng.integers(0, SIZE // 2 - PATCH + 1))
            x = qx * SIZE // 2 + int(rng.integers(0, SIZE // 2 - PATCH + 1))
            image[y : y + PATCH, x : x + PATCH] = 255
            Image.fromarray(image).save(folder / name / f"{index:03d}.png")


def patch_box(image: np.ndarray) -> tuple[int, int]:
    """Top-left corner of the bright patch (the only pixels above the noise's range)."""
    ys, xs = np.nonzero(image.min(axis=-1) == 255)
    return int(ys.min()), int(xs.min())


@pytest.mark.slow
def test_grad_cam_peaks_on_the_patch_that_decides_the_class(tmp_path):
    from tasks.dataset import Prepared
    from tasks.explain import gradcam
    from tasks.safety import load_model_safely

    source = tmp_path / "patches"
    patch_images(source, per_class=80, seed=0)
    project = make_project(tmp_path / "project", SHRUNK)
    set_params(project, {
        "fetch": {"source": str(source)},
        "prepare": {"image_size": [SIZE, SIZE]},
        # A small hidden layer: with the flattened map straight into the classifier (the
        # default, dense_units 0) Grad-CAM's channel weights average away where things are.
        "train": {"epochs": 8, "dense_units": 8},
    })  # fmt: skip
    run(["dvc", "repro", "train"], project)

    prepared = Prepared.open(project / "data/prepared")
    images, labels = prepared.load("test")
    model = load_model_safely(project / "models/model.keras", compile=False)
    explained = gradcam(model, images)
    correct = explained.probabilities.argmax(axis=1) == labels
    assert correct.mean() > 0.8  # the model learned the rule

    hits = []
    for image, heatmap in zip(images[correct], explained.heatmaps[correct], strict=True):
        y, x = patch_box(image)
        peak_y, peak_x = np.unravel_index(int(heatmap.argmax()), heatmap.shape)
        hits.append(y - 2 <= peak_y < y + PATCH + 2 and x - 2 <= peak_x < x + PATCH + 2)
    assert np.mean(hits) >= 0.8, f"peak on the patch for {np.mean(hits):.0%} of the images"


@pytest.mark.slow
def test_tlp_explain_writes_an_overlay_for_a_file_and_a_folder(built_project, tmp_path):
    raw = built_project / "data/raw/images"
    folder = tmp_path / "digits"
    shutil.copytree(raw / "7", folder)
    single = next(iter(sorted((raw / "3").iterdir())))
    out = tmp_path / "out"

    result = run(
        ["tlp", "explain", str(single), str(folder), "--out", str(out),
         "--model", str(built_project / "models/model.keras")],
        built_project,
    )  # fmt: skip

    written = sorted(out.glob("*.explain.png"))
    assert len(written) == 1 + len(list(folder.iterdir()))
    assert (out / f"{single.stem}.explain.png") in written
    picture = np.asarray(Image.open(written[0]).convert("RGB"))
    assert picture.shape[0] > 150 and picture.std() > 20
    lines = [line for line in result.stdout.splitlines() if "->" in line]
    assert len(lines) == len(written)
    assert all(" (" in line and "%)" in line for line in lines)  # label and confidence
