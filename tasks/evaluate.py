"""Stage ``evaluate``: test-split metrics (scikit-learn) and the confusion matrix.

Writes a DVC metrics file (accuracy, macro F1, top-k accuracy, per-class precision,
recall, F1 and support), a confusion-matrix picture, and the (actual, predicted) pairs
that ``dvc plots show`` renders with its ``confusion`` template.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from tasks.common import StageError, atomic_path, log, run_stage, write_json
from tasks.dataset import Prepared
from tasks.params import EvaluateParams, load_params


@dataclass
class Evaluation:
    """Metrics, and the raw predictions they came from."""

    metrics: dict
    y_true: np.ndarray
    y_pred: np.ndarray
    confusion: np.ndarray


def predict_split(
    model, prepared: Prepared, split: str, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and true labels for a whole split, batch by batch."""
    probabilities, labels = [], []
    for images, y in prepared.batches(split, batch_size):
        probabilities.append(np.asarray(model.predict_on_batch(images.astype(np.float32))))
        labels.append(y)
    if not labels:
        raise StageError(f"the {split} split is empty; raise prepare.test_fraction or add images")
    return np.concatenate(probabilities), np.concatenate(labels)


def compute_metrics(
    probabilities: np.ndarray, y_true: np.ndarray, classes: list[str], top_k: int
) -> Evaluation:
    """All metrics from probabilities and labels (pure: no model, no files).

    Args:
        probabilities: (N, C) class probabilities.
        y_true: (N,) label indices.
        classes: class names, index = label.
        top_k: k of the top-k accuracy (capped at the number of classes).
    """
    y_pred = probabilities.argmax(axis=1)
    label_ids = list(range(len(classes)))
    k = min(top_k, len(classes))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=label_ids, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    result = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=label_ids, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=label_ids, average="weighted", zero_division=0)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "top_k_accuracy": float(skm.top_k_accuracy_score(y_true, probabilities, k=k, labels=label_ids)) if len(classes) > 2 else 1.0,
        "top_k": k,
        "test_images": int(len(y_true)),
        "per_class": per_class,
    }  # fmt: skip
    confusion = skm.confusion_matrix(y_true, y_pred, labels=label_ids)
    return Evaluation(result, y_true, y_pred, confusion)


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Save the confusion matrix as a PNG (counts, with row-normalised colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(5.0, 0.55 * len(classes) + 3)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    rows = confusion.sum(axis=1, keepdims=True).clip(min=1)
    ax.imshow(confusion / rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if len(classes) <= 30:
        for (i, j), count in np.ndenumerate(confusion):
            shade = confusion[i, j] / rows[i, 0] > 0.5
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if shade else "black",
            )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.evaluate --data ... --model ... --metrics ... --plot ... --confusion ...``."""
    parser = argparse.ArgumentParser(description="Evaluate the model on the test split.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plot", required=True, type=Path)
    parser.add_argument("--confusion", required=True, type=Path)
    args = parser.parse_args(argv)

    def body() -> None:
        from tasks.safety import load_model_safely

        params: EvaluateParams = load_params(args.params).evaluate
        prepared = Prepared.open(args.data)
        model = load_model_safely(args.model, compile=False)
        probabilities, y_true = predict_split(model, prepared, "test", params.batch_size)
        evaluation = compute_metrics(probabilities, y_true, prepared.classes, params.top_k)
        m = evaluation.metrics
        plot_confusion(
            evaluation.confusion, prepared.classes, args.plot,
            f"test accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f} (n={m['test_images']})",
        )  # fmt: skip
        with (
            atomic_path(args.confusion) as tmp,
            tmp.open("w", newline="", encoding="utf-8") as handle,
        ):
            writer = csv.writer(handle)
            writer.writerow(["actual", "predicted"])
            writer.writerows(
                (prepared.classes[a], prepared.classes[p])
                for a, p in zip(evaluation.y_true, evaluation.y_pred, strict=True)
            )
        write_json(args.metrics, m)
        log.info("evaluate: accuracy %.4f, macro F1 %.4f, top-%d %.4f on %d test images",
                 m["accuracy"], m["macro_f1"], m["top_k"], m["top_k_accuracy"], m["test_images"])  # fmt: skip

    return run_stage("evaluate", body)


if __name__ == "__main__":
    raise SystemExit(main())
