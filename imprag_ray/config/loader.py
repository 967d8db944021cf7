"""Load YAML job files into frozen dataclasses, failing early with the dotted key path.

Every runnable job is one YAML file (``jobs/*.yaml``) described by a tree of frozen dataclasses.
This module turns ``mapping -> dataclass`` generically, so config classes stay plain
dataclasses with no loader code in them. It imports only the standard library and PyYAML: no
Ray, no torch, so configs can be loaded and checked anywhere (CLI, head node, notebook).

Supported field types: ``int``, ``float`` (ints accepted), ``str``, ``bool`` (only real
booleans: ``1`` or ``"yes"`` are rejected), ``X | None``, other unions (first member that
fits), ``Literal[...]``, ``list[X]`` / ``tuple[X, ...]`` / ``tuple[X, Y]`` (stored as tuples,
so configs stay immutable), ``dict[str, X]``, ``Any``, and nested dataclasses (also inside lists
and dicts).

Hooks on config classes:

* ``field(metadata={"path": "file" | "dir" | "any"})`` marks a path field. Existence is NOT
  checked while loading (a config is often loaded on a machine that does not hold the data);
  call :func:`check_paths` where the paths must exist.
* An optional ``validate(self)`` method is called after the dataclass is built (children
  first). It checks constraints between fields and reports them relative to its own class::

      def validate(self) -> None:
          if not self.b < self.t:
              raise ConfigError.at("b", f"must be < t ({self.t}), got {self.b}; lower b or raise t")

  The loader prefixes the key with the dataclass's own dotted path (``model.b``). A plain
  ``ValueError`` raised by ``validate`` is reported at the dataclass's path.

YAML note: PyYAML implements YAML 1.1, where ``1e-3`` (no dot) is a *string*. The loader used
here (:func:`parse_yaml`) reads it as the float a user means, in files and in overrides alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_paths",
    "from_dict",
    "load_config",
    "parse_yaml",
    "to_dict",
]

T = TypeVar("T")

PATH_KINDS = ("file", "dir", "any", "out")  # "out": a path that need not exist yet (outputs)


class ConfigError(ValueError):
    """A user-fixable configuration mistake.

    ``str(err)`` reads ``[source: ]key: message``; ``message`` says what is wrong and how to fix it.

    Attributes:
        key: dotted key path (``train.lr``, ``stages[1].lr``); ``""`` for the whole document.
        message: the problem and the fix.
        source: the file the config came from, when known.
    """

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.message = message
        self.source = source
        super().__init__(key, message, source)

    @classmethod
    def at(cls, key: str, message: str) -> ConfigError:
        """Error at ``key`` relative to the dataclass being validated (for ``validate``)."""
        return cls(key, message)

    def prefixed(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` (the parent's dotted path) put in front of the key."""
        return ConfigError(_join(prefix, self.key), self.message, self.source)

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(self.key, self.message, source)

    def __str__(self) -> str:
        if self.source:
            return f"{self.source}: {self.key + ': ' if self.key else ''}{self.message}"
        return f"{self.key or '(top level)'}: {self.message}"


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot (``1e-3``, ``-2E+5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


EXTENDS = "extends"  # job YAML key: start from another job file (read_job)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also parses ``1e-3`` as a float. Raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _got(value: Any) -> str:
    if value is None:
        return "got null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"got {_type_name(type(value))} {text}"


def _fix_for(tp: Any, value: Any) -> str:
    """A short 'how to write it' hint for scalar types."""
    if tp is bool:
        return "write true or false (unquoted)"
    if tp is int:
        return "write a whole number such as 8"
    if tp is float:
        return "write a number such as 0.001 or 1e-3"
    if tp is str:
        return f"quote the value: '{value}'"
    return f"write a value of type {_type_name(tp)}"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build the dataclass ``cls`` (and nested dataclasses) from a plain mapping.

    Args:
        cls: a dataclass type.
        data: mapping of field name -> value, as read from YAML.
        path: dotted path of ``data`` inside the whole config, used in error messages.

    Returns:
        An instance of ``cls``; sequences become tuples. ``validate()`` has run on every level.

    Raises:
        ConfigError: unknown or missing keys, wrong types, failed ``validate``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(
            path, f"expected a section (mapping of keys), {_got(data)}; write it as 'key: value' lines"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}

    for key in data:
        if key not in fields:
            key_text = str(key)
            valid = ", ".join(fields) or "(none)"
            raise ConfigError(
                _join(path, key_text),
                f"unknown key{_suggest(key_text, fields)}; valid keys here: {valid}",
            )

    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                key,
                f"required key is missing; add '{name}: <{_type_name(hints[name])}>'"
                + (f" under '{path}'" if path else " at the top level"),
            )

    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except ConfigError as err:
        raise err.prefixed(path) from None
    except ValueError as err:  # plain ValueError from validate / __post_init__
        raise ConfigError(path, str(err)) from err
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check / convert one value against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if origin is Union or origin is types.UnionType:
        return _convert_union(args, value, key)
    if origin is Literal:
        for choice in args:
            if type(value) is type(choice) and value == choice:
                return value
        shown = ", ".join(repr(c) for c in args)
        hint = _suggest(value, [str(c) for c in args]) if isinstance(value, str) else ""
        raise ConfigError(key, f"expected one of {shown}, {_got(value)}{hint}")
    if origin in (list, tuple):
        return _convert_sequence(origin, args, value, key)
    if origin is dict or origin is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, {_got(value)}; write it as 'name: value' lines")
        key_tp, val_tp = args or (str, Any)
        out = {}
        for k, v in value.items():
            sub = f"{key}.{k}"
            out[_convert(key_tp, k, sub)] = _convert(val_tp, v, sub)
        return out
    if tp in (int, float, str, bool):
        return _convert_scalar(tp, value, key)
    raise TypeError(f"{key}: config field type {tp!r} is not supported by the loader")


def _convert_union(args: tuple[Any, ...], value: Any, key: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(key, "must not be null; set a value or remove the key to use the default")
    members = [a for a in args if a is not type(None)]
    errors = []
    for member in members:
        try:
            return _convert(member, value, key)
        except ConfigError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    allowed = " or ".join(_type_name(m) for m in members)
    raise ConfigError(key, f"expected {allowed}, {_got(value)}; {_fix_for(members[0], value)}")


def _convert_sequence(origin: Any, args: tuple[Any, ...], value: Any, key: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected a list, {_got(value)}; write it as [a, b] or '- a' lines")
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[X, Y]
        if len(value) != len(args):
            raise ConfigError(key, f"expected a list of exactly {len(args)} items, {_got(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    item_tp = args[0] if args else Any
    return tuple(_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))


def _convert_scalar(tp: type, value: Any, key: str) -> Any:
    if value is None:
        raise ConfigError(
            key, f"expected {tp.__name__}, got null; set a value or remove the key to use the default"
        )
    ok = type(value) is tp or (tp is float and type(value) is int)
    if not ok:
        raise ConfigError(key, f"expected {tp.__name__}, {_got(value)}; {_fix_for(tp, value)}")
    return float(value) if tp is float else value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a copy of ``data``.

    Values are parsed as YAML (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``null``). Missing
    sections are created; whether a key exists in the schema is checked later by
    :func:`from_dict`, which rejects unknown keys. List items are addressed by index
    (``stages.0.lr=1e-4``).

    Raises:
        ConfigError: malformed override, or a path that goes through a non-section value.
    """
    out = _deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            raise ConfigError(
                key or item,
                f"malformed override {item!r}; write overrides as key.sub=value, e.g. train.lr=1e-3",
            )
        try:
            value = parse_yaml(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                key,
                f"cannot parse override value {text!r} as YAML ({_yaml_problem(err)}); "
                f"quote it: {key}='\"...\"'",
            ) from None
        _set_path(out, parts, value)
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a PyYAML error: 'at line L, column C: problem'."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        problem = " ".join(filter(None, [err.problem, f"({err.context})" if err.context else None]))
        return f"at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(err)


def _deepcopy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deepcopy(v) for v in value]
    return value


def _set_path(root: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = root
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        index: int | str = part
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:depth])
                raise ConfigError(
                    here,
                    f"'{where}' is a list of {len(node)} items; address an item by its index "
                    f"(0..{len(node) - 1}) or replace the whole list: {where}=[...]",
                )
            index = int(part)
        if depth == len(parts) - 1:
            node[index] = value
            return
        child = node[index] if isinstance(index, int) else node.get(index)
        if child is None and isinstance(index, str):
            child = node[index] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(
                here,
                f"holds the value {child!r}, not a section, so '{'.'.join(parts)}' cannot be set; "
                f"override '{here}' itself",
            )
        node = child


def load_config(cls: type[T], yaml_path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Read a YAML job file, apply ``key=value`` overrides, build and validate ``cls``.

    Path fields are not checked here; call :func:`check_paths` where they must exist.

    Raises:
        ConfigError: missing file, YAML syntax error, top level not a mapping, or any
            :func:`from_dict` / :func:`apply_overrides` error (all tagged with the file name).
    """
    data = read_job(yaml_path)
    source = str(yaml_path)
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as err:
        raise err.with_source(source) from None


def read_job(yaml_path: str | Path) -> dict[str, Any]:
    """A job YAML's mapping. ``extends: OTHER.yaml`` (a path relative to the file) starts from
    that job's mapping and lays this file's keys over it: sections merge key by key, any other
    value (a list too) replaces the inherited one. Errors are tagged with the file that has them.
    """
    return _read_job(yaml_path, ())


def _read_job(yaml_path: str | Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """:func:`read_job` below the files in ``seen`` (the chain that extends this one)."""
    source = str(yaml_path)
    try:
        text = Path(yaml_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", "file not found; check the path", source) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError("", f"invalid YAML {_yaml_problem(err)}; fix the syntax there", source) from None
    if not isinstance(data, dict):
        raise ConfigError(
            "", f"the top level must be a mapping of keys ('key: value' lines), {_got(data)}", source
        )
    if EXTENDS not in data:
        return data
    parent = data.pop(EXTENDS)
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(EXTENDS, f"must be the path of another job YAML, relative to this file, {_got(parent)}",
                          source)
    here = Path(yaml_path).resolve()
    parent_path = here.parent / parent
    if parent_path.resolve() in (*seen, here):
        chain = " -> ".join(str(p) for p in (*seen, here, parent_path.resolve()))
        raise ConfigError(EXTENDS, f"the files extend each other in a cycle ({chain}); remove one 'extends'", source)
    if not parent_path.is_file():
        raise ConfigError(EXTENDS, f"{parent_path} does not exist; give a job YAML's path relative to {here.parent}",
                          source)
    return _merged(_read_job(parent_path, (*seen, here)), data)


def _merged(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def job_data_files(job: str | Path) -> list[Path]:
    """The corpus and every task file a job YAML's ``data`` section names, as written there
    (before validation: for finding what a job will read, e.g. files an older world lacks)."""
    data = read_job(job).get("data") or {}
    return [Path(data["corpus"])] + [Path(t["path"]) for k in ("train", "dev", "eval") for t in data.get(k) or []]


def check_paths(cfg: Any, base_dir: str | Path, path: str = "") -> None:
    """Check that every path field (``metadata={"path": ...}``) of ``cfg`` exists.

    Relative paths are resolved against ``base_dir`` and ``~`` is expanded. ``None`` values
    and URIs (``s3://...``, anything with ``://``) are skipped: they cannot be checked locally.

    Raises:
        ConfigError: naming the dotted key and the resolved path that is missing.
    """
    for f in dataclasses.fields(cfg):
        key = _join(path, f.name)
        value = getattr(cfg, f.name)
        kind = f.metadata.get("path")
        if kind is not None:
            if kind not in PATH_KINDS:
                raise TypeError(f"{key}: metadata path must be one of {PATH_KINDS}, got {kind!r}")
            for sub, item in _leaves(value, key):
                _check_one(item, kind, Path(base_dir), sub)
        for sub, item in _leaves(value, key):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                check_paths(item, base_dir, sub)


def _leaves(value: Any, key: str) -> list[tuple[str, Any]]:
    """(key, item) for a value, or for each element of a tuple / dict value."""
    if isinstance(value, tuple):
        return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return [(f"{key}.{k}", v) for k, v in value.items()]
    return [(key, value)]


def absolute_paths(cfg: Any, base_dir: str | Path) -> Any:
    """A copy of ``cfg`` with every relative path field made absolute against ``base_dir``
    (``~`` expanded; None and URIs kept). Jobs are written with paths relative to where the
    command runs; Ray workers run elsewhere, so the driver resolves them before shipping."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("path") is not None:
            value = _absolute(value, Path(base_dir))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = absolute_paths(value, base_dir)
        elif isinstance(value, tuple) and any(dataclasses.is_dataclass(v) for v in value):
            value = tuple(absolute_paths(v, base_dir) if dataclasses.is_dataclass(v) else v for v in value)
        changes[f.name] = value
    return dataclasses.replace(cfg, **changes)


def _absolute(value: Any, base_dir: Path) -> Any:
    if isinstance(value, tuple):
        return tuple(_absolute(v, base_dir) for v in value)
    if not isinstance(value, str) or "://" in value:
        return value
    return str((base_dir / Path(value).expanduser()).resolve())


def _check_one(value: Any, kind: str, base_dir: Path, key: str) -> None:
    if value is None or kind == "out" or (isinstance(value, str) and "://" in value):
        return
    resolved = (base_dir / Path(value).expanduser()).resolve()
    test = {"file": resolved.is_file, "dir": resolved.is_dir, "any": resolved.exists}[kind]
    if not test():
        what = {"file": "file", "dir": "directory", "any": "path"}[kind]
        raise ConfigError(
            key, f"{what} not found: {resolved}; create it or point {key} at an existing {what}"
        )


def to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data for a config (tuples -> lists), e.g. to save next to a checkpoint.

    ``from_dict(type(cfg), to_dict(cfg)) == cfg`` for every config the loader can build.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg
