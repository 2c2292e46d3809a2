"""The other class's specialist (train.other_specialist): its data, its stages, the cascade."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks import export_other
from tasks.common import StageError
from tasks.dataset import Prepared
from tasks.params import ParamsError, parse_params, with_changes
from tasks.prepare import prepare
from tests.conftest import PARAMS, ROOT, SHRUNK, make_project, run, set_params

# Four large classes and three small ones, each a colour a small CNN tells apart at once.
COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
    "cyan": (30, 210, 220), "magenta": (210, 30, 200), "grey": (128, 128, 128),
}  # fmt: skip
LARGE, SMALL = ("red", "green", "blue", "yellow"), ("cyan", "magenta", "grey")


def write_images(root: Path, counts: dict[str, int], size: int = 16) -> None:
    """``root/<class>/<i>.png``: the class's colour with a little noise (every file distinct)."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            noise = rng.integers(-25, 26, (size, size, 3))
            pixels = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")


def prepared_with(tmp_path: Path, counts: dict[str, int], **changes) -> Prepared:
    raw = tmp_path / "raw"
    write_images(raw, counts)
    settings = {"image_size": [16, 16], "min_images_per_class": 12, "other_class": "other"}
    prepare(with_changes(PARAMS.prepare, **{**settings, **changes}), raw, tmp_path / "prepared")
    return Prepared.open(tmp_path / "prepared")


def test_the_specialist_sees_the_merged_classes_under_their_own_names(tmp_path):
    prepared = prepared_with(tmp_path, {"red": 20, "green": 20, "cyan": 8, "grey": 9})
    assert prepared.classes == ["green", "other", "red"]

    subset = prepared.specialist("other")

    assert subset.classes == ["cyan", "grey"]
    assert sorted(subset.manifest["label"]) == ["cyan"] * 8 + ["grey"] * 9
    for split in ("train", "val", "test"):  # the same pixels as the rows they came from
        rows = subset.rows(split)
        if len(rows):
            images, labels = subset.load(split)
            assert [subset.classes[i] for i in labels] == list(rows["source_label"])
            red_share = images[..., 0].mean() / 255
            assert red_share < 0.6  # cyan and grey, never the big red class


def test_a_merged_class_without_training_images_is_an_error_naming_the_counts(tmp_path):
    prepared = prepared_with(tmp_path, {"red": 20, "green": 20, "cyan": 8, "grey": 9})
    manifest = prepared.manifest
    no_cyan_to_train = manifest[
        ~((manifest["source_label"] == "cyan") & (manifest["split"] == "train"))
    ]
    grey = int(((manifest["source_label"] == "grey") & (manifest["split"] == "train")).sum())
    broken = Prepared(prepared.root, prepared.classes, no_cyan_to_train, prepared.image_size)

    with pytest.raises(StageError) as caught:
        broken.specialist("other")

    message = str(caught.value)
    assert "at least 2 classes merged into 'other', each with a training image" in message
    assert "'cyan': {'train': 0," in message and f"'grey': {{'train': {grey}," in message
    with pytest.raises(StageError, match="at least 2 classes merged into 'green'"):
        prepared.specialist("green")  # a class nothing was merged into


def test_the_specialist_needs_an_other_class():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["other_specialist"] = True
    with pytest.raises(ParamsError, match="prepare.other_class is null"):
        parse_params(raw)
    raw["prepare"]["other_class"] = "other"
    assert parse_params(raw).train.other_specialist


def test_the_train_stage_lists_every_train_key_but_the_specialists_switch():
    """The main model re-runs for every train key but train.other_specialist; the
    specialist, which trains with the same settings, for every one."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = {key.removeprefix("train.") for key in stages["train"]["params"]}
    wanted = set(type(PARAMS.train).model_fields) - {"other_specialist"}
    assert listed == wanted, (
        f"dvc.yaml, stage train, params: add {sorted(f'train.{k}' for k in wanted - listed)}, "
        f"remove {sorted(f'train.{k}' for k in listed - wanted)}"
    )
    assert "train" in stages["train_other"]["params"]


def lock_entries(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def dvc_status(project: Path) -> dict:
    """``dvc status`` through DVC's Python API: the stages that would run, and why."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {name.split(":")[-1]: why for name, why in repo.status().items()}


@pytest.mark.slow
def test_dvc_repro_trains_exports_and_predicts_through_the_cascade(tmp_path):
    source = tmp_path / "photos"
    write_images(source, {**dict.fromkeys(LARGE, 24), **dict.fromkeys(SMALL, 12)})
    params = {
        **SHRUNK,
        "fetch": {"source": str(source)},
        "prepare": {"image_size": [16, 16], "min_images_per_class": 15, "other_class": "other",
                    "val_fraction": 0.2, "test_fraction": 0.25},
        "train": {"epochs": 12, "early_stopping_patience": 0, "learning_rate": 0.003,
                  "other_specialist": True},
        "evaluate": {"explain": 0, "errors": 0},
    }  # fmt: skip
    project = make_project(tmp_path / "project", params)

    run(["dvc", "repro"], project)

    assert (project / "models/other/model.onnx").stat().st_size > 0
    assert sorted(p.name for p in (project / "models/other-keras").iterdir()) == ["model.keras"]
    info = json.loads((project / "models/other.json").read_text())
    assert info["enabled"] and info["classes"] == sorted(SMALL)
    figures = json.loads((project / "metrics/eval.json").read_text())["other_specialist"]
    assert figures["cascade_accuracy"] >= 0.8 and figures["accuracy"] >= 0.8, figures
    assert "Specialist for `other`" in (project / "models/MODEL_CARD.md").read_text()
    assert dvc_status(project) == {}  # a no-op `dvc repro` would run nothing

    test_rows = Prepared.open(project / "data/prepared").rows("test")
    small = test_rows[test_rows["label"] == "other"].iloc[0]
    image = str(project / "data/raw" / small["path"])  # manifest paths: relative to data/raw
    text = run(["python", "-m", "tasks.predict", image], project).stdout
    assert f"other › {small['source_label']} (" in text
    answer = json.loads(run(["python", "-m", "tasks.predict", "--json", image], project).stdout)
    prediction = answer["predictions"][0]
    assert prediction["top_label"] == "other" and prediction["label"] == small["source_label"]
    assert prediction["specialist"]["label"] == small["source_label"]
    assert answer["specialist"]["refines"] == "other"

    # Only a specialist param changes: DVC says only train_other changed, and the main
    # model's stages keep their lock entries (fetch, prepare, backbone, train did not run).
    before = lock_entries(project)
    set_params(project, {"train": {"other_specialist": False}})
    assert set(dvc_status(project)) == {"train_other"}
    repro = run(["dvc", "repro"], project)
    assert "is empty" not in repro.stdout + repro.stderr  # no empty output for DVC to warn of
    after = lock_entries(project)
    for stage in ("fetch", "prepare", "backbone", "train"):
        assert after[stage] == before[stage], stage
    assert after["train_other"] != before["train_other"]
    assert [p.name for p in (project / "models/other").iterdir()] == ["README.md"]
    assert [p.name for p in (project / "models/other-keras").iterdir()] == ["README.md"]
    assert "other_specialist" not in json.loads((project / "metrics/eval.json").read_text())
    assert dvc_status(project) == {}
    answer = json.loads(run(["python", "-m", "tasks.predict", "--json", image], project).stdout)
    assert answer["specialist"] is None and answer["predictions"][0]["specialist"] is None


@pytest.mark.slow
def test_with_a_pretrained_backbone_the_specialist_reuses_the_train_stages_features(
    tmp_path, monkeypatch
):
    import tasks.features
    from tasks.features import cache_key, extract_features
    from tasks.safety import load_model_safely
    from tasks.training import TrainPaths, train
    from tests.test_feature_cache import make_backbone

    full = prepared_with(tmp_path, {"red": 20, "green": 20, "cyan": 10, "grey": 10})
    subset = full.specialist("other")
    path, info = make_backbone(tmp_path, seed=1)  # simple_cnn flagged pretrained: frozen
    extracted: list[int] = []  # images per extraction call

    def spy(backbone, prepared, split, *args, **kwargs):
        extracted.append(prepared.count(split))
        return extract_features(backbone, prepared, split, *args, **kwargs)

    monkeypatch.setattr(tasks.features, "extract_features", spy)
    params = with_changes(PARAMS.train, epochs=2, early_stopping_patience=0, pooling="avg")

    def fit(data: Prepared, name: str, features: Path, whole: Prepared | None = None):
        paths = TrainPaths(tmp_path / name / "m.keras", tmp_path / name / "backup", features)
        return train(params, load_model_safely(path, compile=False), info, data, paths, path, whole)

    fit(full, "main", tmp_path / "features")
    assert extracted == [full.count("train"), full.count("val")]
    result = fit(subset, "other", tmp_path / "features", full)
    assert extracted == [full.count("train"), full.count("val")]  # sliced, not extracted again
    assert result.used_feature_cache and result.model.output_shape == (None, 2)

    # The slices are the subset's own features, row for row.
    key = cache_key(path, full, "avg", params.feature_engine)
    cached = tasks.features.subset_features(tmp_path / "features", key, None, full, subset, "avg")
    backbone = load_model_safely(path, compile=False)
    for split in ("train", "val"):
        direct = extract_features(backbone, subset, split, "avg", 16)
        np.testing.assert_allclose(cached[split], direct, atol=1e-4)
    del extracted[2:]  # the direct extractions above

    # Without the train stage's cache, only the subset's images are extracted, and not stored.
    alone = tasks.features.subset_features(tmp_path / "none", key, backbone, full, subset, "avg")
    assert extracted[2:] == [subset.count("train"), subset.count("val")]
    assert not (tmp_path / "none").exists()
    for split in ("train", "val"):
        np.testing.assert_allclose(alone[split], cached[split], atol=1e-4)


def channel_model(classes: list[str], gains: dict[str, tuple[float, float, float]], **metadata):
    """A real ONNX classifier whose logit for a class is its gains · the mean RGB."""
    from tests.test_predict import SIZE, linear_model

    weights = np.zeros((*SIZE, 3, len(classes)), np.float32)
    for index, name in enumerate(classes):
        for channel, gain in enumerate(gains[name]):
            weights[:, :, channel, index] = gain / (SIZE[0] * SIZE[1])
    return linear_model(weights.reshape(-1, len(classes)), classes, metadata=metadata)


def test_tlp_predict_chains_the_specialist_found_next_to_the_model(tmp_path, capsys):
    from tests.test_predict import run_predict, save, solid

    main = {"red": (0.05, 0, 0), "green": (0, 0.05, 0), "other": (0, 0, 0.05)}
    model = save(channel_model(list(main), main), tmp_path / "models/model.onnx")
    fine = {"navy": (0, 0, 0.05), "sky": (0, 0.1, 0)}
    specialist = channel_model(list(fine), fine, specialist_of="other")
    save(specialist, tmp_path / "models/other/model.onnx")
    navy = solid(tmp_path / "navy.png", (10, 10, 250))
    sky = solid(tmp_path / "sky.png", (10, 200, 250))
    red = solid(tmp_path / "red.png", (250, 10, 10))

    code, out, err = run_predict(["--model", model, navy, sky, red], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{navy}: other › navy (") and " × " in lines[0]
    assert lines[1].startswith(f"{sky}: other › sky (")
    assert lines[2].startswith(f"{red}: red (")

    code, out, err = run_predict(["--model", model, "--jsonl", navy, red], capsys)
    first, second = (json.loads(line) for line in out.splitlines())
    assert (first["label"], first["top_label"], first["specialist"]["label"]) == (
        "navy",
        "other",
        "navy",
    )
    assert [r["label"] for r in first["specialist"]["top_k"]] == ["navy", "sky"]
    assert second["label"] == "red" and second["specialist"] is None

    code, out, err = run_predict(["--model", model, "--json", "--specialist", "none", navy], capsys)
    document = json.loads(out)
    assert document["specialist"] is None and document["predictions"][0]["label"] == "other"

    # A specialist of a class the model does not have is refused, naming both.
    save(channel_model(list(fine), fine, specialist_of="dog"), tmp_path / "models/other/model.onnx")
    code, out, err = run_predict(["--model", model, navy], capsys)
    assert code == 1 and "'dog'" in err and "--specialist none" in err
    # The export_other stage's folder while the specialist is off: the model alone.
    (tmp_path / "models/other/model.onnx").unlink()
    (tmp_path / "models/other/README.md").write_text(export_other.OFF)
    code, out, err = run_predict(["--model", model, navy], capsys)
    assert code == 0 and out.startswith(f"{navy}: other (")
    # Asked for by path, the missing specialist is an error that names the switch.
    missing = str(tmp_path / "models/other/model.onnx")
    code, out, err = run_predict(["--model", model, "--specialist", missing, navy], capsys)
    assert code == 1 and "train.other_specialist" in err


class ByColour:
    """A stand-in specialist for cyan vs grey: cyan's red channel is low, grey's is not."""

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        grey = images[..., 0].mean(axis=(1, 2)) > 80
        return np.stack([~grey, grey], axis=1).astype(np.float32)


def test_the_cascade_is_scored_over_the_classes_before_merging(tmp_path):
    from tasks.evaluate import evaluate_cascade

    counts = {"red": 20, "green": 20, "cyan": 11, "grey": 11}
    prepared = prepared_with(tmp_path, counts, test_fraction=0.4)
    test = prepared.rows("test")
    assert {"cyan", "grey"} <= set(test["source_label"])
    y_pred = test["label_index"].to_numpy().copy()  # the main model right everywhere...
    other = prepared.classes.index("other")
    first_red = int(np.flatnonzero(test["label"] == "red")[0])
    first_other = int(np.flatnonzero(test["label"] == "other")[0])
    y_pred[first_red] = (
        other  # ...but one red image sent to the specialist (wrong whatever it says)
    )
    y_pred[first_other] = prepared.classes.index("green")  # and one rare image called green
    info = {"specialist_of": "other", "classes": ["cyan", "grey"]}
    params = with_changes(PARAMS.evaluate, batch_size=2)

    figures, problems = evaluate_cascade(ByColour(), info, prepared, y_pred, params)

    assert figures["cascade_accuracy"] == pytest.approx((len(test) - 2) / len(test))
    assert figures["routed_images"] == int((test["label"] == "other").sum())  # -1 +1
    assert figures["accuracy"] == 1.0 and figures["test_images"] == (test["label"] == "other").sum()
    assert problems == []
    assert 0 < figures["cascade_macro_f1"] < 1
