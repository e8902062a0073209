"""The raw edge of every user-facing YAML: reading it (aliases refused), ``--set`` overrides, and
the one error type, ``SpecError``, whose lines name each bad field and value (values cut short).
The pydantic models that validate what is read are in ``visionray.specs`` and ``visionray.serve.config``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

# One pattern for model names and one for aliases, shared by specs, the registry and serving
# (always ``fullmatch``: ``$`` would accept a trailing newline).
NAME_PATTERN = r"[a-z0-9][a-z0-9_.-]{0,63}"
ALIAS_PATTERN = r"[a-z][a-z0-9_-]{0,31}"
UNION_TAGS: set[str] = set()  # discriminator values of tagged unions (``ops.register_op`` adds each op's)


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


def format_errors(exc: ValidationError) -> list[str]:
    """One line per error: the field path, what is wrong and what is allowed, and the value given."""
    lines = []
    for err in exc.errors():
        # a tagged union adds the tag to the path: augment.0.randaugment.n -> augment.0.n
        loc = ".".join(str(p) for p in err["loc"] if p not in UNION_TAGS)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "union_tag_invalid":
            got = err["input"].get("op") if isinstance(err["input"], dict) else err["input"]
            msg = f"unknown op {got!r}; allowed: {err['ctx']['expected_tags'].replace(chr(39), '')}"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `visionray validate --help` for the reference)"
        line = f"{loc or '(top level)'}: {msg}"
        if err["type"] not in ("missing", "union_tag_invalid") and not err["type"].startswith("value_error"):
            line += f" (got {shown(err['input'])})"
        lines.append(line)
    return lines


def validate_model(model: type[BaseModel], raw: dict[str, Any], source: str):
    """``model`` validated from ``raw``, or ``SpecError`` with one line per problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(source, format_errors(exc)) from None
