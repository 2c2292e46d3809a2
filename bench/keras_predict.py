"""The predict baseline: the same answer through Keras (and so TensorFlow).

``python -m bench.keras_predict MODEL.keras IMAGE``: decodes the image with the prepare
stage's own ``decode`` (as ``tlp predict`` does), runs the Keras model, prints the top 3.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bench.common import PARAMS
from tasks.params import with_changes


def main(argv: list[str] | None = None) -> int:
    """Classify one image with a ``.keras`` model."""
    model_path, image_path = (argv or sys.argv[1:])[:2]
    from tasks.prepare import Item, decode
    from tasks.safety import load_model_safely

    model = load_model_safely(model_path, compile=False)
    size = tuple(model.input_shape[1:3])
    decoded = decode(
        Item(image_path, "", file=Path(image_path)), with_changes(PARAMS.prepare, image_size=size)
    )
    if decoded.pixels is None:
        print(f"error: {image_path}: {decoded.reason}", file=sys.stderr)
        return 1
    probabilities = np.asarray(model.predict_on_batch(decoded.pixels[None].astype(np.float32)))[0]
    top = np.argsort(-probabilities)[:3]
    print(f"{image_path}: " + ", ".join(f"{i} {probabilities[i]:.3f}" for i in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
