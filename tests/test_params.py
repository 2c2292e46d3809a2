"""The params schema: the shipped file parses, and every bad value is a ParamsError naming its key.

The property-based (hypothesis) fuzzing of the schema lives in ``test_reliability.py``.
"""

from __future__ import annotations

import math

import pytest
import yaml

from tasks.params import (
    Params,
    ParamsError,
    apply_overrides,
    load_params,
    parse_params,
    read_yaml,
    with_changes,
)
from tests.conftest import ROOT, run


def shipped() -> dict:
    """The repository's params.yaml as a plain dict."""
    return read_yaml(ROOT / "params.yaml")


def test_shipped_params_parse_into_every_section():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    raw = shipped()
    assert set(raw) == set(Params.model_fields)  # one section per stage, nothing extra
    assert params.prepare.image_size == tuple(raw["prepare"]["image_size"])
    assert params.train.learning_rate == raw["train"]["learning_rate"]
    assert params.backbone.arch == raw["backbone"]["arch"]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": 2.5}}, "train.epochs"),
        ({"train": {"epochs": True}}, "train.epochs: Value error, must be a number"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate"),
        (
            {"train": {"learning_rate": float("inf")}},
            "train.learning_rate: Input should be a finite",
        ),
        ({"train": {"learning_rate": float("nan")}}, "train.learning_rate"),
        ({"train": {"pooling": "mean"}}, "train.pooling"),
        ({"train": {"monitor": "val_f1"}}, "train.monitor"),
        ({"train": {"seed": -1}}, "train.seed"),
        ({"train": {"seed": 2**40}}, "train.seed"),
        ({"train": {"fine_tune": {"enabled": "maybe"}}}, "train.fine_tune.enabled"),
        ({"prepare": {"image_size": [0, 224]}}, "prepare.image_size"),
        ({"prepare": {"image_size": "big"}}, "prepare.image_size"),
        ({"prepare": {"image_size": [32, True]}}, "prepare.image_size"),
        ({"prepare": {"max_bad_fraction": 1.5}}, "prepare.max_bad_fraction"),
        ({"prepare": {"val_fraction": 0.5, "test_fraction": 0.5}}, "prepare.val_fraction"),
        ({"backbone": {"simple_cnn": {"padding": "full"}}}, "backbone.simple_cnn.padding"),
        ({"backbone": {"simple_cnn": {"filters": []}}}, "backbone.simple_cnn.filters"),
        ({"backbone": {"weights": None}}, "backbone.weights"),
        ({"fetch": {"sha256": "abc"}}, "fetch.sha256"),
        ({"export": {"opset": 5}}, "export.opset"),
        ({"train": "fast"}, "train: Input should be a valid dictionary"),
    ],
)
def test_wrong_value_is_a_params_error_naming_the_key(changes, expected):
    raw = shipped()
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert expected in str(caught.value)
    assert "Fix params.yaml" in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"epoch": 3}}, "unknown key train.epoch (allowed: augment, batch_size, "),
        ({"trian": {}}, "unknown key trian (allowed: backbone, evaluate, export, fetch, "),
        ({"train": {"fine_tune": {"lr": 1}}}, "unknown key train.fine_tune.lr (allowed: enabled"),
        ({"backbone": {"simple_cnn": {"filter": [8]}}}, "unknown key backbone.simple_cnn.filter"),
    ],
)
def test_unknown_key_lists_the_allowed_ones(raw, expected):
    with pytest.raises(ParamsError, match="unknown key") as caught:
        parse_params(raw)
    assert expected in str(caught.value)


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(ParamsError) as caught:
        parse_params({"train": {"epochs": -1, "dropout": 2}, "prepare": {"shard_size": 0}})
    message = str(caught.value)
    for key in ("train.epochs", "train.dropout", "prepare.shard_size"):
        assert key in message


def test_params_yaml_is_read_with_dvcs_yaml_rules(tmp_path):
    """YAML 1.2, as DVC reads it: what trains is what dvc.lock and `dvc params diff` show."""
    text = (ROOT / "params.yaml").read_text()
    text = text.replace("  epochs: 12\n", "  epochs: 010\n").replace(
        "  learning_rate: 0.003\n", "  learning_rate: 1e-3\n", 1
    )
    assert "1e-3" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load_params(path)
    assert params.train.epochs == 10  # PyYAML (YAML 1.1) reads 010 as octal 8
    assert math.isclose(params.train.learning_rate, 1e-3)  # and 1e-3 as a string
    from dvc.utils.serialize import load_yaml  # DVC's own reader agrees

    assert load_yaml(path)["train"]["epochs"] == 10


def test_a_missing_key_is_named_with_where_the_default_is():
    raw = shipped()
    del raw["train"]["epochs"]
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert "missing key train.epochs: every key of the shipped params.yaml" in str(caught.value)
    with pytest.raises(ParamsError, match="missing key fetch: every key"):
        parse_params({k: v for k, v in shipped().items() if k != "fetch"})


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path):
    """A "billion laughs" params.yaml: refused at once, in a few kB of memory."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = (ROOT / "params.yaml").read_text().replace("  epochs: 12", "  epochs: *a9")
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n" + text)
    with pytest.raises(ParamsError, match=r"uses the YAML alias \*a0 \(line 2\)"):
        read_yaml(path)
    path.write_text("x: " + "y" * (2 * 1024 * 1024))
    with pytest.raises(ParamsError, match="is over 1024 KiB"):
        read_yaml(path)


def test_with_changes_merges_nested_sections_and_validates():
    train = load_params(ROOT / "params.yaml").train
    changed = with_changes(train, epochs=3, fine_tune={"enabled": True})
    assert changed.epochs == 3 and changed.fine_tune.enabled
    assert changed.fine_tune.layers == train.fine_tune.layers  # merged, not replaced
    assert train.epochs != 3  # the original is untouched (frozen)
    with pytest.raises(ParamsError, match="epochs"):
        with_changes(train, epochs=0)


def test_overrides_apply_dotted_keys_and_refuse_unknown_stages():
    raw = shipped()
    changed = apply_overrides(raw, {"train.epochs": 2, "backbone.simple_cnn.filters": [4]})
    params = parse_params(changed)
    assert params.train.epochs == 2 and params.backbone.simple_cnn.filters == (4,)
    assert raw == shipped()  # the input is not modified
    with pytest.raises(ParamsError, match="first part must be a stage"):
        apply_overrides(raw, {"training.epochs": 2})
    with pytest.raises(ParamsError, match="train.epochs.x.*epochs is not a section"):
        apply_overrides(raw, {"train.epochs.x": 2})


def test_read_yaml_names_the_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml is not valid YAML"):
        read_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="must hold a mapping of sections, got list"):
        read_yaml(listing)


def test_stage_with_a_wrongly_typed_param_fails_cleanly_and_keeps_its_output(tmp_path):
    """Through the real CLI: exit 1, one error line naming the key, the old output intact."""
    raw = shipped()
    raw["prepare"]["image_size"] = "large"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    (tmp_path / "raw" / "a").mkdir(parents=True)
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "classes.json").write_text('["previous"]\n')

    result = run(
        ["python", "-m", "tasks.prepare", "--params", str(params_file), "--raw",
         str(tmp_path / "raw"), "--out", str(out)],
        tmp_path, check=False, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip

    assert result.returncode == 1
    assert "ERROR: prepare: invalid params: prepare.image_size" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "classes.json").read_text() == '["previous"]\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "prepared", "raw"]
