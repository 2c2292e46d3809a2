"""Stage ``backbone``: names, size limits, seeded init, preprocessing, and both weight sources.

Nothing here touches the network: the ``imagenet`` path is exercised against a weights file
seeded into ``$KERAS_HOME/models/`` under the exact name Keras looks for, and the local-file
path against random-init VGG16 weights saved by the test.
"""

from __future__ import annotations

import json
import re
import zipfile

import keras
import numpy as np
import pytest
import yaml

from tasks.archs import ARCHS, SIMPLE_CNN, allowed_archs, resolve_arch, simple_cnn_output
from tasks.backbone import _simple_cnn, build_backbone
from tasks.common import save_model, sha256_file
from tasks.layers import Preprocess
from tasks.params import ParamsError, read_yaml, with_changes
from tasks.safety import load_model_safely
from tests.conftest import PARAMS, ROOT, run


def weights_equal(left: list[np.ndarray], right: list[np.ndarray]) -> bool:
    """Same number of arrays, each with the same shape and values."""
    return len(left) == len(right) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(left, right, strict=True)
    )


def params_file(tmp_path, backbone: dict, image_size: list[int]):
    """A full params.yaml (the shipped one) with a backbone section and image size."""
    data = read_yaml(ROOT / "params.yaml")
    data["backbone"].update(backbone)
    data["prepare"]["image_size"] = image_size
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("MobileNetV2", "mobilenet_v2"),
        ("mobilenet-v2", "mobilenet_v2"),
        ("mobilenet_v2", "mobilenet_v2"),
        ("ResNet50V2", "resnet50_v2"),
        ("VGG16", "vgg16"),
        ("EfficientNetV2B0", "efficientnet_v2_b0"),
        ("ConvNeXtXLarge", "convnext_xlarge"),
        ("convnext_xlarge", "convnext_xlarge"),
        ("Simple-CNN", SIMPLE_CNN),
    ],
)
def test_archs_resolve_by_their_usual_names(name, canonical):
    assert resolve_arch(name) == canonical


def test_every_keras_application_is_allowed_and_constructible_by_name():
    constructors = {name for name in dir(keras.applications) if name[0].isupper()}
    assert {arch.constructor for arch in ARCHS.values()} == constructors
    assert allowed_archs()[0] == SIMPLE_CNN and len(allowed_archs()) == len(ARCHS) + 1


def test_unknown_arch_is_an_error_listing_the_allowed_names():
    with pytest.raises(ValueError) as caught:
        build_backbone(with_changes(PARAMS.backbone, arch="resnet51"), (32, 32))
    message = str(caught.value)
    assert "backbone.arch 'resnet51' is not a known architecture" in message
    assert all(name in message for name in ("simple_cnn", "mobilenet_v2", "vgg16", "resnet50"))


@pytest.mark.parametrize(
    ("arch", "size", "expected"),
    [
        ("vgg16", (16, 16), "vgg16 needs images of at least 32x32; prepare.image_size is [16, 16]"),
        ("inception_v3", (64, 64), "inception_v3 needs images of at least 75x75"),
        ("xception", (70, 90), "xception needs images of at least 71x71"),
    ],
)
def test_input_size_the_arch_cannot_take_is_an_error_naming_the_minimum(arch, size, expected):
    with pytest.raises(ValueError, match="Raise prepare.image_size") as caught:
        build_backbone(with_changes(PARAMS.backbone, arch=arch), size)
    assert expected in str(caught.value)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize(("kernel", "stride", "pool"), [(3, 1, 2), (5, 2, 1), (3, 3, 3), (7, 4, 4)])
def test_simple_cnn_size_arithmetic_matches_keras(padding, kernel, stride, pool):
    """tasks.archs predicts what Keras builds, so the check before any run agrees with it."""
    for side in (8, 9, 13, 16, 31):
        params = with_changes(
            PARAMS.backbone,
            simple_cnn={"filters": (2, 2), "kernel_size": kernel, "strides": stride,
                        "padding": padding, "pool_size": pool},
        )  # fmt: skip
        predicted = simple_cnn_output((side, side + 3), 2, kernel, stride, padding, pool)
        if min(predicted) < 1:  # Keras refuses it too (the check comes first in the stage)
            with pytest.raises(ValueError, match="too small for 2 conv blocks"):
                _simple_cnn(params.simple_cnn, (side, side + 3))
        else:
            model = _simple_cnn(params.simple_cnn, (side, side + 3))
            assert tuple(model.output.shape[1:3]) == predicted, (side, predicted)


def test_simple_cnn_too_deep_for_the_image_is_an_error():
    params = with_changes(PARAMS.backbone, simple_cnn={"filters": (4, 4, 4, 4), "padding": "valid"})
    with pytest.raises(ValueError, match="too small for 4 conv blocks"):
        build_backbone(params, (16, 16))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (with_changes(PARAMS.backbone, weights="imagenet"), "must be 'none' for simple_cnn"),
        (
            with_changes(PARAMS.backbone, arch="vgg16", weights="no/such/file.h5"),
            "not 'imagenet', 'none' or a weights file",
        ),
    ],
)
def test_bad_weights_setting_is_an_error(params, expected):
    with pytest.raises(ValueError, match=expected):
        build_backbone(params, (32, 32))


def test_unknown_arch_through_the_cli_fails_and_keeps_the_previous_backbone(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "backbone.keras").write_bytes(b"previous")
    params = params_file(tmp_path, {"arch": "mobilenet_v9"}, [32, 32])

    result = run(
        ["python", "-m", "tasks.backbone", "--params", str(params), "--weights-dir",
         "data/weights", "--out", "models/backbone.keras", "--info", "models/backbone.json"],
        tmp_path, check=False, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip

    assert result.returncode == 1
    assert "ERROR: backbone: invalid params: backbone.arch 'mobilenet_v9' is not a known " in (
        result.stderr
    )
    assert "mobilenet_v2" in result.stderr.splitlines()[-1]
    assert sorted(p.name for p in models.iterdir()) == ["backbone.keras"]
    assert (models / "backbone.keras").read_bytes() == b"previous"


# ---------------------------------------------------------------- building


def test_simple_cnn_is_seeded_and_takes_raw_pixels():
    first, info = build_backbone(PARAMS.backbone, (16, 16))
    again, _ = build_backbone(PARAMS.backbone, (16, 16))
    other, _ = build_backbone(with_changes(PARAMS.backbone, seed=7), (16, 16))
    assert weights_equal(first.get_weights(), again.get_weights())
    assert not weights_equal(first.get_weights(), other.get_weights())
    assert info.preprocessing == "rescale" and not info.pretrained and info.weights == "none"
    last = PARAMS.backbone.simple_cnn.filters[-1]
    assert info.feature_shape == (4, 4, last)  # 16 -> two 2x2 poolings, the last block's filters
    pixels = np.full((1, 16, 16, 3), 255.0, np.float32)
    assert first(pixels).shape == (1, 4, 4, last)


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("caffe", keras.applications.vgg16.preprocess_input),
        ("tf", keras.applications.mobilenet_v2.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
        ("raw", lambda x: x),
        ("rescale", lambda x: x / 255.0),
    ],
)
def test_preprocessing_inside_the_model_matches_keras_applications(mode, reference):
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    expected = reference(pixels.copy())
    actual = keras.ops.convert_to_numpy(Preprocess(mode)(pixels))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


def test_local_weights_file_is_loaded_into_vgg16(tmp_path):
    keras.utils.set_random_seed(7)  # not the stage's seed: equality below proves loading
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights_file = tmp_path / "vgg16" / "no-top.weights.h5"  # a sub-folder of the weights folder
    weights_file.parent.mkdir()
    source.save_weights(weights_file)

    params = with_changes(PARAMS.backbone, arch="VGG16", weights="vgg16/no-top.weights.h5")
    model, info = build_backbone(params, (32, 32), weights_dir=tmp_path)

    base = model.get_layer(info.base_layer)
    assert weights_equal(base.get_weights(), source.get_weights())
    assert info.arch == "vgg16" and info.pretrained and info.preprocessing == "caffe"
    assert info.weights == "vgg16/no-top.weights.h5"
    assert info.weights_sha256 == sha256_file(weights_file)
    assert info.feature_shape == (1, 1, 512)


@pytest.mark.parametrize(
    "weights", ["/abs/vgg16.h5", "../outside.h5", "vgg16/../../x.h5", "~/x.h5", "ImageNet", ""]
)
def test_weights_outside_the_weights_folder_are_refused_by_the_params(weights):
    with pytest.raises(ParamsError, match=f"weights: .*got {re.escape(repr(weights))}") as caught:
        with_changes(PARAMS.backbone, arch="vgg16", weights=weights)
    message = str(caught.value)
    assert "in lower case" in message or (
        "copy or link the file into data/weights/ and set backbone.weights to its name" in message
    )


def test_saved_backbone_is_byte_identical_for_identical_inputs(tmp_path):
    paths = []
    for index in range(2):
        model, _ = build_backbone(PARAMS.backbone, (16, 16))
        paths.append(tmp_path / f"{index}.keras")
        save_model(model, paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with zipfile.ZipFile(paths[0]) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert "date_saved" not in json.loads(archive.read("metadata.json"))
        ids = re.findall(r'"shared_object_id": (\d+)', archive.read("config.json").decode())
        assert ids and set(ids) == {"1"}  # renumbered: one shared dtype policy
    loaded = load_model_safely(paths[0], compile=False)
    assert weights_equal(loaded.get_weights(), model.get_weights())


@pytest.mark.slow
def test_imagenet_weights_come_from_the_keras_cache_without_network(tmp_path):
    """The real ``weights="imagenet"`` code path, offline, through ``python -m tasks.backbone``."""
    keras_home = tmp_path / "keras-home"
    (keras_home / "models").mkdir(parents=True)
    keras.utils.set_random_seed(7)
    seeded = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(96, 96, 3)
    )
    # The exact name keras/src/applications/mobilenet_v2.py asks get_file for (alpha 1.0,
    # 96 px, no top); Keras checks no hash for it, so this file stands in for the download.
    seeded.save(
        keras_home / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    )
    params = params_file(tmp_path, {"arch": "mobilenet_v2", "weights": "imagenet"}, [96, 96])

    run(
        ["python", "-m", "tasks.backbone", "--params", str(params), "--weights-dir",
         "data/weights", "--out", "models/backbone.keras", "--info", "models/backbone.json"],
        tmp_path, env={"PYTHONPATH": str(ROOT), "KERAS_HOME": str(keras_home)},
    )  # fmt: skip

    info = json.loads((tmp_path / "models" / "backbone.json").read_text())
    assert info["arch"] == "mobilenet_v2" and info["weights"] == "imagenet"
    assert info["pretrained"] is True and info["preprocessing"] == "tf"
    assert info["feature_shape"] == [3, 3, 1280]
    built = load_model_safely(tmp_path / "models" / "backbone.keras", compile=False)
    assert weights_equal(built.get_layer(info["base_layer"]).get_weights(), seeded.get_weights())
    assert sorted(p.name for p in (keras_home / "models").iterdir()) == [
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    ]  # nothing was downloaded
