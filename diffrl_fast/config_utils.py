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


def _leaves(data: dict, cls, prefix: str = "") -> list[str]:
    """Dotted keys of the values (not sections) that the nested dict ``data`` sets in config ``cls``."""
    out, hints = [], _hints(cls)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is not None and _is_config(tp) and isinstance(value, dict):
            out += _leaves(value, tp, f"{prefix}{key}.")
        else:
            out.append(prefix + str(key))
    return out


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return loaded or {}


def _section(data: dict, name: str, path) -> dict:
    value = data.pop(name, None) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"config file {path}: {name} must be a mapping")
    return value


def resolve_config(cls, path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()):
    """(config, sources): ``cls`` built in layers, and {dotted key: the layer that set it} for every key a layer set.

    Layers, each over the one before (sources named as ``--print-config`` shows them):

    1. the dataclass defaults ("default");
    2. ``cls.layered_defaults(data) -> {dotted key: value}`` where ``cls`` has it (``Config``: the chosen
       algorithm's reference values, "reference of ALGO");
    3. the YAML file at ``path`` (safe_load; "preset FILE"); with an ``algo`` field in ``cls`` the file may hold
       ``model_facts: {...}`` (a partial config of what the model needs whatever the algorithm, e.g. FLUX.1-dev's
       distilled guidance; "preset FILE model_facts") and ``by_algo: {NAME: {...}}`` (the partial config of the
       chosen algorithm, over the file's other keys; "preset FILE by_algo.NAME");
    4. ``key=value`` overrides ("command line").
    """
    data: dict = {}
    facts: dict = {}
    by_algo: dict = {}
    has_algo = "algo" in {f.name for f in dataclasses.fields(cls)}
    if path is not None:
        data = _read_yaml(path)
        if has_algo:
            facts = _section(data, "model_facts", path)
            by_algo = _section(data, "by_algo", path)
            if not all(isinstance(v, dict) for v in by_algo.values()):
                raise ConfigError(f"config file {path}: by_algo must map algorithm names to partial configs")
            both = sorted(set(_leaves(data, cls)) & set(_leaves(facts, cls)))
            if both:
                raise ConfigError(f"config file {path} sets {both} both at its top level and under model_facts: keep one")
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
    algo = cli.get("algo", facts.get("algo", data.get("algo", getattr(cls, "algo", None))))
    known = getattr(cls, "algorithm_names", None)
    if by_algo and known is not None:
        unknown = sorted(set(by_algo) - set(known()))
        if unknown:
            raise ConfigError(f"config file {path}: by_algo names unknown algorithms {unknown}; known: {sorted(known())}")
    chosen = by_algo.get(algo, {})
    layers = [(data, f"preset {path}"), (facts, f"preset {path} model_facts"), (chosen, f"preset {path} by_algo.{algo}"),
              (cli, "command line")]
    merged: dict = {}
    sources: dict[str, str] = {}
    for layer, label in layers:
        merged = _deep_merge(merged, layer)
        sources.update({k: label for k in _leaves(layer, cls)})
    layered = getattr(cls, "layered_defaults", None)
    if layered is not None:
        for key, value in layered(merged).items():
            if not _has_dotted(merged, key):
                _set_dotted(merged, key, value, cls)
                sources[key] = "default (from model.path and algo)" if key == "name" else f"reference of {algo}"
    cfg = from_dict(cls, merged)
    object.__setattr__(cfg, "_sources", sources)
    return cfg, sources


def load_config(cls, path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()):
    """Config ``cls`` from its defaults, the YAML file at ``path`` and ``key=value`` overrides (the layers of
    ``resolve_config``, which also says where each value came from)."""
    return resolve_config(cls, path, overrides)[0]


def config_sources(cfg) -> dict[str, str]:
    """{dotted key: layer} of a config built by ``resolve_config`` / ``load_config`` ({} for one built otherwise)."""
    return dict(getattr(cfg, "_sources", {}))


def _get_dotted(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def provenance_lines(cfg) -> list[str]:
    """``key: value  # source`` for every value a layer set or that differs from the default, in field order: what
    ``diffrl-fast train --print-config`` prints and the header of a run's config.yaml."""
    sources = config_sources(cfg)
    default = type(cfg)()
    lines = []
    for key in _leaves(to_dict(cfg), type(cfg)):
        value = _get_dotted(cfg, key)
        if key not in sources and value == _get_dotted(default, key):
            continue
        shown = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]
        lines.append(f"{shown}  # {sources.get(key, 'set in code')}")
    return lines


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
