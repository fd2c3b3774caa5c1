"""Typed, documented configs: dataclasses whose every field carries a one-line help text.

    cfg = load_config(Config, "configs/digits.yaml", ["train.learning_rate=1e-4", "algo=ddpo_sf"])

YAML files and ``key=value`` overrides (dotted paths into nested configs; values parsed as YAML) are
merged into the dataclass defaults. Unknown keys and wrong types raise ``ConfigError`` naming the key
and, for unknown keys, the closest valid one; nothing is loaded before the whole config is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, impossible combination."""


def option(default, help: str, **kwargs):
    """A dataclass field with a help text (``default`` may be a list or dict: it is copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """``value`` as type ``tp`` (bool/int/float/str/list[...]/dict/Optional/Literal), or ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(value, str) and tp in (int, float):
        try:  # YAML 1.1 reads "1e-4" as a string
            value = float(value) if tp is float else int(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads no/yes/off/on as booleans; our string options say "no"
            return "yes" if value else "no"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _unknown(key: str, valid: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys here: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build config ``cls`` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise _unknown(full, names)
        tp = hints[key]
        if _is_config(tp):
            kwargs[key] = from_dict(tp, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _is_str_field(tp) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _set_dotted(data: dict, key: str, value, cls, raw: Optional[str] = None) -> None:
    """Set ``key`` (dotted) in ``data``; string fields get the ``raw`` text, not its YAML reading."""
    parts = key.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            raise _unknown(".".join(parts[: i + 1]), names)
        tp = _hints(node_cls)[part]
        if i == len(parts) - 1:
            if _is_config(tp):
                raise ConfigError(f"{key} is a section, not a value: set one of its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
            # (a field that may also hold a list or mapping takes the YAML reading of "[...]" / "{...}")
            structured = isinstance(value, (list, dict)) and typing.get_origin(tp) in (typing.Union, types.UnionType)
            node[part] = (raw if raw is not None and _is_str_field(tp) and not structured
                          and raw.strip().lower() not in ("null", "~") else value)
        else:
            if not _is_config(tp):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section; cannot set {key}")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} must be a mapping")
            node_cls = tp


def _has_dotted(data: dict, key: str) -> bool:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls, path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()):
    """Defaults of ``cls``, updated by the YAML file at ``path`` (safe_load) and then ``key=value`` overrides.

    A YAML file may hold ``by_algo: {NAME: {...}}`` (for configs with an ``algo`` field): the partial config
    of the chosen algorithm is applied over the file's other keys and under the overrides.
    If ``cls`` has a static ``layered_defaults(data) -> {dotted key: value}``, those values sit between the
    dataclass defaults and the file: they fill every key the file and the overrides leave unset.
    """
    data: dict = {}
    by_algo: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        data = loaded or {}
        if "by_algo" in data and "algo" in {f.name for f in dataclasses.fields(cls)}:
            by_algo = data.pop("by_algo") or {}
            if not isinstance(by_algo, dict) or not all(isinstance(v, dict) for v in by_algo.values()):
                raise ConfigError(f"config file {path}: by_algo must map algorithm names to partial configs")
    cli: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.learning_rate=1e-4)")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(cli, key.strip(), value, cls, raw=raw)
    if by_algo:
        algo = cli.get("algo", data.get("algo", getattr(cls, "algo", None)))
        known = getattr(cls, "algorithm_names", None)
        if known is not None:
            unknown = sorted(set(by_algo) - set(known()))
            if unknown:
                raise ConfigError(f"config file {path}: by_algo names unknown algorithms {unknown}; known: {sorted(known())}")
        data = _deep_merge(data, by_algo.get(algo, {}))
    data = _deep_merge(data, cli)
    layered = getattr(cls, "layered_defaults", None)
    if layered is not None:
        for key, value in layered(data).items():
            if not _has_dotted(data, key):
                _set_dotted(data, key, value, cls)
    return from_dict(cls, data)


def describe(cls, prefix: str = "", instance=None) -> list[str]:
    """One line per field: dotted key, type, default and help text (for ``--help``)."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(instance, f.name) if instance is not None else None
        if _is_config(tp):
            lines.append(f"{prefix}{f.name}:  {f.metadata.get('help', '')}")
            lines += describe(tp, prefix + f.name + ".", value)
        else:
            if instance is not None:
                shown = value
            else:  # list and dict fields have a default_factory, not a default
                shown = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {shown!r}): {f.metadata.get('help', '')}")
    return lines
