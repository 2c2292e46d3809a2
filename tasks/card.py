"""The model card (``models/MODEL_CARD.md``) that the export stage writes next to the model.

Every fact in it is read from a file the pipeline wrote, never typed by hand: the model's
``model.json`` (classes, backbone, training params), the evaluate stage's metrics and
per-class CSV, the fetch stage's ``source.json``, the prepare stage's report and manifest
(images per split, the data's content hash) and the export stage's own metrics (ONNX
parity, int8). :func:`read_facts` reads them; :func:`render` turns them into Markdown and
does no IO, so a test can compare the card's numbers with the files'.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import read_json
from tasks.dataset import Prepared

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CardFacts:
    """What the card says, as the pipeline's files hold it."""

    info: dict[str, Any]  # models/model.json
    evaluation: dict[str, Any]  # metrics/eval.json
    per_class: list[dict[str, str]]  # plots/per_class.csv rows
    source: dict[str, Any]  # data/raw/source.json
    report: dict[str, Any]  # data/prepared/report.json
    data_sha256: str  # tasks.dataset.Prepared.digest of the manifest
    export: dict[str, Any]  # metrics/export.json
    model: str  # the float model's path, as the stage was given it
    int8_model: str  # the int8 model's path
    specialist: dict[str, Any] | None = None  # models/other.json (the other class's specialist)


def read_facts(
    info: Path, evaluation: Path, per_class: Path, source: Path, prepared: Prepared,
    export: Path, model: Path, int8_model: Path, specialist: Path | None = None,
) -> CardFacts:  # fmt: skip
    """Read the card's facts from the files the pipeline wrote.

    Args:
        info: ``models/model.json``.
        evaluation: ``metrics/eval.json``.
        per_class: ``plots/per_class.csv``.
        source: ``data/raw/source.json``.
        prepared: the prepared dataset (its report and manifest).
        export: ``metrics/export.json``.
        model: the float ONNX model's path.
        int8_model: the int8 model's path.
        specialist: ``models/other.json``, the other class's specialist's info.
    """
    with per_class.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return CardFacts(
        info=read_json(info),
        evaluation=read_json(evaluation),
        per_class=rows,
        source=read_json(source),
        report=read_json(prepared.root / "report.json"),
        data_sha256=prepared.digest().hex(),
        export=read_json(export),
        model=str(model),
        int8_model=str(int8_model),
        specialist=read_json(specialist) if specialist is not None else None,
    )


def number(value: Any) -> str:
    """How the card writes a metric: 4 decimals for a fraction, as is otherwise."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:  # a class name may hold a |, which would split the cell
        lines.append("| " + " | ".join(number(c).replace("|", "\\|") for c in row) + " |")
    return [*lines, ""]


def _digest(sha256: str | dict[str, str] | None) -> str:
    if isinstance(sha256, dict):  # IDX datasets: one hash per file
        return ", ".join(f"{name} {digest}" for name, digest in sorted(sha256.items()))
    return sha256 or "—"


def _flat(section: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in section.items():
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", str(value)))  # as written: 1e-05, not 0.0000
    return rows


def _numbers(section: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf, values kept as they are (``quality.lift``)."""
    rows = []
    for key, value in section.items():
        if isinstance(value, dict):
            rows += _numbers(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def render(facts: CardFacts) -> str:
    """The model card as Markdown (pure: no IO)."""
    info, ev, report, export = facts.info, facts.evaluation, facts.report, facts.export
    classes, (height, width) = info["classes"], info["image_size"]
    backbone, int8 = info["backbone"], export.get("int8")
    counts = report["counts"]
    per_split = {split: sum(c[split] for c in counts.values()) for split in SPLITS}
    scores = {row["class"]: row for row in facts.per_class}
    n_test, accuracy = ev["test_images"], ev["accuracy"]
    margin = 1.96 * math.sqrt(accuracy * (1 - accuracy) / n_test)  # normal approximation
    weakest = min(facts.per_class, key=lambda row: float(row["f1"]))
    source = facts.source

    out = [f"# Model card: {backbone['arch']} classifier, {len(classes)} classes", ""]
    out += [
        "Written by the export stage from the files the pipeline wrote (`dvc repro` rewrites",
        "it); the numbers are the test split's.",
        "",
        "## Classes",
        "",
        ", ".join(f"`{name}`" for name in classes),
        "",
        "## Data",
        "",
    ]
    out += _table(
        ("fact", "value"),
        [
            ("source", f"`{source['source']}` ({source['kind']}, from {source['origin']})"),
            ("source sha256", _digest(source["sha256"])),
            ("images", report["images"]),
            *((f"{split} images", per_split[split]) for split in SPLITS),
            ("rejected files", report["rejected"]),
            ("image size", f"{height}x{width}"),
            ("content sha256 (every image's hash, label, split)", facts.data_sha256),
        ],
    )
    out += ["## Model", ""]
    out += _table(
        ("fact", "value"),
        [
            ("backbone", backbone["arch"]),
            ("backbone weights", backbone["weights"]),
            ("pretrained (frozen while the head trains)", backbone["pretrained"]),
            ("preprocessing (inside the graph)", info["preprocessing"]),
            ("input", info["input"]),
            ("epochs run", info["epochs_run"]),
            ("best epoch", info["best_epoch"]),
        ],
    )
    out += ["Training params (`train` section of params.yaml):", ""]
    out += _table(("param", "value"), _flat(info["train"]))
    out += ["## Test metrics", ""]
    out += _table(
        ("metric", "value"),
        [
            (key, value)
            for key, value in _numbers(ev)
            if isinstance(value, int | float) and not isinstance(value, bool)
        ],
    )
    out += ["Per class (train/val/test: images; precision, recall, F1 on the test split):", ""]
    out += _table(
        ("class", "train", "val", "test", "precision", "recall", "f1"),
        [
            (name, *(counts[name][s] for s in SPLITS),
             *(float(scores[name][k]) for k in ("precision", "recall", "f1")))
            for name in classes
        ],
    )  # fmt: skip
    out += ["## Export", ""]
    out += _table(
        ("check", "value"),
        [
            ("ONNX top-1 agreement with Keras", export["top1_agreement"]),
            ("ONNX max abs difference", f"{export['max_abs_diff']:.2e}"),
            ("parity images", export["parity_images"]),
            ("opset", export["opset"]),
            ("ONNX bytes", export["onnx_bytes"]),
        ],
    )
    if int8:
        out += [f"int8 model (`{facts.int8_model}`), gated against the float model:", ""]
        out += _table(
            ("int8", "value"),
            [
                ("top-1 agreement with float", int8["top1_agreement"]),
                ("test accuracy", int8["accuracy"]),
                ("accuracy drop", int8["accuracy_drop"]),
                ("test images", int8["images"]),
                ("bytes", int8["size_bytes"]),
                ("speedup over float (ONNX Runtime, batch 32)", int8["speedup"]),
            ],
        )
    else:
        out += ["No int8 model (`export.quantize: none`).", ""]
    out += _specialist_section(facts.specialist, ev.get("other_specialist", {}))
    warnings = [*ev.get("warnings", []), *report.get("warnings", [])]
    out += [
        "## Intended use and limits",
        "",
        f"- Sorts {height}x{width} RGB images into exactly these {len(classes)} classes. An "
        "image of anything else still gets one of them: pass `--min-confidence P` to answer "
        "`other` below probability P.",
        f"- Learnt from {per_split['train']} images of `{source['source']}`; expect the test "
        "figures only on images like those (same kind of camera, framing and light).",
        f"- Test accuracy {number(accuracy)} on {n_test} images (about ±{margin:.3f} at 95%), "
        f"against {number(ev['quality']['baseline_accuracy'])} for always answering the most frequent "
        f"class. Weakest class: `{weakest['class']}` (F1 {number(float(weakest['f1']))}).",
        *(f"- Warning from the pipeline: {warning}" for warning in warnings),
        "",
        "## Use it",
        "",
        "```bash",
        f"tlp predict --model {facts.model} photo.jpg folder/      # ONNX Runtime only",
        *([f"tlp predict --model {facts.int8_model} photo.jpg    # int8"] if int8 else []),
        f"tlp predict --model {facts.model} --json --top-k 3 --min-confidence 0.5 photos/",
        "```",
        "",
        "The graph takes float32 RGB pixels in [0, 255], shape (batch, height, width, 3), and",
        "returns class probabilities; the class names and image size are in its metadata.",
        "",
    ]
    return "\n".join(out)


def _specialist_section(info: dict[str, Any] | None, figures: dict[str, Any]) -> list[str]:
    """The other class's specialist, when one was trained (``train.other_specialist``)."""
    if not info or not info.get("enabled"):
        return []
    other, classes = info["specialist_of"], info["classes"]
    out = [
        f"## Specialist for `{other}`",
        "",
        f"A second model, trained on the images of the {len(classes)} classes merged into "
        f"`{other}` with their own labels ({', '.join(f'`{c}`' for c in classes)}), on the same "
        f"backbone. `tlp predict` chains the two when `other/model.onnx` lies next to the model: "
        f"an image the main model calls `{other}` gets the specialist's class.",
        "",
    ]
    names = {
        "test_images": "specialist test images",
        "accuracy": "specialist test accuracy",
        "macro_f1": "specialist test macro F1",
        "cascade_accuracy": "cascade test accuracy (every class before merging)",
        "cascade_macro_f1": "cascade test macro F1",
    }
    rows = [
        ("training images", info["train_images"]),
        ("epochs run", info["epochs_run"]),
        ("best epoch", info["best_epoch"]),
        *((name, figures[key]) for key, name in names.items() if key in figures),
    ]
    return out + _table(("fact", "value"), rows)
