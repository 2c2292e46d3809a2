"""The training core of the ``train`` and ``train_other`` stages: :func:`train`.

* Pretrained backbone: frozen, called with ``training=False`` (BatchNorm stays in inference
  mode, also when fine-tuning). With ``train.feature_cache`` (and no augmentation or
  fine-tuning) the backbone's pooled features are computed once, stored under
  ``--features`` keyed by backbone, data, pooling and engine, and the head trains on them
  (:mod:`tasks.features`). The extraction runs on ONNX Runtime (``train.feature_engine``:
  the backbone is converted with tf2onnx and checked against Keras on a sample), 1.3-2x
  faster than Keras on CPU; Keras takes over if the conversion fails.
* ``backbone.weights: none``: the backbone trains with the head (from scratch), its
  BatchNorm momentum suited to the steps per epoch (:func:`tasks.network.suit_batchnorm`).
* Optional phase 2 (``train.fine_tune``): unfreeze the top N backbone layers (BatchNorm
  stays frozen), recompile at a lower learning rate, continue.

Each phase checkpoints the best epoch (``ModelCheckpoint(save_best_only=True)`` semantics,
crash-safe, best value persisted) and keeps a per-epoch backup of weights and optimizer
state (a crash-safe ``BackupAndRestore``), so a killed run resumes from its last complete
epoch (the callbacks of :mod:`tasks.callbacks` write the backup; :mod:`tasks.backup`
reads it back and guards it).
A backup made with other settings is refused, not mixed in; a run whose loss turns NaN/inf
stops with an error and writes no model.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from tasks.backup import budget, check_backup, fingerprint, mark_diverged, restore_backup
from tasks.callbacks import (
    BestCheckpoint,
    DivergedError,
    EpochBackup,
    EpochClockCallback,
    NanGuard,
    ResumableEarlyStopping,
    is_better,
    monitor_mode,
)
from tasks.common import (
    StageError,
    log,
    read_json,
    set_determinism,
    write_json,
)
from tasks.dataset import EpochClock, Prepared
from tasks.features import training_features
from tasks.network import (
    apply,
    augmentation,
    capacity_warning,
    compile_model,
    count_trainable,
    head_layers,
    suit_batchnorm,
    unfreeze_top,
)
from tasks.params import TrainParams


@dataclass
class TrainPaths:
    """Where training reads and writes (all given on the command line by dvc.yaml)."""

    model: Path
    backup: Path
    features: Path | None = None


@dataclass
class TrainResult:
    """What :func:`train` produced.

    ``best_epoch`` counts from 1 over all phases (the fine-tuning epochs follow the head's),
    ``history`` holds every epoch's logs, also those trained before a resume, and
    ``trainable_params`` is the most any phase trained.
    """

    model: Any
    history: dict[str, list[float]]
    best_epoch: int
    best_value: float
    used_feature_cache: bool
    phases: list[str] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    batchnorm_momentum: float | None = None
    warnings: list[str] = field(default_factory=list)

    def at_best_epoch(self) -> dict[str, float]:
        """The logs (loss, accuracy, val_loss, val_accuracy) of the epoch that was saved."""
        return {key: values[self.best_epoch - 1] for key, values in self.history.items()}


def train(
    params: TrainParams,
    backbone,
    backbone_info: dict,
    prepared: Prepared,
    paths: TrainPaths,
    backbone_file: Path,
    full: Prepared | None = None,
) -> TrainResult:
    """Train the head (and optionally fine-tune) and return the best model.

    Args:
        params: the ``train`` section.
        backbone: the loaded backbone model (raw pixels → feature map).
        backbone_info: ``models/backbone.json`` (``pretrained`` decides freezing).
        prepared: the prepared dataset.
        paths: checkpoint, backup and feature-cache locations.
        backbone_file: the backbone's file, hashed into the resume fingerprint.
        full: the whole dataset when ``prepared`` is a subset of it (the other-class
            specialist): the features the train stage cached for it are reused, read only.

    Returns:
        A :class:`TrainResult` whose ``model`` maps raw pixels to class probabilities.

    Raises:
        StageError: the data or the settings cannot train, or the backup is another run's.
        DivergedError: the loss became NaN/inf; no model is returned.
    """
    started = time.perf_counter()
    set_determinism(params.seed)
    pretrained = bool(backbone_info["pretrained"])
    _check_inputs(params, prepared, pretrained)
    check_backup(paths.backup, fingerprint(params, backbone_file, prepared), budget(params))
    has_val = prepared.count("val") > 0
    use_cache = (
        pretrained and params.feature_cache and not params.augment and not params.fine_tune.enabled
    )

    # The classifier: pixels -> [augmentation] -> backbone -> head. A pretrained backbone is
    # frozen and called with training=False, so its BatchNorm layers stay in inference mode.
    backbone.trainable = not pretrained
    result = TrainResult(None, {}, 0, math.nan, use_cache, ["head"])
    if not pretrained:
        steps = math.ceil(prepared.count("train") / params.batch_size)
        result.batchnorm_momentum = suit_batchnorm(backbone, steps)
    feature_rank = len(backbone.output_shape) - 1
    head = head_layers(params, len(prepared.classes), feature_rank)
    inputs = keras.Input(backbone.input_shape[1:], name="pixels")
    x = augmentation(params.seed)(inputs) if params.augment else inputs
    x = backbone(x, training=False if pretrained else None)
    model = keras.Model(inputs, apply(head, x), name="classifier")

    clock = EpochClock()
    fit = {"params": params, "paths": paths, "clock": clock}
    if use_cache:
        # The head alone trains on the backbone's pooled features, computed once; it shares
        # its layers with `model`, which therefore ends up with the trained head.
        features = training_features(
            paths.features or paths.backup / "features", backbone_file, backbone, prepared,
            params.pooling, params.feature_engine, full,
        )  # fmt: skip
        pooled_already = head[1:] if feature_rank == 3 else head
        feature_input = keras.Input(features["train"].shape[1:], name="features")
        head_model = keras.Model(feature_input, apply(pooled_already, feature_input), name="head")
        compile_model(head_model, params.learning_rate)
        _check_capacity(result, head_model, prepared, params, pretrained, "head")
        history, checkpoint = _fit_phase(
            head_model, "head", params.epochs, params.learning_rate,
            train_data=(features["train"], prepared.labels("train")),
            val_data=(features["val"], prepared.labels("val")) if has_val else None, **fit,
        )  # fmt: skip
        _load_best(head_model, checkpoint)
        offset = 0
    else:
        compile_model(model, params.learning_rate)
        _check_capacity(result, model, prepared, params, pretrained, "head")
        train_ds = prepared.tf_dataset(
            "train", params.batch_size, shuffle=True, seed=params.seed, clock=clock
        )
        val_ds = prepared.tf_dataset("val", params.batch_size) if has_val else None
        history, checkpoint = _fit_phase(
            model, "head", params.epochs, params.learning_rate,
            train_data=train_ds, val_data=val_ds, **fit,
        )  # fmt: skip
        _load_best(model, checkpoint)
        offset = 0
        if params.fine_tune.enabled:
            result.phases.append("fine_tune")
            tune = params.fine_tune
            unfreeze_top(backbone, backbone_info["base_layer"], tune.layers)
            compile_model(model, tune.learning_rate)
            _check_capacity(result, model, prepared, params, pretrained, "fine_tune")
            more, tuned = _fit_phase(
                model, "fine_tune", tune.epochs, tune.learning_rate, train_data=train_ds,
                val_data=val_ds, initial_best=checkpoint.best, **fit,
            )  # fmt: skip
            head_epochs = len(next(iter(history.values()), []))
            for key, values in more.items():
                history.setdefault(key, []).extend(values)
            if tuned.path is not None and is_better(
                tuned.best, checkpoint.best, monitor_mode(params.monitor)
            ):
                _load_best(model, tuned)
                checkpoint, offset = tuned, head_epochs
    for key, values in history.items():
        if any(not math.isfinite(v) for v in values):
            mark_diverged(paths.backup)
            raise DivergedError(
                f"training diverged: {key} became NaN/inf; lower train.learning_rate (now "
                f"{params.learning_rate}). No model was written"
            )
    result.model, result.history = model, history
    result.best_epoch = offset + checkpoint.best_epoch + 1
    result.best_value = float(checkpoint.best)
    result.seconds = time.perf_counter() - started
    return result


def _check_capacity(
    result: TrainResult, model, prepared: Prepared, params: TrainParams, pretrained: bool,
    phase: str,
) -> None:  # fmt: skip
    """Count a phase's trainable parameters; warn above the 10:1 rule, before training."""
    trainable = count_trainable(model)
    result.trainable_params = max(result.trainable_params, trainable)
    warning = capacity_warning(trainable, prepared.count("train"), params, pretrained, phase)
    if warning:
        log.warning("%s", warning)
        result.warnings.append(warning)


def _check_inputs(params: TrainParams, prepared: Prepared, pretrained: bool) -> None:
    """Refuse data and settings that cannot train, before anything is written."""
    if prepared.count("train") == 0:
        raise StageError("the train split is empty; add images or lower prepare.test_fraction")
    if params.fine_tune.enabled and not pretrained:
        raise StageError(
            "train.fine_tune needs a pretrained backbone (backbone.weights is 'none': it already trains fully)"
        )
    if prepared.count("val") == 0 and params.monitor.startswith("val_"):
        raise StageError(
            f"train.monitor is {params.monitor} but the val split is empty; set prepare.val_fraction > 0"
        )


# ---------------------------------------------------------------- one phase


def _fit_phase(
    model, phase: str, epochs: int, learning_rate: float, *, train_data, val_data,
    params: TrainParams, paths: TrainPaths, clock: EpochClock, initial_best=None,
) -> tuple[dict[str, list[float]], BestCheckpoint]:  # fmt: skip
    """Fit one phase with checkpoints and a resumable backup; skip it if it already finished.

    Args:
        model: the compiled model to fit.
        phase: ``head`` or ``fine_tune`` (names its files in the backup folder).
        epochs: the phase's epoch budget.
        learning_rate: the phase's learning rate (for the divergence message).
        train_data: a ``tf.data.Dataset``, or ``(features, labels)`` arrays.
        val_data: the same for validation, or ``None``.
        params: the ``train`` section.
        paths: the stage's paths.
        clock: the epoch clock the training dataset shuffles by.
        initial_best: the best value so far (phase 1's), which this phase must beat.

    Returns:
        The logs of every epoch of the phase (those before a resume included), and the
        phase's :class:`~tasks.callbacks.BestCheckpoint`.
    """
    mode = monitor_mode(params.monitor)
    checkpoint = BestCheckpoint(paths.backup, params.monitor, phase)
    if initial_best is not None and is_better(initial_best, checkpoint.best, mode):
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
        EpochClockCallback(clock),
        NanGuard(learning_rate),
        checkpoint,
        EpochBackup(folder, history),
    ]
    if params.early_stopping_patience:
        earlier = {k: list(v) for k, v in history.items()}
        callbacks.append(
            ResumableEarlyStopping(
                earlier, monitor=params.monitor, patience=params.early_stopping_patience, mode=mode
            )
        )
    x, y = train_data if isinstance(train_data, tuple) else (train_data, None)
    try:
        model.fit(
            x, y, epochs=epochs, initial_epoch=initial_epoch, validation_data=val_data,
            callbacks=callbacks, batch_size=params.batch_size if y is not None else None,
            shuffle=y is not None, verbose=2,
        )  # fmt: skip
    except DivergedError:
        mark_diverged(paths.backup)
        raise
    write_json(done_file, {"history": history, "budget": budget(params)})
    shutil.rmtree(folder, ignore_errors=True)
    return history, checkpoint


def _load_best(model, checkpoint: BestCheckpoint) -> None:
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


def summarize(result: TrainResult, monitor: str, train_images: int) -> dict[str, Any]:
    """The saved (best) epoch and its validation figures, and the 10:1 rule's numbers."""
    logs = result.at_best_epoch()
    keys = dict.fromkeys((monitor, "val_loss", "val_accuracy"))  # ordered, no repeats
    return {
        "best_epoch": result.best_epoch,
        "at_best_epoch": {key: logs[key] for key in keys if key in logs},
        "epochs_run": len(next(iter(result.history.values()), [])),
        "trainable_params": result.trainable_params,
        "train_images": train_images,
        "params_per_image": round(result.trainable_params / max(train_images, 1), 2),
        "warnings": result.warnings,
    }
