"""Models the benchmarks need, built with the project's own code and saved once (reused).

Random-init weights: ImageNet weights cannot be downloaded here, and speed does not depend
on the weights' values. Each builder runs in its own process (``python -m bench.models``),
so the benchmark driver itself never imports TensorFlow.

``python -m bench.models backbone ARCH HEIGHT WIDTH OUT.keras OUT.json``
``python -m bench.models classifier ARCH HEIGHT WIDTH CLASSES OUT_DIR [--prepared P]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import PARAMS, ROOT, env_with_venv, run_process
from tasks.params import with_changes


def backbone_file(arch: str, image_size: tuple[int, int], folder: Path) -> tuple[Path, Path]:
    """``(backbone.keras, backbone.json)`` for ``arch``, flagged pretrained (so it is frozen)."""
    height, width = image_size
    model = folder / f"{arch}-{height}x{width}.keras"
    info = model.with_suffix(".json")
    if not (model.exists() and info.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "bench.models", "backbone", arch, str(height), str(width)]
        run_process([*command, model, info], ROOT, env_with_venv()).check(f"building {arch}")
    return model, info


def classifier_files(
    arch: str, image_size: tuple[int, int], classes: int, folder: Path, prepared: Path
) -> tuple[Path, Path]:
    """``(model.keras, model.onnx)``: backbone, average pooling and a softmax head,
    exported by the export stage's own code (ONNX checker and Keras parity gate included)."""
    keras_file, onnx_file = folder / "model.keras", folder / "model.onnx"
    if not (keras_file.exists() and onnx_file.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        height, width = image_size
        command = [
            sys.executable,
            "-m",
            "bench.models",
            "classifier",
            arch,
            str(height),
            str(width),
        ]
        command += [str(classes), folder, "--prepared", prepared]
        run_process(command, ROOT, env_with_venv()).check(f"building the {arch} classifier")
    return keras_file, onnx_file


def _build_backbone(arch: str, image_size: tuple[int, int]):
    from tasks.backbone import build_backbone

    model, info = build_backbone(
        with_changes(PARAMS.backbone, arch=arch, weights="none"), image_size
    )
    return model, {**info.to_json(), "pretrained": True, "weights": "random (benchmark)"}


def main(argv: list[str] | None = None) -> int:
    """Build one model (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("backbone")
    one.add_argument("arch")
    one.add_argument("height", type=int)
    one.add_argument("width", type=int)
    one.add_argument("out", type=Path)
    one.add_argument("info", type=Path)
    two = sub.add_parser("classifier")
    two.add_argument("arch")
    two.add_argument("height", type=int)
    two.add_argument("width", type=int)
    two.add_argument("classes", type=int)
    two.add_argument("out", type=Path)
    two.add_argument("--prepared", type=Path, required=True)
    args = parser.parse_args(argv)

    import keras

    image_size = (args.height, args.width)
    model, info = _build_backbone(args.arch, image_size)
    if args.what == "backbone":
        model.save(args.out)
        args.info.write_text(json.dumps(info, indent=2))
        return 0

    from tasks.dataset import Prepared
    from tasks.onnx_io import export

    keras.utils.set_random_seed(0)
    inputs = keras.Input((*image_size, 3), name="pixels")
    features = keras.layers.GlobalAveragePooling2D(name="pool")(model(inputs, training=False))
    outputs = keras.layers.Dense(args.classes, activation="softmax", name="probabilities")(features)
    classifier = keras.Model(inputs, outputs, name="classifier")
    classifier.save(args.out / "model.keras")
    classes = [f"class_{i}" for i in range(args.classes)]
    model_info = {
        "classes": classes,
        "image_size": list(image_size),
        "preprocessing": info["preprocessing"],
        "backbone": info,
    }
    images, _ = Prepared.open(args.prepared).load("test", limit=32)
    export(classifier, model_info, images, PARAMS.export, args.out / "model.onnx")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
