"""Stage ``train`` in-process: checkpoints, backups, resume fingerprints, both training paths.

Real Keras models on a tiny generated dataset; the subprocess kill/resume and NaN scenarios
of the whole stage are in ``test_reliability.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zipfile

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from tasks.backbone import build_backbone
from tasks.backup import DIVERGED_MARK, check_backup, fingerprint, latest_backup, restore_backup
from tasks.callbacks import BestCheckpoint, DivergedError, EpochBackup, ResumableEarlyStopping
from tasks.common import StageError
from tasks.dataset import Prepared
from tasks.features import extract_features
from tasks.params import with_changes
from tasks.prepare import prepare
from tasks.safety import load_model_safely
from tasks.training import TrainPaths, train
from tests.conftest import PARAMS, ROOT, run, write_params

SIZE = (16, 16)


def weights_equal(left, right) -> bool:
    """Two lists of arrays, equal one by one."""
    return len(left) == len(right) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(left, right, strict=True)
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    """Two easy classes (reddish and bluish noise), 60 images each, through the real prepare."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, channel in (("blue", 2), ("red", 0)):
        folder = root / "raw" / name
        folder.mkdir(parents=True)
        for index in range(60):
            pixels = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
            pixels[..., channel] += 120
            Image.fromarray(pixels).save(folder / f"{index}.png")
    prepare(
        with_changes(
            PARAMS.prepare, image_size=SIZE, val_fraction=0.2, test_fraction=0.1, workers=2
        ),
        root / "raw",
        root / "prepared",
    )
    return Prepared.open(root / "prepared")


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A small simple_cnn backbone saved like the backbone stage saves it."""
    model, info = build_backbone(
        with_changes(PARAMS.backbone, simple_cnn={"filters": (4, 8)}), SIZE
    )
    path = tmp_path_factory.mktemp("models") / "backbone.keras"
    model.save(path)
    return path, info.to_json()


def load_backbone(backbone_file, pretrained: bool):
    path, info = backbone_file
    return load_model_safely(path, compile=False), {**info, "pretrained": pretrained}


def tiny_model(seed: int = 0):
    """A compiled Dense model with a Dropout layer (so it has a random-generator state)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.5),
         keras.layers.Dense(2, activation="softmax")]
    )  # fmt: skip
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    return model


def float_arrays(h5_file) -> list[np.ndarray]:
    """Every floating-point dataset in an HDF5 file."""
    arrays: list[np.ndarray] = []

    def visit(_, node):
        if isinstance(node, h5py.Dataset) and node.dtype.kind == "f":
            arrays.append(node[()])

    with h5py.File(h5_file, "r") as handle:
        handle.visititems(visit)
    return arrays


def toy_data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


# ---------------------------------------------------------------- best checkpoint


def test_best_checkpoint_keeps_its_best_value_across_a_restart(tmp_path):
    model = tiny_model()
    first_weights = model.get_weights()
    checkpoint = BestCheckpoint(tmp_path, "val_loss", "head")
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_loss": 0.5})
    model.set_weights([w + 1 for w in first_weights])
    checkpoint.on_epoch_end(1, {"val_loss": 0.7})  # worse: not saved
    saved = checkpoint.path
    assert saved.name == "best-head-e0001.keras"
    assert weights_equal(load_model_safely(saved, compile=False).get_weights(), first_weights)

    # A restarted run (a new process) reads the persisted best value...
    restarted = BestCheckpoint(tmp_path, "val_loss", "head")
    restarted.set_model(model)
    assert (restarted.best, restarted.best_epoch, restarted.path) == (0.5, 0, saved)
    restarted.on_epoch_end(2, {"val_loss": 0.6})  # ...so a worse epoch cannot overwrite it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-head-e0001.keras", "best-head.json"]
    assert weights_equal(load_model_safely(saved, compile=False).get_weights(), first_weights)
    # Keras' own callback starts from +inf after a restart and would have saved that epoch.
    keras_checkpoint = keras.callbacks.ModelCheckpoint(
        tmp_path / "keras-best.keras", monitor="val_loss", save_best_only=True
    )
    keras_checkpoint.set_model(model)
    keras_checkpoint.on_epoch_end(2, {"val_loss": 0.6})
    assert (tmp_path / "keras-best.keras").exists()

    better_weights = [w * 3 for w in first_weights]
    model.set_weights(better_weights)
    restarted.on_epoch_end(3, {"val_loss": 0.4})
    assert restarted.path.name == "best-head-e0004.keras" and not saved.exists()
    assert json.loads((tmp_path / "best-head.json").read_text()) == {
        "best": 0.4, "epoch": 3, "file": "best-head-e0004.keras", "phase": "head",
    }  # fmt: skip
    assert weights_equal(
        load_model_safely(restarted.path, compile=False).get_weights(), better_weights
    )


def test_best_checkpoint_ignores_files_of_a_write_that_was_killed(tmp_path):
    model = tiny_model()
    checkpoint = BestCheckpoint(tmp_path, "val_accuracy", "head")
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_accuracy": 0.8})
    # Killed after the new checkpoint was renamed but before the JSON moved, and mid-write:
    (tmp_path / "best-head-e0002.keras").write_bytes(checkpoint.path.read_bytes())
    (tmp_path / ".best-head-e0003.tmp.keras").write_bytes(b"PK\x03\x04 half a zip")

    restarted = BestCheckpoint(tmp_path, "val_accuracy", "head")
    assert restarted.best == 0.8 and restarted.path.name == "best-head-e0001.keras"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-head-e0001.keras", "best-head.json"]
    with pytest.raises(StageError, match="train.monitor 'val_accuracy' is not a logged metric"):
        restarted.set_model(model)
        restarted.on_epoch_end(1, {"loss": 0.1})


# ---------------------------------------------------------------- epoch backup


def test_epoch_backup_resumes_exactly_where_an_uninterrupted_run_would_be(tmp_path):
    x, y = toy_data()
    folder = tmp_path / "head"

    reference = tiny_model()
    reference.fit(x, y, epochs=4, batch_size=16, shuffle=False, verbose=0)

    interrupted = tiny_model()
    interrupted.fit(
        x, y, epochs=2, batch_size=16, shuffle=False, verbose=0,
        callbacks=[EpochBackup(folder, {})],
    )  # fmt: skip
    assert latest_backup(folder)[0] == 2
    (folder / ".epoch-0003.tmp.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")

    resumed = tiny_model(seed=99)  # a new process: other initial weights, fresh optimizer
    done, history = restore_backup(resumed, folder)
    assert done == 2 and len(history["loss"]) == 2
    assert weights_equal(resumed.get_weights(), interrupted.get_weights())
    assert weights_equal(resumed.optimizer.variables, interrupted.optimizer.variables)
    resumed.fit(
        x, y, epochs=4, initial_epoch=done, batch_size=16, shuffle=False, verbose=0,
        callbacks=[EpochBackup(folder, history)],
    )  # fmt: skip
    # Weights, Adam moments and Dropout's generator state were all restored: the resumed
    # run ends exactly where the uninterrupted one did.
    assert weights_equal(resumed.get_weights(), reference.get_weights())
    assert len(history["loss"]) == 4
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-0004.json", "epoch-0004.weights.h5"]


def test_early_stopping_patience_counts_the_epochs_before_a_resume():
    """Patience 2, val_loss 1.0, 0.5, 0.6 before the kill: one more bad epoch must stop."""
    earlier = {"val_loss": [1.0, 0.5, 0.6], "loss": [1.0, 0.8, 0.7]}

    def stops_after(callback) -> bool:
        model = tiny_model()
        callback.set_model(model)
        model.stop_training = False
        callback.on_train_begin()
        assert not model.stop_training  # the earlier epochs alone do not stop it
        callback.on_epoch_end(3, {"val_loss": 0.7})
        return bool(model.stop_training)

    resumed = ResumableEarlyStopping(earlier, monitor="val_loss", patience=2, mode="min")
    assert stops_after(resumed)
    assert resumed.best == 0.5 and resumed.best_epoch == 1
    # Keras' own callback forgets epochs 1-3 and would train on.
    assert not stops_after(keras.callbacks.EarlyStopping("val_loss", patience=2, mode="min"))
    # Nothing before the resume: the same as Keras' callback.
    fresh = ResumableEarlyStopping({}, monitor="val_loss", patience=2, mode="min")
    assert not stops_after(fresh) and fresh.best == 0.7


def test_a_backup_that_cannot_be_loaded_is_a_clear_error(tmp_path):
    folder = tmp_path / "backup" / "head"
    folder.mkdir(parents=True)
    (folder / "epoch-0003.weights.h5").write_bytes(b"not hdf5 at all")
    (folder / "epoch-0003.json").write_text('{"history": {}, "rng_states": []}')
    with pytest.raises(StageError, match="cannot be loaded .* delete .*backup to start"):
        restore_backup(tiny_model(), folder)


# ---------------------------------------------------------------- resume fingerprint


def test_fingerprint_covers_settings_backbone_and_classes_but_not_the_epoch_budget(
    prepared, backbone_file, tmp_path
):
    path, _ = backbone_file
    base = PARAMS.train
    reference = fingerprint(base, path, prepared)
    assert fingerprint(base.model_copy(update={"epochs": 99}), path, prepared) == reference
    assert (
        fingerprint(base.model_copy(update={"early_stopping_patience": 1}), path, prepared)
        == reference
    )
    # The same backbone saved again differs byte-wise (its save date), not in content.
    resaved = tmp_path / "resaved.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(resaved, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(
                name, b'{"date_saved": "tomorrow"}' if name == "metadata.json" else data
            )
    assert resaved.read_bytes() != path.read_bytes()
    assert fingerprint(base, resaved, prepared) == reference
    other_model, _ = build_backbone(
        with_changes(PARAMS.backbone, seed=1, simple_cnn={"filters": (4, 8)}), SIZE
    )
    other_backbone = tmp_path / "other.keras"
    other_model.save(other_backbone)
    other_classes = dataclasses.replace(prepared, classes=["blue", "green"])
    changed = [
        fingerprint(base.model_copy(update={"learning_rate": 0.01}), path, prepared),
        fingerprint(base.model_copy(update={"dropout": 0.0}), path, prepared),
        fingerprint(base, other_backbone, prepared),
        fingerprint(base, path, other_classes),
    ]
    assert reference not in changed and len(set(changed)) == len(changed)


def test_a_backup_of_other_settings_is_refused_and_left_alone(tmp_path):
    backup = tmp_path / "backup"
    check_backup(backup, "run-one")
    (backup / "head").mkdir()
    (backup / "head" / "epoch-0002.weights.h5").write_bytes(b"weights of run one")
    before = {p: p.read_bytes() for p in backup.rglob("*") if p.is_file()}

    with pytest.raises(StageError, match="other settings.*rm -rf .*backup"):
        check_backup(backup, "run-two")
    assert {p: p.read_bytes() for p in backup.rglob("*") if p.is_file()} == before

    check_backup(backup, "run-one")  # the same settings resume
    (backup / DIVERGED_MARK).write_text("diverged")
    check_backup(backup, "run-two")  # a diverged run's backup is discarded instead
    assert sorted(p.name for p in backup.iterdir()) == ["fingerprint.txt"]
    assert (backup / "fingerprint.txt").read_text() == "run-two\n"


def test_a_backup_with_nothing_to_resume_is_discarded_whatever_its_settings(tmp_path, caplog):
    """Killed before its first epoch ended: only the stamp, maybe a half-written file."""
    caplog.set_level(logging.INFO, logger="tlp")
    backup = tmp_path / "backup"
    check_backup(backup, "run-one")
    (backup / "head").mkdir()
    (backup / "head" / ".epoch-0001.tmp.weights.h5").write_bytes(b"half")
    check_backup(backup, "run-two")  # other settings, and nothing to mix: no error
    assert sorted(p.name for p in backup.iterdir()) == ["fingerprint.txt"]
    assert (backup / "fingerprint.txt").read_text() == "run-two\n"
    assert "left nothing to resume" in caplog.text


def test_a_backup_past_this_runs_epoch_budget_is_discarded_and_a_longer_run_resumes(tmp_path):
    def backup_with(epochs_done: int, done_budget: dict | None = None):
        backup = tmp_path / f"backup-{epochs_done}-{bool(done_budget)}"
        check_backup(backup, "run")
        (backup / "best-head.json").write_text('{"best": 0.5, "epoch": 0, "file": "x"}')
        if done_budget is None:
            (backup / "head").mkdir()
            (backup / "head" / f"epoch-{epochs_done:04d}.weights.h5").write_bytes(b"w")
        else:
            history = {"loss": [1.0] * epochs_done}
            (backup / "head.done.json").write_text(
                json.dumps({"history": history, "budget": done_budget})
            )
        return backup

    budget = {"epochs": 4, "early_stopping_patience": 2}
    for backup in (
        backup_with(5),  # more epochs done than this run's train.epochs
        backup_with(4, {"epochs": 6, "early_stopping_patience": 2}),  # a finished longer run
        backup_with(4, {"epochs": 4, "early_stopping_patience": 9}),  # other patience
        backup_with(3, {"epochs": 3, "early_stopping_patience": 2}),  # finished, shorter run
    ):
        check_backup(backup, "run", budget)
        assert sorted(p.name for p in backup.iterdir()) == ["fingerprint.txt"], backup.name
    for kept in (backup_with(4), backup_with(2), backup_with(4, budget)):
        before = sorted(p.name for p in kept.rglob("*"))
        check_backup(kept, "run", budget)  # resumable: kept as it was
        assert sorted(p.name for p in kept.rglob("*")) == before


# ---------------------------------------------------------------- training


def test_training_from_scratch_trains_the_backbone_and_a_finished_phase_is_not_redone(
    prepared, backbone_file, tmp_path, caplog
):
    backbone, info = load_backbone(backbone_file, pretrained=False)
    initial = [w.copy() for w in backbone.get_weights()]
    params = with_changes(PARAMS.train, epochs=3, batch_size=16, learning_rate=0.01, dense_units=0)
    paths = TrainPaths(model=tmp_path / "model.keras", backup=tmp_path / "backup")

    result = train(params, backbone, info, prepared, paths, backbone_file[0])

    assert len(result.history["val_loss"]) == 3 and result.phases == ["head"]
    assert result.best_value == min(result.history["val_loss"])
    assert not result.used_feature_cache
    assert not weights_equal(backbone.get_weights(), initial)  # trained from scratch
    images, labels = prepared.load("val")
    probabilities = result.model.predict(images.astype("float32"), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities.argmax(1) == labels).mean() > 0.8
    assert (paths.backup / "head.done.json").exists()

    # Killed after train() returned but before main() removed the backup: nothing is redone.
    caplog.set_level(logging.INFO, logger="tlp")
    backbone2, _ = load_backbone(backbone_file, pretrained=False)
    again = train(params, backbone2, info, prepared, paths, backbone_file[0])
    assert "phase head already finished" in caplog.text
    assert again.history == result.history and again.best_value == result.best_value
    assert weights_equal(again.model.get_weights(), result.model.get_weights())


def test_pretrained_backbone_stays_frozen_and_its_features_are_computed_once(
    prepared, backbone_file, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="tlp")
    backbone, info = load_backbone(backbone_file, pretrained=True)
    frozen = [w.copy() for w in backbone.get_weights()]
    params = with_changes(PARAMS.train, epochs=2, batch_size=16, learning_rate=0.01, pooling="avg")
    features = tmp_path / "features"

    def run_once(name: str):
        paths = TrainPaths(model=tmp_path / "m.keras", backup=tmp_path / name, features=features)
        return train(params, backbone, info, prepared, paths, backbone_file[0])

    result = run_once("backup-1")
    assert result.used_feature_cache and "feature cache miss" in caplog.text
    assert weights_equal(backbone.get_weights(), frozen)
    (cached,) = features.iterdir()
    stamp = (cached / "train.npy").stat().st_mtime_ns
    caplog.clear()
    run_once("backup-2")
    assert "feature cache hit" in caplog.text and "miss" not in caplog.text
    assert (cached / "train.npy").stat().st_mtime_ns == stamp

    # The full model (pixels -> probabilities) carries the head trained on cached features.
    images, _ = prepared.load("val")
    pooled = extract_features(backbone, prepared, "val", "avg", 64)
    np.testing.assert_allclose(
        result.model.predict(images.astype("float32"), verbose=0),
        _head_on(result.model, pooled),
        rtol=1e-4,
        atol=1e-5,
    )


def _head_on(model, pooled: np.ndarray) -> np.ndarray:
    """Apply the layers after the ``pool`` layer of ``model`` to pooled features."""
    x = pooled
    names = [layer.name for layer in model.layers]
    for layer in model.layers[names.index("pool") + 1 :]:
        x = layer(x, training=False)
    return keras.ops.convert_to_numpy(x)


def test_fine_tuning_runs_a_second_phase(prepared, backbone_file, tmp_path):
    backbone, info = load_backbone(backbone_file, pretrained=True)
    params = with_changes(PARAMS.train,
        epochs=2, batch_size=16, learning_rate=0.01,
        fine_tune={"enabled": True, "layers": 2, "epochs": 1, "learning_rate": 1e-4},
    )  # fmt: skip
    paths = TrainPaths(model=tmp_path / "m.keras", backup=tmp_path / "backup")
    result = train(params, backbone, info, prepared, paths, backbone_file[0])
    assert result.phases == ["head", "fine_tune"] and not result.used_feature_cache
    assert len(result.history["loss"]) == 3
    assert sorted(p.name for p in paths.backup.glob("*.done.json")) == [
        "fine_tune.done.json",
        "head.done.json",
    ]


def batchnorm_backbone(path):
    """A small backbone shaped like build_backbone's, standing in for a pretrained one.

    Preprocessing, then a nested base model ``base`` of two conv + BatchNorm blocks whose
    BatchNorm statistics and scales are not Keras' defaults (as after ImageNet training),
    so any update to them shows.
    """
    from tasks.layers import Preprocess

    keras.utils.set_random_seed(3)
    x = base_input = keras.Input((*SIZE, 3))
    for index in (1, 2):
        x = keras.layers.Conv2D(4, 3, padding="same", name=f"conv{index}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
    base = keras.Model(base_input, x, name="base")
    rng = np.random.default_rng(3)
    for name in ("bn1", "bn2"):
        shape = base.get_layer(name).gamma.shape
        gamma, beta = rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.5, shape)
        mean, variance = rng.normal(0, 0.5, shape), rng.uniform(0.5, 2.0, shape)
        base.get_layer(name).set_weights([gamma, beta, mean, variance])
    pixels = keras.Input((*SIZE, 3), name="pixels")
    model = keras.Model(pixels, base(Preprocess("rescale", name="preprocess")(pixels)))
    model.save(path)
    return load_model_safely(path, compile=False), {"pretrained": True, "base_layer": "base"}


def test_fine_tuning_keeps_batchnorm_frozen_and_trains_the_top_conv_layers(prepared, tmp_path):
    backbone, info = batchnorm_backbone(tmp_path / "backbone.keras")
    base = backbone.get_layer("base")
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in base.layers}
    # The head barely learns (tiny learning rate), so the fine-tune phase (top 3 layers of
    # the base: conv2, bn2, relu2) improves on it and its weights are the ones returned.
    params = with_changes(PARAMS.train,
        epochs=1, batch_size=16, learning_rate=1e-5, dense_units=0, dropout=0.0,
        fine_tune={"enabled": True, "layers": 3, "epochs": 2, "learning_rate": 0.01},
    )  # fmt: skip
    paths = TrainPaths(model=tmp_path / "m.keras", backup=tmp_path / "backup")

    result = train(params, backbone, info, prepared, paths, tmp_path / "backbone.keras")

    assert result.phases == ["head", "fine_tune"]
    assert (paths.backup / "best-fine_tune.json").exists(), result.history  # it improved
    trained = result.model.get_layer(backbone.name).get_layer("base")
    for name in ("bn1", "bn2"):  # bn2 is in the unfrozen top layers, and stays frozen
        layer = trained.get_layer(name)
        assert not layer.trainable
        # gamma, beta, moving mean and variance, each exactly as "pretrained"
        assert weights_equal(layer.get_weights(), before[name]), name
    assert trained.get_layer("conv2").trainable
    assert not weights_equal(trained.get_layer("conv2").get_weights(), before["conv2"])
    assert not trained.get_layer("conv1").trainable  # below the top 3 layers
    assert weights_equal(trained.get_layer("conv1").get_weights(), before["conv1"])


def test_nan_loss_stops_training_and_marks_the_backup(prepared, backbone_file, tmp_path):
    backbone, info = load_backbone(backbone_file, pretrained=False)
    paths = TrainPaths(model=tmp_path / "model.keras", backup=tmp_path / "backup")
    absurd = with_changes(PARAMS.train, epochs=2, batch_size=16, learning_rate=1e30, dropout=0.0)

    with pytest.raises(DivergedError, match=r"training diverged: the loss became nan") as caught:
        train(absurd, backbone, info, prepared, paths, backbone_file[0])

    assert "Lower train.learning_rate (now 1e+30)" in str(caught.value)
    assert (paths.backup / DIVERGED_MARK).exists()
    assert not paths.model.exists()
    for weights in paths.backup.rglob("*.weights.h5"):  # nothing non-finite was backed up
        assert all(np.isfinite(array).all() for array in float_arrays(weights))

    # With a sane learning rate the diverged backup is discarded, not refused.
    backbone2, _ = load_backbone(backbone_file, pretrained=False)
    sane = with_changes(PARAMS.train, epochs=1, batch_size=16, learning_rate=0.01)
    result = train(sane, backbone2, info, prepared, paths, backbone_file[0])
    assert np.isfinite(result.best_value)
    assert not (paths.backup / DIVERGED_MARK).exists()


# ---------------------------------------------------------------- what the stage reports


def run_stage(tmp_path, prepared, backbone_file, pretrained: bool, train: dict):
    """``python -m tasks.train`` on the fixtures; returns (process, out folder)."""
    path, info = backbone_file
    out = tmp_path / "out"
    out.mkdir()
    (out / "backbone.json").write_text(json.dumps({**info, "pretrained": pretrained}))
    params = write_params(tmp_path / "params.yaml", {"train": train})
    flags = {
        "params": params, "data": prepared.root, "backbone": path,
        "backbone-info": out / "backbone.json", "model": out / "model.keras",
        "info": out / "model.json", "metrics": out / "train.json", "live": out / "live",
        "backup": tmp_path / "backup", "features": tmp_path / "features",
    }  # fmt: skip
    command = ["python", "-m", "tasks.train"]
    command += [part for name, value in flags.items() for part in (f"--{name}", str(value))]
    return run(command, ROOT), out


def curve(out, name: str) -> list[float]:
    """One dvclive curve (``train/loss``, ``eval/accuracy``...): its values, epoch by epoch."""
    lines = (out / "live/plots/metrics" / f"{name}.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", name.split("/")[1]]
    return [float(line.split("\t")[1]) for line in lines[1:]]


def test_the_stage_reports_the_saved_epoch_and_warns_above_ten_parameters_per_image(
    prepared, backbone_file, tmp_path
):
    train = {
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": 0.01,
        "early_stopping_patience": 0,
        "dense_units": 128,
    }  # a hidden layer: over 10 parameters per image
    result, out = run_stage(tmp_path, prepared, backbone_file, pretrained=False, train=train)

    info = json.loads((out / "model.json").read_text())
    model = load_model_safely(out / "model.keras")
    images = prepared.count("train")
    assert info["trainable_params"] == model.count_params() > 10 * images  # all of it trains
    assert info["train_images"] == images
    assert info["params_per_image"] == round(model.count_params() / images, 2)
    (warning,) = info["warnings"]
    assert (
        f"{model.count_params():,} trainable parameters for {images:,} training images" in warning
    )
    for fix in ("freeze more", "a smaller head", "more training images", "train.augment: true"):
        assert fix in warning
    assert f"WARNING [tlp] {warning}" in result.stderr  # in the log, so in the Prefect run

    # The saved (best) epoch and its validation figures, named so they read as training's.
    val_loss, val_accuracy = curve(out, "eval/loss"), curve(out, "eval/accuracy")
    best = int(np.argmin(val_loss))
    metrics = json.loads((out / "train.json").read_text())
    assert metrics == {
        "train": {
            "best_epoch": best + 1,
            "best_epoch_val_loss": pytest.approx(val_loss[best]),
            "best_epoch_val_accuracy": pytest.approx(val_accuracy[best]),
            "epochs_run": 3,
            "params_per_image": info["params_per_image"],
        },
        "warnings": [warning],
    }
    assert info["best_epoch"] == best + 1 and len(curve(out, "train/loss")) == 3
    assert not (out / "live/metrics.json").exists()  # dvclive's last-epoch summary
    assert info["batchnorm_momentum"] is None  # simple_cnn has no BatchNorm


def test_a_small_head_on_a_frozen_backbone_is_within_the_rule(prepared, backbone_file, tmp_path):
    train = {"epochs": 1, "pooling": "avg", "dense_units": 0, "monitor": "val_accuracy"}
    result, out = run_stage(tmp_path, prepared, backbone_file, pretrained=True, train=train)
    info = json.loads((out / "model.json").read_text())
    head = 8 * 2 + 2  # 8 pooled features -> 2 classes, weights and biases
    assert info["trainable_params"] == head and info["params_per_image"] < 1
    assert info["warnings"] == [] and "WARNING [tlp]" not in result.stderr
    metrics = json.loads((out / "train.json").read_text())
    assert list(metrics["train"]) == [
        "best_epoch", "best_epoch_val_accuracy", "best_epoch_val_loss", "epochs_run",
        "params_per_image",
    ]  # fmt: skip
