"""The raw edge of every user-facing YAML: reading it (aliases refused), ``--set`` overrides, and
the one error type, ``SpecError``, whose lines name each bad field and value (values cut short).
The pydantic models that validate what is read are in ``visionray.specs`` and ``visionray.serve.config``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """The base of every spec and metadata model: unknown keys refused, frozen, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)


class SpecError(ValueError):
    """A spec that cannot be used: ``errors`` holds one readable line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, in order."""
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            errors.append(f"--set {item!r}: expected KEY=VALUE with a dotted key such as optim.lr=0.05")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            errors.append(f"--set {key}: value {text!r} is not valid YAML ({str(exc).splitlines()[0]})")
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append(f"--set {key}: {part!r} is a value ({child!r}), not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if errors:
        raise SpecError("overrides", errors)
    return raw


SHOWN_CHARS = 200  # longest value quoted in an error message


def shown(value: Any) -> str:
    """``repr(value)``, cut to ``SHOWN_CHARS`` with the length it had."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read spec: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), [f"not UTF-8 text (byte {exc.start}): a spec is a YAML file"]) from None
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: an alias is not expanded here
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                raise SpecError(str(path), [f"line {mark.line + 1}: YAML alias *{event.anchor[:40]} refused; a spec "
                                            "writes each value out (aliases can expand a few bytes into gigabytes)"])
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {' '.join(str(exc).split())[:500]}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(str(path), [f"top level must be a mapping of sections, got {type(raw).__name__}"])
    return raw
