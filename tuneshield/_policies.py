"""Policies: the YAML files under ``policies/`` turned into typed config objects.

Configuration flows one way: YAML (and the environment, for where the folder is) →
dataclasses → code. ``load_config`` is the only place that reads a policy file; a key
the dataclass does not declare is an error naming the file and the key, so a typo in a
policy never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

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
    try:
        return cls(**data)
    except (TypeError, ValueError) as error:
        raise PolicyError(f"{where}: {error}") from None


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
