"""The export stage's int8 model, its gate, and the model card.

The quick tests quantize tiny ONNX classifiers built here with ``onnx.helper`` (no
TensorFlow); the slow ones run the real stage on the shrunk pipeline (``built_project``):
``dvc repro`` with ``export.quantize: int8``, a calibration that breaks the gate, the card's
numbers against the metrics files, and the placeholder through ``dvc push`` / ``pull``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tasks import export, predict, quantize
from tasks.common import StageError
from tasks.export import calibration_batches
from tasks.onnx_io import cpu_session
from tasks.params import with_changes
from tests.conftest import PARAMS, SHRUNK, merged, run, write_params

SIZE = 8
CLASSES = ["red", "green", "blue"]
INT8 = with_changes(PARAMS.export, quantize="int8")


def color_model() -> onnx.ModelProto:
    """``softmax(conv1x1(pixels) averaged)``: class = the dominant colour channel.

    A Conv (quantized per channel), a Mul and a Softmax, as in the real graphs, with this
    pipeline's metadata, so ``tlp predict`` takes it.
    """
    weights = (np.eye(3, dtype=np.float32) * 0.05).reshape(3, 3, 1, 1)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Mul", ["nchw", "scale"], ["scaled"]),
            helper.make_node("Conv", ["scaled", "weights"], ["maps"]),
            helper.make_node("GlobalAveragePool", ["maps"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="softmax"),
        ],
        "colors",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(np.array(1.0, np.float32), "scale"),
            numpy_helper.from_array(weights, "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(
        model, {"classes": json.dumps(CLASSES), "image_size": json.dumps([SIZE, SIZE])}
    )
    return model


def colour_images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose dominant channel is their label (0 red, 1 green, 2 blue)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = rng.uniform(0, 120, (count, SIZE, SIZE, 3))
    images[np.arange(count), :, :, labels] += rng.uniform(40, 130, (count, 1, 1))
    return images.astype(np.float32), labels


@pytest.fixture
def float_model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(color_model(), path)
    return path


def build(float_model: Path, out: Path, calibration: np.ndarray, params=INT8) -> dict:
    images, labels = colour_images(300, seed=1)
    batches = [(images[i : i + 64], labels[i : i + 64]) for i in range(0, 300, 64)]
    chunks = (calibration[i : i + 16] for i in range(0, len(calibration), 16))
    return quantize.build_int8(float_model, out, chunks, batches, images[:8], params)


def test_int8_passes_its_gate_keeps_metadata_and_tlp_predict_runs_it(float_model, capsys):
    out = float_model.with_name("model.int8.onnx")
    result = build(float_model, out, colour_images(200)[0])

    assert set(result) >= {"top1_agreement", "accuracy", "accuracy_drop", "size_bytes", "speedup"}
    assert result["top1_agreement"] >= INT8.int8_min_agreement and result["images"] == 300
    assert result["accuracy_drop"] <= INT8.int8_max_accuracy_drop
    assert result["size_bytes"] == out.stat().st_size and result["speedup"] > 0
    proto = onnx.load(out)
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    softmax = next(node for node in proto.graph.node if node.op_type == "Softmax")
    producer = next(node for node in proto.graph.node if softmax.input[0] in node.output)
    # A float Softmax on dequantized logits writes the graph output itself: probabilities
    # are not rounded to steps of 1/256.
    assert producer.op_type == "DequantizeLinear"
    assert softmax.output[0] == proto.graph.output[0].name == "probabilities"
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == CLASSES

    red = float_model.parent / "red.png"
    Image.new("RGB", (20, 20), (240, 30, 30)).save(red)
    assert predict.main(["--model", str(out), "--json", str(red)]) == 0
    answer = json.loads(capsys.readouterr().out)["predictions"][0]
    assert answer["label"] == "red"


def test_a_calibration_that_breaks_the_model_fails_the_gate_and_leaves_no_file(float_model):
    out = float_model.with_name("model.int8.onnx")
    out.write_bytes(b"an older int8 model")  # must not outlive the failed gate
    # Calibrated on near-black images, every activation range is tiny: real pixels saturate.
    # (All-black ones would not do here: ONNX Runtime gives an empty range the scale 1.)
    dark = np.ones((32, SIZE, SIZE, 3), np.float32)

    with pytest.raises(StageError) as failure:
        build(float_model, out, dark)

    assert not out.exists() and list(out.parent.glob(".model.int8.onnx*")) == []
    message = str(failure.value)
    assert "int8 gate failed on 300 test images" in message
    agreement = float(re.search(r"agreement with the float model (\d\.\d{4})", message)[1])
    assert agreement < 0.9 and f"export.int8_min_agreement {INT8.int8_min_agreement}" in message
    assert f"export.int8_max_accuracy_drop {INT8.int8_max_accuracy_drop}" in message


def test_the_accuracy_gate_alone_can_fail(float_model):
    """One gate at a time: perfect agreement required nowhere, a drop of zero allowed."""
    strict = with_changes(INT8, int8_min_agreement=0.0, int8_max_accuracy_drop=0.0)
    dark = np.ones((32, SIZE, SIZE, 3), np.float32)
    with pytest.raises(StageError, match="over export.int8_max_accuracy_drop 0.0") as failure:
        build(float_model, float_model.with_name("int8.onnx"), dark, strict)
    assert "int8_min_agreement" not in str(failure.value)


def test_the_int8_folder_without_a_model_is_refused_by_predict_naming_the_setting(tmp_path, capsys):
    folder = tmp_path / "models" / "int8"  # as the export stage leaves it with quantize: none
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(export.NO_INT8)
    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (240, 30, 30)).save(image)

    assert predict.main(["--model", str(folder / "model.onnx"), str(image)]) == 1
    error = capsys.readouterr().err
    assert "no int8 model was built" in error and "export.quantize: int8" in error


def test_a_model_folder_with_an_empty_note_gets_the_plain_not_found_error(tmp_path, capsys):
    folder = tmp_path / "models" / "int8"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("\n")
    image = tmp_path / "red.png"
    Image.new("RGB", (8, 8), (240, 30, 30)).save(image)

    assert predict.main(["--model", str(folder / "model.onnx"), str(image)]) == 1
    assert "not found. Build it with `tlp run`" in capsys.readouterr().err


def test_accuracy_drop_is_exact_at_the_gate():
    check = quantize.Int8Check(images=100, agree=99, float_right=91, int8_right=90)
    assert check.accuracy_drop == 0.01 and check.top1_agreement == 0.99


def test_no_calibration_image_is_a_stage_error(float_model, tmp_path):
    with pytest.raises(StageError, match="no training images to calibrate"):
        quantize.quantize_int8(float_model, tmp_path / "int8.onnx", iter(()), "pixels")


def test_timing_alternates_and_reports_both_medians(float_model):
    session = cpu_session(float_model)
    speed = quantize.time_models(session, session, colour_images(5)[0], batch=4, repeats=3)
    assert speed.batch == 4 and speed.float_seconds > 0 and speed.int8_seconds > 0
    assert speed.speedup == speed.float_seconds / speed.int8_seconds


def test_calibration_images_are_spread_over_every_class(tmp_path):
    from tasks.dataset import Prepared
    from tasks.prepare import prepare

    colours = {"a": (250, 0, 0), "b": (0, 250, 0), "c": (0, 0, 250)}
    for name, rgb in colours.items():
        for index in range(12):
            folder = tmp_path / "raw" / "images" / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), rgb).save(folder / f"{index:02d}.png")
    params = with_changes(PARAMS.prepare, image_size=[8, 8], val_fraction=0.0, workers=1)
    prepare(params, tmp_path / "raw", tmp_path / "prepared")
    prepared = Prepared.open(tmp_path / "prepared")

    batches = list(calibration_batches(prepared, 6))
    images = np.concatenate(batches)
    assert len(images) == 6 and all(len(b) <= 16 for b in batches)
    assert {int(image[0, 0].argmax()) for image in images} == {0, 1, 2}
    assert len(np.concatenate(list(calibration_batches(prepared, 10_000)))) == prepared.count(
        "train"
    )


# ---------------------------------------------------------------- the real stage


def card_tables(card: str) -> dict[str, str]:
    """``| name | value |`` rows of the card, by name (first occurrence)."""
    rows: dict[str, str] = {}
    for line in card.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2:
            rows.setdefault(cells[0], cells[1])
    return rows


def assert_card_matches_metrics(project: Path) -> dict[str, str]:
    card = (project / "models/MODEL_CARD.md").read_text()
    rows = card_tables(card)
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    export = json.loads((project / "metrics/export.json").read_text())
    info = json.loads((project / "models/model.json").read_text())
    report = json.loads((project / "data/prepared/report.json").read_text())
    for key in ("accuracy", "macro_f1", "quality.baseline_accuracy", "macro_recall"):
        section, _, name = key.rpartition(".")
        value = evaluation[section][name] if section else evaluation[key]
        assert float(rows[key]) == round(value, 4), key
    assert int(rows["test_images"]) == evaluation["test_images"]
    assert float(rows["ONNX top-1 agreement with Keras"]) == round(export["top1_agreement"], 4)
    assert int(rows["ONNX bytes"]) == export["onnx_bytes"]
    assert rows["backbone"] == info["backbone"]["arch"] and int(rows["images"]) == report["images"]
    assert int(rows["test images"]) == sum(c["test"] for c in report["counts"].values())
    assert ", ".join(f"`{c}`" for c in info["classes"]) in card
    per_class = (project / "plots/per_class.csv").read_text().splitlines()[1:]
    for line in per_class:
        name, precision, recall, f1, support = line.split(",")
        counts = report["counts"][name]
        row = f"| {name} | " + " | ".join(str(counts[s]) for s in ("train", "val", "test"))
        scores = " | ".join(f"{float(v):.4f}" for v in (precision, recall, f1))
        assert f"{row} | {scores} |" in card
    return rows


@pytest.mark.slow
def test_model_card_numbers_are_those_of_the_metrics_files(built_project):
    rows = assert_card_matches_metrics(built_project)
    assert (
        "No int8 model (`export.quantize: none`"
        in (built_project / "models/MODEL_CARD.md").read_text()
    )
    assert "top-1 agreement with float" not in rows
    assert [p.name for p in (built_project / "models/int8").iterdir()] == ["README.md"]


@pytest.mark.slow
def test_int8_through_dvc_repro_predict_status_push_and_pull(built_project, tmp_path, capsys):
    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump(merged(yaml.safe_load(params.read_text()),
                                            {"export": {"quantize": "int8"}}), sort_keys=False))  # fmt: skip

    repro = run(["dvc", "repro"], project)
    assert sorted(re.findall(r"Running stage '(\w+)'", repro.stdout)) == ["export", "export_other"]
    int8 = json.loads((project / "metrics/export.json").read_text())["int8"]
    assert int8["top1_agreement"] >= PARAMS.export.int8_min_agreement
    assert int8["accuracy_drop"] <= PARAMS.export.int8_max_accuracy_drop
    model = project / "models/int8/model.onnx"
    assert int8["size_bytes"] == model.stat().st_size > 0
    rows = assert_card_matches_metrics(project)
    assert float(rows["top-1 agreement with float"]) == round(int8["top1_agreement"], 4)
    assert float(rows["test accuracy"]) == round(int8["accuracy"], 4)
    assert float(rows["accuracy drop"]) == round(int8["accuracy_drop"], 4)
    assert int(rows["bytes"]) == int8["size_bytes"]
    assert (
        "tlp predict --model models/int8/model.onnx"
        in (project / "models/MODEL_CARD.md").read_text()
    )

    images = sorted((project / "data/raw/images").glob("*/*.png"))[::60]
    answers = {}
    for name in ("model.onnx", "int8/model.onnx"):
        found = run([sys.executable, "-m", "tasks.predict", "--model", f"models/{name}", "--json",
                     *map(str, images)], project)  # fmt: skip
        answers[name] = [p["label"] for p in json.loads(found.stdout)["predictions"]]
    assert len(answers["model.onnx"]) == len(images) >= 20
    agree = np.mean(np.array(answers["model.onnx"]) == np.array(answers["int8/model.onnx"]))
    assert agree >= 0.9

    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], project)
    run(["dvc", "push"], project)
    written = model.read_bytes()
    shutil.rmtree(project / "models")
    shutil.rmtree(project / ".dvc/cache")
    run(["dvc", "pull"], project)
    assert model.read_bytes() == written
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}

    # Back to none: the folder with its note is an output like any other, through push and pull.
    write_params(params, {**SHRUNK, "export": {**SHRUNK["export"], "quantize": "none"}})
    repro = run(["dvc", "repro"], project)
    assert "is empty" not in repro.stdout + repro.stderr
    note = model.with_name("README.md")
    assert not model.exists() and "export.quantize: int8" in note.read_text()
    run(["dvc", "push"], project)
    shutil.rmtree(model.parent)
    run(["dvc", "pull"], project)
    assert not model.exists() and note.is_file()
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    failed = run([sys.executable, "-m", "tasks.predict", "--model", str(model), str(images[0])],
                 project, check=False)  # fmt: skip
    assert failed.returncode == 1 and "export.quantize: int8" in failed.stderr


@pytest.mark.slow
def test_a_failed_int8_gate_fails_the_stage_and_leaves_neither_model(built_project, tmp_path):
    """The real stage, calibrated on a train split made black: the gate must refuse it."""
    prepared = tmp_path / "prepared"
    shutil.copytree(built_project / "data/prepared", prepared)
    for shard in (prepared / "shards").glob("train-*.npy"):
        np.save(shard, np.zeros_like(np.load(shard)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "int8").mkdir()
    (out / "int8/model.onnx").write_bytes(b"an older int8 model")
    params = write_params(tmp_path / "params.yaml", {**SHRUNK, "export": {**SHRUNK["export"],
                          "quantize": "int8"}})  # fmt: skip
    result_file = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "tasks.export", "--params", params, "--data", prepared,
        "--model", built_project / "models/model.keras",
        "--info", built_project / "models/model.json",
        "--out", out / "model.onnx", "--int8-out", out / "int8",
        "--metrics", out / "export.json", "--card", out / "MODEL_CARD.md",
        "--eval-metrics", built_project / "metrics/eval.json",
        "--per-class", built_project / "plots/per_class.csv",
        "--source", built_project / "data/raw/source.json",
    ]  # fmt: skip
    env = {"TLP_STAGE_RESULT": str(result_file), "PYTHONPATH": os.getcwd()}
    failed = run([str(c) for c in command], built_project, check=False, env=env)

    assert failed.returncode == 1
    outcome = json.loads(result_file.read_text())  # the runner reports this, once
    assert outcome["exit_code"] == 1
    assert sorted(p.name for p in out.iterdir()) == []  # no int8, no float model, no card
    assert re.search(
        r"int8 gate failed on \d+ test images: top-1 agreement with the float model "
        r"0\.\d{4} is under export\.int8_min_agreement 0\.98",
        outcome["error"],
    ), outcome
    assert "int8 gate failed" not in failed.stderr  # not printed a second time
