"""Stage ``export``: the Keras model as ONNX, gated on parity with Keras.

The graph takes raw RGB pixels (float32, 0..255, NHWC, dynamic batch) because the
preprocessing is inside the model; class names, image size and preprocessing travel in
the ONNX metadata, so ``tlp predict`` needs nothing else. ``onnx.checker`` runs with the
full check, then ONNX Runtime must agree with Keras on the test split within
``export.atol`` and ``export.min_top1_agreement``: otherwise the stage fails and no
``.onnx`` is left behind.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common import StageError, atomic_path, log, read_json, run_stage, write_json
from tasks.dataset import Prepared
from tasks.onnx_io import cpu_session, keras_to_onnx
from tasks.params import ExportParams, load_params

INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
METADATA_KEYS = ("classes", "image_size", "preprocessing", "input", "arch")


@dataclass
class Parity:
    """How closely ONNX Runtime matches Keras."""

    images: int
    top1_agreement: float
    max_abs_diff: float
    passed: bool


def to_onnx(model, info: dict, opset: int):
    """Convert a Keras model (raw pixels → probabilities) to an ONNX ``ModelProto``.

    Args:
        model: the trained Keras model.
        info: ``models/model.json`` (classes, image size, preprocessing, backbone).
        opset: the ONNX opset.
    """
    import onnx

    height, width = info["image_size"]
    proto = keras_to_onnx(model, (height, width, 3), opset, INPUT_NAME, OUTPUT_NAME)
    metadata = {
        "classes": json.dumps(info["classes"]),
        "image_size": json.dumps(info["image_size"]),
        "preprocessing": f"inside the graph ({info['preprocessing']}); feed RGB float32 0..255",
        "input": f"{INPUT_NAME}: float32 (batch, {height}, {width}, 3) RGB pixels in [0, 255]",
        "arch": info["backbone"]["arch"],
        "producer": "tlp",
    }
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "tlp transfer-learning classifier"
    return proto


def check_parity(model, session, images: np.ndarray, params: ExportParams) -> Parity:
    """Compare Keras and ONNX Runtime on the same images."""
    if len(images) == 0:
        raise StageError("no test images to check ONNX parity on; raise prepare.test_fraction")
    keras_out, onnx_out = [], []
    for start in range(0, len(images), 128):
        batch = images[start : start + 128].astype(np.float32)
        keras_out.append(np.asarray(model.predict_on_batch(batch)))
        onnx_out.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    k, o = np.concatenate(keras_out), np.concatenate(onnx_out)
    agreement = float((k.argmax(1) == o.argmax(1)).mean())
    diff = float(np.abs(k - o).max())
    passed = diff <= params.atol and agreement >= params.min_top1_agreement
    return Parity(len(images), agreement, diff, passed)


def export(model, info: dict, test_images: np.ndarray, params: ExportParams, out: Path) -> Parity:
    """Convert, check, verify parity and write ``out`` atomically (only if parity holds).

    Raises:
        StageError: the parity gate failed; ``out`` is not written.
    """
    import onnx

    started = time.perf_counter()
    proto = to_onnx(model, info, params.opset)
    with atomic_path(out) as tmp:
        onnx.save(proto, tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
        session = cpu_session(tmp)
        parity = check_parity(model, session, test_images, params)
        log.info(
            "export: %d images, top-1 agreement %.4f, max |diff| %.2e (%.1fs)",
            parity.images, parity.top1_agreement, parity.max_abs_diff, time.perf_counter() - started,
        )  # fmt: skip
        if not parity.passed:
            raise StageError(
                f"ONNX parity failed: top-1 agreement {parity.top1_agreement:.4f} (need >= "
                f"{params.min_top1_agreement}), max |diff| {parity.max_abs_diff:.2e} (need <= "
                f"{params.atol}). No ONNX file was written; check the model for ops tf2onnx "
                "converts differently, or loosen export.atol / export.min_top1_agreement"
            )
    return parity


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.export --data ... --model ... --info ... --out ... --metrics ...``."""
    parser = argparse.ArgumentParser(description="Export the model to ONNX with a parity gate.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--info", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    def body() -> None:
        from tasks.safety import load_model_safely

        params = load_params(args.params).export
        info = read_json(args.info)
        model = load_model_safely(args.model, compile=False)
        images, _ = Prepared.open(args.data).load("test", limit=params.max_parity_images)
        parity = export(model, info, images, params, args.out)
        write_json(
            args.metrics,
            {
                "parity_images": parity.images,
                "top1_agreement": parity.top1_agreement,
                "max_abs_diff": parity.max_abs_diff,
                "opset": params.opset,
                "onnx_bytes": args.out.stat().st_size,
            },
        )

    return run_stage("export", body)


if __name__ == "__main__":
    raise SystemExit(main())
