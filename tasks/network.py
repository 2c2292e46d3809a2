"""The train stage's model: the head, BatchNorm settings for a backbone trained from scratch,
fine-tuning's unfreezing, and the trainable parameters against the training images.

* The head: pooling (for a feature map), dropout, an optional hidden layer, the softmax.
* BatchNorm from scratch: ``keras.applications`` build BatchNormalization with momentum
  0.999, suited to ImageNet's ~10,000 steps per epoch. On a few hundred images (~10 steps
  per epoch) the moving statistics barely leave their initial values, so inference mode
  (validation, evaluate, export) computes something training never saw, and the model
  answers one class. :func:`suit_batchnorm` derives the momentum from the steps per epoch.
* The 10:1 rule of thumb: at most 10 trainable parameters per training image; above it,
  expect overfitting (:func:`capacity_warning`).
"""

from __future__ import annotations

import math

import keras

from tasks.common import log
from tasks.params import TrainParams

# Trainable parameters per training image above which a model is expected to overfit.
MAX_PARAMS_PER_IMAGE = 10
# BatchNorm's moving statistics keep this share of their value from one epoch earlier
# (momentum ** steps_per_epoch), so they follow the weights as they change.
BATCHNORM_MEMORY_PER_EPOCH = 0.1


def head_layers(params: TrainParams, n_classes: int, feature_rank: int) -> list:
    """Pooling (for a feature map), dropout, an optional hidden layer, the softmax."""
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


def apply(layers: list, x):
    """Call ``layers`` one after the other on ``x``."""
    for layer in layers:
        x = layer(x)
    return x


def augmentation(seed: int):
    """Random flips, small rotations and zooms (active in training only)."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.05, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
        ],
        name="augment",
    )


def compile_model(model, learning_rate: float) -> None:
    """Adam, sparse categorical cross-entropy, accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def unfreeze_top(backbone, base_name: str, n_layers: int) -> None:
    """Make the top ``n_layers`` of the base model trainable, BatchNorm layers excepted."""
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


def suit_batchnorm(backbone, steps_per_epoch: int) -> float | None:
    """Give a backbone trained from scratch BatchNorm momentum suited to this run.

    The momentum is chosen so that the moving statistics keep
    :data:`BATCHNORM_MEMORY_PER_EPOCH` of what they were one epoch earlier; it is never
    above the value the architecture was built with (0.999 for ``keras.applications``,
    suited to large datasets).

    Args:
        backbone: the backbone, before the model is compiled.
        steps_per_epoch: training batches per epoch.

    Returns:
        The momentum now used, or ``None`` when the backbone has no BatchNorm layer.
    """
    layers = [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return None
    built = min(layer.momentum for layer in layers)
    suited = BATCHNORM_MEMORY_PER_EPOCH ** (1 / max(steps_per_epoch, 1))
    momentum = round(min(suited, built), 4)
    for layer in layers:
        layer.momentum = momentum
    log.info(
        "BatchNorm from scratch: momentum %.4f (built with %s) for %d steps per epoch",
        momentum, built, steps_per_epoch,
    )  # fmt: skip
    return momentum


def count_trainable(model) -> int:
    """The number of trainable parameters of ``model``."""
    return int(sum(math.prod(variable.shape) for variable in model.trainable_weights))


def capacity_warning(
    trainable: int, images: int, params: TrainParams, pretrained: bool, phase: str
) -> str | None:
    """The 10:1 rule: a warning with the numbers and what to do, or ``None`` when within it.

    Args:
        trainable: trainable parameters in the phase.
        images: training images.
        params: the ``train`` section (which fixes to suggest).
        pretrained: whether the backbone is pretrained (frozen).
        phase: ``head`` or ``fine_tune``.
    """
    ratio = trainable / max(images, 1)
    if ratio <= MAX_PARAMS_PER_IMAGE:
        return None
    fixes = []
    if not pretrained:
        fixes.append(
            "freeze more: a pretrained backbone (backbone.weights: imagenet, with a "
            "keras.applications backbone.arch such as mobilenet_v2)"
        )
    elif phase == "fine_tune":
        fixes.append(f"freeze more: fewer train.fine_tune.layers (now {params.fine_tune.layers})")
    if params.dense_units or params.pooling == "flatten":
        fixes.append("a smaller head (train.dense_units: 0, train.pooling: avg)")
    fixes.append("more training images")
    if not params.augment:
        fixes.append("augmentation (train.augment: true)")
    return (
        f"{phase}: {trainable:,} trainable parameters for {images:,} training images, "
        f"{ratio:,.1f} per image: above the 10:1 rule of thumb (at most "
        f"{MAX_PARAMS_PER_IMAGE} per image), expect overfitting. Try {'; '.join(fixes)}"
    )
