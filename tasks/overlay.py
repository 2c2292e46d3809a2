"""``tlp explain IMAGE... [--out DIR]``: a Grad-CAM overlay PNG per image, with the trained model.

Images are decoded exactly as ``prepare`` decoded the training data (``tasks.predict``'s
loader), so the model sees what it saw in ``evaluate``. Kept apart from :mod:`tasks.explain`,
which the evaluate stage imports, so that the stage does not depend on the image loader.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.common import StageError
from tasks.explain import Tile, gradcam, sheet


def main(argv: list[str] | None = None) -> int:
    """``tlp explain IMAGE... [--model models/model.keras] [--out explanations]``."""
    parser = argparse.ArgumentParser(
        prog="tlp explain",
        description="Write a Grad-CAM overlay PNG per image: where the trained model looked.",
    )
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--info", type=Path, help="model.json (default: beside the model)")
    parser.add_argument("--out", type=Path, default=Path("explanations"), help="output folder")
    parser.add_argument("--layer", help="the layer to explain (default: the last convolution)")
    args = parser.parse_args(argv)

    from tasks.common import read_json, setup_logging
    from tasks.imaging import decode
    from tasks.predict import DecodeLimits, iter_inputs
    from tasks.safety import load_model_safely

    setup_logging()
    info_path = args.info or args.model.with_suffix(".json")
    try:
        info = read_json(info_path)
        model = load_model_safely(args.model, compile=False)
    except (OSError, ValueError) as exc:
        print(f"ERROR: cannot load the trained model: {exc}. Run the pipeline first.", file=sys.stderr)  # fmt: skip
        return 1
    limits = DecodeLimits(tuple(info["image_size"]))
    skipped: list[tuple[str, str]] = []
    written = 0
    for item in iter_inputs(args.inputs):  # the files `tlp predict` would read, and no others
        decoded = decode(item, limits)
        if decoded.pixels is None:
            skipped.append((item.path, decoded.reason))
            continue
        pixels, file = decoded.pixels, Path(item.path)
        try:
            explained = gradcam(model, pixels[None], layer=args.layer)
        except StageError as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            return 1
        probabilities = explained.probabilities[0]
        best = int(probabilities.argmax())
        label, confidence = info["classes"][best], float(probabilities[best])
        target = args.out / f"{file.stem}.explain.png"
        args.out.mkdir(parents=True, exist_ok=True)
        tile = Tile(pixels, explained.heatmaps[0], None, label, confidence)
        sheet([tile], f"{file.name}: Grad-CAM, layer {explained.layer}", target, "")
        print(f"{file}: {label} ({confidence:.0%}) -> {target}")
        written += 1
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
