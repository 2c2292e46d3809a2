"""Stage ``export_other``: the other class's specialist as ONNX, behind export's parity gate.

The ``export`` stage's module and params section, run for the specialist of
:mod:`tasks.train_other`: the same conversion, ``onnx.checker`` and ONNX Runtime parity
gate (on the test images of the classes merged into the other class, or their training
images when none was drawn for the test split), and the same metadata, plus
``specialist_of`` (the main model's class it refines), by which ``tlp predict`` finds the
class to route. No model passes the gate: no file is written and the stage fails.

The model goes in a folder of its own (``models/other/model.onnx``). Off (the train_other
stage wrote ``{"enabled": false}``), the stage writes only a ``README.md`` there, as export
does for the int8 model: declared outputs must exist, an unchanging note re-runs nothing,
and a folder with a note is never an empty output DVC would warn about. ``tlp predict``
then runs the main model alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.common import atomic_path, log, read_json, run_stage
from tasks.params import load_params

OFF = """# No specialist for the other class

`train.other_specialist` is false, so there is no specialist to export. Set it to true and
run `dvc repro` (or `tlp run`): `model.onnx` then appears in this folder, and `tlp predict`
chains it after the main model.
"""


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
            args.out.unlink(missing_ok=True)
            with atomic_path(args.out.with_name("README.md")) as note:
                note.write_text(OFF, encoding="utf-8")
            log.info("export_other: off (no specialist was trained)")
            return
        from tasks.dataset import Prepared
        from tasks.onnx_io import export
        from tasks.safety import load_model_safely

        subset = Prepared.open(args.data).specialist(info["specialist_of"])
        split = "test" if subset.count("test") else "train"
        images, _ = subset.load(split, limit=params.max_parity_images)
        model = load_model_safely(args.model, compile=False)
        args.out.with_name("README.md").unlink(missing_ok=True)
        parity = export(model, info, images, params, args.out)
        log.info(
            "export_other: %s written; parity on %d %s images: top-1 agreement %.4f",
            args.out, parity.images, split, parity.top1_agreement,
        )  # fmt: skip

    return run_stage("export_other", body)


if __name__ == "__main__":
    raise SystemExit(main())
