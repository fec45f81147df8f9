"""JSONL task files with clear errors.

A line holds ``prompt`` and ``demonstration`` (strings) and optionally ``negative`` (a wrong
demonstration, for the contrastive teacher) and ``answer`` (what task accuracy compares the
greedy completion with; the demonstration when absent). Other keys are ignored, but a line
that lacks a field names them (a misspelt key is the likely cause)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from ..errors import DataError
from .base import Example


def load_jsonl(path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    examples = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            examples.append(_example(record, where))
    if not examples:
        raise DataError(f"data file {str(path)!r} holds no example")
    return examples


FIELDS = ("prompt", "demonstration", "negative", "answer")
REQUIRED = ("prompt", "demonstration")


def _unknown_keys(record: dict) -> str:
    """What a missing-field error adds when the line holds keys that are no field: each
    named, with the field it is closest to (``'demonstraton' (did you mean ...?)``)."""
    unknown = [k for k in record if k not in FIELDS]
    if not unknown:
        return ""
    named = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), FIELDS, n=1)
        named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"; unknown keys on the line: {', '.join(named)}; the fields are {', '.join(FIELDS)}"


def _example(record: dict, where: str) -> Example:
    values = {}
    for name in FIELDS:
        value = record.get(name)
        required = name in REQUIRED
        if value is None:
            if required:
                raise DataError(f"{where}: missing field {name!r}{_unknown_keys(record)}")
            continue
        if not isinstance(value, str) or (required and not value.strip()):
            raise DataError(
                f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}"
            )
        values[name] = value
    return Example(**values)
