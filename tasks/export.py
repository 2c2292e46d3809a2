"""Stage ``export``: the Keras model as ONNX, gated on parity with Keras; int8; the model card.

The graph takes raw RGB pixels (float32, 0..255, NHWC, dynamic batch) because the
preprocessing is inside the model; class names, image size and preprocessing travel in
the ONNX metadata, so ``tlp predict`` needs nothing else. ``onnx.checker`` runs with the
full check, then ONNX Runtime must agree with Keras on the test split within
``export.atol`` and ``export.min_top1_agreement``: otherwise the stage fails and no
``.onnx`` is left behind.

With ``export.quantize: int8`` the stage also writes the int8 model (:mod:`tasks.quantize`,
calibrated on ``export.calibration_images`` training images spread evenly over the split),
gated on top-1 agreement with the float model and on the test-accuracy drop; a failed gate
fails the stage and leaves neither model. The int8 output is a folder, ``models/int8``:
it holds ``model.onnx`` with ``int8``, and with ``none`` only a ``README.md`` saying how to
build it. DVC requires every declared output to exist after the command, and declaring the
folder always keeps one ``dvc.yaml`` for both settings; a folder with a note is never an
empty output (DVC warns on those), and ``tlp predict`` on the missing model names the setting.

Last, the stage writes the model card (:mod:`tasks.card`) from the files the pipeline wrote.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tasks.common import StageError, atomic_path, read_json, remove, run_stage, write_json
from tasks.dataset import Prepared
from tasks.onnx_io import write_checked
from tasks.params import load_params

CALIBRATION_BATCH = 16
CHECK_BATCH = 128
INT8_NAME = "model.onnx"  # inside the int8 folder
NO_INT8 = """# No int8 model

`export.quantize` is `none`, so no int8 model was built. To build one, set
`export.quantize: int8` in params.yaml and run `dvc repro export` (or `tlp run`):
`model.onnx` then appears in this folder, gated against the float model.
"""


def calibration_batches(prepared: Prepared, count: int) -> Iterator[np.ndarray]:
    """Up to ``count`` training images, spread evenly over the split, a batch at a time.

    The manifest lists a split class by class, so its first images would all be of one
    class; evenly spaced positions take every class in proportion, the same ones every run.

    Raises:
        StageError: the train split is empty.
    """
    total = prepared.count("train")
    if total == 0:
        raise StageError("no training images to calibrate the int8 model on")
    positions = np.unique(np.linspace(0, total - 1, num=min(count, total)).round().astype(int))
    for start in range(0, len(positions), CALIBRATION_BATCH):
        yield prepared.take("train", positions[start : start + CALIBRATION_BATCH])


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.export --data ... --model ... --out ... --int8-out ... --card ...``."""
    parser = argparse.ArgumentParser(description="Export the model to ONNX with a parity gate.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--info", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--int8-out", required=True, type=Path, help="int8 folder (model.onnx)")
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--card", required=True, type=Path, help="the model card (Markdown)")
    parser.add_argument("--eval-metrics", required=True, type=Path, help="card: test metrics")
    parser.add_argument("--per-class", required=True, type=Path, help="card: per-class CSV")
    parser.add_argument("--source", required=True, type=Path, help="card: fetch's source.json")
    parser.add_argument("--specialist-info", type=Path, help="card: the other class's specialist")
    args = parser.parse_args(argv)

    def body() -> None:
        from tasks import card, quantize
        from tasks.safety import load_model_safely

        params = load_params(args.params).export
        for path in (args.eval_metrics, args.per_class, args.source):
            if not path.is_file():
                raise StageError(f"{path} (read for the model card) is missing; run `dvc repro`")
        info = read_json(args.info)
        prepared = Prepared.open(args.data)
        model = load_model_safely(args.model, compile=False)
        images, _ = prepared.load("test", limit=params.max_parity_images)
        # Both models are committed together, or neither: a failed int8 gate removes both.
        remove(args.int8_out)  # an older int8 model must not outlive a failed gate
        with (
            atomic_path(args.out) as float_model,
            atomic_path(args.int8_out, directory=True) as int8,
        ):
            parity = write_checked(model, info, images, params, float_model)
            metrics = {
                "parity_images": parity.images,
                "top1_agreement": parity.top1_agreement,
                "max_abs_diff": parity.max_abs_diff,
                "opset": params.opset,
                "onnx_bytes": float_model.stat().st_size,
            }
            if params.quantize == "int8":
                metrics["int8"] = quantize.build_int8(
                    float_model, int8 / INT8_NAME,
                    calibration_batches(prepared, params.calibration_images),
                    prepared.batches("test", CHECK_BATCH), images, params,
                )  # fmt: skip
            else:
                (int8 / "README.md").write_text(NO_INT8, encoding="utf-8")
        write_json(args.metrics, metrics)
        facts = card.read_facts(
            args.info, args.eval_metrics, args.per_class, args.source, prepared, args.metrics,
            args.out, args.int8_out / INT8_NAME, args.specialist_info,
        )  # fmt: skip
        with atomic_path(args.card) as tmp:
            tmp.write_text(card.render(facts), encoding="utf-8")

    return run_stage("export", body)


if __name__ == "__main__":
    raise SystemExit(main())
