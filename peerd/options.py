"""How an option is declared and read: the machinery under peerd/config.py's one description.

An option is a field of a frozen dataclass declared with `option(...)`: its default, its help,
its flag, how to read it from text, what values are valid, and whether every member must agree
on it. Everything else is derived from that field here, for any such class: a value from a flag
or an environment variable (text), from a TOML file (typed), and back to the flags that give it
(`peerd cluster` starts its daemons with them). Torch-free: operator commands import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A bad option value; the message names the option and what is allowed."""


def require(condition: bool, option: str, value: object, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{option}={value!r} is invalid: must be {allowed}")


@dataclass(frozen=True)
class Rule:
    """What one value must satisfy, and how the error says it."""

    valid: Callable[[Any], bool]
    allowed: str


def at_least(low: float) -> Rule:
    return Rule(lambda value: value >= low, f">= {low:g}")


def positive() -> Rule:
    return Rule(lambda value: value > 0 and math.isfinite(value), "a positive number")


def non_negative() -> Rule:
    return Rule(lambda value: value >= 0 and math.isfinite(value), "a number >= 0")


def one_of(choices: tuple[str, ...]) -> Rule:
    return Rule(lambda value: value in choices, f"one of {', '.join(choices)}")


@dataclass(frozen=True)
class OptionSpec:
    """Everything about an option but its name, type and default (the field's)."""

    help: str
    flag: str | None = None  # when not `--` + the name with dashes
    agreed: bool = False  # every member must have the same value: part of the fingerprint
    planner: str | None = None  # read by this method's planner only (a keyword of its class)
    parse: Callable[[str], Any] | None = None  # text -> value, when the type does not say how
    rule: Rule | None = None  # checked on every value but None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    off_help: str | None = None  # a flag that turns off an option on by default: its help
    per_peer: bool = False  # sim and cluster: one value, or one per peer (cycled)


def option(default: object, help: str, flag: str | None = None, **spec: Any) -> Any:
    """A declared option (OptionSpec's fields for the rest)."""
    choices = spec.get("choices")
    if choices is not None and "rule" not in spec:
        spec["rule"] = one_of(choices)
    return field(default=default, metadata={"option": OptionSpec(help, flag, **spec)})


def option_fields(config: object) -> list[Field]:
    """The declared options of a config class (or instance), in declaration order."""
    return [f for f in fields(config) if "option" in f.metadata]  # type: ignore[arg-type]


def spec_of(option_field: Field) -> OptionSpec:
    return option_field.metadata["option"]


def option_flag(option_field: Field) -> str:
    return spec_of(option_field).flag or "--" + option_field.name.replace("_", "-")


def option_default(option_field: Field) -> object:
    return None if option_field.default is MISSING else option_field.default


def field_type(config_class: type, name: str) -> object:
    return get_type_hints(config_class)[name]


def required_type(kind: object) -> object:
    """The type without `| None`."""
    arguments = [a for a in get_args(kind) if a is not type(None)]
    return arguments[0] if get_origin(kind) is UnionType and len(arguments) == 1 else kind


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def describe(config_class: type, option_field: Field) -> str:
    """What a value of this option looks like, for errors and the reference table."""
    spec = spec_of(option_field)
    if spec.choices is not None:
        return "one of " + ", ".join(spec.choices)
    if spec.parse is not None and spec.metavar is not None:
        return spec.metavar
    return {
        str: "text", int: "an integer", float: "a number", bool: "true or false",
        tuple[str, ...]: "a list of HOST:PORT",
    }[required_type(field_type(config_class, option_field.name))]


def check_value(option_field: Field, value: object) -> None:
    """The option's rule, on a value that is set."""
    rule = spec_of(option_field).rule
    if rule is not None and value is not None:
        require(rule.valid(value), option_field.name, value, rule.allowed)


def check_options(config: object) -> None:
    """Every declared option's rule."""
    for option_field in option_fields(config):
        check_value(option_field, getattr(config, option_field.name))


def _named(config_class: type, name: str) -> Field:
    return next(f for f in option_fields(config_class) if f.name == name)


def parse_text(config_class: type, name: str, text: str) -> object:
    """An option's value from text (a flag or an environment variable)."""
    option_field = _named(config_class, name)
    kind = field_type(config_class, name)
    required = required_type(kind)
    if text == "" and required is not kind:
        return None
    spec = spec_of(option_field)
    if spec.parse is not None:
        return spec.parse(text)  # its error says what is allowed
    try:
        if required is bool:
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if required == tuple[str, ...]:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return required(text)  # type: ignore[operator]
    except ValueError:
        raise ConfigError(f"{name}={text!r} is invalid: must be "
                          f"{describe(config_class, option_field)}") from None


def parse_toml(config_class: type, name: str, value: object, source: str) -> object:
    """An option's value from TOML, which already carries a type."""
    option_field = _named(config_class, name)
    required = required_type(field_type(config_class, name))
    if spec_of(option_field).parse is not None:
        return spec_of(option_field).parse(value if isinstance(value, str) else repr(value))
    valid = (
        (required is bool and isinstance(value, bool))
        or (required is int and isinstance(value, int) and not isinstance(value, bool))
        or (required is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (required is str and isinstance(value, str))
        or (required == tuple[str, ...] and isinstance(value, list)
            and all(isinstance(v, str) for v in value))
    )
    if not valid:
        raise ConfigError(f"{source}: {name} = {value!r} is invalid: must be "
                          f"{describe(config_class, option_field)}")
    if required == tuple[str, ...]:
        return tuple(value)  # type: ignore[arg-type]
    return float(value) if required is float else value  # type: ignore[arg-type]


def read_variables(config_class: type, environ: Mapping[str, str], prefix: str
                   ) -> dict[str, object]:
    """The options set by `prefix` + NAME variables; an unknown such variable is an error."""
    names = {prefix + f.name.upper(): f.name for f in option_fields(config_class)}
    values = {}
    for variable, text in sorted(environ.items()):
        if not variable.startswith(prefix):
            continue
        if variable not in names:
            raise ConfigError(f"unknown environment variable {variable}; "
                              f"allowed: {', '.join(names)}")
        values[names[variable]] = parse_text(config_class, names[variable], text)
    return values


def read_table(config_class: type, table: Mapping[str, object], source: str
               ) -> dict[str, object]:
    """The options of a TOML table; an unknown key is an error."""
    names = [f.name for f in option_fields(config_class)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(names)}")
    return {name: parse_toml(config_class, name, value, source) for name, value in table.items()}


def value_text(value: object, kind: object = None) -> str:
    """A value as its flag takes it: a shard as I/N, other lists comma-separated."""
    if kind == tuple[int, int]:
        return "/".join(map(str, value))  # type: ignore[call-overload]
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def command_line(config: object) -> list[str]:
    """The flags that give every option of `config` that is not at its default."""
    args: list[str] = []
    for option_field in option_fields(config):
        value, flag = getattr(config, option_field.name), option_flag(option_field)
        if value == option_default(option_field):
            continue
        if value is None:
            raise ConfigError(f"{option_field.name} cannot be unset by a flag")
        kind = required_type(field_type(type(config), option_field.name))
        if kind is bool:
            args.append(flag)  # on when off by default; the off flag when on by default
        elif kind == tuple[str, ...]:
            for item in value:
                args += [flag, item]
        else:
            args += [flag, value_text(value, kind)]
    return args


def shown_default(default: object) -> str:
    """A default as help and docs show it."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "unset"
    if default == ():
        return "none"
    return value_text(default)
