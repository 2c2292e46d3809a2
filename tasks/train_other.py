"""Stage ``train_other``: a specialist model for the classes merged into ``prepare.other_class``.

The course's recipe: let the rare classes gather in one class, "other", so the main model
learns them as a group from enough images, then train a second model on what gathered
there, with the images' own labels. ``prepare.other_class`` does the first half; with
``train.other_specialist: true`` this stage does the second, by :func:`tasks.training.train`
on the other class's images (:meth:`tasks.dataset.Prepared.specialist`): the same backbone,
head, checkpoints, resume and divergence guards, and with a pretrained backbone the
features the train stage cached, sliced (seconds, not a second extraction). The evaluate
stage scores the cascade (an image goes to the specialist when the main model says
"other"), ``export_other`` writes its ONNX model and ``tlp predict`` chains the two.

The model goes in a folder of its own (``models/other-keras/model.keras``). Off (the
default), the stage writes only a ``README.md`` there saying how to turn it on, and
``{"enabled": false}`` as its info, without importing TensorFlow: its outputs never change
while it is off, so nothing downstream re-runs because of it and a no-op ``dvc repro``
stays a no-op. DVC requires every declared output to exist and has no optional ones; a
folder with a note is never an empty output it would warn about (as for ``models/int8``).

Naming: the ``train`` stage's module and params section, run for the other class's model;
the stage reads the whole ``train`` section (the specialist trains with the same settings),
while the ``train`` stage lists every key but ``train.other_specialist``, so switching the
specialist on or off never retrains the main model.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tasks.common import StageError, atomic_path, log, read_json, run_stage, write_json
from tasks.params import load_params

OFF = """# No specialist for the other class

`train.other_specialist` is false. To train one on the classes merged into
`prepare.other_class`, set `train.other_specialist: true` and run `dvc repro` (or `tlp run`).
"""


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.train_other --data ... --backbone ... --model ... --info ... --backup ...``."""
    parser = argparse.ArgumentParser(description="Train the other class's specialist.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--backbone", required=True, type=Path)
    parser.add_argument("--backbone-info", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--info", required=True, type=Path)
    parser.add_argument("--backup", required=True, type=Path)
    parser.add_argument("--features", type=Path, help="the train stage's cache (read only)")
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        if not params.train.other_specialist:
            args.model.unlink(missing_ok=True)
            with atomic_path(args.model.with_name("README.md")) as note:
                note.write_text(OFF, encoding="utf-8")
            write_json(args.info, {"enabled": False})
            shutil.rmtree(args.backup, ignore_errors=True)
            log.info("train_other: off (train.other_specialist is false)")
            return
        from tasks.dataset import Prepared

        other = params.prepare.other_class
        full = Prepared.open(args.data)
        subset = full.specialist(other)  # refuses < 2 merged classes or one with no image
        monitor = params.train.monitor
        if subset.count("val") == 0 and monitor.startswith("val_"):
            raise StageError(
                f"train.monitor is {monitor} but no image of the classes merged into {other!r} "
                f"({', '.join(subset.classes)}) is in the val split; raise "
                "prepare.val_fraction, add images, or set train.monitor: loss"
            )
        from tasks.common import save_model
        from tasks.safety import load_model_safely
        from tasks.training import TrainPaths, summarize, train

        backbone_info = read_json(args.backbone_info)
        backbone = load_model_safely(args.backbone, compile=False)
        paths = TrainPaths(model=args.model, backup=args.backup, features=args.features)
        result = train(params.train, backbone, backbone_info, subset, paths, args.backbone, full)
        args.model.with_name("README.md").unlink(missing_ok=True)
        save_model(result.model, args.model)
        write_json(
            args.info,
            {
                "enabled": True,
                "specialist_of": other,
                "classes": subset.classes,
                "image_size": list(subset.image_size),
                "input": "RGB pixels, float32 in [0, 255], shape (batch, height, width, 3)",
                "preprocessing": backbone_info["preprocessing"],
                "backbone": backbone_info,
                "train": params.train.model_dump(),
                "best": {monitor: result.best_value},
                **summarize(result, monitor, subset.count("train")),
                "phases": result.phases,
                "feature_cache": result.used_feature_cache,
                "seconds": round(result.seconds, 2),
            },
        )
        shutil.rmtree(args.backup, ignore_errors=True)  # finished: nothing to resume
        log.info(
            "train_other: specialist for %r over %d classes, best %s=%.4f at epoch %d (%.1fs)",
            other, len(subset.classes), monitor, result.best_value, result.best_epoch,
            result.seconds,
        )  # fmt: skip

    return run_stage("train_other", body)


if __name__ == "__main__":
    raise SystemExit(main())
