"""Stage ``train``: a classification head on the backbone, with checkpoints and resume.

* Pretrained backbone: frozen, called with ``training=False`` (BatchNorm stays in inference
  mode, also when fine-tuning). With ``train.feature_cache`` (and no augmentation or
  fine-tuning) the backbone's pooled features are computed once, stored under
  ``--features`` keyed by backbone, data, pooling and engine, and the head trains on them.
  The extraction runs on ONNX Runtime (``train.feature_engine``: the backbone is converted
  with tf2onnx and checked against Keras on the first batch), 1.3-2x faster than Keras on
  CPU; Keras takes over if the conversion fails.
* ``backbone.weights: none``: the backbone trains with the head (from scratch).
* Optional phase 2 (``train.fine_tune``): unfreeze the top N backbone layers (BatchNorm
  stays frozen), recompile at a lower learning rate, continue.

Each phase checkpoints the best epoch (``ModelCheckpoint(save_best_only=True)`` semantics,
crash-safe, best value persisted) and keeps a per-epoch backup of weights and optimizer
state (a crash-safe ``BackupAndRestore``), so a killed run resumes from its last complete
epoch. A backup made with other settings is refused, not mixed in; a run whose loss turns
NaN/inf stops with an error and writes no model.

Backup folder (``--backup``)::

    fingerprint.txt                 settings, backbone and data the backup belongs to
    best-<phase>.json               {best, epoch, file}: the best value and its checkpoint
    best-<phase>-e<epoch>.keras     that checkpoint
    <phase>/epoch-<n>.weights.h5    weights + optimizer after n complete epochs
    <phase>/epoch-<n>.json          the logs of those n epochs
    <phase>.done.json               the phase finished (a rerun skips it)
    diverged.txt                    the run diverged: a rerun with other settings discards it
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from tasks.common import (
    StageError,
    atomic_path,
    log,
    progress,
    read_json,
    run_stage,
    set_determinism,
    write_json,
)
from tasks.dataset import EpochClock, Prepared
from tasks.params import TrainParams, load_params


@dataclass
class TrainPaths:
    """Where training reads and writes (all given on the command line by dvc.yaml)."""

    model: Path
    backup: Path
    features: Path | None = None
    live: Path | None = None


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    model: Any
    history: dict[str, list[float]]
    best_epoch: int
    best_value: float
    used_feature_cache: bool
    phases: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _mode(monitor: str) -> str:
    return "max" if "acc" in monitor else "min"


def _better(value: float, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class DivergedError(StageError):
    """The loss or the monitored metric became NaN or infinite."""


BACKUP_EPOCH_GLOB = "epoch-*.weights.h5"


def latest_backup(folder: Path) -> tuple[int, Path | None]:
    """The newest complete epoch backup in ``folder``: ``(epochs completed, weights file)``.

    A backup file gets its final name only once fully written (see ``EpochBackup``), so a
    run killed mid-write leaves at worst a hidden temporary file, which is ignored here.
    """
    best: tuple[int, Path | None] = (0, None)
    if folder.is_dir():
        for file in folder.glob(BACKUP_EPOCH_GLOB):
            number = file.name.removeprefix("epoch-").removesuffix(".weights.h5")
            if number.isdigit() and int(number) > best[0]:
                best = (int(number), file)
    return best


def keras_callbacks() -> SimpleNamespace:
    """The Keras callbacks of this stage (defined lazily, so importing this module is cheap).

    Returns:
        A namespace with ``BestCheckpoint``, ``EpochBackup``, ``ResumableEarlyStopping``,
        ``EpochClockCallback`` and ``NanGuard``.
    """
    import keras

    class BestCheckpoint(keras.callbacks.Callback):
        """``ModelCheckpoint(save_best_only=True)``, crash-safe, with its best value persisted.

        Keras' own callback forgets its best value when a run restarts, so after a resume a
        worse epoch could overwrite the best file. Here each improvement is written to its
        own file, ``best-<phase>-e<epoch>.keras`` (to a temporary name, then renamed), and
        only then ``best-<phase>.json`` is replaced atomically to point at it, with the
        value. The JSON is the single source of truth: whenever the process dies, the file it
        names is complete and its value is the one recorded.
        """

        def __init__(self, folder: Path, monitor: str, phase: str):
            super().__init__()
            self.folder, self.monitor, self.phase = folder, monitor, phase
            self.state_path = folder / f"best-{phase}.json"
            self.mode = _mode(monitor)
            self.best: float | None = None
            self.best_epoch = -1
            self.path: Path | None = None
            state = read_json(self.state_path) if self.state_path.exists() else {}
            if state.get("file") and (folder / state["file"]).is_file():
                self.best, self.best_epoch = state["best"], state["epoch"]
                self.path = folder / state["file"]
            for stale in folder.glob(f"best-{phase}-e*.keras"):
                if stale != self.path:  # written, but the process died before the JSON moved
                    stale.unlink()
            for stale in folder.glob(f".best-{phase}-*"):
                stale.unlink()  # temporary files of a write that was killed

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.monitor)
            if value is None:
                raise StageError(
                    f"train.monitor {self.monitor!r} is not a logged metric: {sorted(logs or {})}"
                )
            value = float(value)
            if not _better(value, self.best, self.mode):
                return
            log.info(
                "epoch %d: %s improved to %.5f, saving checkpoint", epoch + 1, self.monitor, value
            )
            self.folder.mkdir(parents=True, exist_ok=True)
            target = self.folder / f"best-{self.phase}-e{epoch + 1:04d}.keras"
            tmp = self.folder / f".best-{self.phase}-e{epoch + 1:04d}.tmp.keras"
            self.model.save(tmp)
            os.replace(tmp, target)
            write_json(
                self.state_path,
                {"best": value, "epoch": epoch, "phase": self.phase, "file": target.name},
            )
            previous, self.path = self.path, target
            self.best, self.best_epoch = value, epoch
            if previous is not None and previous != target:
                previous.unlink(missing_ok=True)

    class EpochBackup(keras.callbacks.Callback):
        """A crash-safe ``keras.callbacks.BackupAndRestore``.

        Keras' callback overwrites ``latest.weights.h5`` in place and writes the epoch number
        to a second file: a kill during the write leaves a corrupt backup (the rerun crashes)
        or weights one epoch ahead of the recorded epoch (the rerun trains an extra epoch).
        Here the weights, optimizer state included, go to a temporary file renamed to
        ``epoch-<n>.weights.h5`` only when complete; the epoch number is in the name, and
        the logs of all epochs so far are written beside it first. Restoring is done by
        :func:`restore_backup` before ``fit`` (which then gets ``initial_epoch``).
        """

        def __init__(self, folder: Path, history: dict[str, list[float]]):
            super().__init__()
            self.folder = folder
            self.history = history  # logs of the epochs before this run (from the backup)

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            self.folder.mkdir(parents=True, exist_ok=True)
            done = epoch + 1
            state = {
                "history": self.history,
                "rng_states": [v.numpy().tolist() for v in _rng_states(self.model)],
            }
            write_json(self.folder / f"epoch-{done:04d}.json", state)
            tmp = self.folder / f".epoch-{done:04d}.tmp.weights.h5"
            self.model.save_weights(tmp)
            os.replace(tmp, self.folder / f"epoch-{done:04d}.weights.h5")  # the commit point
            for old in self.folder.iterdir():
                if not old.name.startswith(f"epoch-{done:04d}."):
                    old.unlink()

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """``keras.callbacks.EarlyStopping`` that counts the epochs before a resume.

        Keras' callback starts from scratch in every ``fit``: after a resume its patience
        would restart, and a run killed and resumed could train longer than one left
        alone. Here the logged values of the earlier epochs (from the backup) are replayed
        first, so the stopping epoch is the one an uninterrupted run would reach.
        """

        def __init__(self, earlier: dict[str, list[float]], **kwargs):
            super().__init__(**kwargs)
            self.earlier = earlier

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            for epoch, value in enumerate(self.earlier.get(self.monitor, [])):
                super().on_epoch_end(epoch, {self.monitor: value})

    class EpochClockCallback(keras.callbacks.Callback):
        def __init__(self, clock: EpochClock):
            super().__init__()
            self.clock = clock

        def on_epoch_begin(self, epoch, logs=None):
            self.clock.epoch = epoch

    class NanGuard(keras.callbacks.Callback):
        """Stop at the first NaN/inf loss with a message that names the cause."""

        def __init__(self, learning_rate: float):
            super().__init__()
            self.learning_rate = learning_rate

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                raise DivergedError(
                    f"training diverged: the loss became {float(loss)} at batch {batch}. Lower "
                    f"train.learning_rate (now {self.learning_rate}) or check the data; no model "
                    "was written, and the previous model and the resume backup were left as "
                    "they were"
                )

    return SimpleNamespace(
        BestCheckpoint=BestCheckpoint,
        EpochBackup=EpochBackup,
        ResumableEarlyStopping=ResumableEarlyStopping,
        EpochClockCallback=EpochClockCallback,
        NanGuard=NanGuard,
    )


def restore_backup(model, folder: Path) -> tuple[int, dict[str, list[float]]]:
    """Load the newest epoch backup of ``folder`` into ``model`` (compiled).

    Returns:
        ``(epochs completed, logs of those epochs)``; ``(0, {})`` when there is no backup.
    """
    done, weights = latest_backup(folder)
    if weights is None:
        return 0, {}
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # so its state can be loaded too
    try:
        model.load_weights(weights)
    except (OSError, ValueError) as exc:
        raise StageError(
            f"the resume backup {weights} cannot be loaded ({exc}); delete {folder.parent} to "
            "start the training over"
        ) from None
    state = read_json(weights.with_name(f"epoch-{done:04d}.json"))
    rng_states = _rng_states(model)
    if len(rng_states) == len(state["rng_states"]):
        for variable, value in zip(rng_states, state["rng_states"], strict=True):
            variable.assign(np.asarray(value, dtype=variable.dtype))
    log.info("resuming from the backup of epoch %d in %s", done, folder)
    return done, state["history"]


def _rng_states(model) -> list:
    """The model's random-generator states (e.g. Dropout's): variables, but not weights.

    ``save_weights`` leaves them out; restoring them too makes a resumed run draw the same
    dropout masks as an uninterrupted one, so it ends with the same weights.
    """
    weight_ids = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weight_ids]


def fingerprint(params: TrainParams, backbone_file: Path, prepared: Prepared) -> str:
    """What a resume must match: everything but the epoch budget and patience."""
    settings = params.model_dump(exclude={"epochs", "early_stopping_patience"})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(model_digest(backbone_file))
    digest.update(json.dumps(prepared.classes).encode())
    digest.update(pd_hash(prepared))
    return digest.hexdigest()


def model_digest(path: Path) -> bytes:
    """A digest of a saved model's content: config and weights, not its save date.

    A ``.keras`` archive holds ``metadata.json`` with the time it was saved, so the same
    backbone saved twice (``dvc repro -f backbone``) differs byte-wise; its other entries
    do not.
    """
    digest = hashlib.sha256()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in sorted(archive.namelist()):
                if name != "metadata.json":
                    digest.update(name.encode() + b"\0" + archive.read(name))
    else:
        digest.update(path.read_bytes())
    return digest.digest()


def pd_hash(prepared: Prepared) -> bytes:
    """A digest of the prepared data: every image's content hash, label and split."""
    cols = prepared.manifest[["sha256", "label_index", "split"]].astype(str)
    return hashlib.sha256("\n".join(cols.agg("|".join, axis=1)).encode()).digest()


DIVERGED_MARK = "diverged.txt"


def _check_backup(backup: Path, print_: str) -> None:
    """Refuse a backup made with other settings; stamp the folder with this run's fingerprint.

    The backup of a run that diverged is the exception: its settings must change anyway
    (usually the learning rate), so it is discarded with a warning instead of refused.
    """
    stamp = backup / "fingerprint.txt"
    if backup.exists() and any(backup.iterdir()):
        if not stamp.exists() or stamp.read_text().strip() != print_:
            if (backup / DIVERGED_MARK).exists():
                log.warning("discarding the backup of a run that diverged, in %s", backup)
                shutil.rmtree(backup)
            else:
                raise StageError(
                    f"{backup} holds a backup of an interrupted run made with other settings "
                    "(learning rate, backbone, classes or data changed). Resuming would mix two "
                    f"trainings; delete it to start over (rm -rf {backup}) or restore the "
                    "settings to resume"
                )
        else:
            log.info("resuming the interrupted run from its backup in %s", backup)
    backup.mkdir(parents=True, exist_ok=True)
    with atomic_path(stamp) as tmp:  # a kill mid-write must not leave a stamp that mismatches
        tmp.write_text(print_ + "\n")


def _head_layers(params: TrainParams, n_classes: int, feature_rank: int):
    import keras

    layers = []
    if feature_rank == 3:
        pool = {
            "avg": keras.layers.GlobalAveragePooling2D(name="pool"),
            "max": keras.layers.GlobalMaxPooling2D(name="pool"),
            "flatten": keras.layers.Flatten(name="pool"),
        }[params.pooling]
        layers.append(pool)
    if params.dropout:
        layers.append(keras.layers.Dropout(params.dropout, name="dropout"))
    if params.dense_units:
        layers.append(keras.layers.Dense(params.dense_units, activation="relu", name="hidden"))
        if params.dropout:
            layers.append(keras.layers.Dropout(params.dropout, name="dropout_hidden"))
    layers.append(keras.layers.Dense(n_classes, activation="softmax", name="probabilities"))
    return layers


def _apply(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def _augmentation(seed: int):
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.05, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
        ],
        name="augment",
    )


def _compile(model, learning_rate: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


EXTRACT_BATCH = 16  # the fastest VGG16/MobileNetV2 batch on CPU here; features don't depend on it


@dataclass
class FeatureExtractor:
    """The frozen backbone plus pooling, as a function of a float32 pixel batch."""

    run: Callable[[np.ndarray], np.ndarray]
    engine: str  # "onnxruntime" or "keras"
    width: int  # features per image


def feature_extractor(
    backbone, pooling: str, engine: str = "keras", sample: np.ndarray | None = None
) -> FeatureExtractor:
    """Backbone → global pooling (or flatten) as a batch function on ``engine``.

    With ``onnxruntime`` the Keras graph is converted with tf2onnx and, given a ``sample``
    batch of float32 pixels, checked against Keras on it; if the conversion fails or
    disagrees, Keras is used and the reason is logged (the features are the same either
    way, within float32 rounding).
    """
    import keras

    inputs = keras.Input(backbone.input_shape[1:])
    x = backbone(inputs, training=False)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D()(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D()(x)
    else:
        x = keras.layers.Flatten()(x)
    extractor = keras.Model(inputs, x)
    width = int(x.shape[-1])

    def on_keras(batch: np.ndarray) -> np.ndarray:
        return np.asarray(extractor.predict_on_batch(batch), np.float32)

    if engine == "onnxruntime":
        try:
            on_onnx = _onnx_runner(extractor)
        except Exception as exc:  # tf2onnx raises whatever it hits on layers it can't convert
            log.warning("feature extraction: ONNX Runtime unavailable (%s); using Keras", exc)
        else:
            if sample is None or _agrees(on_onnx(sample), on_keras(sample)):
                return FeatureExtractor(on_onnx, "onnxruntime", width)
    return FeatureExtractor(on_keras, "keras", width)


FEATURE_OPSET = 17  # the extractor never leaves this process; any opset tf2onnx handles


def _onnx_runner(extractor) -> Callable[[np.ndarray], np.ndarray]:
    """``extractor`` converted to ONNX, as a batch function on an ONNX Runtime session."""
    import onnxruntime as ort

    from tasks.export import keras_to_onnx

    started = time.perf_counter()
    proto = keras_to_onnx(extractor, extractor.input_shape[1:], FEATURE_OPSET, "pixels", "features")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    log.info(
        "feature extraction: backbone converted to ONNX in %.1fs", time.perf_counter() - started
    )
    return lambda batch: session.run(None, {"pixels": batch})[0]


def _agrees(features: np.ndarray, expected: np.ndarray) -> bool:
    """ONNX Runtime's features match Keras's within float32 rounding (else a warning)."""
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(features - expected).max())
    if diff <= 1e-3 * scale:
        return True
    log.warning(
        "feature extraction: ONNX Runtime differs from Keras by %g (scale %g); using Keras",
        diff,
        scale,
    )
    return False


def extract_features(
    backbone, prepared: Prepared, split: str, pooling: str, batch_size: int,
    extractor: FeatureExtractor | None = None,
) -> np.ndarray:  # fmt: skip
    """Backbone outputs (globally pooled unless ``pooling`` is ``flatten``) for a split.

    ``extractor`` (from :func:`feature_extractor`) is built from ``backbone`` when absent.
    """
    extractor = extractor or feature_extractor(backbone, pooling)
    total = prepared.count(split)
    out = np.empty((total, extractor.width), np.float32)
    done = 0
    with progress(total=total, desc=f"features {split} ({extractor.engine})", unit="img") as bar:
        for images, _ in prepared.batches(split, batch_size):
            out[done : done + len(images)] = extractor.run(images.astype(np.float32))
            done += len(images)
            bar.update(len(images))
    return out


def cached_features(
    folder: Path, key: str, backbone, prepared: Prepared, pooling: str,
    engine: str = "keras", batch_size: int = EXTRACT_BATCH,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Load the features for ``key`` from ``folder``, computing and storing them if absent.

    Only one key is kept: features of older backbones or data are deleted.
    """
    target = folder / key
    splits = ("train", "val")
    if all((target / f"{s}.npy").exists() for s in splits):
        log.info("feature cache hit: %s", target)
        return {s: np.load(target / f"{s}.npy") for s in splits}
    log.info("feature cache miss: extracting backbone features once into %s", target)
    started = time.perf_counter()
    sample = prepared.load("train", limit=2)[0].astype(np.float32)  # checks ONNX vs Keras
    extractor = feature_extractor(backbone, pooling, engine, sample if len(sample) else None)
    features = {
        s: extract_features(backbone, prepared, s, pooling, batch_size, extractor) for s in splits
    }
    log.info(
        "extracted %d feature vectors with %s in %.1fs",
        sum(len(f) for f in features.values()),
        extractor.engine,
        time.perf_counter() - started,
    )
    if folder.exists():
        for old in folder.iterdir():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    with atomic_path(target, directory=True) as tmp:
        for split, array in features.items():
            np.save(tmp / f"{split}.npy", array)
    return features


def _fit_phase(
    *, model, phase: str, epochs: int, train_data, val_data, params: TrainParams,
    paths: TrainPaths, clock: EpochClock, live, learning_rate: float, initial_best=None,
) -> tuple[dict[str, list[float]], Any]:  # fmt: skip
    """Fit one phase with checkpoints and a resumable backup; skip it if it already finished.

    Returns:
        The logs of every epoch of the phase (those before a resume included), and the
        phase's ``BestCheckpoint``.
    """

    cbs = keras_callbacks()
    checkpoint = cbs.BestCheckpoint(paths.backup, params.monitor, phase)
    if initial_best is not None and _better(initial_best, checkpoint.best, _mode(params.monitor)):
        checkpoint.best = initial_best  # phase 2 saves only what beats phase 1
    done_file = paths.backup / f"{phase}.done.json"
    if done_file.exists():  # killed after this phase finished: do not train it again
        log.info("phase %s already finished before the interruption; skipping it", phase)
        return read_json(done_file)["history"], checkpoint
    folder = paths.backup / phase
    initial_epoch, history = restore_backup(model, folder)
    # The checkpoint comes before the backup: if the process dies while the best model is
    # written, the epoch is not yet marked done and is trained again on resume.
    callbacks = [
        cbs.EpochClockCallback(clock),
        cbs.NanGuard(learning_rate),
        checkpoint,
        cbs.EpochBackup(folder, history),
    ]
    if params.early_stopping_patience:
        callbacks.append(
            cbs.ResumableEarlyStopping(
                {k: list(v) for k, v in history.items()},
                monitor=params.monitor,
                patience=params.early_stopping_patience,
                mode=_mode(params.monitor),
            )  # fmt: skip
        )
    if live is not None:
        from dvclive.keras import DVCLiveCallback

        callbacks.append(DVCLiveCallback(live=live))
    x, y = train_data if isinstance(train_data, tuple) else (train_data, None)
    try:
        model.fit(
            x, y, epochs=epochs, initial_epoch=initial_epoch, validation_data=val_data,
            callbacks=callbacks, batch_size=params.batch_size if y is not None else None,
            shuffle=y is not None, verbose=2,
        )  # fmt: skip
    except DivergedError:
        _mark_diverged(paths.backup)
        raise
    write_json(done_file, {"history": history})
    shutil.rmtree(folder, ignore_errors=True)
    return history, checkpoint


def _mark_diverged(backup: Path) -> None:
    """Mark the backup as coming from a diverged run (see :func:`_check_backup`)."""
    backup.mkdir(parents=True, exist_ok=True)
    (backup / DIVERGED_MARK).write_text("this run diverged (NaN/inf loss)\n")


def train(
    params: TrainParams,
    backbone,
    backbone_info: dict,
    prepared: Prepared,
    paths: TrainPaths,
    backbone_file: Path,
) -> TrainResult:
    """Train the head (and optionally fine-tune) and return the best model.

    Args:
        params: the ``train`` section.
        backbone: the loaded backbone model (raw pixels → feature map).
        backbone_info: ``models/backbone.json`` (``pretrained`` decides freezing).
        prepared: the prepared dataset.
        paths: checkpoint, backup, feature-cache and dvclive locations.
        backbone_file: the backbone's file, hashed into the resume fingerprint.

    Returns:
        A :class:`TrainResult` whose ``model`` maps raw pixels to class probabilities.
    """
    import keras

    started = time.perf_counter()
    set_determinism(params.seed)
    if prepared.count("train") == 0:
        raise StageError("the train split is empty; add images or lower prepare.test_fraction")
    n_classes = len(prepared.classes)
    pretrained = bool(backbone_info["pretrained"])
    use_cache = (
        pretrained and params.feature_cache and not params.augment and not params.fine_tune.enabled
    )
    if params.fine_tune.enabled and not pretrained:
        raise StageError(
            "train.fine_tune needs a pretrained backbone (backbone.weights is 'none': it already trains fully)"
        )
    _check_backup(paths.backup, fingerprint(params, backbone_file, prepared))
    has_val = prepared.count("val") > 0
    if not has_val and params.monitor.startswith("val_"):
        raise StageError(
            f"train.monitor is {params.monitor} but the val split is empty; set prepare.val_fraction > 0"
        )

    backbone.trainable = not pretrained
    feature_rank = len(backbone.output_shape) - 1
    head = _head_layers(params, n_classes, feature_rank)
    inputs = keras.Input(backbone.input_shape[1:], name="pixels")
    x = _augmentation(params.seed)(inputs) if params.augment else inputs
    x = backbone(x, training=False if pretrained else None)
    model = keras.Model(inputs, _apply(head, x), name="classifier")
    clock = EpochClock()
    live = None
    if paths.live is not None:
        from dvclive import Live

        resuming = latest_backup(paths.backup / "head")[0] > 0
        live = Live(str(paths.live), save_dvc_exp=False, dvcyaml=None, resume=resuming)
    phases = ["head"]
    if use_cache:
        pool_layer = head[0] if feature_rank == 3 else None
        key_source = hashlib.sha256(model_digest(backbone_file))
        key_source.update(pd_hash(prepared))
        key_source.update(
            f"{params.pooling}|{prepared.image_size}|{params.feature_engine}".encode()
        )
        features = cached_features(
            paths.features or paths.backup / "features", key_source.hexdigest()[:20], backbone,
            prepared, params.pooling, params.feature_engine,
        )  # fmt: skip
        feat_in = keras.Input(features["train"].shape[1:], name="features")
        head_model = keras.Model(
            feat_in, _apply(head[1:] if pool_layer else head, feat_in), name="head"
        )
        _compile(head_model, params.learning_rate)
        history, checkpoint = _fit_phase(
            model=head_model, phase="head", epochs=params.epochs,
            train_data=(features["train"], prepared.labels("train")),
            val_data=(features["val"], prepared.labels("val")) if has_val else None,
            params=params, paths=paths, clock=clock, live=live, learning_rate=params.learning_rate,
        )  # fmt: skip
        _load_best(head_model, checkpoint)
    else:
        _compile(model, params.learning_rate)
        train_ds = prepared.tf_dataset(
            "train", params.batch_size, shuffle=True, seed=params.seed, clock=clock
        )
        val_ds = prepared.tf_dataset("val", params.batch_size) if has_val else None
        history, checkpoint = _fit_phase(
            model=model, phase="head", epochs=params.epochs, train_data=train_ds, val_data=val_ds,
            params=params, paths=paths, clock=clock, live=live, learning_rate=params.learning_rate,
        )  # fmt: skip
        _load_best(model, checkpoint)
        if params.fine_tune.enabled:
            phases.append("fine_tune")
            _unfreeze_top(backbone, backbone_info["base_layer"], params.fine_tune.layers)
            _compile(model, params.fine_tune.learning_rate)
            more, checkpoint2 = _fit_phase(
                model=model, phase="fine_tune", epochs=params.fine_tune.epochs, train_data=train_ds,
                val_data=val_ds, params=params, paths=paths, clock=clock, live=live,
                learning_rate=params.fine_tune.learning_rate, initial_best=checkpoint.best,
            )  # fmt: skip
            for key, values in more.items():
                history.setdefault(key, []).extend(values)
            if checkpoint2.path is not None and _better(
                checkpoint2.best, checkpoint.best, _mode(params.monitor)
            ):
                _load_best(model, checkpoint2)
                checkpoint = checkpoint2
    if live is not None:
        live.end()
    for key, values in history.items():
        if any(not math.isfinite(v) for v in values):
            _mark_diverged(paths.backup)
            raise DivergedError(
                f"training diverged: {key} became NaN/inf; lower train.learning_rate (now "
                f"{params.learning_rate}). No model was written"
            )
    return TrainResult(
        model=model, history=history, best_epoch=checkpoint.best_epoch + 1,
        best_value=float(checkpoint.best), used_feature_cache=use_cache, phases=phases,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def _load_best(model, checkpoint) -> None:
    """Load the weights of a phase's best checkpoint into ``model`` (the model it was saved from).

    ``load_weights`` reads only the weights of the ``.keras`` archive, never its config.
    """
    if checkpoint.path is None:
        raise DivergedError(
            f"no epoch produced a finite {checkpoint.monitor}; nothing to save. Lower "
            "train.learning_rate or check the data"
        )
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # the checkpoint holds its state too
    model.load_weights(checkpoint.path)


def _unfreeze_top(backbone, base_name: str, n_layers: int) -> None:
    import keras

    base = backbone.get_layer(base_name)
    backbone.trainable = True
    base.trainable = True
    for layer in base.layers[:-n_layers]:
        layer.trainable = False
    for layer in base.layers[-n_layers:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # keep BatchNorm statistics frozen (keras-io guide)
    trainable = sum(1 for layer in base.layers if layer.trainable and layer.weights)
    log.info(
        "fine-tune: %d of %d backbone layers trainable (BatchNorm kept frozen)",
        trainable,
        len(base.layers),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.train --data ... --backbone ... --model ... --backup ...``."""
    parser = argparse.ArgumentParser(description="Train the classification head.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--backbone", required=True, type=Path)
    parser.add_argument("--backbone-info", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--info", required=True, type=Path)
    parser.add_argument("--backup", required=True, type=Path)
    parser.add_argument("--features", type=Path)
    parser.add_argument("--live", type=Path)
    args = parser.parse_args(argv)

    def body() -> None:
        from tasks.safety import load_model_safely

        params = load_params(args.params)
        prepared = Prepared.open(args.data)
        backbone_info = read_json(args.backbone_info)
        backbone = load_model_safely(args.backbone, compile=False)
        paths = TrainPaths(
            model=args.model, backup=args.backup, features=args.features, live=args.live
        )
        if args.features is not None:
            args.features.mkdir(parents=True, exist_ok=True)
        result = train(params.train, backbone, backbone_info, prepared, paths, args.backbone)
        with atomic_path(args.model) as tmp:
            keras_tmp = tmp.with_suffix(".keras")  # Keras insists on the extension
            try:
                result.model.save(keras_tmp)
                keras_tmp.replace(tmp)
            finally:
                keras_tmp.unlink(missing_ok=True)
        write_json(
            args.info,
            {
                "classes": prepared.classes,
                "image_size": list(prepared.image_size),
                "input": "RGB pixels, float32 in [0, 255], shape (batch, height, width, 3)",
                "preprocessing": backbone_info["preprocessing"],
                "backbone": backbone_info,
                "train": params.train.model_dump(),
                "best_epoch": result.best_epoch,
                "best": {params.train.monitor: result.best_value},
                "epochs_run": len(next(iter(result.history.values()), [])),
                "phases": result.phases,
                "feature_cache": result.used_feature_cache,
                "seconds": round(result.seconds, 2),
            },
        )
        shutil.rmtree(args.backup, ignore_errors=True)  # finished: nothing to resume
        log.info(
            "train: best %s=%.4f at epoch %d (%.1fs)",
            params.train.monitor,
            result.best_value,
            result.best_epoch,
            result.seconds,
        )

    return run_stage("train", body)


if __name__ == "__main__":
    raise SystemExit(main())
