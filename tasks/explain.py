"""Why did the model decide this? Grad-CAM heat maps, and the pictures built from them.

Grad-CAM (Selvaraju et al., 2017; the keras-io "Grad-CAM class activation visualization"
example) weighs the feature maps of the last convolution by the gradient of the predicted
class's score, averaged over each map: where the heat map is bright, the model looked.

* :func:`gradcam` returns one heat map per image, for any model the train stage builds: the
  last convolution is found automatically (inside the backbone, inside ``keras.applications``
  models too), or named with ``evaluate.explain_layer``.
* :func:`contact_sheet` and :func:`error_gallery` draw the evaluate stage's
  ``plots/explain.png`` and ``plots/errors.png``.
* ``tlp explain`` (:mod:`tasks.overlay`) uses them for images given on the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common import StageError, atomic_path

_POOLING = ("Pooling", "Flatten", "Dropout")


@dataclass(frozen=True)
class Explained:
    """Heat maps and predictions for a batch of images.

    Attributes:
        heatmaps: (N, H, W) in [0, 1], at the images' size.
        probabilities: (N, C) the model's class probabilities.
        layer: the layer whose feature maps were weighed.
    """

    heatmaps: np.ndarray
    probabilities: np.ndarray
    layer: str


def _path_to_layer(model, name: str | None) -> list:
    """The chain of nested models from ``model`` down to the explained layer, that layer last.

    Without ``name``: the last layer with a 4-D output (a feature map) that is not a pooling
    layer, searched depth first through nested models (backbone, then its base).
    """
    found: list = []

    def visit(container, chain: list) -> None:
        for layer in container.layers:
            if hasattr(layer, "layers") and layer.layers:  # a nested model
                visit(layer, [*chain, layer])
            elif name is not None:
                if layer.name == name:
                    found[:] = [*chain, layer]
            elif _is_feature_map(layer):
                found[:] = [*chain, layer]

    visit(model, [])
    if not found:
        what = f"no layer named {name!r}" if name else "no convolutional feature map"
        raise StageError(
            f"cannot explain this model: {what} found. Set evaluate.explain_layer to the name "
            "of a convolution layer (Keras: model.summary(expand_nested=True) lists them)"
        )
    return found


def _is_feature_map(layer) -> bool:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return False
    return len(shape) == 4 and not any(word in type(layer).__name__ for word in _POOLING)


def _split_model(model, layer_name: str | None) -> tuple[Callable, str]:
    """A function ``pixels -> (feature maps, probabilities)`` traced by one GradientTape.

    The container that holds the layer (e.g. a ``keras.applications`` model, whose graph
    has skip connections) becomes a two-output model; the containers around it are chains
    of layers (the train stage builds them so), which are called in order.
    """
    import keras

    chain = _path_to_layer(model, layer_name)
    target = chain[-1]
    holder = chain[-2] if len(chain) > 1 else model
    two_outputs = keras.Model(holder.inputs, [target.output, holder.output])
    outers = [model, *chain[:-2]]  # from the outside in; the last one contains ``holder``

    def forward(pixels, depth: int = 0):
        container = outers[depth]
        x, maps = pixels, None
        for layer in container.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if layer is holder:
                maps, x = two_outputs(x, training=False)
            elif depth + 1 < len(outers) and layer is outers[depth + 1]:
                maps, x = forward(x, depth + 1)
            else:
                x = layer(x, training=False)
        return maps, x

    if holder is model:
        return (lambda pixels: two_outputs(pixels, training=False)), target.name
    return forward, target.name


def gradcam(
    model, images: np.ndarray, classes: np.ndarray | None = None, layer: str | None = None
) -> Explained:
    """Grad-CAM heat maps of ``images`` (uint8 or float RGB, model-sized) for ``classes``.

    Args:
        model: the trained classifier (raw pixels in, class probabilities out).
        images: (N, H, W, 3).
        classes: the class to explain per image; default: the predicted one.
        layer: the layer to explain; default: the last convolutional feature map.

    Returns:
        The heat maps, at the images' size, each scaled to [0, 1], and the probabilities.
    """
    import tensorflow as tf

    forward, name = _split_model(model, layer)
    pixels = tf.convert_to_tensor(np.asarray(images, np.float32))
    with tf.GradientTape() as tape:
        maps, probabilities = forward(pixels)
        expected = model(pixels, training=False)
        chosen = (
            tf.argmax(probabilities, axis=1)
            if classes is None
            else tf.convert_to_tensor(np.asarray(classes, np.int64))
        )
        score = tf.gather(probabilities, chosen, axis=1, batch_dims=1)
    if not np.allclose(probabilities.numpy(), expected.numpy(), atol=1e-4):
        raise StageError(
            "cannot explain this model: it is not the chain of layers the train stage builds "
            "(re-running it layer by layer gives other outputs)"
        )
    grads = tape.gradient(score, maps)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))[..., None]
    cams = tf.image.resize(cams, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    heatmaps = np.where(peak > 0, cams / np.maximum(peak, 1e-12), 0.0).astype(np.float32)
    return Explained(heatmaps, probabilities.numpy(), name)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the heat map laid over it in the ``jet`` colours, uint8 RGB."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heatmap)[..., :3] * 255.0
    return np.clip(image * (1 - alpha) + colours * alpha, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Tile:
    """One image of a sheet and its caption facts."""

    image: np.ndarray  # (H, W, 3) uint8
    heatmap: np.ndarray | None  # (H, W) in [0, 1]
    true: str | None
    predicted: str
    confidence: float


def sheet(tiles: list[Tile], title: str, path: Path, empty: str) -> None:
    """Draw tiles in a grid (image | overlay pairs when heat maps are given) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = any(tile.heatmap is not None for tile in tiles)
    columns = min(4, max(1, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    per = 2 if pairs else 1
    fig, axes = plt.subplots(
        rows, columns * per, figsize=(2.0 * columns * per, 2.35 * rows + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    if not tiles:
        axes[0, 0].text(0.5, 0.5, empty, ha="center", va="center", fontsize=11)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        wrong = tile.true is not None and tile.true != tile.predicted
        caption = (
            f"true {tile.true}\n" if tile.true is not None else ""
        ) + f"pred {tile.predicted} ({tile.confidence:.0%})"
        ax = axes[row, column * per]
        ax.imshow(tile.image, interpolation="nearest" if tile.image.shape[0] < 96 else None)
        ax.set_title(caption, fontsize=8, color="#b00020" if wrong else "black")
        if pairs and tile.heatmap is not None:
            ax = axes[row, column * per + 1]
            ax.imshow(overlay(tile.image, tile.heatmap), interpolation="bilinear")
            ax.set_title("Grad-CAM", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def pick_for_explanation(y_true: np.ndarray, y_pred: np.ndarray, count: int) -> np.ndarray:
    """Test images to explain: misclassified ones first, then correct ones, in split order."""
    wrong = np.flatnonzero(y_true != y_pred)
    right = np.flatnonzero(y_true == y_pred)
    return np.concatenate([wrong, right])[:count]


def contact_sheet(
    model, images: np.ndarray, y_true: np.ndarray, classes: list[str], path: Path,
    layer: str | None = None,
) -> str:  # fmt: skip
    """``plots/explain.png``: each image beside its Grad-CAM overlay, true / predicted / confidence.

    Returns:
        The name of the explained layer.
    """
    if len(images) == 0:  # evaluate.explain: 0 (Grad-CAM of no image is no batch at all)
        sheet([], "Grad-CAM", path, "no test images explained (evaluate.explain: 0)")
        return "none"
    explained = gradcam(model, images, layer=layer)
    predicted = explained.probabilities.argmax(axis=1)
    tiles = [
        Tile(image, heat, classes[int(t)], classes[int(p)], float(prob[p]))
        for image, heat, t, p, prob in zip(
            images, explained.heatmaps, y_true, predicted, explained.probabilities, strict=True
        )
    ]
    title = f"Grad-CAM on {len(tiles)} test images (misclassified first), layer {explained.layer}"
    sheet(tiles, title, path, "no test images")
    return explained.layer


def error_gallery(
    images: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, classes: list[str],
    path: Path,
) -> None:  # fmt: skip
    """``plots/errors.png``: the given misclassified images with true / predicted / probability."""
    predicted = probabilities.argmax(axis=1)
    tiles = [
        Tile(image, None, classes[int(t)], classes[int(p)], float(prob[p]))
        for image, t, p, prob in zip(images, y_true, predicted, probabilities, strict=True)
    ]
    title = f"The {len(tiles)} most confidently wrong test images"
    sheet(tiles, title, path, "no misclassified test images")


def most_confident_errors(y_true: np.ndarray, probabilities: np.ndarray, count: int) -> np.ndarray:
    """Indices of misclassified images, the most confident prediction first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]
