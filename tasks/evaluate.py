"""Stage ``evaluate``: test-split metrics, quality guards, and pictures to look at.

Writes:

* a DVC metrics file led by the test split's ``accuracy`` and ``macro_f1``, with the
  guards' figures under ``quality``: ``baseline_accuracy`` (always guessing the most
  frequent test class), ``lift`` (accuracy / baseline) and ``prediction_majority_share``
  (the share of test predictions in the most-predicted class). Every other name sorts
  after ``macro_f1``, as ``dvc metrics show`` sorts its columns. Per-class precision,
  recall, F1 and support go to their own CSV (a DVC bar plot), so ``dvc exp show`` stays
  narrow;
* the confusion matrix as a picture and as (actual, predicted) pairs for ``dvc plots``;
* ``explain.png``: Grad-CAM heat maps of test images, misclassified ones first;
* ``errors.png``: the most confidently wrong test images.

With the other class's specialist (``train.other_specialist``, :mod:`tasks.train_other`),
the metrics also hold ``other_specialist``: the specialist's own figures on the test images
of the merged classes, and the cascade's (``cascade_accuracy``, ``cascade_macro_f1``) over
the classes as they were before merging; the specialist faces the same guards.

A model no better than guessing is refused, not "Completed": when accuracy does not beat the
baseline, when nearly all predictions fall in one class although the data is not that
imbalanced, or when ``evaluate.min_accuracy`` / ``evaluate.min_macro_f1`` are set and
missed, the stage fails with the numbers and likely fixes, and writes nothing.
``evaluate.allow_weak: true`` turns that into loud warnings (also in the metrics file).
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from tasks.common import StageError, atomic_path, log, read_json, run_stage, write_json
from tasks.dataset import Prepared
from tasks.params import EvaluateParams, load_params

# "Nearly all predictions in one class": at least this share, and this much above the share
# of that class among the true labels (so a model on truly imbalanced data is not blamed).
COLLAPSE_SHARE = 0.9
COLLAPSE_MARGIN = 0.1
FIXES = (
    "more images per class, a pretrained backbone (backbone.weights: imagenet), another "
    "train.learning_rate, a larger prepare.image_size, or train.augment: true"
)


@dataclass
class Evaluation:
    """Metrics, and the raw predictions they came from."""

    metrics: dict
    per_class: dict[str, dict]
    y_true: np.ndarray
    probabilities: np.ndarray
    confusion: np.ndarray
    problems: list[str] = field(default_factory=list)

    @property
    def y_pred(self) -> np.ndarray:
        """The predicted class of each test image."""
        return self.probabilities.argmax(axis=1)


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
        top_k: k of the top-k accuracy, reported only when k < the number of classes
            (with k >= C it is 1.0 by construction, which means nothing).
    """
    y_pred = probabilities.argmax(axis=1)
    label_ids = list(range(len(classes)))
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
    true_counts = np.bincount(y_true, minlength=len(classes))
    pred_counts = np.bincount(y_pred, minlength=len(classes))
    accuracy = float(skm.accuracy_score(y_true, y_pred))
    baseline = float(true_counts.max() / len(y_true))
    # Insertion order is the column order of `dvc exp show`; `dvc metrics show` sorts the
    # names, so none may sort before "macro_f1" (the guards' figures are quality.*, and
    # balanced accuracy is named for what it is: the mean recall over the classes).
    result = {
        "accuracy": accuracy,
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=label_ids, average="macro", zero_division=0)),
        "quality": {
            "baseline_accuracy": baseline,
            "lift": accuracy / baseline,
            "prediction_majority_share": float(pred_counts.max() / len(y_pred)),
        },
        "macro_recall": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=label_ids, average="weighted", zero_division=0)),
    }  # fmt: skip
    if top_k < len(classes):
        result[f"top_{top_k}_accuracy"] = float(
            skm.top_k_accuracy_score(y_true, probabilities, k=top_k, labels=label_ids)
        )
    result["test_images"] = int(len(y_true))
    confusion = skm.confusion_matrix(y_true, y_pred, labels=label_ids)
    return Evaluation(result, per_class, y_true, probabilities, confusion)


def quality_problems(
    evaluation: Evaluation, classes: list[str], params: EvaluateParams
) -> list[str]:
    """What makes the model not worth shipping, each with its numbers (empty: none).

    Pure: from the metrics and predictions alone.
    """
    m, quality = evaluation.metrics, evaluation.metrics["quality"]
    problems = []
    counts = np.bincount(evaluation.y_pred, minlength=len(classes))
    top = int(counts.argmax())
    true_share = float(np.mean(evaluation.y_true == top))
    share = quality["prediction_majority_share"]
    if share >= COLLAPSE_SHARE and share >= true_share + COLLAPSE_MARGIN:
        problems.append(
            f"the model collapsed onto one class: {share:.0%} of the test predictions are "
            f"{classes[top]!r}, which is {true_share:.0%} of the test images"
        )
    if m["accuracy"] <= quality["baseline_accuracy"]:
        problems.append(
            f"test accuracy {m['accuracy']:.3f} is no better than the baseline "
            f"{quality['baseline_accuracy']:.3f} (always answering the most frequent test class)"
        )
    if params.min_accuracy is not None and m["accuracy"] < params.min_accuracy:
        problems.append(
            f"test accuracy {m['accuracy']:.3f} is under evaluate.min_accuracy {params.min_accuracy}"
        )
    if params.min_macro_f1 is not None and m["macro_f1"] < params.min_macro_f1:
        problems.append(
            f"test macro F1 {m['macro_f1']:.3f} is under evaluate.min_macro_f1 {params.min_macro_f1}"
        )
    return problems


def evaluate_cascade(
    specialist, info: dict, prepared: Prepared, y_pred: np.ndarray, params: EvaluateParams
) -> tuple[dict, list[str]]:
    """The other class's specialist on its own test images, and the cascade over every class.

    The cascade answers the main model's class, or, when that is ``info["specialist_of"]``,
    the specialist's; it is scored against each test image's class before merging
    (``source_label``). The specialist gets the same quality guards as the main model.

    Args:
        specialist: the specialist Keras model (:mod:`tasks.train_other`).
        info: its ``models/other.json``.
        prepared: the prepared dataset.
        y_pred: the main model's predicted class per test image (manifest order).
        params: the ``evaluate`` section.

    Returns:
        The figures (the specialist's ``accuracy``, ``macro_f1`` and ``test_images``,
        ``cascade_accuracy``, ``cascade_macro_f1``, and ``routed_images``: the test images
        the main model sent to the specialist), and the specialist's quality problems.
    """
    other, classes = info["specialist_of"], info["classes"]
    true_fine = prepared.rows("test")["source_label"].to_numpy(object)
    fine_pred = np.asarray(prepared.classes, dtype=object)[y_pred]
    routed = np.flatnonzero(fine_pred == other)
    for start in range(0, len(routed), params.batch_size):
        batch = routed[start : start + params.batch_size]
        scores = specialist.predict_on_batch(prepared.take("test", batch).astype(np.float32))
        fine_pred[batch] = np.asarray(classes, dtype=object)[np.asarray(scores).argmax(axis=1)]
    present = sorted(set(true_fine))
    figures = {
        "cascade_accuracy": float(np.mean(fine_pred == true_fine)),
        "cascade_macro_f1": float(skm.f1_score(true_fine, fine_pred, labels=present, average="macro", zero_division=0)),
        "routed_images": int(len(routed)),
    }  # fmt: skip
    subset = prepared.specialist(other)
    if subset.count("test") == 0:
        log.warning(
            "evaluate: no test image of the classes merged into %r; specialist unscored", other
        )
        figures["test_images"] = 0
        return figures, []
    probabilities, y_true = predict_split(specialist, subset, "test", params.batch_size)
    own = compute_metrics(probabilities, y_true, subset.classes, params.top_k)
    problems = [
        f"specialist for {other!r}: {p}" for p in quality_problems(own, subset.classes, params)
    ]
    keys = ("accuracy", "macro_f1", "test_images")
    return {**{key: own.metrics[key] for key in keys}, **figures}, problems


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
            color = "white" if shade else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _write_csv(path: Path, header: list[str], rows) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.evaluate --data ... --model ... --metrics ... --plots PLOTS_DIR``."""
    parser = argparse.ArgumentParser(description="Evaluate the model on the test split.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path, help="the metrics JSON")
    parser.add_argument("--confusion-plot", required=True, type=Path, help="confusion PNG")
    parser.add_argument("--confusion", required=True, type=Path, help="(actual, predicted) CSV")
    parser.add_argument("--per-class", required=True, type=Path, help="per-class metrics CSV")
    parser.add_argument("--explain", required=True, type=Path, help="Grad-CAM sheet PNG")
    parser.add_argument("--errors", required=True, type=Path, help="error gallery PNG")
    parser.add_argument("--specialist", type=Path, help="the other class's specialist (.keras)")
    parser.add_argument("--specialist-info", type=Path, help="its info: enabled or not")
    args = parser.parse_args(argv)

    def body() -> None:
        from tasks import explain
        from tasks.safety import load_model_safely

        params: EvaluateParams = load_params(args.params).evaluate
        prepared = Prepared.open(args.data)
        classes = prepared.classes
        model = load_model_safely(args.model, compile=False)
        probabilities, y_true = predict_split(model, prepared, "test", params.batch_size)
        evaluation = compute_metrics(probabilities, y_true, classes, params.top_k)
        m = evaluation.metrics
        problems = quality_problems(evaluation, classes, params)
        info = read_json(args.specialist_info) if args.specialist_info else {}
        if info.get("enabled"):  # the cascade's figures, after every main-model figure
            specialist = load_model_safely(args.specialist, compile=False)
            m["other_specialist"], more = evaluate_cascade(
                specialist, info, prepared, evaluation.y_pred, params
            )
            problems += more
        if problems and not params.allow_weak:
            raise StageError(
                f"refusing the model: {'; '.join(problems)}. Likely fixes: {FIXES}. To write "
                "the metrics and pictures anyway, set evaluate.allow_weak: true"
            )
        for problem in problems:
            log.warning("WEAK MODEL (evaluate.allow_weak is true): %s", problem)
        if problems:
            m["warnings"] = problems
        write_json(args.metrics, m, sort_keys=False)
        _write_csv(
            args.per_class,
            ["class", "precision", "recall", "f1", "support"],
            ([name, *values.values()] for name, values in evaluation.per_class.items()),
        )
        _write_csv(
            args.confusion,
            ["actual", "predicted"],
            ((classes[a], classes[p]) for a, p in zip(y_true, evaluation.y_pred, strict=True)),
        )
        title = f"test accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f} (n={m['test_images']})"  # fmt: skip
        plot_confusion(evaluation.confusion, classes, args.confusion_plot, title)
        chosen = explain.pick_for_explanation(y_true, evaluation.y_pred, params.explain)
        layer = explain.contact_sheet(
            model, prepared.take("test", chosen), y_true[chosen], classes, args.explain,
            params.explain_layer,
        )  # fmt: skip
        wrong = explain.most_confident_errors(y_true, probabilities, params.errors)
        explain.error_gallery(
            prepared.take("test", wrong), y_true[wrong], probabilities[wrong], classes, args.errors
        )
        log.info(
            "evaluate: accuracy %.4f (baseline %.4f), macro F1 %.4f on %d test images; "
            "explained %d images (layer %s), %d errors shown",
            m["accuracy"], m["quality"]["baseline_accuracy"], m["macro_f1"], m["test_images"],
            len(chosen), layer, len(wrong),
        )  # fmt: skip

    return run_stage("evaluate", body)


if __name__ == "__main__":
    raise SystemExit(main())
