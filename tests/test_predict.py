"""``tlp predict`` (tasks/predict.py): ONNX Runtime only, matching ``evaluate``.

Most tests use tiny linear ONNX models built here with ``onnx.helper`` (no TensorFlow, a
fraction of a second each); one slow test runs against the model of the real shrunk
pipeline (``built_project``) and checks that predict agrees with the Keras model.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tasks import imaging, predict
from tasks.params import with_changes
from tests.conftest import PARAMS, ROOT, run
from tests.peakmemory import run_measured

COLORS = ["red", "green", "blue"]
COLORS_RGB = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
SIZE = (8, 8)  # height, width of the tiny models


def linear_model(weights: np.ndarray, classes: list[str], image_size=SIZE, metadata=None):
    """``softmax(flatten(pixels) @ weights)``: a real ONNX classifier with our metadata."""
    height, width = image_size
    features = height * width * 3
    assert weights.shape == (features, len(classes))
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["pixels", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", height, width, 3])],
        [
            helper.make_tensor_value_info(
                "probabilities", TensorProto.FLOAT, ["batch", len(classes)]
            )
        ],
        initializer=[
            numpy_helper.from_array(np.array([-1, features], np.int64), "shape"),
            numpy_helper.from_array(weights.astype(np.float32), "weights"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    props = {"classes": json.dumps(classes), "image_size": json.dumps(list(image_size))}
    props.update(metadata or {})
    helper.set_model_props(model, props)
    return model


def color_model() -> onnx.ModelProto:
    """Class = the dominant colour channel (logit = 0.05 x that channel's mean)."""
    weights = np.zeros((*SIZE, 3, 3), np.float32)
    for channel in range(3):
        weights[:, :, channel, channel] = 0.05 / (SIZE[0] * SIZE[1])
    return linear_model(weights.reshape(-1, 3), COLORS)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def solid(path: Path, rgb: tuple[int, int, int], size=(20, 14), **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, **save_kwargs)
    return path


def run_predict(args: list[str], capsys) -> tuple[int, str, str]:
    code = predict.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return save(color_model(), tmp_path / "models" / "model.onnx")


def test_json_top_k_labels_and_probabilities(tmp_path, model_file, capsys):
    red = solid(tmp_path / "images" / "red.png", (250, 10, 10))
    blue = solid(tmp_path / "images" / "blue.jpg", (5, 5, 240), quality=95)
    code, out, err = run_predict(
        ["--model", model_file, "--json", "--top-k", "2", red, blue], capsys
    )
    assert code == 0, err
    document = json.loads(out)
    assert document["classes"] == COLORS and document["image_size"] == [8, 8]
    assert document["errors"] == []
    by_path = {p["path"]: p for p in document["predictions"]}
    assert by_path[str(red)]["label"] == "red" and by_path[str(blue)]["label"] == "blue"
    for prediction in document["predictions"]:
        ranked = prediction["top_k"]
        assert len(ranked) == 2
        assert ranked[0]["probability"] >= ranked[1]["probability"]
        assert prediction["top_probability"] == pytest.approx(ranked[0]["probability"])
        assert prediction["top_label"] == prediction["label"] == ranked[0]["label"]
        assert prediction["below_min_confidence"] is False
    # logits 0.05 x (250, 10, 10): the softmax the model must produce
    expected = np.exp([12.5, 0.5, 0.5]) / np.exp([12.5, 0.5, 0.5]).sum()
    assert by_path[str(red)]["top_probability"] == pytest.approx(expected[0], abs=1e-4)


def test_top_k_is_capped_at_the_number_of_classes_and_text_output(tmp_path, model_file, capsys):
    image = solid(tmp_path / "g.png", (0, 200, 0))
    code, out, _ = run_predict(["--model", model_file, "--top-k", "10", image], capsys)
    assert code == 0
    line = out.strip()
    assert line.startswith(f"{image}: green (")
    assert all(color in line for color in COLORS)


def test_min_confidence_answers_other_and_says_whose_probability_is_shown(
    tmp_path, model_file, capsys
):
    gray = solid(tmp_path / "gray.png", (128, 128, 128))  # every class at 1/3
    red = solid(tmp_path / "red.png", (255, 0, 0))
    args = ["--model", model_file, "--min-confidence", "0.5", gray, red]
    code, out, _ = run_predict([*args, "--json"], capsys)
    assert code == 0
    labels = {p["path"]: p for p in json.loads(out)["predictions"]}
    other = labels[str(gray)]
    assert other["label"] == "other" and other["below_min_confidence"] is True
    # the probability shown is the best class's, and that class is named beside it
    assert other["top_label"] == other["top_k"][0]["label"] in COLORS
    assert other["top_probability"] == pytest.approx(1 / 3, abs=1e-5)
    assert labels[str(red)]["label"] == labels[str(red)]["top_label"] == "red"
    assert labels[str(red)]["below_min_confidence"] is False

    code, out, _ = run_predict(args, capsys)
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    top = other["top_label"]
    assert lines[str(gray)].startswith(
        f"other (best class {top} 0.333, under --min-confidence 0.5)  [{top} 0.333, "
    )
    assert lines[str(red)].startswith("red (")


def test_bad_min_confidence_is_a_usage_error(tmp_path, model_file, capsys):
    code, _, err = run_predict(["--model", model_file, "--min-confidence", "1.5", "x.png"], capsys)
    assert code == 2 and "between 0 and 1" in err


def test_folder_is_searched_recursively_in_sorted_order(tmp_path, model_file, capsys):
    folder = tmp_path / "photos"
    solid(folder / "b" / "2.png", (0, 0, 255))
    solid(folder / "a" / "1.PNG", (255, 0, 0))
    solid(folder / ".hidden" / "3.png", (0, 255, 0))
    solid(folder / ".4.png", (0, 255, 0))
    (folder / "notes.txt").write_text("not an image")
    code, out, _ = run_predict(["--model", model_file, "--json", folder], capsys)
    assert code == 0
    predictions = json.loads(out)["predictions"]
    assert [Path(p["path"]).relative_to(folder).as_posix() for p in predictions] == [
        "a/1.PNG",
        "b/2.png",
    ]
    assert [p["label"] for p in predictions] == ["red", "blue"]


def test_exif_orientation_and_mode_conversion_follow_prepare(tmp_path, capsys):
    """A photo stored upside down with an EXIF 'rotate 180' tag is seen upright, as in prepare."""
    height, width = SIZE
    weights = np.zeros((height, width, 3, 2), np.float32)
    weights[: height // 2, :, 0, 0] = 0.1 / (height * width / 2)  # red in the top half
    weights[height // 2 :, :, 0, 1] = 0.1 / (height * width / 2)  # red in the bottom half
    model_file = save(
        linear_model(weights.reshape(-1, 2), ["red_top", "red_bottom"]), tmp_path / "m.onnx"
    )

    stored = np.zeros((40, 30, 3), np.uint8)
    stored[20:, :, 0] = 255  # red at the bottom of the stored pixels...
    exif = Image.Exif()
    exif[0x0112] = 3  # ...but Orientation 3 = rotated 180 degrees: upright, red is on top
    rotated = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(rotated, exif=exif, quality=95)
    plain = tmp_path / "plain.jpg"
    Image.fromarray(stored).save(plain, quality=95)
    palette = tmp_path / "palette.png"  # 'P' mode with red on top: converted to RGB first
    Image.fromarray(stored[::-1].copy()).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)

    code, out, _ = run_predict(["--model", model_file, "--json", rotated, plain, palette], capsys)
    assert code == 0
    labels = {Path(p["path"]).name: p["label"] for p in json.loads(out)["predictions"]}
    assert labels == {"rotated.jpg": "red_top", "plain.jpg": "red_bottom", "palette.png": "red_top"}


def test_pixels_are_exactly_those_of_prepare_decode(tmp_path):
    from tasks.prepare import Item, decode

    exif = Image.Exif()
    exif[0x0112] = 6
    image = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), np.uint8)).save(image, exif=exif)
    pixels, reason = predict.load_pixels(image, (16, 24))
    expected = decode(
        Item("photo.jpg", "x", file=image), with_changes(PARAMS.prepare, image_size=(16, 24))
    )
    assert reason == "" and pixels.shape == (16, 24, 3)
    np.testing.assert_array_equal(pixels, expected.pixels)


def test_decode_limits_are_the_prepare_defaults():

    defaults = PARAMS.prepare
    limits = predict.DecodeLimits(defaults.image_size)
    assert (limits.min_side, limits.max_pixels) == (defaults.min_side, defaults.max_pixels)


def test_unreadable_images_are_listed_and_the_rest_still_predicted(tmp_path, model_file, capsys):
    good = solid(tmp_path / "good.png", (255, 0, 0))
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(
        solid(tmp_path / "whole.png", (0, 0, 255), size=(64, 64)).read_bytes()[:60]
    )
    missing = tmp_path / "missing.png"
    args = ["--model", model_file, "--json", good, broken, empty, truncated, missing]

    code, out, err = run_predict(args, capsys)
    assert code == 0  # something was classified: the failures are reported, not fatal
    document = json.loads(out)
    assert [p["path"] for p in document["predictions"]] == [str(good)]
    reasons = {Path(e["path"]).name: e["reason"] for e in document["errors"]}
    assert set(reasons) == {"broken.jpg", "empty.png", "truncated.png", "missing.png"}
    assert "not an image" in reasons["broken.jpg"]
    assert "empty" in reasons["empty.png"]
    assert "no such file" in reasons["missing.png"]
    assert "1 classified, 4 skipped" in err

    code, _, _ = run_predict([*args, "--strict"], capsys)
    assert code == 1

    code, out, err = run_predict(["--model", model_file, broken, empty], capsys)
    assert code == 1 and out == ""
    assert f"skipped: {broken}: not an image" in err and "no image could be classified" in err


def test_folder_with_a_fifo_and_links_out_finishes_and_names_them_skipped(tmp_path, model_file):
    """`tlp predict DIR` reads only regular files: a FIFO would block the open forever and a
    link to /dev/zero would be read without end; both are named as skipped, never opened."""
    folder = tmp_path / "photos"
    solid(folder / "good.png", (255, 0, 0))
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    secret = solid(tmp_path / "outside" / "secret.png", (0, 0, 255))
    (folder / "secret.png").symlink_to(secret)
    (folder / "again.png").symlink_to(folder / "good.png")  # inside the folder: read
    (folder / "sub").mkdir()
    os.mkfifo(folder / "sub" / "deeper.png")
    with (folder / "huge.jpg").open("wb") as handle:  # sparse: 1 GiB that uses no disk
        handle.truncate(imaging.max_file_bytes(predict.DecodeLimits((1, 1)).max_pixels) + 1)

    command = [sys.executable, "-m", "flows.cli", "predict", "--model", str(model_file)]
    # The timeout only guards against a hang (today's code never returns on the FIFO).
    result = run([*command, "--json", str(folder)], ROOT, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [Path(p["path"]).name for p in document["predictions"]] == ["again.png", "good.png"]
    assert all(p["label"] == "red" for p in document["predictions"])
    reasons = {Path(e["path"]).name: e["reason"] for e in document["errors"]}
    assert reasons == {
        "huge.jpg": reasons["huge.jpg"],
        "pipe.jpg": "not a regular file: a FIFO (named pipe)",
        "secret.png": f"a symbolic link to {secret}, outside the folder {folder}",
        "zero.jpg": f"a symbolic link to /dev/zero, outside the folder {folder}",
        "deeper.png": "not a regular file: a FIFO (named pipe)",
    }
    assert reasons["huge.jpg"].startswith("file too large: 816,777,217 bytes, over the 816,777,216")
    assert "2 classified, 5 skipped" in result.stderr

    result = run([*command, str(folder)], ROOT, check=False, timeout=120)  # text: on stderr
    assert result.returncode == 0
    assert f"skipped: {folder / 'pipe.jpg'}: not a regular file" in result.stderr
    assert f"skipped: {folder / 'zero.jpg'}: a symbolic link to /dev/zero" in result.stderr

    result = run([*command, str(folder / "pipe.jpg")], ROOT, check=False, timeout=120)
    assert result.returncode == 1 and "not a regular file or folder" in result.stderr


def test_jsonl_streams_one_object_per_image_in_input_order(tmp_path, model_file, capsys):
    images = [solid(tmp_path / f"{i:02d}.png", COLORS_RGB[i % 3]) for i in range(7)]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    inputs = [*images[:3], broken, *images[3:]]
    code, out, err = run_predict(
        ["--model", model_file, "--jsonl", "--batch-size", "2", *inputs], capsys
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["path"] for line in lines] == [str(path) for path in inputs]
    assert lines[3] == {"path": str(broken), "error": "not an image (unknown format)"}
    answers = [line for line in lines if "error" not in line]
    assert [a["label"] for a in answers] == [COLORS[i % 3] for i in range(7)]
    assert set(answers[0]) == {
        "path", "label", "top_label", "top_probability", "below_min_confidence", "top_k",
        "specialist",
    }  # fmt: skip
    assert answers[0]["specialist"] is None  # no other/model.onnx beside the model
    assert "7 classified, 1 skipped" in err


def test_progress_bar_goes_to_stderr_and_leaves_stdout_clean(tmp_path, model_file, capsys):
    images = [solid(tmp_path / f"{i}.png", (0, 255, 0)) for i in range(5)]
    code, out, err = run_predict(["--model", model_file, "--jsonl", "--progress", *images], capsys)
    assert code == 0
    assert "predict: 100%" in err and "5/5" in err  # tqdm's bar, total counted up front
    assert len(out.splitlines()) == 5 and all(json.loads(line) for line in out.splitlines())
    code, _, err = run_predict(["--model", model_file, "--jsonl", *images], capsys)
    assert "5/5" not in err  # not a terminal: no bar unless asked


@pytest.mark.slow
def test_ten_thousand_images_stream_in_bounded_memory(tmp_path, model_file):
    """10,000 images, one JSON line each, and the peak does not grow with the count.

    The same folder shape with 500 images is the reference: streamed, 9,500 more images add
    well under 8 MiB (measured: about 1 MiB, at a peak of ~85 MiB); today's list of every
    answer (and of every file) added about 13 MiB in text mode and 50 MiB with --json.
    """
    encoded = []
    for rgb in COLORS_RGB:
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), rgb).save(buffer, "PNG")
        encoded.append(buffer.getvalue())

    def folder_of(count: int) -> Path:
        root = tmp_path / f"photos-{count}"
        for index in range(count):
            path = root / f"part{index // 1000:02d}" / f"{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoded[index % 3])
        return root

    command = [sys.executable, "-m", "flows.cli", "predict", "--model", model_file, "--jsonl"]
    small = run_measured([*command, folder_of(500)], ROOT)
    large = run_measured([*command, folder_of(10_000)], ROOT)
    assert small.returncode == 0 and large.returncode == 0, large.stderr[-2000:]
    lines = [json.loads(line) for line in large.stdout.splitlines()]
    assert len(lines) == 10_000
    assert [line["label"] for line in lines[:6]] == COLORS * 2
    assert lines[-1]["path"].endswith("part09/09999.png")
    grown = large.peak_bytes - small.peak_bytes
    assert grown < 8 * 2**20, (small.peak_bytes / 2**20, large.peak_bytes / 2**20)


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    image = solid(tmp_path / "x.png", (1, 2, 3))
    code, out, err = run_predict(["--model", tmp_path / "nope.onnx", image], capsys)
    assert code == 1 and out == ""
    assert "nope.onnx not found" in err and "--model" in err


def test_default_model_path_is_models_model_onnx(tmp_path, model_file, monkeypatch, capsys):
    image = solid(tmp_path / "x.png", (0, 0, 255))
    monkeypatch.chdir(tmp_path)  # model_file is tmp_path/models/model.onnx
    code, out, _ = run_predict([image], capsys)
    assert code == 0 and ": blue (" in out


def test_not_an_onnx_file_and_missing_metadata_are_refused(tmp_path, capsys):
    image = solid(tmp_path / "x.png", (1, 2, 3))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    code, _, err = run_predict(["--model", garbage, image], capsys)
    assert code == 1 and "ERROR: predict:" in err

    bare = color_model()
    del bare.metadata_props[:]
    code, _, err = run_predict(["--model", save(bare, tmp_path / "bare.onnx"), image], capsys)
    assert code == 1 and "no 'classes' metadata" in err


def test_checker_full_check_runs_before_loading(tmp_path, capsys):
    model = color_model()
    model.graph.node[1].input[1] = "undefined_tensor"  # a graph no runtime should be given
    code, _, err = run_predict(["--model", save(model, tmp_path / "bad.onnx"), "x.png"], capsys)
    assert code == 1 and "failed onnx.checker" in err


def _with_external_weights(folder: Path, location: str) -> Path:
    """A copy of the colour model whose weights live in the file ``location`` names."""
    model = color_model()
    weights = next(t for t in model.graph.initializer if t.name == "weights")
    data_file = (folder / location) if not Path(location).is_absolute() else Path(location)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_bytes(weights.raw_data)
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in {
        "location": location,
        "offset": "0",
        "length": str(data_file.stat().st_size),
    }.items():
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    return save(model, folder / "model.onnx")


def test_external_data_inside_the_model_folder_is_accepted(tmp_path, capsys):
    model_file = _with_external_weights(tmp_path / "models", "weights.bin")
    code, out, err = run_predict(
        ["--model", model_file, solid(tmp_path / "r.png", (255, 0, 0))], capsys
    )
    assert code == 0, err
    assert ": red (" in out


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, kind, capsys):
    folder = tmp_path / "models"
    outside = tmp_path / "secret" / "weights.bin"
    if kind == "parent":
        model_file = _with_external_weights(folder, "../secret/weights.bin")
    elif kind == "absolute":
        model_file = _with_external_weights(folder, str(outside))
    else:
        model_file = _with_external_weights(folder, "weights.bin")
        outside.parent.mkdir(parents=True)
        (folder / "weights.bin").rename(outside)
        (folder / "weights.bin").symlink_to(outside)
    assert outside.exists()
    code, out, err = run_predict(
        ["--model", model_file, solid(tmp_path / "r.png", (255, 0, 0))], capsys
    )
    assert code == 1 and out == ""
    assert "refusing to load" in err and "outside the model's folder" in err and "'weights'" in err


def test_tlp_predict_imports_no_heavy_library(tmp_path, model_file):
    """`tlp predict` starts fast: no TensorFlow, and none of the stages' pandas/pydantic."""
    image = solid(tmp_path / "r.png", (255, 0, 0))
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        f"code = main(['predict', '--model', {str(model_file)!r}, '--json', {str(image)!r}])\n"
        "names = ('tensorflow', 'keras', 'tf2onnx', 'pandas', 'pyarrow', 'pydantic', 'prefect',"
        " 'dvc', 'tasks.prepare', 'tasks.params')\n"
        "heavy = sorted(m for m in names if m in sys.modules)\n"
        "print('HEAVY', heavy, code)\n"
    )
    result = run([sys.executable, "-c", code], ROOT)
    assert result.stdout.strip().splitlines()[-1] == "HEAVY [] 0"
    assert (
        json.loads(result.stdout[: result.stdout.rindex("HEAVY")])["predictions"][0]["label"]
        == "red"
    )


def test_python_dash_m_entry_point(tmp_path, model_file):
    image = solid(tmp_path / "b.png", (0, 0, 255))
    result = run(
        [sys.executable, "-m", "tasks.predict", "--model", str(model_file), str(image)], ROOT
    )
    assert f"{image}: blue (" in result.stdout


@pytest.mark.slow
def test_predictions_match_the_keras_model_on_the_test_split(built_project):
    """On every test-split image, predict's top-1 equals the argmax of the Keras model."""
    project = built_project
    code = """
import json, numpy as np
from tasks.dataset import Prepared
from tasks.safety import load_model_safely
prepared = Prepared.open('data/prepared')
rows = prepared.rows('test')
images, labels = prepared.load('test')
probabilities = load_model_safely('models/model.keras', compile=False).predict(images.astype('float32'), verbose=0)
print(json.dumps({'paths': rows['path'].tolist(), 'labels': labels.tolist(),
                  'probabilities': probabilities.tolist()}))
"""
    keras_side = json.loads(
        run([sys.executable, "-c", code], project).stdout.strip().splitlines()[-1]
    )
    raw = project / "data" / "raw"
    files = [raw / path for path in keras_side["paths"]]
    assert len(files) > 100 and all(f.is_file() for f in files)

    args = ["--json", "--top-k", "10", *map(str, files)]
    result = run([sys.executable, "-m", "tasks.predict", *args], project)
    document = json.loads(result.stdout)
    assert document["errors"] == []
    classes = document["classes"]
    predicted = {p["path"]: p for p in document["predictions"]}
    keras_probabilities = np.array(keras_side["probabilities"])
    for file, row in zip(files, keras_probabilities, strict=True):
        answer = predicted[str(file)]
        assert answer["label"] == classes[int(row.argmax())], file
        onnx_row = {r["label"]: r["probability"] for r in answer["top_k"]}
        np.testing.assert_allclose([onnx_row[c] for c in classes], row, atol=1e-4)
    accuracy = np.mean(
        [
            predicted[str(f)]["label"] == classes[y]
            for f, y in zip(files, keras_side["labels"], strict=True)
        ]
    )
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert accuracy == pytest.approx(metrics["accuracy"])
