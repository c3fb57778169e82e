"""Reading untrusted JSON documents field by field: one clear error naming the file and the field.

Manifests (checkpoint and artifact) are files a user can hand-edit, truncate or
replace.  :class:`Fields` wraps one parsed JSON object and reads typed, range-checked
values from it by dotted path; anything else raises a :class:`ManifestError` such as
``runs/k1/keyedge.json: field 'model.image_size' must be an integer in 1..16384, got -3``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keyedge.errors import KeyedgeError

_MISSING = object()
#: 16 lower-case hex digits: a key fingerprint (keyedge.keys.keyfile.fingerprint)
FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: bounds that no real model reaches; they keep a hand-edited value from allocating terabytes
MAX_IMAGE_SIZE = 16384
MAX_CLASSES = 1_000_000
#: seeds are 32-bit: every generator keyedge seeds (torch, numpy's legacy one, Python's) accepts them
MAX_SEED = 2**32 - 1


class ManifestError(KeyedgeError):
    """A manifest is missing, not JSON, from a newer keyedge, or has a field of the wrong type or range."""


def read_json(path: Path, what: str, hint: str, error: type[ManifestError] = ManifestError) -> Fields:
    """Parse ``path`` as one JSON object; errors (of class ``error``) name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} not found", hint) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {path} ({type(exc).__name__})", hint) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})", hint) from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a {what}", hint) from None
    if not isinstance(data, dict):
        raise error(f"{path} is not a {what} (a JSON object was expected)", hint)
    return Fields(data, str(path), hint, error=error)


class Fields:
    """Typed access to a JSON object; ``prefix`` is the dotted path of this object in the document."""

    def __init__(
        self,
        data: dict[str, Any],
        source: str,
        hint: str,
        prefix: str = "",
        *,
        error: type[ManifestError] = ManifestError,
    ):
        self.data, self.source, self.hint, self.prefix, self.error = data, source, hint, prefix, error

    def fail(self, name: str, problem: str) -> ManifestError:
        path = f"{self.prefix}{name}"
        if not path.isprintable():  # a hand-edited key with a newline or control character: keep the error one line
            path = repr(path)[1:-1]
        return self.error(f"{self.source}: field '{path}' {problem}", self.hint)

    def sub(self, data: dict[str, Any], prefix: str) -> Fields:
        return Fields(data, self.source, self.hint, f"{self.prefix}{prefix}", error=self.error)

    def schema_version(self, schema: str, legacy_format: str, what: str) -> int:
        """The version of a ``"schema": "NAME/N"`` document (or a legacy ``format`` + ``version`` one).

        ``schema`` is the newest this keyedge reads (``keyedge-checkpoint/1``); a newer version, another
        name or a foreign document is one error naming the file.
        """
        family, _, newest = schema.partition("/")
        written = self.str("schema", optional=True)
        if written is None:  # written before the schema field existed: format + version
            if self.raw("format", None) != legacy_format:
                raise self.error(f"{self.source} is not a keyedge {what}", self.hint)
            version = self.int("version", low=1)
        else:
            name, _, number = written.partition("/")
            if name != family or not number.isdigit():
                raise self.fail("schema", f"must be {schema}, got {written!r}")
            version = int(number)
        if version > int(newest):
            raise self.error(
                f"{self.source} has {what} version {version}, newer than this keyedge reads ({newest})",
                "upgrade keyedge",
            )
        return version

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        if name not in self.data:
            if default is _MISSING:
                raise self.fail(name, "is missing")
            return default
        return self.data[name]

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def obj(self, name: str, *, optional: bool = False) -> Fields | None:
        value = self.raw(name, None if optional else _MISSING)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, f"must be an object, got {_shown(value)}")
        return self.sub(value, f"{name}.")

    def str(
        self,
        name: str,
        *,
        choices: Sequence[str] | None = None,
        pattern: re.Pattern | None = None,
        optional: bool = False,
        default: Any = _MISSING,
    ) -> Any:
        value = self.raw(name, None if optional else default)
        if value is None and (optional or default is None):
            return None
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {_shown(value)}")
        if choices is not None and value not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}, got {_shown(value)}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(name, f"is malformed ({_shown(value)})")
        return value

    def int(
        self,
        name: str,
        *,
        low: int | None = None,
        high: int | None = None,
        optional: bool = False,
        default: Any = _MISSING,
    ) -> Any:
        value = self.raw(name, None if optional else default)
        if value is None and (optional or default is None):
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            bounds = (
                f" in {low}..{high}"
                if low is not None and high is not None
                else (f" >= {low}" if low is not None else "")
            )
            raise self.fail(name, f"must be an integer{bounds}, got {_shown(value)}")
        return value

    def float(self, name: str, *, low: float | None = None, high: float | None = None, optional: bool = False) -> Any:
        value = self.raw(name, None if optional else _MISSING)
        if value is None and optional:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
        ):
            bounds = f" in [{low}, {high}]" if low is not None and high is not None else ""
            raise self.fail(name, f"must be a finite number{bounds}, got {_shown(value)}")
        return float(value)

    def bool(self, name: str, *, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {_shown(value)}")
        return value

    def floats(self, name: str, *, length: int | None = None, positive: bool = False) -> list[float]:
        value = self.raw(name)
        ok = (
            isinstance(value, list)
            and (length is None or len(value) == length)
            and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
                for v in value
            )
        )
        if not ok:
            what = f"{length} " if length else ""
            raise self.fail(
                name, f"must be a list of {what}{'positive ' if positive else ''}numbers, got {_shown(value)}"
            )
        return [float(v) for v in value]

    def ints(self, name: str, *, optional: bool = False) -> list[int] | None:
        value = self.raw(name, None if optional else _MISSING)
        if value is None and optional:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.fail(name, f"must be a list of integers, got {_shown(value)}")
        return list(value)

    def strs(self, name: str, *, optional: bool = False) -> list[str] | None:
        value = self.raw(name, None if optional else _MISSING)
        if value is None and optional:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(name, f"must be a list of strings, got {_shown(value)}")
        return list(value)

    def dict(self, name: str, *, optional: bool = False) -> dict[str, Any] | None:
        value = self.raw(name, None if optional else _MISSING)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self.fail(name, f"must be an object, got {_shown(value)}")
        return value

    def objs(self, name: str) -> list[Fields]:
        """A list of objects, each as :class:`Fields` (``name[3].field`` in errors)."""
        value = self.raw(name)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(name, f"must be a list of objects, got {_shown(value)}")
        return [self.sub(v, f"{name}[{i}].") for i, v in enumerate(value)]

    def file_name(self, name: str) -> str:
        """A plain file name inside the manifest's directory: no separators, no '..', no hidden tricks."""
        value = self.str(name)
        if not is_plain_name(value):
            raise self.fail(
                name, f"must be a plain file name (no '/', '..' or control characters), got {_shown(value)}"
            )
        return value

    def relative_path(self, name: str) -> str:
        """A relative path that stays inside the manifest's directory (an .mlpackage has sub-directories)."""
        value = self.str(name)
        parts = value.split("/")
        if not value or value.startswith("/") or "\\" in value or not all(is_plain_name(p) for p in parts):
            raise self.fail(name, f"must be a relative path inside the directory, got {_shown(value)}")
        return value


def is_plain_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and len(name) <= 255
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
    )


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_dataclass(cls: type, fields: Fields, *, nested: dict[str, type] | None = None, skip: Sequence[str] = ()):
    """Build dataclass ``cls`` from ``fields``, checking each value against its annotation.

    Handles ``float``, ``int``, ``str``, ``bool``, ``list[str]``, ``list[float]``, ``dict[...]``,
    ``X | None`` and, through ``nested`` (name -> class), dataclass fields and ``list[Name]``.
    A field with a default may be absent; ``skip`` names fields derived from the others.
    """
    import dataclasses

    nested = nested or {}
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        name, annotation = field.name, str(field.type).replace(" ", "")
        if name in skip or not field.init:
            continue
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        if name not in fields.data and has_default:
            continue
        optional = annotation.endswith("|None")
        base = annotation.removesuffix("|None")
        if optional and fields.raw(name) is None:
            values[name] = None
        elif base == "float":
            values[name] = fields.float(name)
        elif base == "int":
            values[name] = fields.int(name)
        elif base == "str":
            values[name] = fields.str(name)
        elif base == "bool":
            values[name] = fields.bool(name)
        elif base == "list[str]":
            values[name] = fields.strs(name)
        elif base == "list[float]":
            values[name] = fields.floats(name)
        elif base.startswith("dict["):
            values[name] = fields.dict(name)
        elif base in nested:
            values[name] = read_dataclass(nested[base], fields.obj(name), nested=nested)
        elif base.startswith("list[") and base[5:-1] in nested:
            values[name] = [read_dataclass(nested[base[5:-1]], item, nested=nested) for item in fields.objs(name)]
        elif base.startswith("list["):
            items = fields.raw(name)
            if not isinstance(items, list):
                raise fields.fail(name, f"must be a list, got {_shown(items)}")
            values[name] = items
        else:
            values[name] = fields.raw(name)
    return cls(**values)
