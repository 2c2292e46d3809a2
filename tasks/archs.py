"""The backbone architectures ``backbone.arch`` names, and what each needs of its input.

A table, no TensorFlow: the params checks (:mod:`tasks.checks`) read it before anything
runs, and the backbone stage (:mod:`tasks.backbone`) builds from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


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


def simple_cnn_output(
    image_size: tuple[int, int], blocks: int, kernel: int, stride: int, padding: str, pool: int
) -> tuple[int, int]:
    """The feature map size the course's CNN leaves from ``image_size`` (height, width).

    Keras' own arithmetic: a ``same`` convolution gives ``ceil(n / stride)``, a ``valid`` one
    ``floor((n - kernel) / stride) + 1``, and max pooling ``floor(n / pool)``. A side that
    drops below 1 stays 0 (Keras refuses such a layer).
    """

    def side(n: int) -> int:
        for _ in range(blocks):
            n = math.ceil(n / stride) if padding == "same" else (n - kernel) // stride + 1
            n = n // pool if pool > 1 and n > 0 else n
            if n < 1:
                return 0
        return n

    return side(image_size[0]), side(image_size[1])
