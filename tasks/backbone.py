"""Stage ``backbone``: build the feature extractor, preprocessing included.

Any ``keras.applications`` image model by its usual name (``vgg16``, ``mobilenet_v2``,
``resnet50``, ``efficientnet_b0``…) without its top, or ``simple_cnn``: the course's MNIST
CNN. The saved model takes raw RGB pixels (0..255) and returns a feature map.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import log, run_stage, save_model, sha256_file, write_json
from tasks.params import BackboneParams, SimpleCnnParams, load_params


@dataclass(frozen=True)
class Arch:
    """How to build one ``keras.applications`` model."""

    constructor: str
    preprocessing: str
    min_size: int = 32


def _family(prefix: str, names: dict[str, str], preprocessing: str, min_size: int = 32) -> dict:
    return {f"{prefix}{key}": Arch(value, preprocessing, min_size) for key, value in names.items()}


ARCHS: dict[str, Arch] = {
    "vgg16": Arch("VGG16", "caffe"),
    "vgg19": Arch("VGG19", "caffe"),
    **_family("resnet", {"50": "ResNet50", "101": "ResNet101", "152": "ResNet152"}, "caffe"),
    **_family(
        "resnet", {"50_v2": "ResNet50V2", "101_v2": "ResNet101V2", "152_v2": "ResNet152V2"}, "tf"
    ),
    "mobilenet": Arch("MobileNet", "tf"),
    "mobilenet_v2": Arch("MobileNetV2", "tf"),
    "mobilenet_v3_small": Arch("MobileNetV3Small", "raw"),
    "mobilenet_v3_large": Arch("MobileNetV3Large", "raw"),
    **_family("efficientnet_b", {str(i): f"EfficientNetB{i}" for i in range(8)}, "raw"),
    **_family(
        "efficientnet_v2_",
        {
            **{f"b{i}": f"EfficientNetV2B{i}" for i in range(4)},
            "s": "EfficientNetV2S",
            "m": "EfficientNetV2M",
            "l": "EfficientNetV2L",
        },
        "raw",
    ),
    **_family("densenet", {n: f"DenseNet{n}" for n in ("121", "169", "201")}, "torch"),
    **_family(
        "convnext_",
        {
            "tiny": "ConvNeXtTiny",
            "small": "ConvNeXtSmall",
            "base": "ConvNeXtBase",
            "large": "ConvNeXtLarge",
            "xlarge": "ConvNeXtXLarge",
        },
        "raw",
    ),
    "inception_v3": Arch("InceptionV3", "tf", 75),
    "inception_resnet_v2": Arch("InceptionResNetV2", "tf", 75),
    "xception": Arch("Xception", "tf", 71),
    "nasnet_mobile": Arch("NASNetMobile", "tf"),
    "nasnet_large": Arch("NASNetLarge", "tf"),
}
SIMPLE_CNN = "simple_cnn"


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(name): name for name in ARCHS} | {_key(a.constructor): n for n, a in ARCHS.items()}


def allowed_archs() -> list[str]:
    """The names ``backbone.arch`` accepts."""
    return [SIMPLE_CNN, *sorted(ARCHS)]


def resolve_arch(name: str) -> str:
    """Canonical arch name for ``name`` (``MobileNetV2`` → ``mobilenet_v2``).

    Raises:
        ValueError: for an unknown arch, listing the allowed names.
    """
    if _key(name) == _key(SIMPLE_CNN):
        return SIMPLE_CNN
    canonical = _BY_KEY.get(_key(name))
    if canonical is None:
        raise ValueError(
            f"backbone.arch {name!r} is not a known architecture; allowed: "
            f"{', '.join(allowed_archs())}"
        )
    return canonical


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
    # Everything that can be checked without TensorFlow is checked first: a typo fails in a
    # second, and an unsafe weights file is refused before any Keras loader sees it.
    arch = resolve_arch(params.arch)
    weights = params.weights
    height, width = image_size
    weights_sha = None
    if arch == SIMPLE_CNN:
        if weights != "none":
            raise ValueError(
                "backbone.weights must be 'none' for simple_cnn (it is trained from scratch); "
                f"got {weights!r}"
            )
    else:
        spec = ARCHS[arch]
        if min(height, width) < spec.min_size:
            raise ValueError(
                f"{arch} needs images of at least {spec.min_size}x{spec.min_size}; "
                f"prepare.image_size is {list(image_size)}. Raise prepare.image_size."
            )
        if weights not in ("imagenet", "none"):
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
