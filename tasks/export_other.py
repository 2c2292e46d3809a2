"""Stage ``export_other``: the other class's specialist as ONNX, behind export's parity gate.

The ``export`` stage's module and params section, run for the specialist of
:mod:`tasks.train_other`: the same conversion, ``onnx.checker`` and ONNX Runtime parity
gate (on the test images of the classes merged into the other class, or their training
images when none was drawn for the test split), and the same metadata, plus
``specialist_of`` (the main model's class it refines), by which ``tlp predict`` finds the
class to route. No model passes the gate: no file is written and the stage fails.

Off (the train_other stage wrote ``{"enabled": false}``), the stage writes an empty file,
as export does for the int8 model: declared outputs must exist, and an unchanging empty
file re-runs nothing. ``tlp predict`` ignores an empty specialist.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.common import atomic_path, log, read_json, run_stage
from tasks.params import load_params


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.export_other --data ... --model ... --info ... --out ...``."""
    parser = argparse.ArgumentParser(description="Export the other class's specialist to ONNX.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--info", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(args.params).export
        info = read_json(args.info)
        if not info.get("enabled"):
            with atomic_path(args.out):
                pass  # the empty placeholder (see the module docstring)
            log.info("export_other: off (no specialist was trained)")
            return
        from tasks.dataset import Prepared
        from tasks.export import export
        from tasks.safety import load_model_safely

        subset = Prepared.open(args.data).specialist(info["specialist_of"])
        split = "test" if subset.count("test") else "train"
        images, _ = subset.load(split, limit=params.max_parity_images)
        model = load_model_safely(args.model, compile=False)
        parity = export(model, info, images, params, args.out)
        log.info(
            "export_other: %s written; parity on %d %s images: top-1 agreement %.4f",
            args.out, parity.images, split, parity.top1_agreement,
        )  # fmt: skip

    return run_stage("export_other", body)


if __name__ == "__main__":
    raise SystemExit(main())
