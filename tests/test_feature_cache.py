"""The train stage's feature cache (``tasks.features.cached_features``), in process.

A small simple_cnn backbone flagged as pretrained stands in for an ImageNet model (its
random weights stay frozen, so its features are as fixed as a real pretrained backbone's);
the data are scikit-learn's digits prepared at 16x16 by the real prepare stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tasks.features
from tasks.dataset import Prepared
from tasks.evaluate import predict_split
from tasks.params import with_changes
from tasks.prepare import prepare
from tasks.training import TrainPaths, train
from tests.conftest import PARAMS

IMAGE_SIZE = (16, 16)
TRAIN = {
    "epochs": 8,
    "batch_size": 32,
    "learning_rate": 0.003,
    "dropout": 0.1,
    "pooling": "flatten",
    "dense_units": 64,
    "early_stopping_patience": 0,
    "feature_cache": True,
    "seed": 7,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    """Digits as PNG class folders, through the real prepare stage."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / "raw" / "images" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"{index:04d}.png")
    prepare(with_changes(PARAMS.prepare, image_size=IMAGE_SIZE), root / "raw", root / "prepared")
    return Prepared.open(root / "prepared")


def make_backbone(folder: Path, seed: int) -> tuple[Path, dict]:
    """A saved simple_cnn backbone whose info says ``pretrained`` (so train freezes it)."""
    from tasks.backbone import build_backbone

    params = with_changes(
        PARAMS.backbone, arch="simple_cnn", seed=seed, simple_cnn={"filters": [8, 16]}
    )
    model, info = build_backbone(params, IMAGE_SIZE)
    path = folder / f"backbone-{seed}.keras"
    model.save(path)
    return path, {**info.to_json(), "pretrained": True}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> tuple[Path, dict]:
    return make_backbone(tmp_path_factory.mktemp("backbone"), seed=1)


@pytest.fixture
def extractions(monkeypatch) -> list[str]:
    """Records every split the backbone is run on to extract features."""
    calls: list[str] = []
    original = tasks.features.extract_features

    def spy(backbone, prepared, split, *args, **kwargs):
        calls.append(split)
        return original(backbone, prepared, split, *args, **kwargs)

    monkeypatch.setattr(tasks.features, "extract_features", spy)
    return calls


def run_train(tmp_path: Path, backbone, prepared: Prepared, name: str, **changes):
    """Call ``tasks.training.train`` with a fresh backup folder and the shared feature folder."""
    from tasks.safety import load_model_safely

    path, info = backbone
    params = with_changes(PARAMS.train, **{**TRAIN, **changes})
    paths = TrainPaths(
        model=tmp_path / name / "model.keras",
        backup=tmp_path / name / "backup",
        features=tmp_path / "features",
    )
    loaded = load_model_safely(path, compile=False)
    return train(params, loaded, info, prepared, paths, path)


def accuracy_on_test_split(model, prepared: Prepared) -> float:
    probabilities, labels = predict_split(model, prepared, "test", 256)
    return float((probabilities.argmax(1) == labels).mean())


def cache_files(folder: Path) -> dict[str, int]:
    """``key/split.npy`` → modification time (ns) of every cached feature file."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.glob("*/*.npy"))
    }


@pytest.mark.slow
def test_cached_features_train_as_well_as_the_naive_path(tmp_path, prepared, backbone, extractions):
    cached = run_train(tmp_path, backbone, prepared, "cached")
    assert cached.used_feature_cache and sorted(extractions) == ["train", "val"]
    naive = run_train(tmp_path, backbone, prepared, "naive", feature_cache=False)
    assert not naive.used_feature_cache and sorted(extractions) == ["train", "val"]

    cached_accuracy = accuracy_on_test_split(cached.model, prepared)
    naive_accuracy = accuracy_on_test_split(naive.model, prepared)
    assert naive_accuracy > 0.85, naive_accuracy  # the frozen features are good enough to learn
    # Same model, data and optimiser; only the batch order differs between the two paths.
    assert cached_accuracy == pytest.approx(naive_accuracy, abs=0.05)
    # The cached path returns a full model from raw pixels, like the naive one.
    assert cached.model.input_shape == naive.model.input_shape == (None, *IMAGE_SIZE, 3)
    assert len(cached.history["loss"]) == len(naive.history["loss"]) == TRAIN["epochs"]


def test_cache_is_reused_then_invalidated_by_backbone_and_data(
    tmp_path, prepared, backbone, extractions
):
    features = tmp_path / "features"
    first = run_train(tmp_path, backbone, prepared, "first", epochs=1)
    assert first.used_feature_cache
    assert sorted(extractions) == ["train", "val"]
    stored = cache_files(features)
    assert len(stored) == 2
    (key,) = {Path(name).parent.name for name in stored}
    train_features = np.load(features / key / "train.npy")
    assert train_features.shape == (prepared.count("train"), 4 * 4 * 16)

    # A second run on the same backbone file and data: a hit, nothing recomputed or rewritten.
    extractions.clear()
    second = run_train(tmp_path, backbone, prepared, "second", epochs=1)
    assert second.used_feature_cache and extractions == []
    assert cache_files(features) == stored

    # Other backbone weights: a miss, and the stale entry is deleted (one key is kept).
    other = make_backbone(tmp_path, seed=2)
    run_train(tmp_path, other, prepared, "other-backbone", epochs=1)
    assert sorted(extractions) == ["train", "val"]
    after_backbone = cache_files(features)
    assert len(after_backbone) == 2 and not set(after_backbone) & set(stored)

    # Other data (ten training images fewer): a miss again, with features for the new split.
    extractions.clear()
    manifest = prepared.manifest
    dropped = manifest.drop(manifest.index[manifest["split"] == "train"][:10]).reset_index(
        drop=True
    )
    fewer = Prepared(prepared.root, prepared.classes, dropped, prepared.image_size)
    run_train(tmp_path, other, fewer, "fewer-images", epochs=1)
    assert sorted(extractions) == ["train", "val"]
    after_data = cache_files(features)
    assert len(after_data) == 2 and not set(after_data) & set(after_backbone)
    (new_key,) = {Path(name).parent.name for name in after_data}
    assert len(np.load(features / new_key / "train.npy")) == prepared.count("train") - 10


@pytest.mark.parametrize(
    ("changes", "info_changes"),
    [
        ({"augment": True}, {}),
        ({"fine_tune": {"enabled": True, "layers": 2, "epochs": 1}}, {}),
        ({"feature_cache": False}, {}),
        ({}, {"pretrained": False}),  # a backbone trained from scratch must see every epoch
    ],
    ids=["augment", "fine-tune", "switched-off", "not-pretrained"],
)
def test_cache_is_off_when_the_backbone_output_can_change(
    tmp_path, prepared, backbone, extractions, changes, info_changes
):
    path, info = backbone
    result = run_train(
        tmp_path, (path, {**info, **info_changes}), prepared, "off", epochs=1, **changes
    )
    assert not result.used_feature_cache
    assert extractions == []
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())
    # It trained on pixels: one epoch (two with the fine-tune phase), finite losses, and the
    # model returned is the best epoch's.
    tuned = "fine_tune" in changes
    assert result.phases == (["head", "fine_tune"] if tuned else ["head"])
    assert len(result.history["loss"]) == len(result.history["val_loss"]) == 1 + tuned
    assert all(np.isfinite(result.history["loss"] + result.history["val_loss"]))
    assert result.best_value == pytest.approx(min(result.history["val_loss"]), rel=1e-6)


def test_onnx_runtime_features_match_keras(prepared, backbone, caplog):
    """The default engine converts the backbone once and gives Keras's features."""
    from tasks.safety import load_model_safely

    model = load_model_safely(backbone[0], compile=False)
    sample = prepared.load("train", limit=2)[0].astype(np.float32)
    for pooling in ("avg", "flatten"):
        on_ort = tasks.features.feature_extractor(model, pooling, "onnxruntime", sample)
        on_keras = tasks.features.feature_extractor(model, pooling, "keras")
        assert (on_ort.engine, on_keras.engine) == ("onnxruntime", "keras")
        fast = tasks.features.extract_features(model, prepared, "val", pooling, 16, on_ort)
        reference = tasks.features.extract_features(model, prepared, "val", pooling, 16, on_keras)
        assert fast.shape == reference.shape == (prepared.count("val"), on_ort.width)
        np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-5)
    assert "using Keras" not in caplog.text


def test_a_backbone_onnx_cannot_convert_falls_back_to_keras(
    tmp_path, prepared, backbone, monkeypatch, caplog
):
    def unconvertible(*_args, **_kwargs):
        raise ValueError("tf2onnx: no converter for op FancyOp")

    monkeypatch.setattr(tasks.features, "keras_to_onnx", unconvertible)
    result = run_train(tmp_path, backbone, prepared, "fallback", epochs=2)
    assert result.used_feature_cache
    assert "no converter for op FancyOp" in caplog.text and "using Keras" in caplog.text
    accuracy = accuracy_on_test_split(result.model, prepared)
    assert accuracy > 0.5, accuracy  # trained on Keras features


def test_features_that_disagree_with_keras_are_refused(caplog):
    reference = np.array([[0.5, 40.0], [3.0, -2.0]], np.float32)
    assert tasks.features._agrees(reference + 1e-4, reference)  # float32 rounding: accepted
    assert not tasks.features._agrees(reference + np.float32(0.1), reference)
    assert "ONNX Runtime differs from Keras by 0.1" in caplog.text and "using Keras" in caplog.text


def test_two_runs_sharing_the_folder_extract_the_features_once(tmp_path, prepared, backbone,
                                                                extractions):  # fmt: skip
    """A sweep's parallel runs share one folder: the second waits on the entry's lock and hits."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.safety import load_model_safely

    path, _ = backbone
    key = tasks.features.cache_key(path, prepared, "avg", "keras")
    models = [load_model_safely(path, compile=False) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(tasks.features.cached_features, tmp_path / "shared", key, model,
                               prepared, "avg", "keras") for model in models]  # fmt: skip
        first, second = (future.result() for future in futures)
    assert sorted(extractions) == ["train", "val"]  # one extraction of each split, not two
    assert np.array_equal(first["train"], second["train"])
    assert [p.name for p in (tmp_path / "shared").iterdir() if not p.name.startswith(".")] == [key]
