"""The prepare baseline: the loop most tutorials start from.

``python -m bench.naive_prepare FOLDER HEIGHT WIDTH``: every image under ``FOLDER/<class>/``
is opened with Pillow, converted to RGB, resized, and stored in one float64 array of the
whole dataset, in a single thread. Prints ``{"images": N, "seconds": S}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def load_all(folder: Path, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """All images of ``folder``'s class sub-folders as ``(float64 (N, H, W, 3), labels)``."""
    files = sorted(p for p in folder.glob("*/*") if p.is_file() and not p.name.startswith("."))
    classes = sorted({p.parent.name for p in files})
    images = np.zeros((len(files), height, width, 3), np.float64)
    labels = np.zeros(len(files), np.int64)
    for index, path in enumerate(files):
        with Image.open(path) as image:
            images[index] = np.asarray(image.convert("RGB").resize((width, height)), np.float64)
        labels[index] = classes.index(path.parent.name)
    return images, labels


def main(argv: list[str] | None = None) -> int:
    """Load the folder and report the count and the time the loop took."""
    folder, height, width = (argv or sys.argv[1:])[:3]
    started = time.perf_counter()
    images, _ = load_all(Path(folder), int(height), int(width))
    print(json.dumps({"images": len(images), "seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
