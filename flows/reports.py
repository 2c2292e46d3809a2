"""The content of the Prefect artifacts, built from the files the stages wrote.

Pure functions from files to tables and Markdown: the flow decides when to publish them,
these decide what they say. Nothing here imports Prefect.
"""

from __future__ import annotations

import base64
import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The guards' figures in the quality artifact: (key in metrics/eval.json's "quality", name,
# what it says).
QUALITY_ROWS = (
    ("baseline_accuracy", "baseline accuracy", "always answering the most frequent test class"),
    ("lift", "lift", "accuracy / baseline; 1.0 is no better than guessing"),
    ("prediction_majority_share", "prediction majority share",
     "share of the test predictions in the most-predicted class"),
)  # fmt: skip
PICTURE_WIDTH = 1200  # pixels: artifacts embed a JPEG copy, not the full-size PNG


@dataclass(frozen=True)
class StageOutcome:
    """What happened to one stage in one flow run: ``outcome`` is ``ran``, ``cached`` (up
    to date), ``restored`` (from DVC's run cache), ``failed`` or ``not run`` (an upstream
    failed); ``seconds`` the wall time (0.1 s); ``why`` the reason it ran, or did not."""

    stage: str
    outcome: str
    seconds: float
    why: str


def metrics_table(metrics: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """The numbers of a metrics file (``metrics/eval.json``) as metric/value rows, nested
    ones under the dotted names DVC shows (``quality.lift``)."""
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += metrics_table(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append({"metric": f"{prefix}{key}", "value": _round(value)})
    return rows


def quality_markdown(evaluation: dict[str, Any], training: dict[str, Any] | None) -> str:
    """What says whether to trust the model, as Markdown: test accuracy and macro F1, the
    guards' figures, the saved epoch, the parameters per training image, every warning.

    Args:
        evaluation: ``metrics/eval.json`` (the evaluate stage's metrics).
        training: the train stage's metrics (``metrics/train.json``), if there are any.
    """
    quality = evaluation.get("quality", {})
    train = (training or {}).get("train", {})
    rows = [
        ("test accuracy", evaluation.get("accuracy"), f"{evaluation.get('test_images')} test images"),
        ("test macro F1", evaluation.get("macro_f1"), "the mean of the per-class F1 scores"),
        *((name, quality.get(key), says) for key, name, says in QUALITY_ROWS),
    ]  # fmt: skip
    if "params_per_image" in train:
        rows.append(("trainable parameters per training image", train["params_per_image"],
                     "the course's rule of thumb: at most 10 (10:1); the train stage warns above it"))  # fmt: skip
    if "best_epoch" in train:
        figures = ", ".join(f"{key.removeprefix('best_epoch_')} {_short(value)}"
                            for key, value in train.items() if key.startswith("best_epoch_"))  # fmt: skip
        rows.append(("saved (best) epoch", train["best_epoch"],
                     f"of {train.get('epochs_run', '?')} run; at it: {figures}"))  # fmt: skip
    lines = ["| figure | value | what it says |", "|---|---:|---|"]
    lines += [f"| {name} | {_short(value)} | {says} |" for name, value, says in rows]
    warnings = [*evaluation.get("warnings", []), *(training or {}).get("warnings", [])]
    lines += ["", "**Warnings**" if warnings else "No warnings.", ""]
    lines += [f"- {warning}" for warning in warnings]
    return "\n".join(lines) + "\n"


def weak_model_markdown(warnings: list[str]) -> str:
    """The warning shown when ``evaluate.allow_weak`` let a model the guards refuse through."""
    lines = [
        "**Weak model kept**: the evaluate stage's guards refuse this model, and "
        "`evaluate.allow_weak: true` let it through. Do not ship it before these are fixed:",
        "",
        *(f"- {warning}" for warning in warnings),
    ]
    return "\n".join(lines) + "\n"


def pictures_markdown(pictures: list[tuple[str, Path]]) -> str:
    """Pictures as Markdown images with the pixels inside (``data:`` URLs), so the dashboard
    shows them without access to the project's files: a JPEG copy at most
    :data:`PICTURE_WIDTH` pixels wide of each, under its path.

    Args:
        pictures: (path to show, e.g. ``plots/explain.png``; the file) pairs.
    """
    from PIL import Image

    lines = []
    for title, path in pictures:
        with Image.open(path) as image:
            copy = image.convert("RGB")
        copy.thumbnail((PICTURE_WIDTH, PICTURE_WIDTH * 10))
        buffer = io.BytesIO()
        copy.save(buffer, format="JPEG", quality=85)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        lines += [f"**{title}**", "", f"![{title}](data:image/jpeg;base64,{data})", ""]
    return "\n".join(lines)


def confusion_counts(
    path: Path, actual: str = "actual", predicted: str = "predicted"
) -> dict[tuple[str, str], int]:
    """Count (actual, predicted) pairs in a confusion CSV (DVC's ``confusion`` plot data)."""
    with path.open(newline="", encoding="utf-8") as handle:
        return dict(Counter((row[actual], row[predicted]) for row in csv.DictReader(handle)))


def per_class_scores(path: Path) -> dict[str, dict[str, Any]]:
    """Per-class precision, recall, F1 and support from the evaluate stage's CSV, by class."""
    with path.open(newline="", encoding="utf-8") as handle:
        return {
            row["class"]: {key: float(value) if key != "support" else int(value)
                           for key, value in row.items() if key != "class"}
            for row in csv.DictReader(handle)
        }  # fmt: skip


def confusion_markdown(
    counts: dict[tuple[str, str], int], classes: list[str], per_class: dict[str, Any] | None = None
) -> str:
    """The confusion matrix (rows actual, columns predicted) and per-class scores as Markdown.

    Args:
        counts: (actual, predicted) -> count, from :func:`confusion_counts`.
        classes: class names in display order; classes seen only in ``counts`` are appended.
        per_class: per-class scores from :func:`per_class_scores`, if any.

    Returns:
        Markdown with one table for the matrix (diagonal in bold) and one for the scores.
    """
    names = list(classes) + sorted({c for pair in counts for c in pair} - set(classes))
    correct = sum(counts.get((name, name), 0) for name in names)
    lines = [
        f"**Confusion matrix**: rows are the actual class, columns the predicted class; "
        f"{correct} of {sum(counts.values())} test images on the diagonal.",
        "",
        "| actual \\ predicted | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for actual in names:
        cells = [str(counts.get((actual, predicted), 0)) for predicted in names]
        cells[names.index(actual)] = f"**{cells[names.index(actual)]}**"  # the diagonal
        lines.append(f"| **{actual}** | " + " | ".join(cells) + " |")
    if per_class:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        for name in names:
            scores = per_class.get(name, {})
            lines.append(
                f"| {name} | {_fmt(scores.get('precision'))} | {_fmt(scores.get('recall'))} | "
                f"{_fmt(scores.get('f1'))} | {scores.get('support', '')} |"
            )
    return "\n".join(lines) + "\n"


def parity_table(export: dict[str, Any], atol: float, min_agreement: float) -> list[dict]:
    """The ONNX export's parity (``metrics/export.json``) against its gates: check, value,
    limit, passed rows (``atol`` and ``min_agreement`` are ``export.atol`` and
    ``export.min_top1_agreement``)."""
    agreement, diff = export.get("top1_agreement"), export.get("max_abs_diff")
    rows = [
        ("top-1 agreement, ONNX vs Keras", _round(agreement), f">= {min_agreement}",
         agreement is not None and agreement >= min_agreement),
        ("max |ONNX - Keras| probability", diff, f"<= {atol}", diff is not None and diff <= atol),
        *((key, export[key], "", "") for key in ("parity_images", "opset", "onnx_bytes")
          if key in export),
    ]  # fmt: skip
    return [dict(zip(("check", "value", "limit", "passed"), row, strict=True)) for row in rows]


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
