"""Stage ``train``: a classification head on the backbone, with checkpoints and resume.

The training itself is :func:`tasks.training.train` (shared with ``train_other``): frozen
or from-scratch backbone, the feature cache, optional fine-tuning, crash-safe checkpoints
and per-epoch backups from which a killed run resumes.

Besides the model, the stage writes what a person compares runs by: the saved epoch and its
validation figures (``--metrics``, a DVC metrics file), the trainable parameters per
training image (warned about above 10, :func:`tasks.network.capacity_warning`), and the
training curves of every epoch (``--live``, dvclive's plots).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tasks.common import log, read_json, run_stage, save_model, write_json
from tasks.dataset import Prepared
from tasks.devices import for_replicas, strategy_for
from tasks.features import open_cache
from tasks.params import load_params
from tasks.training import TrainPaths, summarize, train


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.train --data ... --backbone ... --model ... --metrics ... --backup ...``."""
    parser = argparse.ArgumentParser(description="Train the classification head.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--backbone", required=True, type=Path)
    parser.add_argument("--backbone-info", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--info", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path, help="the best epoch's figures")
    parser.add_argument("--backup", required=True, type=Path)
    parser.add_argument("--features", type=Path)
    parser.add_argument("--live", type=Path, help="dvclive folder: the training curves")
    args = parser.parse_args(argv)

    def body() -> None:
        from tasks.safety import load_model_safely

        params = load_params(args.params)
        prepared = Prepared.open(args.data)
        backbone_info = read_json(args.backbone_info)
        paths = TrainPaths(model=args.model, backup=args.backup, features=args.features)
        if args.features is not None:
            open_cache(args.features)
        strategy = strategy_for(params.train)  # train.distribute: every variable in its scope
        with strategy.scope():
            backbone = load_model_safely(args.backbone, compile=False)
            replicas = strategy.num_replicas_in_sync
            run = for_replicas(params.train, replicas)  # the global batch, the learning rates
            result = train(run, backbone, backbone_info, prepared, paths, args.backbone)
        save_model(result.model, args.model)
        summary = summarize(result, params.train.monitor, prepared.count("train"))
        write_json(
            args.info,
            {
                "classes": prepared.classes,
                "image_size": list(prepared.image_size),
                "input": "RGB pixels, float32 in [0, 255], shape (batch, height, width, 3)",
                "preprocessing": backbone_info["preprocessing"],
                "backbone": backbone_info,
                "train": params.train.model_dump(),
                "best": {params.train.monitor: result.best_value},
                **summary,
                "phases": result.phases,
                "feature_cache": result.used_feature_cache,
                "batchnorm_momentum": result.batchnorm_momentum,
                "seconds": round(result.seconds, 2),
                "replicas": replicas,  # train.distribute: batch and learning rates x replicas
            },
        )
        at_best = {f"best_epoch_{key}": value for key, value in summary["at_best_epoch"].items()}
        figures = {"best_epoch": result.best_epoch, **at_best, "epochs_run": summary["epochs_run"],
                   "params_per_image": summary["params_per_image"]}  # fmt: skip
        # Nested under "train": DVC's tables then name them train.best_epoch_val_accuracy...,
        # which neither reads as a test metric nor sorts before them (`dvc metrics show`).
        write_json(args.metrics, {"train": figures, "warnings": result.warnings}, sort_keys=False)
        if args.live is not None:
            write_curves(args.live, result.history)
        shutil.rmtree(args.backup, ignore_errors=True)  # finished: nothing to resume
        log.info(
            "train: best %s=%.4f at epoch %d of %d (%.1fs)", params.train.monitor,
            result.best_value, result.best_epoch, summary["epochs_run"], result.seconds,
        )  # fmt: skip

    return run_stage("train", body)


def write_curves(folder: Path, history: dict[str, list[float]]) -> None:
    """dvclive's training curves (``train/loss``, ``eval/accuracy``...), one point per epoch.

    Written from the logs of every epoch once training is over, those trained before a
    resume included, so the curves are whole however often the run was interrupted.
    """
    from dvclive import Live
    from dvclive.utils import standardize_metric_name

    live = Live(str(folder), save_dvc_exp=False, dvcyaml=None, report=None)
    for epoch in range(len(next(iter(history.values()), []))):
        for key, values in history.items():
            live.log_metric(standardize_metric_name(key, "dvclive.keras"), values[epoch])
        live.next_step()
    live.end()
    # dvclive's summary holds the last epoch, not the saved one: --metrics says what was saved.
    (folder / "metrics.json").unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
