"""Forward throughput of one classifier in TensorFlow (Keras) or ONNX Runtime.

``python -m bench.throughput keras|onnx MODEL BATCH BATCHES``: prints ``{"images_per_s": x}``
for ``BATCHES`` batches of ``BATCH`` random images, after one warm-up batch (tracing and
session set-up are not counted: this is the steady state a feature extraction reaches).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    """Measure and print the steady-state images per second."""
    runtime, model_path, batch, batches = (argv or sys.argv[1:])[:4]
    batch, batches = int(batch), int(batches)
    if runtime == "keras":
        from tasks.safety import load_model_safely

        model = load_model_safely(model_path, compile=False)
        shape = model.input_shape[1:]

        def forward(x):
            return model.predict_on_batch(x)
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape[1:]

        def forward(x):
            return session.run(None, {"pixels": x})

    images = np.random.default_rng(0).uniform(0, 255, (batch, *shape)).astype(np.float32)
    forward(images)
    started = time.perf_counter()
    for _ in range(batches):
        forward(images)
    print(json.dumps({"images_per_s": batch * batches / (time.perf_counter() - started)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
