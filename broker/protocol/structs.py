"""Typed wire structs: slotted dataclasses that convert to and from msgpack maps.

A struct declares its fields with plain annotations. `to_wire()` gives a map of
msgpack-native values; `from_wire()` checks each declared field's type (naming the
field on error), converts nested structs, and ignores unknown keys so that new
optional fields never break an older peer.

Both conversions run for every task on the hot path, so `@struct` generates them as
straight-line code per class (the way `dataclasses` generates `__init__`) instead of
looping over field descriptions at run time, with its constants in closure cells, and
fills the decoded object's slots directly rather than through `__init__` (every field was
checked already). Type checks compare exact types: what msgpack decodes is always a
plain int/float/str/bool/bytes/list/dict.

Three options serve the task parameters (broker/protocol/tasks.py): `omit_defaults`
leaves a field at its default out of the map (so a map keeps exactly the keys it always
had); a field declared with `by_kind(discriminator, types)` is decoded as the struct
that an earlier field's value picks; a class's `check(where)` method, when it has one,
runs after decoding for what an annotation cannot say (list entries, related fields).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from broker.protocol.errors import ErrorCode, ProtocolError

_ACCEPTED: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    str: (str,),
    bool: (bool,),
    bytes: (bytes,),
    list: (list, tuple),
    dict: (dict,),
}


# Every number a peer sends is bounded at decode: an int field lies in [-2^53, 2^53]
# unless it declares its own range (`bounded`), a float is finite. Sums and products of
# such numbers (a cluster's counters, a backlog in seconds) stay far inside msgpack's
# 64-bit range, so nothing a peer says can make an encode raise later.
INT_BOUND = 2**53


def bounded(low: int, high: int, **field_kwargs) -> Any:
    """An int field whose values must lie in [low, high] (its default and factory as
    `dataclasses.field` takes them)."""
    return dataclasses.field(metadata={"bounds": (low, high)}, **field_kwargs)


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    accepted: tuple[type, ...] | None  # None: any type
    nested: Any  # a Struct class, or None
    is_list: bool
    optional: bool
    required: bool
    default: Any
    factory: bool  # `default` is a default_factory to call
    union_by: str | None = None  # a by_kind field: the name of the field whose value picks its struct
    bounds: tuple | None = None  # an int field's [low, high]; a float field: (None, None), finite


def by_kind(discriminator: str, types: dict[Any, type]) -> Any:
    """A field whose struct is `types[value of the field named discriminator]`, which must
    come before it; an unknown value is refused naming the discriminator."""
    return dataclasses.field(metadata={"union_by": discriminator, "types": types})


def _describe(f: dataclasses.Field, hint: Any) -> _Field:
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(hint)
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory
    nested, is_list = None, False
    if "union_by" in f.metadata:
        return _Field(f.name, (dict,), f.metadata["types"], False, optional, required, default, False,
                      f.metadata["union_by"])
    if isinstance(hint, type) and issubclass(hint, Struct):
        nested, accepted = hint, (dict,)
    elif origin in (list, tuple):
        args = typing.get_args(hint)
        if args and isinstance(args[0], type) and issubclass(args[0], Struct):
            nested, is_list = args[0], True
        accepted = (list, tuple)
    elif origin is dict:
        accepted = (dict,)
    else:
        accepted = _ACCEPTED.get(hint)
    factory = f.default_factory is not dataclasses.MISSING
    bounds = f.metadata.get("bounds", (-INT_BOUND, INT_BOUND)) if hint is int else (None, None) if hint is float else None
    return _Field(f.name, accepted, nested, is_list, optional, required, default, factory, None, bounds)


def _bad(cls_name: str, field: str, value: Any, where: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_HEADER, f"{cls_name}.{field} has type {type(value).__name__}", where + field)


def _out_of_range(cls_name: str, field: str, value: Any, bounds: tuple, where: str) -> ProtocolError:
    allowed = "a finite number" if bounds[0] is None else f"within [{bounds[0]}, {bounds[1]}]"
    return ProtocolError(ErrorCode.BAD_HEADER, f"{cls_name}.{field} must be {allowed}", where + field)


def _missing(cls_name: str, field: str, where: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_HEADER, f"{cls_name} lacks a required field", where + field)


def _not_a_map(cls_name: str, where: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_HEADER, f"{cls_name} must be a map", where.rstrip(".") or None)


def _unknown(cls_name: str, field: str, value: Any, where: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_HEADER, f"{cls_name}.{field} {value!r} is not one this peer knows", where + field)


def _type_check(i: int, accepted: tuple[type, ...]) -> str:
    # One accepted type (nearly every field) is an identity test; a float field also takes an int.
    if len(accepted) == 1:
        return f"v.__class__ is not _t{i}"
    return f"v.__class__ not in _t{i}"


def _omitted_test(attr: str, i: int, default: Any) -> str:
    # The common defaults get identity or truth tests; anything else compares by value.
    if default is None:
        return f"{attr} is not None"
    if isinstance(default, (list, tuple, dict)) and not default:
        return attr  # any empty sequence or map is left out
    return f"{attr} != _e{i}"


def _generate(cls: type, fields: list[_Field], omit_defaults: bool) -> None:
    ns: dict[str, Any] = {"_bad": _bad, "_missing": _missing, "_range": _out_of_range, "_finite": math.isfinite, "_not_a_map": _not_a_map, "_unknown": _unknown,
                          "_M": object(), "_name": cls.__name__, "_cls": cls, "_new": object.__new__}
    to_items, to_lines, from_lines = [], [], []
    index = {f.name: i for i, f in enumerate(fields)}
    for i, f in enumerate(fields):
        attr = f"self.{f.name}"
        if f.nested is None:
            value = attr
        elif f.is_list:
            value = f"(None if {attr} is None else [v.to_wire() for v in {attr}])"
        else:
            value = f"(None if {attr} is None else {attr}.to_wire())"
        if omit_defaults and not f.required:
            ns[f"_e{i}"] = default = f.default() if f.factory else f.default
            to_lines.append(f"if {_omitted_test(attr, i, default)}: d[{f.name!r}] = {value}")
        elif omit_defaults:  # key by key, so that the map keeps the fields' order
            to_lines.append(f"d[{f.name!r}] = {value}")
        else:
            to_items.append(f"{f.name!r}: {value}")

        accepted = f.accepted
        ns[f"_t{i}"] = accepted[0] if accepted is not None and len(accepted) == 1 else accepted
        ns[f"_n{i}"], ns[f"_d{i}"] = f.nested, f.default
        lines = [f"v = get({f.name!r}, _M)", "if v is _M:"]
        if f.required:
            lines.append(f"    raise _missing(_name, {f.name!r}, where)")
        elif f.factory:
            lines.append(f"    v = _d{i}()")
        else:
            lines.append(f"    v = _d{i}")
        check = []
        if accepted is not None:
            check.append(f"if {_type_check(i, accepted)}: raise _bad(_name, {f.name!r}, v, where)")
        if f.bounds is not None:
            ns[f"_b{i}"] = f.bounds
            test = "not _finite(v)" if f.bounds[0] is None else f"not {f.bounds[0]} <= v <= {f.bounds[1]}"
            check.append(f"if {test}: raise _range(_name, {f.name!r}, v, _b{i}, where)")
        if f.union_by is not None:
            by = index[f.union_by]  # decoded before this field: the dataclass order puts it first
            check.append(f"c = _n{i}.get(a{by})")
            check.append(f"if c is None: raise _unknown(_name, {f.union_by!r}, a{by}, where)")
            check.append(f"v = c.from_wire(v, where + {f.name + '.'!r})")
        elif f.nested is not None and f.is_list:
            check.append(f"v = [_n{i}.from_wire(x, f'{{where}}{f.name}[{{j}}].') for j, x in enumerate(v)]")
        elif f.nested is not None:
            check.append(f"v = _n{i}.from_wire(v, where + {f.name + '.'!r})")
        if check:
            guard = "elif v is None: pass" if f.optional else ""
            lines.append("else:" if not guard else "elif v is None:\n    pass\nelse:")
            lines += [f"    {c}" for c in check]
        lines.append(f"a{i} = v")
        from_lines += lines
    # Every field was checked above, so the object is built without calling the
    # dataclass __init__ again: a fresh instance and one slot store per field.
    build = ["obj = _new(cls)"] + [f"obj.{f.name} = a{i}" for i, f in enumerate(fields)]
    if hasattr(cls, "check"):
        build.append("obj.check(where)")
    build.append("return obj")
    to_wire = "def to_wire(self):\n    d = {" + ", ".join(to_items) + "}\n"
    to_wire += "".join(f"    {line}\n" for line in to_lines) + "    return d\n"
    from_wire = ("def from_wire(cls, data, where=''):\n"
                 "    if data.__class__ is not dict:\n        raise _not_a_map(_name, where)\n"
                 "    get = data.get\n"
                 + "".join(f"    {line}\n" for block in from_lines + build for line in block.split("\n")))
    # The helpers and constants are a closure's cells rather than module globals: the
    # generated functions read them as fast as locals.
    names = ", ".join(ns)
    source = (f"def _make({names}):\n"
              + "".join(f"    {line}\n" for line in (to_wire + from_wire).split("\n"))
              + "    return to_wire, from_wire\n")
    scope: dict[str, Any] = {}
    exec(compile(source, f"<wire struct {cls.__name__}>", "exec"), scope)
    cls.to_wire, from_wire_function = scope["_make"](**ns)
    cls.from_wire = classmethod(from_wire_function)


class Struct:
    """Base of every typed wire struct (subclasses are slotted dataclasses via @struct)."""

    __slots__ = ()

    def to_wire(self) -> dict[str, Any]:  # replaced per class by @struct
        return {}

    @classmethod
    def from_wire(cls, data: Any, where: str = ""):  # replaced per class by @struct
        return cls()


def struct(cls=None, *, omit_defaults: bool = False):
    """Make `cls` a slotted dataclass and generate its wire conversion.

    `omit_defaults`: a field equal to its default is left out of `to_wire()`'s map (and
    comes back as that default from `from_wire()`)."""

    def make(cls):
        cls = dataclasses.dataclass(slots=True)(cls)
        if hasattr(cls, "__post_init__"):  # from_wire builds objects without __init__ (see _generate)
            raise TypeError(f"{cls.__name__}: a wire struct validates in check(where), not __post_init__")
        hints = typing.get_type_hints(cls)
        fields = [_describe(f, hints[f.name]) for f in dataclasses.fields(cls)]
        _generate(cls, fields, omit_defaults)
        return cls

    return make if cls is None else make(cls)
