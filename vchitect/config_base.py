"""The config machinery shared by every config tree: :func:`setting`, :class:`ConfigError`, YAML
loading with ``include:``, dotted overrides, validation, printing and the reference table.

It imports no section and nothing heavy (yaml and the standard library), so the section
configs (``vchitect/*/config.py``, ``data_pipeline/config.py``) import it without a cycle, and
``vchitect config show`` / ``vchitect-curate config show`` start in a fraction of a second.
:mod:`vchitect.config` re-exports all of it and adds the run's tree (:class:`vchitect.config.Config`).

A config file is a YAML mapping whose top-level keys are the sections of the schema. A file may
start with ``include: [other.yaml, …]``; included files are merged first (paths relative to the
including file), then the file itself, then the dotted command-line overrides such as
``model.num_layers=4``.

Every field is declared with :func:`setting`, which records its help text and its allowed values
(``choices``, ``min``, ``max``). Unknown keys, wrong types and out-of-range values all raise one
:class:`ConfigError` that names the key, the value given and what is allowed. A section whose keys
moved lists them in a ``RENAMED`` class variable (old key → new key(s)); setting an old key is an
error naming each new one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased so the user can fix it: key, value, what is allowed."""


def setting(default: Any = dataclasses.MISSING, *, help: str, choices=None, min=None, max=None,
            default_factory: Any = dataclasses.MISSING):
    """A dataclass field carrying its documentation and its validation rules."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Loading, merging, overriding
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(str(p) for p in seen)}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _deep_merge(merged, data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.num_layers=4"`` → (["model", "num_layers"], 4). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. model.num_layers=4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key; write it as section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, schema):
    """Read ``path`` (optional), apply ``overrides`` and build a validated ``schema`` instance."""
    data = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(schema, data)


def from_dict(schema, data: dict, prefix: str = ""):
    """Build dataclass ``schema`` from a plain mapping, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    renamed = getattr(schema, "RENAMED", {})  # ClassVar {old key: where its setting lives now}
    moved = [f"{prefix}{key} → {renamed[key]}" for key in data if key in renamed and key not in fields]
    if moved:
        raise ConfigError(f"renamed config key(s): {'; '.join(moved)}; set the new one(s) instead")
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint} Allowed keys under "
                              f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        kwargs[name] = _convert(f"{prefix}{name}", data[name], hints[name], f.metadata)
    try:
        obj = schema(**kwargs)
    except TypeError as exc:  # a required field without default
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(key: str, value: Any, tp, meta) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, value, arg, meta)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}={value!r} is not a valid {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a {_type_name(tp)}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_convert(f"{key}[{i}]", v, arg, {}) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}={value!r} is out of range; it must be >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value!r} is out of range; it must be <= {hi}")
    return value


SECRET_KEYS = {"key", "secret", "password", "token", "api_key"}
CREDENTIAL_SECTIONS = {"s3", "storage"}  # data.s3 of a run, storage (and storage.options) of a curation


def to_dict(cfg, redact: bool = True) -> dict:
    """The config as plain data. Credentials (``key``, ``secret``, … anywhere under a section named
    ``s3`` or ``storage`` or ending in ``credentials``) are replaced by ``<redacted>`` unless
    ``redact=False``: this is what is printed, logged, and written into run folders and checkpoints."""
    data = dataclasses.asdict(cfg)
    return _redact(data) if redact else data


def _redact(node, in_credentials: bool = False):
    if isinstance(node, dict):
        return {k: ("<redacted>" if in_credentials and k in SECRET_KEYS and v is not None
                    else _redact(v, in_credentials or k in CREDENTIAL_SECTIONS or str(k).endswith("credentials")))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v, in_credentials) for v in node]
    return node


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(schema, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf field of dataclass ``schema``."""
    rows = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        allowed = f.metadata.get("choices")
        help_text = f.metadata.get("help", "")
        if allowed:
            help_text += f" ({' | '.join(map(str, allowed))})"
        rows.append((prefix + f.name, _type_name(tp), repr(default), help_text))
    return rows


def reference_table(schema) -> str:
    """Every key of ``schema`` as a Markdown table (key, type, default, meaning): what
    ``vchitect config describe`` and ``vchitect-curate config describe`` print, and the reference
    tables of docs/configs.md and docs/curation.md."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_text in describe(schema):
        lines.append(f"| `{key}` | {tp} | `{default}` | {help_text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
