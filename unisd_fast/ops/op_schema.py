"""An operator's arguments declared once, as a dataclass: the ``torch.library`` schema, the
packing into positional values and the unpacking all come from its fields.

A field is a tensor, an optional tensor, a list of tensors, a (optional) float, an int, a
str, a bool, or a frozen dataclass of such fields (an op schema takes no Python objects, so
it travels as one argument per field, flattened in order).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import torch

_SCALARS = {float: "float", int: "int", str: "str", bool: "bool", torch.Tensor: "Tensor"}


def _schema_type(hint) -> str | None:
    """The schema type of a field's type hint; None for a nested dataclass."""
    if hint in _SCALARS:
        return _SCALARS[hint]
    if typing.get_origin(hint) is list and typing.get_args(hint) == (torch.Tensor,):
        return "Tensor[]"
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if inner in _SCALARS:
            return _SCALARS[inner] + "?"
    if dataclasses.is_dataclass(hint):
        return None
    raise TypeError(f"no operator schema type for {hint!r}")


class OpArguments:
    """The flat argument layout of the dataclass ``cls`` (nested dataclasses flattened)."""

    def __init__(self, cls):
        self.cls = cls
        self.names: list[str] = []
        self.nested: dict[str, tuple] = {}
        flat = []
        for name, hint in typing.get_type_hints(cls).items():
            kind = _schema_type(hint)
            if kind is None:
                inner = typing.get_type_hints(hint)
                self.nested[name] = (hint, tuple(inner))
                flat += [(n, _schema_type(h)) for n, h in inner.items()]
            else:
                flat.append((name, kind))
            self.names.append(name)
        self.flat = flat
        self.schema = ", ".join(f"{kind} {name}" for name, kind in flat)

    def position(self, name: str) -> int:
        """The flat position of the (not nested) field ``name``."""
        return [n for n, _ in self.flat].index(name)

    def pack(self, values: dict) -> list:
        """The flat argument values from a dict of every field's value (a nested dataclass
        as its instance)."""
        if set(values) != set(self.names):
            raise TypeError(f"{self.cls.__name__} takes {sorted(self.names)}, got "
                            f"{sorted(values)}")
        out = []
        for name in self.names:
            if name in self.nested:
                out += [getattr(values[name], n) for n in self.nested[name][1]]
            else:
                out.append(values[name])
        return out

    def unpack(self, args, build_nested) -> typing.Any:
        """An instance of ``cls`` from the flat values; ``build_nested(cls, fields)`` makes
        each nested dataclass from its field values."""
        it = iter(args)
        values = {}
        for name in self.names:
            if name in self.nested:
                kind, inner = self.nested[name]
                values[name] = build_nested(kind, {n: next(it) for n in inner})
            else:
                values[name] = next(it)
        return self.cls(**values)
