"""Presets: partial ``params.yaml`` files in ``presets/``, written into ``params.yaml`` in place.

``tlp preset NAME`` changes only the keys the preset sets, where they are, keeping every
comment and the key order (:func:`flows.workspace.render_overrides`); the values are
validated first, so nothing is written if one is wrong. ``presets/default.yaml`` is the
shipped ``params.yaml`` itself, byte for byte (a test keeps them equal): ``tlp preset
default`` puts it back exactly, undoing every preset and edit. A preset's first line, a
comment, says what it is for (``tlp preset --list``). Imports neither Prefect nor DVC.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.workspace import (
    PARAMS_FILE,
    dotted_keys,
    render_overrides,
    validate_overrides,
    write_text,
)
from tasks.params import ParamsError, parse_yaml, read_yaml

PRESETS_DIR = "presets"
DEFAULT = "default"  # presets/default.yaml: the shipped params.yaml, byte for byte
DEFAULT_SUMMARY = "the shipped params.yaml, byte for byte: undoes every preset and edit"


@dataclass(frozen=True)
class PresetChange:
    """What applying a preset does to ``params.yaml``.

    Attributes:
        name: the preset.
        before: ``params.yaml``'s text now.
        after: its text with the preset applied.
        values: the preset's keys (dotted) and their validated values.
        left_over: keys the preset does not set whose values differ from the shipped
            defaults (an earlier preset or edit), as ``key -> (now, default)``.
    """

    name: str
    before: str
    after: str
    values: dict[str, Any]
    left_over: dict[str, tuple[Any, Any]]

    def diff(self) -> str:
        """A unified diff of ``params.yaml`` (empty if nothing changes)."""
        lines = difflib.unified_diff(
            self.before.splitlines(keepends=True),
            self.after.splitlines(keepends=True),
            f"a/{PARAMS_FILE}",
            f"b/{PARAMS_FILE}",
        )
        return "".join(lines)


def presets(root: Path) -> dict[str, str]:
    """The presets in ``root/presets``, by name, with the one line that says what each is for."""
    found = {}
    for path in sorted((root / PRESETS_DIR).glob("*.yaml")):
        first = path.read_text(encoding="utf-8").partition("\n")[0]
        summary = first.lstrip("#").strip() if first.startswith("#") else ""
        found[path.stem] = DEFAULT_SUMMARY if path.stem == DEFAULT else summary
    return found


def plan_preset(root: Path, name: str) -> PresetChange:
    """What ``tlp preset NAME`` would write; nothing is written.

    Args:
        root: the project root.
        name: a preset in ``presets/``, or the path of a YAML file ending in .yaml/.yml.

    Raises:
        ParamsError: no such preset (the message lists them), or a value is invalid.
    """
    is_file = name.endswith((".yaml", ".yml"))
    path = Path(name) if is_file else root / PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown preset {name!r}; available: {', '.join(presets(root))}")
    before = (root / PARAMS_FILE).read_text(encoding="utf-8")
    if path.stem == DEFAULT and not is_file:
        after = path.read_text(encoding="utf-8")
        values = dotted_keys(parse_yaml(after, str(path)) or {})
        validate_overrides(root, values)
    else:
        values = validate_overrides(root, dotted_keys(read_yaml(path)))
        after = render_overrides(before, values)
    return PresetChange(name, before, after, values, _left_over(root, after, values))


def apply_preset(root: Path, name: str) -> PresetChange:
    """Write a preset into ``params.yaml`` (see :func:`plan_preset`) and return what changed."""
    change = plan_preset(root, name)
    if change.after != change.before:
        write_text(root / PARAMS_FILE, change.after)
    return change


def _left_over(root: Path, after: str, values: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys the preset leaves alone whose values differ from the shipped defaults."""
    default = root / PRESETS_DIR / f"{DEFAULT}.yaml"
    if not default.is_file():
        return {}
    shipped = dotted_keys(read_yaml(default))
    now = dotted_keys(parse_yaml(after, PARAMS_FILE) or {})
    return {
        key: (value, shipped.get(key))
        for key, value in now.items()
        if key not in values and value != shipped.get(key)
    }
