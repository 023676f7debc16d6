"""The wire format: typed messages, msgpack, length-prefixed frames with a hard cap.

Every message is a frozen dataclass registered under a type name that carries
its version (``"job.request/1"``). On the wire a message is the msgpack array
``[type, {field: value, …}]``, and a frame is a 4-byte big-endian length
followed by that many bytes. A frame longer than the reader's cap is refused
before it is read.

Decoding is strict about what it needs and lenient about what it does not
know: unknown fields are ignored (so a newer peer can add fields without
breaking older ones), missing or mistyped fields are errors. Every failure —
truncated frame, oversized frame, bad msgpack, unknown type, bad field —
becomes one exception, ``WireError``, which handlers log at debug level and
drop. See docs/protocol.md for the message list.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

import msgpack

from node.errors import WireError

#: The default cap on one frame: a 256 KiB model chunk plus headroom.
MAX_FRAME = 1 << 20
_LENGTH = struct.Struct(">I")

_REGISTRY: dict[str, type[Message]] = {}  # filled at import time by @message; read-only afterwards

M = TypeVar("M", bound="Message")


class Message:
    """Base of every wire message; subclasses are frozen dataclasses decorated with ``@message``."""

    TYPE: ClassVar[str]


def message(type_name: str) -> Callable[[type[M]], type[M]]:
    """Register a frozen dataclass as the message ``type_name``; refuses duplicates."""

    def register(cls: type[M]) -> type[M]:
        if type_name in _REGISTRY:
            raise ValueError(f"wire message type {type_name!r} registered twice")
        if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        cls.TYPE = type_name
        _REGISTRY[type_name] = cls
        return cls

    return register


def registered_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)


# -------------------------------------------------------------------- values


def _check(value: Any, hint: Any, where: str) -> Any:
    """Validate (and lightly normalise) a decoded value against a type hint."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected a map, got {type(value).__name__}")
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check(value, option, where)
            except WireError:
                continue
        raise WireError(f"{where}: {type(value).__name__} is not {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise WireError(f"{where}: expected nothing, got {type(value).__name__}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise WireError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        checked = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected a map, got {type(value).__name__}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {_check(k, key_hint, where): _check(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise WireError(f"{where}: expected a number, got {type(value).__name__}")
    if hint is int and isinstance(value, bool):
        raise WireError(f"{where}: expected an integer, got a boolean")
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise WireError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def pack(value: Any) -> bytes:
    """Canonical msgpack of any dataclass value (what signatures inside messages cover)."""
    return msgpack.packb(_to_wire(value), use_bin_type=True)


def encode(msg: Message) -> bytes:
    """The msgpack body of ``msg`` (no length prefix)."""
    if type(msg).TYPE not in _REGISTRY:
        raise TypeError(f"{type(msg).__name__} is not a registered wire message")
    return msgpack.packb([msg.TYPE, _to_wire(msg)], use_bin_type=True)


def decode(body: bytes, *, max_size: int = MAX_FRAME) -> Message:
    """Parse a msgpack body into its message. Raises ``WireError`` for anything invalid."""
    if len(body) > max_size:
        raise WireError(f"message of {len(body)} bytes is over the {max_size} byte cap")
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises many types for hostile input
        raise WireError(f"not msgpack: {err.__class__.__name__}") from None
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str) and isinstance(raw[1], dict)):
        raise WireError("a message is [type, {fields}]")
    cls = _REGISTRY.get(raw[0])
    if cls is None:
        raise WireError(f"unknown message type {raw[0]!r}")
    return _build(cls, raw[1], cls.TYPE)


def _build(cls: type, fields: dict, where: str) -> Any:
    """Construct dataclass ``cls`` from decoded ``fields``: known fields checked, unknown ones ignored."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in fields:
            values[f.name] = _check(fields[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise WireError(f"{where} lacks the field {f.name!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise WireError(f"{where}: {err}") from None


# -------------------------------------------------------------------- frames


class ByteStream(Protocol):
    """What framing needs of a stream (a libp2p stream fits)."""

    async def read(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> Any: ...


def frame(msg: Message) -> bytes:
    body = encode(msg)
    return _LENGTH.pack(len(body)) + body


async def _read_exactly(stream: ByteStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError("stream ended")
        buf += chunk
    return bytes(buf)


async def send(stream: ByteStream, msg: Message) -> None:
    """Write one framed message."""
    await stream.write(frame(msg))


async def receive(stream: ByteStream, *, max_frame: int = MAX_FRAME) -> Message:
    """Read one framed message.

    Raises:
        WireError: the frame is over ``max_frame`` or does not decode.
        EOFError: the stream ended cleanly before a frame began, or inside one.
    """
    (length,) = _LENGTH.unpack(await _read_exactly(stream, _LENGTH.size))
    if length > max_frame:
        raise WireError(f"frame of {length} bytes is over the {max_frame} byte cap")
    return decode(await _read_exactly(stream, length), max_size=max_frame)


async def receive_as(stream: ByteStream, cls: type[M], *, max_frame: int = MAX_FRAME) -> M:
    """Read one framed message that must be a ``cls``."""
    msg = await receive(stream, max_frame=max_frame)
    if not isinstance(msg, cls):
        raise WireError(f"expected {cls.TYPE}, got {msg.TYPE}")
    return msg
