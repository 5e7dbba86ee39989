"""One typed config object per process: defaults < TOML file < environment < CLI.

Each process defines a dataclass of its settings (names carry units: `_s`, `_bytes`)
and builds it once with `load_config`; the result is passed explicitly, never read
from globals. Environment variables are `LEGO_<FIELD>` in upper case.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"config {field}: {message}")
        self.field = field


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list or hint is list:
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        return list(value)
    target = hint if isinstance(hint, type) else type(None)
    if target is bool and isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"expected a boolean, got {value!r}")
    if target in (int, float, str):
        try:
            return target(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected {target.__name__}, got {value!r}") from None
    return value


def load_config(cls: type[T], section: str, file: str | Path | None = None, cli: dict | None = None,
                environ: dict | None = None) -> T:
    """Build `cls` from its defaults, then `[section]` of `file`, then LEGO_* env, then CLI."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if file:
        doc = tomllib.loads(Path(file).read_text())
        for key, value in doc.get(section, {}).items():
            if key not in fields:
                raise ConfigError(f"{section}.{key}", f"unknown setting (known: {sorted(fields)})")
            values[key] = value
    env = os.environ if environ is None else environ
    for name in fields:
        raw = env.get(f"LEGO_{name.upper()}")
        if raw is not None:
            values[name] = raw
    for key, value in (cli or {}).items():
        if value is not None and key in fields:
            values[key] = value
    return cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def parse_options(pairs: list[str] | None) -> dict:
    """`["time_scale=0.1", "profile=Flux1Dev"]` -> {"time_scale": 0.1, "profile": "Flux1Dev"}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError("option", f"expected KEY=VALUE, got {pair!r}")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def setting(default: Any = dataclasses.MISSING, *, help: str = "", flag: bool | str = True,
            choices: tuple | None = None, live: bool = False, default_factory: Any = dataclasses.MISSING):
    """A config field that declares a setting once: its default, what it means (`help`),
    its command-line flag (True: `--name-with-dashes`; a string: that flag; False: file
    and environment only), the values it takes (`choices`) and whether an operator may
    change it while the process runs (`live`). `add_flags` and the live tables read it."""
    metadata = {"help": help, "flag": flag, "choices": choices, "live": live}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_name(f: dataclasses.Field) -> str | None:
    """The command-line flag of a field declared with `setting` (None: it has none)."""
    flag = f.metadata.get("flag", False)
    if flag is True:
        return "--" + f.name.replace("_", "-")
    return flag or None


def add_flags(parser, cls: type) -> None:
    """One flag per field of `cls` that declares one (`setting`), in field order; `dest`
    is the field's name, so `load_config` takes the parsed values as they are. Booleans
    take on/off (coerced by `load_config`); lists repeat the flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = flag_name(f)
        if flag is None:
            continue
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"] or None}
        if hint is bool:
            kwargs["choices"] = ("on", "off")
        elif typing.get_origin(hint) is list:
            kwargs["action"] = "append"
        elif hint in (int, float):
            kwargs["type"] = hint
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def add_common_arguments(parser) -> None:
    """Flags every process takes: config file, logging."""
    parser.add_argument("--config", help="TOML config file (defaults < file < LEGO_* env < flags)")
    parser.add_argument("--log-format", choices=("console", "json"))
    parser.add_argument("--log-level")
