"""``tasks.safety``: which model configs pass, which are refused, and why.

Config-level checks with hand-written configs and real saved models; the end-to-end
malicious files (with sentinel side effects, through the stage CLIs) are in
``test_reliability.py``.
"""

from __future__ import annotations

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

from tasks.backbone import build_backbone
from tasks.params import with_changes
from tasks.safety import UnsafeModelError, check_config, check_model_file, load_model_safely
from tests.conftest import PARAMS


def layer(class_name: str, module: str | None = "keras.layers", **extra) -> dict:
    """A layer entry as Keras 3 writes it in ``config.json``."""
    return {"module": module, "class_name": class_name, "config": {"name": "x"}, **extra}


def functional(*layers: dict) -> dict:
    return {
        "module": "keras",
        "class_name": "Functional",
        "config": {"name": "m", "layers": list(layers)},
    }


def test_the_pipelines_own_models_pass_and_load(tmp_path):
    model, _ = build_backbone(with_changes(PARAMS.backbone, simple_cnn={"filters": (4,)}), (16, 16))
    path = tmp_path / "backbone.keras"
    model.save(path)
    check_model_file(path)  # the Preprocess layer is this project's registered tlp> layer
    loaded = load_model_safely(path, compile=False)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0))


def test_weights_only_files_pass(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.save_weights(tmp_path / "w.weights.h5")
    check_model_file(tmp_path / "w.weights.h5")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (functional(layer("Dense"), layer("Lambda")), "contains a Lambda layer"),
        (
            functional(
                layer(
                    "Sequential", "keras", config={"layers": [layer("Lambda", "keras.layers.core")]}
                )
            ),
            "contains a Lambda layer",
        ),
        (
            functional(
                layer("Dense", activation={"class_name": "__lambda__", "config": {"code": "YQ=="}})
            ),
            "contains a __lambda__ layer",
        ),
        (functional(layer("TFSMLayer")), "contains a TFSMLayer layer"),
        (functional(layer("TorchModuleWrapper", "keras.layers")), "TorchModuleWrapper"),
        (functional(layer("system", "os")), "names module 'os'"),
        (functional(layer("Popen", "subprocess")), "names module 'subprocess'"),
        (functional(layer("Evil", "keras_evil")), "names module 'keras_evil'"),
        (
            functional(layer("Preprocess", "tasks.layers", registered_name="evil>Preprocess")),
            "names module 'tasks.layers'",
        ),
        (
            functional(layer("Thing", None, registered_name="custom>Thing")),
            "needs the custom object 'custom>Thing'",
        ),
    ],
    ids=[
        "lambda", "nested-lambda", "lambda-activation", "savedmodel", "torch", "os", "subprocess",
        "lookalike-package", "not-our-layer", "custom-object",
    ],
)  # fmt: skip
def test_unsafe_configs_are_refused(config, expected):
    with pytest.raises(UnsafeModelError, match="refusing to load") as caught:
        check_config(config, "model.keras")
    assert expected in str(caught.value)


def test_a_keras_archive_with_an_unsafe_config_is_refused_before_keras_opens_it(tmp_path):
    path = tmp_path / "evil.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(functional(layer("Lambda"))))
        archive.writestr("metadata.json", "{}")
    with pytest.raises(UnsafeModelError, match="Lambda"):
        load_model_safely(path)


def test_an_h5_with_a_lambda_in_its_compile_settings_is_refused(tmp_path):
    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = json.dumps(functional(layer("Dense")))
        handle.attrs["training_config"] = json.dumps(
            {"loss": {"class_name": "__lambda__", "config": {"code": "YQ=="}}}
        )
    with pytest.raises(UnsafeModelError, match="__lambda__"):
        check_model_file(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a Keras weights file"),
        (b"\x80\x04\x95 a pickle", "not a Keras weights file"),
        (b"PK\x03\x04 not really a zip", "not a valid .keras archive"),
        (b"\x89HDF\r\n\x1a\n truncated", "not a readable HDF5 weights file"),
    ],
)
def test_files_that_are_not_models_are_a_clear_value_error(tmp_path, content, expected):
    path = tmp_path / "weights.h5"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected):
        check_model_file(path)


def test_a_pathologically_nested_config_is_refused_not_a_crash(tmp_path):
    path = tmp_path / "deep.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(UnsafeModelError, match="nested too deeply"):
        check_model_file(path)
