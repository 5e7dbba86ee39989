"""Typed wire structs: slotted dataclasses that convert to and from msgpack maps.

A struct declares its fields with plain annotations. `to_wire()` gives a map of
msgpack-native values; `from_wire()` checks each declared field's type (naming the
field on error), converts nested structs, and ignores unknown keys so that new
optional fields never break an older peer.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

from broker.protocol.errors import ErrorCode, ProtocolError

_PLAIN_TYPES: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
    bytes: (bytes,),
    list: (list, tuple),
    dict: (dict,),
    Any: (object,),
}

# A field's conversion: (name, accepted python types, nested struct or None,
# is a list of nested structs, allows None, is required)
_FieldSpec = tuple[str, tuple[type, ...], Any, bool, bool, bool]


def _spec_for(name: str, hint: Any, required: bool) -> _FieldSpec:
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, Struct):
        return (name, (dict,), hint, False, optional, required)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        if isinstance(item, type) and issubclass(item, Struct):
            return (name, (list, tuple), item, True, optional, required)
        return (name, (list, tuple), None, False, optional, required)
    if origin is dict:
        return (name, (dict,), None, False, optional, required)
    return (name, _PLAIN_TYPES.get(hint, (object,)), None, False, optional, required)


class Struct:
    """Base of every typed wire struct (subclasses are slotted dataclasses)."""

    __slots__ = ()
    _wire_fields: ClassVar[tuple[_FieldSpec, ...]] = ()

    @classmethod
    def _compile(cls) -> None:
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            required = (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            )
            specs.append(_spec_for(f.name, hints[f.name], required))
        cls._wire_fields = tuple(specs)

    def to_wire(self) -> dict[str, Any]:
        out = {}
        for name, _types, nested, is_list, _opt, _req in self._wire_fields:
            value = getattr(self, name)
            if nested is not None and value is not None:
                value = [v.to_wire() for v in value] if is_list else value.to_wire()
            out[name] = value
        return out

    @classmethod
    def from_wire(cls, data: Any, where: str = ""):
        if not isinstance(data, dict):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{cls.__name__} must be a map", where or None)
        kwargs = {}
        for name, accepted, nested, is_list, optional, required in cls._wire_fields:
            if name not in data:
                if required:
                    raise ProtocolError(
                        ErrorCode.BAD_HEADER, f"{cls.__name__} lacks a required field", where + name
                    )
                continue
            value = data[name]
            if value is None and optional:
                kwargs[name] = None
                continue
            if not isinstance(value, accepted) or (accepted == (int,) and isinstance(value, bool)):
                raise ProtocolError(
                    ErrorCode.BAD_HEADER,
                    f"{cls.__name__}.{name} has type {type(value).__name__}",
                    where + name,
                )
            if nested is not None:
                if is_list:
                    value = [nested.from_wire(v, f"{where}{name}[{i}].") for i, v in enumerate(value)]
                else:
                    value = nested.from_wire(value, f"{where}{name}.")
            kwargs[name] = value
        return cls(**kwargs)


def struct(cls):
    """Make `cls` a slotted dataclass and precompute its wire conversion."""
    cls = dataclasses.dataclass(slots=True)(cls)
    cls._compile()
    return cls
