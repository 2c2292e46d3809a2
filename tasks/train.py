"""Stage ``train``: a classification head on the backbone, with checkpoints and resume.

* Pretrained backbone: frozen, called with ``training=False`` (BatchNorm stays in inference
  mode, also when fine-tuning). With ``train.feature_cache`` (and no augmentation or
  fine-tuning) the backbone's pooled features are computed once, stored under
  ``--features`` keyed by backbone, data and pooling, and the head trains on them.
* ``backbone.weights: none``: the backbone trains with the head (from scratch).
* Optional phase 2 (``train.fine_tune``): unfreeze the top N backbone layers (BatchNorm
  stays frozen), recompile at a lower learning rate, continue.

Each phase checkpoints the best epoch (``ModelCheckpoint(save_best_only=True)`` semantics,
written atomically) and keeps a ``BackupAndRestore`` backup, so a killed run resumes from
its last complete epoch. A backup made with other settings is refused, not mixed in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common import StageError, atomic_path, log, read_json, run_stage, set_determinism, write_json
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
    if value is None or math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _callbacks_module():
    import keras

    class AtomicBestCheckpoint(keras.callbacks.Callback):
        """``ModelCheckpoint(save_best_only=True)``, written atomically, best value persisted.

        Keras' own callback forgets its best value when a run restarts, so after a resume a
        worse epoch could overwrite the best file; here the best value lives in a JSON file
        beside the checkpoint and survives the crash.
        """

        def __init__(self, path: Path, monitor: str, phase: str):
            super().__init__()
            self.path, self.monitor, self.phase = path, monitor, phase
            self.state_path = path.with_suffix(".json")
            self.mode = _mode(monitor)
            state = read_json(self.state_path) if self.state_path.exists() and path.exists() else {}
            self.best = state.get("best")
            self.best_epoch = state.get("epoch", -1)

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.monitor)
            if value is None:
                raise StageError(f"train.monitor {self.monitor!r} is not a logged metric: {sorted(logs or {})}")
            value = float(value)
            if _better(value, self.best, self.mode):
                log.info("epoch %d: %s improved to %.5f, saving checkpoint", epoch + 1, self.monitor, value)
                with atomic_path(self.path) as tmp:
                    keras_tmp = tmp.with_suffix(".keras")
                    self.model.save(keras_tmp)
                    keras_tmp.replace(tmp)
                self.best, self.best_epoch = value, epoch
                self._write_state()

        def _write_state(self):
            write_json(self.state_path, {"best": self.best, "epoch": self.best_epoch, "phase": self.phase})

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
                raise StageError(
                    f"training diverged: the loss became {float(loss)} at batch {batch}. Lower "
                    f"train.learning_rate (now {self.learning_rate}) or check the data; the previous "
                    "model and the resume backup were left as they were"
                )

    return AtomicBestCheckpoint, EpochClockCallback, NanGuard


def fingerprint(params: TrainParams, backbone_file: Path, prepared: Prepared) -> str:
    """What a resume must match: everything but the epoch budget and patience."""
    settings = params.model_dump(exclude={"epochs", "early_stopping_patience"})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(backbone_file.read_bytes())
    digest.update(json.dumps(prepared.classes).encode())
    digest.update(pd_hash(prepared))
    return digest.hexdigest()


def pd_hash(prepared: Prepared) -> bytes:
    """A digest of the prepared data: every image's content hash, label and split."""
    cols = prepared.manifest[["sha256", "label_index", "split"]].astype(str)
    return hashlib.sha256("\n".join(cols.agg("|".join, axis=1)).encode()).digest()


def _check_backup(backup: Path, print_: str) -> None:
    stamp = backup / "fingerprint.txt"
    if backup.exists() and any(backup.iterdir()):
        if not stamp.exists() or stamp.read_text().strip() != print_:
            raise StageError(
                f"{backup} holds a backup of an interrupted run made with other settings (learning "
                "rate, backbone, classes or data changed). Resuming would mix two trainings; delete "
                f"it to start over (rm -rf {backup}) or restore the settings to resume"
            )
        log.info("resuming the interrupted run from its backup in %s", backup)
    backup.mkdir(parents=True, exist_ok=True)
    stamp.write_text(print_ + "\n")


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


def extract_features(backbone, prepared: Prepared, split: str, pooling: str, batch_size: int) -> np.ndarray:
    """Backbone outputs (globally pooled unless ``pooling`` is ``flatten``) for a split."""
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
    parts = [
        extractor.predict_on_batch(images.astype(np.float32))
        for images, _ in prepared.batches(split, batch_size)
    ]
    return np.concatenate(parts).astype(np.float32) if parts else np.empty((0, x.shape[-1]), np.float32)


def cached_features(
    folder: Path, key: str, backbone, prepared: Prepared, pooling: str, batch_size: int
) -> dict[str, np.ndarray]:
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
    features = {s: extract_features(backbone, prepared, s, pooling, batch_size) for s in splits}
    log.info("extracted %d feature vectors in %.1fs", sum(len(f) for f in features.values()), time.perf_counter() - started)
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
    import keras

    AtomicBestCheckpoint, EpochClockCallback, NanGuard = _callbacks_module()
    checkpoint = AtomicBestCheckpoint(paths.backup / f"best-{phase}.keras", params.monitor, phase)
    if initial_best is not None and _better(initial_best, checkpoint.best, _mode(params.monitor)):
        checkpoint.best = initial_best  # phase 2 saves only what beats phase 1
    callbacks = [
        EpochClockCallback(clock),
        NanGuard(learning_rate),
        keras.callbacks.BackupAndRestore(str(paths.backup / phase), delete_checkpoint=True),
        checkpoint,
    ]
    if params.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(params.monitor, patience=params.early_stopping_patience, mode=_mode(params.monitor))
        )
    if live is not None:
        from dvclive.keras import DVCLiveCallback

        callbacks.append(DVCLiveCallback(live=live))
    x, y = train_data if isinstance(train_data, tuple) else (train_data, None)
    history = model.fit(
        x, y, epochs=epochs, validation_data=val_data, callbacks=callbacks,
        batch_size=params.batch_size if y is not None else None,
        shuffle=y is not None, verbose=2,
    )  # fmt: skip
    return history.history, checkpoint


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
    use_cache = pretrained and params.feature_cache and not params.augment and not params.fine_tune.enabled
    if params.fine_tune.enabled and not pretrained:
        raise StageError("train.fine_tune needs a pretrained backbone (backbone.weights is 'none': it already trains fully)")
    _check_backup(paths.backup, fingerprint(params, backbone_file, prepared))
    has_val = prepared.count("val") > 0
    if not has_val and params.monitor.startswith("val_"):
        raise StageError(f"train.monitor is {params.monitor} but the val split is empty; set prepare.val_fraction > 0")

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

        live = Live(str(paths.live), save_dvc_exp=False, dvcyaml=None, resume=(paths.backup / "head").exists())
    phases = ["head"]
    if use_cache:
        pool_layer = head[0] if feature_rank == 3 else None
        key_source = hashlib.sha256(backbone_file.read_bytes())
        key_source.update(pd_hash(prepared))
        key_source.update(f"{params.pooling}|{prepared.image_size}".encode())
        features = cached_features(
            paths.features or paths.backup / "features", key_source.hexdigest()[:20], backbone, prepared,
            params.pooling, max(params.batch_size, 64),
        )  # fmt: skip
        feat_in = keras.Input(features["train"].shape[1:], name="features")
        head_model = keras.Model(feat_in, _apply(head[1:] if pool_layer else head, feat_in), name="head")
        _compile(head_model, params.learning_rate)
        history, checkpoint = _fit_phase(
            model=head_model, phase="head", epochs=params.epochs,
            train_data=(features["train"], prepared.labels("train")),
            val_data=(features["val"], prepared.labels("val")) if has_val else None,
            params=params, paths=paths, clock=clock, live=live, learning_rate=params.learning_rate,
        )  # fmt: skip
        head_model.load_weights(_weights_of(checkpoint.path, head_model))
    else:
        _compile(model, params.learning_rate)
        train_ds = prepared.tf_dataset("train", params.batch_size, shuffle=True, seed=params.seed, clock=clock)
        val_ds = prepared.tf_dataset("val", params.batch_size) if has_val else None
        history, checkpoint = _fit_phase(
            model=model, phase="head", epochs=params.epochs, train_data=train_ds, val_data=val_ds,
            params=params, paths=paths, clock=clock, live=live, learning_rate=params.learning_rate,
        )  # fmt: skip
        model.load_weights(_weights_of(checkpoint.path, model))
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
            if checkpoint2.best_epoch >= 0 and _better(checkpoint2.best, checkpoint.best, _mode(params.monitor)):
                model.load_weights(_weights_of(checkpoint2.path, model))
                checkpoint = checkpoint2
    if live is not None:
        live.end()
    for key, values in history.items():
        if any(not math.isfinite(v) for v in values):
            raise StageError(f"training diverged: {key} became NaN/inf; lower train.learning_rate (now {params.learning_rate})")
    if checkpoint.best is None:
        raise StageError("no epoch produced a finite monitored value; nothing to save")
    return TrainResult(
        model=model, history=history, best_epoch=checkpoint.best_epoch + 1,
        best_value=float(checkpoint.best), used_feature_cache=use_cache, phases=phases,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def _weights_of(checkpoint_path: Path, model) -> Path:
    """Extract the weights of a ``.keras`` checkpoint to a ``.weights.h5`` beside it."""
    from tasks.safety import load_model_safely

    best = load_model_safely(checkpoint_path, compile=False)
    weights = checkpoint_path.with_suffix(".weights.h5")
    best.save_weights(weights)
    return weights


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
    log.info("fine-tune: %d of %d backbone layers trainable (BatchNorm kept frozen)", trainable, len(base.layers))


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
        paths = TrainPaths(model=args.model, backup=args.backup, features=args.features, live=args.live)
        if args.features is not None:
            args.features.mkdir(parents=True, exist_ok=True)
        result = train(params.train, backbone, backbone_info, prepared, paths, args.backbone)
        with atomic_path(args.model) as tmp:
            keras_tmp = tmp.with_suffix(".keras")
            result.model.save(keras_tmp)
            keras_tmp.replace(tmp)
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
        log.info("train: best %s=%.4f at epoch %d (%.1fs)", params.train.monitor, result.best_value, result.best_epoch, result.seconds)

    return run_stage("train", body)


if __name__ == "__main__":
    raise SystemExit(main())
