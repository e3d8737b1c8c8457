"""Reading a config: the file (DeepSpeed's JSON as DeepSpeed reads it, or YAML) and dotted ``key=value``
overrides, into the raw dict :func:`jzero.config.validate` checks. Every failure is one :class:`ConfigError` line
naming the file (line and column where the parser knows them) or the override."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from jzero.errors import ConfigError


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[Any, Any]]) -> dict:
    """``object_pairs_hook`` refusing a key given twice in one mapping (DeepSpeed refuses it too; last-wins would
    train with whichever value came second, silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _duplicate_error(exc: _DuplicateKey, source: str) -> ConfigError:
    return ConfigError(f"{source}: key '{exc.args[0]}' is given twice in one section; keep one (DeepSpeed refuses "
                       "duplicate keys too)")


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``1.0e3`` / ``.5E-2`` as floats, as JSON and Python do (PyYAML's
    YAML 1.1 rules read them as strings, so ``lr: 1e-3`` would fail as "not a number"). Configs, overrides and
    sweep files all load through it."""


def _yaml_mapping(loader: YamlLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    return _no_duplicates(loader.construct_pairs(node, deep=True))


YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _yaml_mapping)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text`` with :class:`YamlLoader`; a syntax error is one :class:`ConfigError` line naming
    ``source``, the line and column, and what is wrong there."""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except _DuplicateKey as exc:
        raise _duplicate_error(exc, source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ConfigError(f"{source} is not valid YAML{where}: {what}"
                          f"{f' ({context})' if context else ''}") from None


def read_config_file(path: str | Path) -> dict:
    """Read a config file into a dict: YAML by extension .yaml/.yml, else DeepSpeed's JSON as DeepSpeed reads it
    (``hjson``: comments, trailing commas and a UTF-8 byte-order mark are accepted). A key given twice in one
    mapping is an error in both, as in DeepSpeed."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass the JSON or YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing --config path or omit it for the default")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {exc.start}); pass a JSON or YAML "
                          "config") from None
    source = f"config file '{path}'"
    data = load_yaml(text, source) if path.suffix in (".yaml", ".yml") else _load_json(text, source)
    if not data:
        raise ConfigError(f"config file '{path}' holds no keys; write the config into it, or omit --config for the "
                          "embedded default")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _load_json(text: str, source: str) -> Any:
    import hjson

    try:
        return hjson.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise _duplicate_error(exc, source) from None
    except hjson.HjsonDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def _parse_value(text: str) -> Any:
    for cast in (int, float):  # YAML 1.1 reads "1e-2" as a string
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.load(text, Loader=YamlLoader)
    except _DuplicateKey as exc:
        raise _duplicate_error(exc, f"override value {text!r}") from None
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars: 3, 1e-3, true, null, [1,2])."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. zero_optimization.stage=3)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override '{item}': '{p}' is a value, not a section")
            node = node[p]
        node[parts[-1]] = _parse_value(value)
    return data
