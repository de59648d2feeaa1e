"""Policies: the YAML files under ``policies/`` turned into typed config objects.

Configuration flows one way: YAML (and the environment, for where the folder is) →
dataclasses → code. ``load_config`` is the only place that reads a policy file; a key
the dataclass does not declare is an error naming the file and the key, so a typo in a
policy never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

POLICIES_ENV = "TUNESHIELD_POLICIES_DIR"
DEFAULT_POLICIES_DIR = Path(__file__).resolve().parent.parent / "policies"

ConfigT = TypeVar("ConfigT")


class PolicyError(ValueError):
    """A policy file is missing, unreadable, or holds a key or value that does not fit."""


def policies_dir() -> Path:
    """The policies folder: ``$TUNESHIELD_POLICIES_DIR`` or the project's ``policies/``."""
    return Path(os.environ.get(POLICIES_ENV) or DEFAULT_POLICIES_DIR)


def read_policy(name: str, directory: Path | None = None) -> dict[str, Any]:
    """The mapping in ``policies/<name>.yaml``."""
    path = (directory or policies_dir()) / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"policy file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise PolicyError(f"policy file {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"policy file {path} must hold a mapping at the top level")
    return data


def build_config(cls: type[ConfigT], data: dict[str, Any], where: str) -> ConfigT:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``PolicyError``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
    hints = _field_types(cls)
    for name, value in data.items():
        hint = hints.get(name, Any)
        if not _fits(value, hint):
            raise PolicyError(
                f"{where}: {name} must be {_type_name(hint)}, got {type(value).__name__} {value!r}"
            )
    try:
        return cls(**data)
    except (TypeError, ValueError) as error:
        raise PolicyError(f"{where}: {error}") from None


def _field_types(cls: type) -> dict[str, Any]:
    """The dataclass's field types; none (nothing checked) where they cannot be resolved."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's type. A type this check does not read (a class
    of the project's own, a protocol) is left to the dataclass's own checks."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    # YAML's true/false are no numbers here, though Python's bool is an int.
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, str | Path)
    if origin in (list, tuple):
        # YAML has lists only, code overrides often pass tuples: either fits either.
        return isinstance(value, list | tuple)
    if isinstance(origin, type):
        return isinstance(value, origin)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint | dict)
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "").replace("pathlib.", "")


def load_config(
    cls: type[ConfigT], name: str, section: str | None = None, directory: Path | None = None
) -> ConfigT:
    """Load ``policies/<name>.yaml`` (or one top-level ``section`` of it) into ``cls``."""
    data = read_policy(name, directory)
    where = f"policies/{name}.yaml"
    if section is not None:
        if section not in data:
            raise PolicyError(f"{where}: missing section '{section}'")
        data = data[section]
        where = f"{where} [{section}]"
        if not isinstance(data, dict):
            raise PolicyError(f"{where}: must be a mapping")
    return build_config(cls, data, where)
