"""One timed call of ``tasks.training.train`` in its own process (benchmarks 1 and 2).

``python -m bench.train_worker --prepared P --backbone B --info I --mode cached|naive
--epochs N --work W --out result.json``

A timing callback is appended to every ``model.fit`` the stage makes (``keras.Model.fit``
is wrapped for the duration), after the stage's own callbacks, so each epoch's phases are
seen as the stage runs them: iterator start-up, training steps, validation, the stage's
end-of-epoch callbacks (checkpoint, backup), and any idle gap before the next epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import PARAMS
from tasks.params import with_changes


def epoch_timer():
    """A Keras callback that records the wall-clock time of each phase of every epoch."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.fit_begin: float | None = None
            self.fit_end: float | None = None
            self.epochs: list[dict[str, float]] = []

        def on_train_begin(self, logs=None):
            self.fit_begin = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append({"begin": time.perf_counter()})

        def on_train_batch_begin(self, batch, logs=None):
            self.epochs[-1].setdefault("first_batch", time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            self.epochs[-1]["last_batch"] = time.perf_counter()

        def on_test_begin(self, logs=None):
            if self.epochs:
                self.epochs[-1]["test_begin"] = time.perf_counter()

        def on_test_end(self, logs=None):
            if self.epochs:
                self.epochs[-1]["test_end"] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epochs[-1]["end"] = time.perf_counter()
            self.epochs[-1]["val_accuracy"] = float((logs or {}).get("val_accuracy", float("nan")))

        def on_train_end(self, logs=None):
            self.fit_end = time.perf_counter()

    return EpochTimer()


@contextlib.contextmanager
def timing_every_fit(timers: list) -> Iterator[None]:
    """Append a fresh :func:`epoch_timer` to the callbacks of every ``keras.Model.fit``."""
    import keras

    original = keras.Model.fit

    def fit(self, *args, **kwargs):
        timer = epoch_timer()
        timers.append(timer)
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), timer]
        return original(self, *args, **kwargs)

    keras.Model.fit = fit
    try:
        yield
    finally:
        keras.Model.fit = original


def epoch_phases(timer, origin: float) -> list[dict[str, float]]:
    """Per-epoch durations (s): total (begin to next begin, or to the end of ``fit``) and
    its phases: iterator start-up (epoch begin to first batch), training steps, the gap
    before validation (where Keras makes the validation iterator), validation, the stage's
    end-of-epoch callbacks, and idle time after the epoch."""
    rows = []
    for index, epoch in enumerate(timer.epochs):
        following = (
            timer.epochs[index + 1]["begin"] if index + 1 < len(timer.epochs) else timer.fit_end
        )
        first = epoch.get("first_batch", epoch["begin"])
        last = epoch.get("last_batch", first)
        test_begin, test_end = epoch.get("test_begin", last), epoch.get("test_end", last)
        rows.append(
            {
                "start_s": round(epoch["begin"] - origin, 3),
                "total_s": round(following - epoch["begin"], 3),
                "iterator_startup_s": round(first - epoch["begin"], 3),
                "train_steps_s": round(last - first, 3),
                "before_validation_s": round(test_begin - last, 3),
                "validation_s": round(test_end - test_begin, 3),
                "callbacks_s": round(epoch["end"] - test_end, 3),
                "idle_after_s": round(following - epoch["end"], 3),
                "val_accuracy": round(epoch["val_accuracy"], 4),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run one training and write its timings as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--backbone", type=Path, required=True)
    parser.add_argument("--info", type=Path, required=True)
    parser.add_argument("--mode", choices=["cached", "naive"], required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", default="{}", help="TrainParams overrides as JSON")
    args = parser.parse_args(argv)

    from tasks.common import setup_logging
    from tasks.dataset import Prepared
    from tasks.safety import load_model_safely
    from tasks.training import TrainPaths, train

    setup_logging()
    settings = {
        "epochs": args.epochs, "batch_size": 32, "learning_rate": 0.001, "dropout": 0.2,
        "pooling": "avg", "dense_units": 128, "early_stopping_patience": 0,
        "feature_cache": args.mode == "cached", "augment": False, "seed": 42,
        **json.loads(args.train),
    }  # fmt: skip
    params = with_changes(PARAMS.train, **settings)
    prepared = Prepared.open(args.prepared)
    info = json.loads(args.info.read_text())
    for folder in ("features", "backup"):
        shutil.rmtree(args.work / folder, ignore_errors=True)  # a cold start every time
    paths = TrainPaths(
        model=args.work / "model.keras",
        backup=args.work / "backup",
        features=args.work / "features",
    )
    loaded = time.perf_counter()
    backbone = load_model_safely(args.backbone, compile=False)
    started = time.perf_counter()
    timers: list = []
    with timing_every_fit(timers):
        result = train(params, backbone, info, prepared, paths, args.backbone)
    finished = time.perf_counter()
    result.model.save(args.work / "model.keras")
    (timer,) = timers
    report = {
        "mode": args.mode,
        "used_feature_cache": result.used_feature_cache,
        "train_params": settings,
        "images": {s: prepared.count(s) for s in ("train", "val", "test")},
        "load_backbone_s": round(started - loaded, 3),
        "train_call_s": round(finished - started, 3),
        "before_fit_s": round(timer.fit_begin - started, 3),
        "after_fit_s": round(finished - timer.fit_end, 3),
        "epochs": epoch_phases(timer, started),
        "model": str(args.work / "model.keras"),
    }
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
