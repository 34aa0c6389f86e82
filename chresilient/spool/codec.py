"""Type-exact row encoding for the spool: tagged JSON, never pickle.

A spooled batch must come back as the same Python values the caller passed, because the
driver picks the wire format from the value's type (a ``Decimal`` is not a float, a tuple
is not a list, an aware datetime keeps its zone). Pickle would do that but executes code
on load, and a spool directory may be shared between processes, so values are written as
JSON where every object is a tag: ``{"$": "<tag>", "v": ...}``. Lists stay JSON arrays;
str, int (any size), float (nan and inf included), bool and None are JSON scalars; strings
keep any code point (lone surrogates too, as ``\\udxxx`` escapes).

Enum members travel as the driver would send them: a plain ``Enum`` as its name; an
``int`` or ``str`` enum as a one-member enum of the same name and value (so an Enum8
column still gets the name and an integer column the number).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import enum
import functools
import ipaddress
import json
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

# Bumped whenever the stored format changes; stored with every batch.
CODEC_VERSION = 1
# zlib level 1: most of the gain of JSON compression (4-8x on typical rows) for little CPU.
_ZLEVEL = 1

_PLAIN = frozenset({str, int, float, bool, type(None)})
_ROWS = frozenset({tuple, list})


class SpoolEncodeError(TypeError):
    """A value has a type the spool cannot store exactly."""


class SpoolDecodeError(ValueError):
    """A stored batch cannot be read back. ``newer`` when a later release wrote it."""

    def __init__(self, message: str, *, newer: bool = False) -> None:
        super().__init__(message)
        self.newer = newer


def _tz_spec(tz: dt.tzinfo, value: dt.datetime) -> list[Any]:
    """How to rebuild ``tz``: by zone name where one exists, else as a fixed offset."""
    if tz is dt.timezone.utc:
        return ["utc"]
    if isinstance(tz, dt.timezone):
        fixed = tz.utcoffset(None)
        return ["fixed", fixed // dt.timedelta(microseconds=1), tz.tzname(None)]
    key = getattr(tz, "key", None)  # zoneinfo.ZoneInfo
    if isinstance(key, str):
        return ["zoneinfo", key]
    zone = getattr(tz, "zone", None)  # pytz
    if isinstance(zone, str):
        return ["pytz", zone]
    offset = value.utcoffset()
    assert offset is not None
    return ["fixed", offset // dt.timedelta(microseconds=1), None]


def _encode_datetime(value: dt.datetime) -> dict[str, Any]:
    out: dict[str, Any] = {"$": "dt", "v": value.isoformat()}
    if value.tzinfo is not None:
        out["tz"] = _tz_spec(value.tzinfo, value)
    if value.fold:
        out["fold"] = 1
    return out


def _encode_enum(value: enum.Enum) -> Any:
    if isinstance(value, int):
        return {"$": "ienum", "n": value.name, "v": int(value)}
    if isinstance(value, str):
        return {"$": "senum", "n": value.name, "v": str(value.value)}
    return value.name


def encode_value(value: Any) -> Any:
    """``value`` as JSON-ready data (see the module docstring for the scheme)."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is list:
        return [encode_value(v) for v in value]
    if kind is tuple:
        return {"$": "tup", "v": [encode_value(v) for v in value]}
    if isinstance(value, enum.Enum):
        return _encode_enum(value)
    if isinstance(value, dt.datetime):
        return _encode_datetime(value)
    if isinstance(value, dt.date):
        return {"$": "date", "v": value.isoformat()}
    if isinstance(value, decimal.Decimal):
        return {"$": "dec", "v": str(value)}
    if isinstance(value, uuid.UUID):
        return {"$": "uuid", "v": value.hex}
    if isinstance(value, (bytes, bytearray, memoryview)):
        tag = "ba" if isinstance(value, bytearray) else "b"
        return {"$": tag, "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, ipaddress.IPv4Address):
        return {"$": "ip4", "v": str(value)}
    if isinstance(value, ipaddress.IPv6Address):
        return {"$": "ip6", "v": str(value)}
    if isinstance(value, Mapping):
        return {"$": "map", "v": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    if isinstance(value, dt.timedelta):
        return {"$": "td", "v": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, dt.time):
        return {"$": "time", "v": value.isoformat()}
    if isinstance(value, (str, int, float)):  # subclasses of the plain types
        return _base_of(value)(value)
    if isinstance(value, (list, tuple)):  # e.g. a namedtuple
        return encode_value(tuple(value) if isinstance(value, tuple) else list(value))
    raise SpoolEncodeError(f"cannot spool a value of type {kind.__module__}.{kind.__qualname__}")


def _base_of(value: Any) -> type:
    for base in (int, float, str):
        if isinstance(value, base):
            return base
    raise AssertionError(value)  # pragma: no cover


def _tz_from_spec(spec: list[Any]) -> dt.tzinfo:
    kind = spec[0]
    if kind == "utc":
        return dt.timezone.utc
    if kind == "fixed":
        offset = dt.timedelta(microseconds=spec[1])
        return dt.timezone(offset, spec[2]) if spec[2] is not None else dt.timezone(offset)
    if kind == "zoneinfo":
        import zoneinfo

        return zoneinfo.ZoneInfo(spec[1])
    if kind == "pytz":
        import pytz

        return pytz.timezone(spec[1])  # type: ignore[no-any-return]
    raise ValueError(f"unknown time zone spec {spec!r}")


def _decode_datetime(obj: Mapping[str, Any]) -> dt.datetime:
    value = dt.datetime.fromisoformat(obj["v"])
    spec = obj.get("tz")
    if spec is not None:
        tz = _tz_from_spec(spec)
        if spec[0] == "pytz":
            # pytz zones must be attached by conversion, not replace(); keep the stored
            # offset if the zone's rules now disagree (e.g. an LMT-offset value).
            converted = value.astimezone(tz)
            if converted.utcoffset() == value.utcoffset():
                value = converted
            else:
                value = value.replace(tzinfo=tz)
        else:
            value = value.astimezone(tz)
    if obj.get("fold"):
        value = value.replace(fold=1)
    return value


@functools.lru_cache(maxsize=1024)
def _enum_member(mixin: type, name: str, value: Any) -> enum.Enum:
    make: Any = enum.Enum  # the functional API with a computed member list
    cls = make("SpooledEnum", [(name, value)], type=mixin)
    return cls[name]  # type: ignore[no-any-return]


def _decode_uuid(v: str) -> uuid.UUID:
    return uuid.UUID(hex=v)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "tup": tuple,
    "date": dt.date.fromisoformat,
    "dec": decimal.Decimal,
    "uuid": _decode_uuid,
    "b": base64.b64decode,
    "ba": lambda v: bytearray(base64.b64decode(v)),
    "ip4": ipaddress.IPv4Address,
    "ip6": ipaddress.IPv6Address,
    "map": lambda v: {_freeze(k): val for k, val in v},
    "td": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "time": dt.time.fromisoformat,
}


def _freeze(key: Any) -> Any:
    """Map keys decoded as lists (arrays) cannot be dict keys; tuples can."""
    return tuple(_freeze(k) for k in key) if isinstance(key, list) else key


def _object_hook(obj: dict[str, Any]) -> Any:
    tag = obj.get("$")
    if tag == "dt":
        return _decode_datetime(obj)
    if tag == "ienum":
        return _enum_member(int, obj["n"], obj["v"])
    if tag == "senum":
        return _enum_member(str, obj["n"], obj["v"])
    decoder = _DECODERS.get(tag)  # type: ignore[arg-type]
    if decoder is None:
        raise ValueError(f"unknown spool value tag {tag!r}")
    return decoder(obj["v"])


def encode_rows(rows: Iterable[Sequence[Any]]) -> bytes:
    """A batch of rows as compressed tagged JSON. Raises :class:`SpoolEncodeError`."""
    batch = rows if isinstance(rows, list) else list(rows)
    plain = _PLAIN
    data: Any
    if set(map(type, batch)) <= _ROWS and set(map(type, chain.from_iterable(batch))) <= plain:
        data = batch  # nothing to tag (the common batch): its types are checked in C
    else:
        data = [[v if type(v) in plain else encode_value(v) for v in row] for row in batch]
    text = json.dumps(data, ensure_ascii=True, allow_nan=True, separators=(",", ":"))
    return zlib.compress(text.encode("ascii"), _ZLEVEL)


def decode_rows(payload: bytes, version: int = CODEC_VERSION) -> list[tuple[Any, ...]]:
    """The rows :func:`encode_rows` stored, as tuples of the original values."""
    if version != CODEC_VERSION:
        raise SpoolDecodeError(
            f"spool codec version {version} is not supported by this release",
            newer=version > CODEC_VERSION,
        )
    try:
        data = json.loads(zlib.decompress(payload), object_hook=_object_hook)
        return [tuple(row) for row in data]
    except (ValueError, TypeError, LookupError, zlib.error) as err:
        raise SpoolDecodeError(f"corrupt spooled batch: {type(err).__name__}") from err


def encode_json(value: Any) -> str:
    """One value (settings, column names) as tagged JSON text."""
    return json.dumps(encode_value(value), ensure_ascii=True, separators=(",", ":"))


def decode_json(text: str) -> Any:
    return json.loads(text, object_hook=_object_hook)
