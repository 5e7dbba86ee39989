"""Workflows registered at run time (ADMIN_REGISTER): checked, then served like the catalog's.

Part of the broker's sans-IO core, in the broker process; no IO. A definition is the
table a catalog file holds under `[workflows.NAME]`, parsed by the catalog's own parser
(`broker.catalog.parse_catalog`) over the models the broker's catalog declares: one
definition format, one set of checks. A registered workflow joins the broker's catalog
(the one object every part of the core reads), so its requests are unrolled onto the
actors of its models, queue and batch with every other workflow's, and it is listed.

What arrives from the wire is trusted no further than any header: the definition must be
plain TOML-like data (string keys; strings, booleans, bounded ints, finite floats, lists
and tables, nested a few levels), small, over declared models only (registering model
files is an operator's catalog change, not a run-time one), with ranges no wider than the
standard inputs' where they have a maximum and no int input reaching 0 unless its standard
range does. Every refusal names its field:
`name`, `definition`, `definition.denoiser`, `definition.inputs.steps.max`, ...
"""

from __future__ import annotations

import math
import re

import msgpack

from broker.catalog import INPUT_TYPES, Catalog, CatalogError, WorkflowSpec, parse_catalog
from broker.protocol.structs import INT_BOUND

MAX_REGISTERED = 256  # workflows registered at run time one broker holds
MAX_NAME_LENGTH = 128
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # as `lego workflows import` names them
MAX_DEFINITION_BYTES = 64 * 1024  # encoded; an imported graph's table is under 2 KiB
MAX_DEPTH = 4  # definition > inputs > NAME > choices
MAX_ITEMS = 64  # entries of one list or table
MAX_TEXT = 8192  # characters of one string (a description, a default prompt)


class RegistrationError(ValueError):
    """A registration refused; `field` names what was wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def parse_registration(catalog: Catalog, name: str, definition: dict, registered: int) -> WorkflowSpec | None:
    """The workflow `definition` declares under `name`, checked against `catalog`; None when
    the catalog holds that very workflow already (registering it again changes nothing).
    `registered`: how many the broker registered so far. Raises RegistrationError."""
    _check_name(name)
    if not isinstance(definition, dict):
        raise RegistrationError("definition", "must be a table: a catalog file's [workflows.NAME]")
    _check_plain(definition, "definition", 0)
    if len(msgpack.packb(definition)) > MAX_DEFINITION_BYTES:
        raise RegistrationError("definition", f"over {MAX_DEFINITION_BYTES} bytes encoded")
    _check_shape(definition)
    spec = _parse(catalog, name, definition)
    _check_inputs(spec, _parse(catalog, name, {**definition, "inputs": {}}))
    existing = catalog.workflows.get(name)
    if existing is not None:
        if existing == spec:
            return None
        raise RegistrationError("name", f"{name!r} already names another workflow (a catalog's or a registered one): "
                                        "pick another name")
    if registered >= MAX_REGISTERED:
        raise RegistrationError("name", f"the broker holds {MAX_REGISTERED} registered workflows already")
    return spec


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise RegistrationError("name", "must be a string")
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise RegistrationError("name", f"must be 1..{MAX_NAME_LENGTH} characters, got {len(name)}")
    if not NAME_PATTERN.match(name):
        raise RegistrationError("name", "must be letters, digits, '.', '_' and '-', starting with a letter or digit")


def _check_plain(value, where: str, depth: int) -> None:
    """TOML's data only (no null, bytes, non-string keys), bounded in size and numbers."""
    if isinstance(value, dict):
        if depth >= MAX_DEPTH or len(value) > MAX_ITEMS:
            raise RegistrationError(where, f"a table nested at most {MAX_DEPTH} deep with at most {MAX_ITEMS} keys")
        for key, item in value.items():
            if not isinstance(key, str) or not 1 <= len(key) <= MAX_NAME_LENGTH:
                raise RegistrationError(where, f"keys must be strings of 1..{MAX_NAME_LENGTH} characters")
            _check_plain(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, list):
        if depth >= MAX_DEPTH or len(value) > MAX_ITEMS:
            raise RegistrationError(where, f"a list nested at most {MAX_DEPTH} deep with at most {MAX_ITEMS} entries")
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise RegistrationError(where, f"at most {MAX_TEXT} characters")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not -INT_BOUND <= value <= INT_BOUND:
            raise RegistrationError(where, f"must lie within [-{INT_BOUND}, {INT_BOUND}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise RegistrationError(where, "must be a finite number")
    else:
        raise RegistrationError(where, f"a catalog table holds strings, numbers, booleans, lists and tables, "
                                       f"not {type(value).__name__}")


def _check_shape(definition: dict) -> None:
    """The shapes the catalog parser assumes of an operator's file (where a wrong one would
    fail there without naming its field)."""
    for role in ("text_encoders", "controlnets"):
        names = definition.get(role, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RegistrationError(f"definition.{role}", "must be a list of model names")
    inputs = definition.get("inputs", {})
    if not isinstance(inputs, dict):
        raise RegistrationError("definition.inputs", "must be a table of input tables, e.g. { steps = { max = 50 } }")
    for input_name, override in inputs.items():
        where = f"definition.inputs.{input_name}"
        if not isinstance(override, dict):
            raise RegistrationError(where, "must be a table, e.g. { default = 4 }")
        for bound in ("min", "max"):
            value = override.get(bound)
            if bound in override and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RegistrationError(f"{where}.{bound}", "must be a number")
        low, high = override.get("min"), override.get("max")
        if low is not None and high is not None and low > high:
            raise RegistrationError(f"{where}.min", f"{low} is above max {high}")
        if "choices" in override and not isinstance(override["choices"], list):
            raise RegistrationError(f"{where}.choices", "must be a list")


def _parse(catalog: Catalog, name: str, definition: dict) -> WorkflowSpec:
    """The catalog parser's reading; its errors renamed from `workflows.NAME.x` to `definition.x`."""
    try:
        return parse_catalog({"workflows": {name: definition}}, catalog).workflows[name]
    except CatalogError as exc:
        field = "definition" + exc.field.removeprefix(f"workflows.{name}")
        raise RegistrationError(field, str(exc).split(": ", 2)[-1]) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a value of a shape the parser assumed
        raise RegistrationError("definition", f"not a workflow table ({type(exc).__name__}: {exc})") from None


def _check_inputs(spec: WorkflowSpec, standard: WorkflowSpec) -> None:
    """What the catalog parser takes on trust from an operator's file: overridden ranges and
    choices of the input's own type, and no maximum above the standard input's (a request of
    10^9 steps would unroll 10^9 nodes)."""
    for name, spec_input in spec.inputs.items():
        where = f"definition.inputs.{name}"
        base = standard.inputs[name]
        kind = INPUT_TYPES.get(spec_input.type)
        numeric = kind in (int, float)
        for bound in ("min", "max"):
            value = getattr(spec_input, bound)
            if value == getattr(base, bound) and type(value) is type(getattr(base, bound)):
                continue
            if not numeric or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RegistrationError(f"{where}.{bound}", f"must be a number on a {spec_input.type} input")
            if kind is int and not isinstance(value, int):
                raise RegistrationError(f"{where}.{bound}", "must be a whole number on an int input")
            # Sizes may go below the standard minimum (an imported graph's model takes smaller
            # images), but no int input to 0 (a request of 0 steps or width 0 has no DAG).
            floor = 0 if kind is float or (base.min is not None and base.min < 1) else 1
            if value < floor:
                raise RegistrationError(f"{where}.{bound}", f"must be >= {floor}, got {value}")
            if base.max is not None and value > base.max:
                raise RegistrationError(f"{where}.{bound}", f"must be <= {base.max} (the standard input's), got {value}")
        if spec_input.min is not None and spec_input.max is not None and spec_input.min > spec_input.max:
            raise RegistrationError(f"{where}.min", f"{spec_input.min} is above max {spec_input.max}")
        if spec_input.choices != base.choices:
            if kind is None or kind is bool:
                raise RegistrationError(f"{where}.choices", f"a {spec_input.type} input takes no choices")
            for i, choice in enumerate(spec_input.choices or ()):
                if not isinstance(choice, kind) or isinstance(choice, bool):
                    raise RegistrationError(f"{where}.choices[{i}]", f"must be {spec_input.type}")
            if base.choices is not None and not set(spec_input.choices or ()) <= set(base.choices):
                raise RegistrationError(f"{where}.choices", f"must be some of {list(base.choices)}")
        if base.required and not spec_input.required and spec_input.default is None:
            raise RegistrationError(f"{where}.required", "an input the workflow needs is optional only with a default")
        if not isinstance(spec_input.description, str):
            raise RegistrationError(f"{where}.description", "must be a string")
