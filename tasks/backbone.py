"""Stage ``backbone``: build the feature extractor, preprocessing included.

Any ``keras.applications`` image model by its usual name (``vgg16``, ``mobilenet_v2``,
``resnet50``, ``efficientnet_b0``…) without its top, or ``simple_cnn``: the course's MNIST
CNN. The saved model takes raw RGB pixels (0..255) and returns a feature map.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.archs import ARCHS, SIMPLE_CNN, resolve_arch
from tasks.checks import check_backbone
from tasks.common import log, run_stage, save_model, sha256_file, write_json
from tasks.params import BackboneParams, SimpleCnnParams, load_params


@dataclass(frozen=True)
class BackboneInfo:
    """What the train, export and predict stages need to know about the backbone."""

    arch: str
    weights: str
    weights_sha256: str | None
    pretrained: bool
    preprocessing: str
    image_size: tuple[int, int]
    feature_shape: tuple[int, ...]
    base_layer: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return {
            **self.__dict__,
            "image_size": list(self.image_size),
            "feature_shape": list(self.feature_shape),
        }


def _simple_cnn(params: SimpleCnnParams, image_size: tuple[int, int]):
    import keras

    height, width = image_size
    too_small = ValueError(
        f"simple_cnn: image_size {list(image_size)} is too small for {len(params.filters)} "
        f"conv blocks (kernel {params.kernel_size}, stride {params.strides}, padding "
        f"{params.padding!r}, pool {params.pool_size}); raise prepare.image_size or use fewer "
        "backbone.simple_cnn.filters"
    )
    inputs = keras.Input((height, width, 3), name="pixels")
    x = inputs
    for index, filters in enumerate(params.filters):
        try:  # Keras refuses a layer whose output would be empty, in its own words
            x = keras.layers.Conv2D(
                filters,
                params.kernel_size,
                strides=params.strides,
                padding=params.padding,
                activation="relu",
                name=f"conv{index + 1}",
            )(x)
            if params.pool_size > 1:
                x = keras.layers.MaxPooling2D(params.pool_size, name=f"pool{index + 1}")(x)
        except ValueError:
            raise too_small from None
        if min(x.shape[1], x.shape[2]) < 1:
            raise too_small
    return keras.Model(inputs, x, name=SIMPLE_CNN)


def _weights_file(weights: str, weights_dir: Path | None) -> Path:
    from tasks.safety import check_model_file

    path = Path(weights_dir or "", weights)
    if weights_dir is None or not path.is_file():
        raise ValueError(
            f"backbone.weights {weights!r} is not 'imagenet', 'none' or a weights file in "
            f"{weights_dir or 'the weights folder'}; copy or link the file there and set "
            "backbone.weights to its name"
        )
    check_model_file(path)
    return path


def build_backbone(
    params: BackboneParams, image_size: tuple[int, int], weights_dir: Path | None = None
):
    """Build the feature extractor with its preprocessing inside.

    Args:
        params: the ``backbone`` section.
        image_size: ``prepare.image_size`` (height, width).
        weights_dir: the folder ``backbone.weights`` names a file in (``data/weights``);
            not needed for ``imagenet`` and ``none``.

    Returns:
        ``(model, info)``: a Keras model from raw RGB pixels to a feature map, and its
        :class:`BackboneInfo`.

    Raises:
        ValueError: unknown arch, bad weights, or an input size the arch cannot take.
    """
    # Everything that can be checked without TensorFlow is checked first, as `tlp run` does
    # before it starts: a typo fails in a second, and an unsafe weights file is refused
    # before any Keras loader sees it.
    check_backbone(params, image_size, weights_dir)
    arch = resolve_arch(params.arch)
    weights, (height, width), weights_sha = params.weights, image_size, None
    if arch != SIMPLE_CNN and weights not in ("imagenet", "none"):
        weights_file = _weights_file(weights, weights_dir)
        weights_sha = sha256_file(weights_file)

    import keras

    from tasks.layers import Preprocess

    # Layers that are not loaded from a file start from seeded random weights, so two runs
    # of the stage build the same backbone (and training from scratch is reproducible).
    keras.utils.set_random_seed(params.seed)
    if arch == SIMPLE_CNN:
        base = _simple_cnn(params.simple_cnn, image_size)
        preprocessing, pretrained, weights = "rescale", False, "none"
    else:
        if weights == "imagenet":
            keras_weights, pretrained = "imagenet", True
        elif weights == "none":
            keras_weights, pretrained = None, False
        else:
            keras_weights, pretrained = str(weights_file), True
        spec = ARCHS[arch]
        constructor = getattr(keras.applications, spec.constructor)
        try:
            base = constructor(
                include_top=False, weights=keras_weights, input_shape=(height, width, 3)
            )
        except ValueError as exc:
            raise ValueError(
                f"{arch} cannot be built with image_size {list(image_size)} and weights "
                f"{weights!r}: {exc}"
            ) from None
        except Exception as exc:
            # keras.utils.get_file raises a bare Exception when a download fails.
            if keras_weights == "imagenet" and type(exc) is Exception:
                raise ValueError(
                    f"could not download the imagenet weights of {arch} ({exc}). Offline, put "
                    "the file named in that URL into $KERAS_HOME/models/ (default "
                    "~/.keras/models/), or copy a weights file into the weights folder and set "
                    "backbone.weights to its name"
                ) from None
            raise
        preprocessing = spec.preprocessing
    inputs = keras.Input((height, width, 3), name="pixels")
    features = base(Preprocess(preprocessing, name="preprocess")(inputs))
    model = keras.Model(inputs, features, name=f"backbone_{arch}")
    info = BackboneInfo(
        arch=arch,
        weights=weights,
        weights_sha256=weights_sha,
        pretrained=pretrained,
        preprocessing=preprocessing,
        image_size=(height, width),
        feature_shape=tuple(int(d) for d in features.shape[1:]),
        base_layer=base.name,
    )
    return model, info


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.backbone --weights-dir data/weights --out ... --info ...``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--weights-dir", required=True, type=Path, help="data/weights")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--info", required=True, type=Path)
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        model, info = build_backbone(params.backbone, params.prepare.image_size, args.weights_dir)
        log.info(
            "backbone %s (weights=%s, preprocessing=%s): %d layers, %d params, features %s",
            info.arch, info.weights, info.preprocessing, len(model.layers),
            model.count_params(), info.feature_shape,
        )  # fmt: skip
        save_model(model, args.out)
        write_json(args.info, info.to_json())

    return run_stage("backbone", body)


if __name__ == "__main__":
    raise SystemExit(main())
