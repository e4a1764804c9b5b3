"""YAML with line numbers, and a small toolkit to validate it into typed values.

Files are composed (not constructed) so every key and value keeps the line it came from;
readers then convert node by node and record every problem as one `FILE:LINE: KEY: MESSAGE`
line instead of stopping at the first one.

Typical use::

    errors = ErrorCollector(filename)
    top = read_document(text, errors)
    if top is not None:
        port = top.integer("port", default=4840, ge=1, le=65535)
        top.reject_unknown({"port"})
    errors.raise_if_any()        # ConfigErrors, one line per problem
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

# libyaml composes a 1000-unit site file (15k lines) about ten times faster, with the same marks.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

__all__ = [
    "REQUIRED",
    "ConfigError",
    "ConfigErrors",
    "ErrorCollector",
    "MapReader",
    "Value",
    "did_you_mean",
    "read_document",
    "read_file_text",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default marker: the key must be present and non-null."""


class ConfigError(Exception):
    """One problem in a configuration file; str() is the single line `FILE:LINE: KEY: MESSAGE`."""

    def __init__(self, file: str, line: int | None, key: str | None, message: str):
        self.file, self.line, self.key, self.message = str(file), line, key, message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigErrors(Exception):
    """Every problem found in a file; str() is their lines joined by newlines."""

    def __init__(self, errors: Sequence[ConfigError]):
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class ErrorCollector:
    """Gathers the errors of one file so a single run reports all of them."""

    def __init__(self, filename: str):
        self.filename = str(filename)
        self.errors: list[ConfigError] = []

    def add(self, line: int | None, key: str | None, message: str) -> None:
        """Record one problem at a 1-based line."""
        self.errors.append(ConfigError(self.filename, line, key, message))

    def raise_if_any(self) -> None:
        """Raise ConfigErrors (sorted by line) if anything was recorded."""
        if self.errors:
            raise ConfigErrors(sorted(self.errors, key=lambda e: e.line or 0))


def read_file_text(path: str | Path) -> str:
    """The text of a file, or ConfigError with one line saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConfigError(str(path), None, None, "is a directory, expected a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), None, None, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(str(path), None, None, f"cannot read file: {exc.strerror or exc}") from None


def read_document(text: str, errors: ErrorCollector, what: str = "a mapping") -> MapReader | None:
    """Parse one YAML document whose top level must be a mapping; None (error recorded) if not."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            context_line = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            problem = f"{problem} ({exc.context}{context_line})"
        errors.add(mark.line + 1 if mark else None, "(yaml)", problem)
        return None
    except yaml.reader.ReaderError as exc:
        errors.add(text.count("\n", 0, exc.position) + 1, "(yaml)", f"character #x{exc.character:04x} is not allowed")
        return None
    except yaml.YAMLError as exc:  # anything else PyYAML may raise: still one line
        errors.add(None, "(yaml)", str(exc).replace("\n", " "))
        return None
    if root is None:
        errors.add(1, "(document)", f"the file is empty, expected {what}")
        return None
    return Value(root, "", errors, SafeConstructor()).as_mapping(what)


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null",
            list: "list", dict: "mapping"}.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if isinstance(value, (bool, int, float, str)) else kind


def did_you_mean(word: str, candidates: Iterable[Any]) -> str:
    """' (did you mean 'X'?)' for the closest candidate, or '' if none is close."""
    match = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class _Invalid:
    """Marks a value that could not be read (its error is already recorded)."""


_INVALID = _Invalid()


class Value:
    """One YAML node and its key path; the as_* methods convert it or record why they cannot."""

    def __init__(self, node: yaml.Node, path: str, errors: ErrorCollector, constructor: SafeConstructor,
                 line: int | None = None):
        self.node, self.path, self.errors = node, path, errors
        self._constructor = constructor
        self._line = line

    @property
    def line(self) -> int:
        """1-based line reported for this value: its key's line, else where the value starts."""
        # A block mapping or list starts on the line after its key; the key is where people look.
        return self._line or self.node.start_mark.line + 1

    def error(self, message: str) -> None:
        """Record a problem with this value."""
        self.errors.add(self.line, self.path or "(document)", message)

    def _scalar(self, expected: str) -> Any:
        """The plain Python value of a scalar node, or _INVALID once the problem is recorded."""
        if isinstance(self.node, (yaml.MappingNode, yaml.SequenceNode)):
            found = "a mapping" if isinstance(self.node, yaml.MappingNode) else "a list"
            self.error(f"expected {expected}, got {found}")
            return _INVALID
        try:
            return self._constructor.construct_object(self.node, deep=True)
        except (ConstructorError, ValueError) as exc:
            self.error(f"cannot read value: {getattr(exc, 'problem', None) or exc}")
            return _INVALID

    def _wrong_type(self, expected: str, value: Any) -> None:
        hint = " (quote it)" if expected == "a string" and isinstance(value, (int, float)) else ""
        self.error(f"expected {expected}, got {_describe(value)}{hint}")

    def _in_bounds(self, value: float, gt=None, ge=None, lt=None, le=None) -> bool:
        for bound, op, holds in ((gt, ">", lambda b: value > b), (ge, ">=", lambda b: value >= b),
                                 (lt, "<", lambda b: value < b), (le, "<=", lambda b: value <= b)):
            if bound is not None and not holds(bound):
                self.error(f"must be {op} {bound:g}, got {value:g}")
                return False
        return True

    def as_number(self, *, gt: float | None = None, ge: float | None = None,
                  lt: float | None = None, le: float | None = None) -> float | None:
        """A finite int or float (returned as float) within the given bounds."""
        value = self._scalar("a number")
        if value is _INVALID:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._wrong_type("a number", value)
            return None
        if not math.isfinite(value):
            self.error(f"must be a finite number, got {value}")
            return None
        return float(value) if self._in_bounds(value, gt, ge, lt, le) else None

    def as_int(self, *, ge: int | None = None, le: int | None = None) -> int | None:
        """An integer within the given bounds."""
        value = self._scalar("an integer")
        if value is _INVALID:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong_type("an integer", value)
            return None
        return value if self._in_bounds(value, ge=ge, le=le) else None

    def as_bool(self) -> bool | None:
        """true or false."""
        value = self._scalar("true or false")
        if value is _INVALID:
            return None
        if not isinstance(value, bool):
            self._wrong_type("true or false", value)
            return None
        return value

    def as_str(self, *, pattern: str | None = None) -> str | None:
        """A non-empty string, matching the regular expression `pattern` in full if given."""
        value = self._scalar("a string")
        if value is _INVALID:
            return None
        if not isinstance(value, str):
            self._wrong_type("a string", value)
            return None
        if not value:
            self.error("must not be empty")
            return None
        if pattern is not None and not re.fullmatch(pattern, value):
            self.error(f"must match {pattern}, got {value!r}")
            return None
        return value

    def as_choice(self, choices: Mapping[Any, Any] | Sequence[Any]) -> Any:
        """One of `choices`; for a mapping, the value stored under the chosen key."""
        listed = ", ".join(map(str, choices))
        value = self._scalar(f"one of {listed}")
        if value is _INVALID:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value not in choices:
            hint = did_you_mean(value, choices) if isinstance(value, str) else ""
            self.error(f"must be one of {listed}, got {value!r}{hint}")
            return None
        return choices[value] if isinstance(choices, Mapping) else value

    def as_mapping(self, expected: str = "a mapping") -> MapReader | None:
        """This value as a mapping reader."""
        if isinstance(self.node, yaml.MappingNode):
            return MapReader(self)
        value = self._scalar(expected)
        if value is not _INVALID:
            self._wrong_type(expected, value)
        return None

    def as_list(self) -> list[Value] | None:
        """The items of a list, each with its indexed key path."""
        if isinstance(self.node, yaml.SequenceNode):
            return [Value(item, f"{self.path}[{i}]", self.errors, self._constructor)
                    for i, item in enumerate(self.node.value)]
        value = self._scalar("a list")
        if value is not _INVALID:
            self._wrong_type("a list", value)
        return None


class MapReader:
    """A YAML mapping read key by key; a problem is recorded and its value read as None."""

    def __init__(self, value: Value):
        self._value = value
        self.path, self.errors = value.path, value.errors
        self._constructor = value._constructor
        self._entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self._index_keys(value.node)

    def _index_keys(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # duplicates before merging: `<<` entries may be overridden
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self._key(key_node)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                found = _describe(key) if isinstance(key_node, yaml.ScalarNode) else "a complex key"
                self.errors.add(line, self.path or "(document)", f"keys must be strings, got {found}")
            elif key in seen:
                self.errors.add(line, self._child(key), f"duplicate key (first at line {seen[key]})")
            else:
                seen[key] = line
        try:
            self._constructor.flatten_mapping(node)  # resolve `<<: *anchor` merge keys
        except ConstructorError as exc:
            self._value.error(f"bad merge key: {exc.problem}")
            return
        for key_node, value_node in node.value:  # later entries win, so own keys override merged
            key = self._key(key_node)
            if isinstance(key, str):
                self._entries[key] = (key_node, value_node)

    def _key(self, key_node: yaml.Node) -> Any:
        if not isinstance(key_node, yaml.ScalarNode):
            return None
        try:
            return self._constructor.construct_object(key_node)
        except (ConstructorError, ValueError):
            return None

    def _child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    @property
    def line(self) -> int:
        """1-based line where the mapping starts."""
        return self._value.line

    def keys(self) -> list[str]:
        """The keys present, in file order."""
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def key_path(self, key: str) -> str:
        """The dotted path of `key` in this mapping, e.g. `aisles[0].units[2].name`."""
        return self._child(key)

    def line_of(self, key: str) -> int:
        """Line of `key`, or of the mapping if the key is absent."""
        entry = self._entries.get(key)
        return entry[0].start_mark.line + 1 if entry else self.line

    def error(self, message: str, key: str | None = None) -> None:
        """Record a problem with `key` (or with the whole mapping)."""
        if key is None:
            self._value.error(message)
        else:
            self.errors.add(self.line_of(key), self._child(key), message)

    def get(self, key: str, default: Any = REQUIRED) -> Value | Any:
        """The Value of `key`; if absent or null: `default`, or None and an error if REQUIRED."""
        entry = self._entries.get(key)
        if entry is None or entry[1].tag == "tag:yaml.org,2002:null":
            if default is REQUIRED:
                self.error("required key is missing" if entry is None else "needs a value", key)
                return None
            return default
        return Value(entry[1], self._child(key), self.errors, self._constructor, self.line_of(key))

    def _read(self, key: str, default: Any, convert) -> Any:
        value = self.get(key, default)
        return convert(value) if isinstance(value, Value) else value

    def number(self, key: str, default: Any = REQUIRED, **bounds: float) -> float | None:
        """A number; bounds as keyword gt/ge/lt/le."""
        return self._read(key, default, lambda v: v.as_number(**bounds))

    def integer(self, key: str, default: Any = REQUIRED, **bounds: int) -> int | None:
        """An integer; bounds as keyword ge/le."""
        return self._read(key, default, lambda v: v.as_int(**bounds))

    def boolean(self, key: str, default: Any = REQUIRED) -> bool | None:
        """true or false."""
        return self._read(key, default, Value.as_bool)

    def string(self, key: str, default: Any = REQUIRED, *, pattern: str | None = None) -> str | None:
        """A non-empty string, optionally matching `pattern` in full."""
        return self._read(key, default, lambda v: v.as_str(pattern=pattern))

    def choice(self, key: str, choices: Mapping[Any, Any] | Sequence[Any], default: Any = REQUIRED) -> Any:
        """One of `choices` (a mapping's value for its key)."""
        return self._read(key, default, lambda v: v.as_choice(choices))

    def mapping(self, key: str, *, required: bool = False) -> MapReader | None:
        """A nested mapping, None if absent and optional."""
        return self._read(key, REQUIRED if required else None, Value.as_mapping)

    def sequence(self, key: str, *, required: bool = False) -> list[Value] | None:
        """The items of a list; None if absent, null or not a list."""
        return self._read(key, REQUIRED if required else None, Value.as_list)

    def mappings(self, key: str, *, required: bool = False) -> list[MapReader]:
        """The items of a list of mappings; items that are not mappings are reported and skipped."""
        readers = (item.as_mapping() for item in self.sequence(key, required=required) or [])
        return [r for r in readers if r is not None]

    def reject_unknown(self, allowed: Iterable[str]) -> None:
        """Report every key not in `allowed`, with the closest allowed key as a suggestion."""
        allowed = list(allowed)
        for key, (key_node, _) in self._entries.items():
            if key not in allowed:
                self.errors.add(key_node.start_mark.line + 1, self._child(key),
                                f"unknown key{did_you_mean(key, allowed)}")
