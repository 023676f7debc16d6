"""The head of a GGUF file: its metadata (the tokenizer included), read from a byte prefix.

A GGUF file is a header, then the tensors' descriptions, then the tensors::

    "GGUF"  version:u32  tensor_count:u64  kv_count:u64
    kv_count × (key:string  type:u32  value)      ← the metadata: tokenizer, chat template, hyperparameters
    tensor_count × (name:string  n_dims:u32  dims:u64[n_dims]  type:u32  offset:u64)
    padding to general.alignment, then the tensor data (the weights: nearly all of the file)

(a string is ``len:u64`` then that many UTF-8 bytes; an array is ``item_type:u32
count:u64`` then the items; little-endian, versions 2 and 3: llama.cpp reads no other.)
The metadata is all a tokenizer needs, and it comes first: a few MiB at the head of
a file of gigabytes. ``HeaderScanner`` reads it from a prefix that grows, as blocks
arrive (``node.models.dag.fetch_prefix``), and says when it has all of it;
``vocab_only_gguf`` then writes the same metadata with no tensors, a file that
llama.cpp loads with ``vocab_only`` (llama.cpp's own ``models/ggml-vocab-*.gguf``
are such files).

**Hostile input.** The file is named by a CID, so its bytes are the ones asked for,
but whoever published the model chose them. Nothing here allocates what the file
claims: counts are never used to size anything, every length is checked against
the bytes left in the header's budget (``MAX_HEADER_BYTES``) before it is used, a
scan needs at most that many bytes, and every failure is one ``ModelError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from node.errors import ModelError

GGUF_MAGIC = b"GGUF"
#: The most bytes the metadata may take, from the file's start to the end of the last key/value pair.
#: Real models need a few MiB (a 256k-token vocabulary with merges is about 12 MiB).
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_KV_COUNT = 65_536  # real models have 20 to 60
MAX_KEY_BYTES = 65_535  # the GGUF spec's limit
DEFAULT_ALIGNMENT = 32

_PREAMBLE = 24  # magic, version, tensor count, key/value count

# type id -> (name, struct format of one scalar, or None for strings and arrays)
_STRING, _ARRAY = 8, 9
_SCALARS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class ArrayInfo:
    """An array value, summarised: its item type and length (the items stay in the raw bytes)."""

    item_type: int
    count: int


@dataclass(frozen=True)
class GGUFHeader:
    """What a complete scan found."""

    version: int
    tensor_count: int
    metadata: dict[str, int | float | bool | str | ArrayInfo]
    kv_end: int  # the offset just past the last key/value pair: the metadata is ``prefix[24:kv_end]``

    @property
    def alignment(self) -> int:
        value = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else DEFAULT_ALIGNMENT


class _Short(Exception):
    """The prefix ends before what is being read; ``need`` bytes in all would get past it."""

    def __init__(self, need: int) -> None:
        self.need = need


@dataclass
class HeaderScanner:
    """Reads a GGUF header from a prefix of the file that grows (see the module docstring).

    ``feed(prefix)`` takes all the bytes known so far (each call's prefix extends
    the last one's) and returns the ``GGUFHeader`` once the metadata is complete,
    else None; ``need`` is then the smallest prefix length that can get further.
    Nothing already read is read again (not even the strings of an array cut
    short), so feeding leaf after leaf costs one pass over the header in all.

    Raises (from ``feed``):
        ModelError: not GGUF, a version llama.cpp does not read, a malformed or
            oversized header (over ``limit`` bytes), a duplicate key.
    """

    limit: int = MAX_HEADER_BYTES
    need: int = _PREAMBLE
    _version: int = 0
    _tensors: int = 0
    _kv_count: int = -1
    _pos: int = _PREAMBLE  # where the next unread key/value pair starts
    _metadata: dict = field(default_factory=dict)
    _done: GGUFHeader | None = None
    _resume: tuple[int, int, int] | None = None  # a string array cut short: (its pair's offset, items read, offset)

    def feed(self, prefix: bytes | bytearray | memoryview) -> GGUFHeader | None:
        if self._done is not None:
            return self._done
        if len(prefix) < self.need:
            return None
        view = memoryview(prefix)
        try:
            if self._kv_count < 0:
                self._preamble(view)
            while len(self._metadata) < self._kv_count:
                self._pos = self._pair(view, self._pos)
        except _Short as short:
            if short.need > self.limit:
                raise ModelError(
                    f"the GGUF metadata is larger than the {self.limit:,}-byte limit (it needs {short.need:,} bytes)"
                ) from None
            self.need = short.need
            return None
        self._done = GGUFHeader(self._version, self._tensors, dict(self._metadata), self._pos)
        return self._done

    def _preamble(self, view: memoryview) -> None:
        if len(view) < _PREAMBLE:
            raise _Short(_PREAMBLE)
        if bytes(view[:4]) != GGUF_MAGIC:
            raise ModelError(f"not a GGUF file: it starts with {bytes(view[:4])!r}, not b'GGUF'")
        (version,) = _U32.unpack_from(view, 4)
        if version not in (2, 3):
            raise ModelError(f"GGUF version {version} is not one llama.cpp reads (2 or 3)")
        tensors, kv_count = struct.unpack_from("<QQ", view, 8)
        if kv_count > MAX_KV_COUNT:
            raise ModelError(f"the GGUF header claims {kv_count:,} metadata keys, over the limit of {MAX_KV_COUNT:,}")
        self._version, self._tensors, self._kv_count = version, tensors, kv_count

    def _take(self, view: memoryview, pos: int, n: int) -> int:
        """The offset past ``n`` bytes at ``pos``; ``_Short`` if the prefix or the budget ends first."""
        end = pos + n
        if end > self.limit:
            raise ModelError(
                f"the GGUF metadata is larger than the {self.limit:,}-byte limit (a value at offset {pos:,} "
                f"claims {n:,} bytes)"
            )
        if end > len(view):
            raise _Short(end)
        return end

    def _u32(self, view: memoryview, pos: int) -> tuple[int, int]:
        end = self._take(view, pos, 4)
        return _U32.unpack_from(view, pos)[0], end

    def _u64(self, view: memoryview, pos: int) -> tuple[int, int]:
        end = self._take(view, pos, 8)
        return _U64.unpack_from(view, pos)[0], end

    def _string(self, view: memoryview, pos: int, *, limit: int | None = None) -> tuple[memoryview, int]:
        length, pos = self._u64(view, pos)
        if limit is not None and length > limit:
            raise ModelError(f"a GGUF key of {length:,} bytes at offset {pos - 8:,} (the limit is {limit:,})")
        end = self._take(view, pos, length)
        return view[pos:end], end

    def _pair(self, view: memoryview, start: int) -> int:
        raw_key, pos = self._string(view, start, limit=MAX_KEY_BYTES)
        try:
            key = bytes(raw_key).decode()
        except UnicodeDecodeError:
            raise ModelError(f"a GGUF metadata key at offset {pos - len(raw_key):,} is not UTF-8") from None
        if key in self._metadata:
            raise ModelError(f"the GGUF metadata has the key {key[:100]!r} twice")
        kind, pos = self._u32(view, pos)
        value, pos = self._value(view, pos, kind, key, start)
        self._metadata[key] = value
        return pos

    def _value(self, view: memoryview, pos: int, kind: int, key: str, start: int) -> tuple[object, int]:
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            end = self._take(view, pos, struct.calcsize(fmt))
            return struct.unpack_from(fmt, view, pos)[0], end
        if kind == _STRING:
            raw, end = self._string(view, pos)
            return bytes(raw).decode(errors="replace"), end
        if kind != _ARRAY:
            raise ModelError(f"the GGUF key {key[:100]!r} has an unknown value type {kind}")
        item, pos = self._u32(view, pos)
        count, pos = self._u64(view, pos)
        if item in _SCALARS:
            return ArrayInfo(item, count), self._take(view, pos, count * struct.calcsize(_SCALARS[item]))
        if item != _STRING:
            raise ModelError(f"the GGUF key {key[:100]!r} is an array of type {item}, which llama.cpp does not read")
        self._take(view, pos, count * 8)  # every string takes at least its length: a huge count fails here, at once
        return ArrayInfo(item, count), self._strings(view, pos, count, start)

    def _strings(self, view: memoryview, pos: int, count: int, start: int) -> int:
        """Skip ``count`` strings from ``pos``, resuming where the last feed stopped inside the same array (a
        vocabulary is one array of MiBs; re-reading it from its start at every feed would cost its square)."""
        index = 0
        if self._resume is not None and self._resume[0] == start:
            _, index, pos = self._resume
        try:
            while index < count:
                length, after = self._u64(view, pos)
                pos = self._take(view, after, length)
                index += 1
        except _Short:
            self._resume = (start, index, pos)
            raise
        self._resume = None
        return pos


def scan_header(data: bytes | bytearray | memoryview, *, limit: int = MAX_HEADER_BYTES) -> GGUFHeader:
    """The header of a GGUF file whose first bytes are ``data``.

    Raises:
        ModelError: ``data`` ends before the metadata does, or the header is bad (``HeaderScanner``).
    """
    scanner = HeaderScanner(limit=limit)
    header = scanner.feed(data)
    if header is None:
        raise ModelError(f"the GGUF metadata is cut short: it needs at least {scanner.need:,} bytes, not {len(data):,}")
    return header


def read_header(path, *, limit: int = MAX_HEADER_BYTES) -> tuple[GGUFHeader, bytes]:
    """The header of the GGUF file at ``path``, and the bytes it spans (reads no more than it needs)."""
    scanner = HeaderScanner(limit=limit)
    data = bytearray()
    with open(path, "rb") as f:
        while (header := scanner.feed(data)) is None:
            more = f.read(max(scanner.need - len(data), 1 << 16))
            if not more:
                raise ModelError(f"{path} ends inside its GGUF metadata, after {len(data):,} bytes")
            data += more
    return header, bytes(data[: header.kv_end])


def vocab_only_gguf(header: GGUFHeader, prefix: bytes | bytearray | memoryview) -> bytes:
    """A GGUF file with ``header``'s metadata (copied byte for byte from ``prefix``) and no tensors.

    llama.cpp loads it with ``vocab_only``: the tokenizer, the chat template and
    the hyperparameters are all there; the weights are not.
    """
    head = GGUF_MAGIC + _U32.pack(header.version) + struct.pack("<QQ", 0, len(header.metadata))
    body = bytes(memoryview(prefix)[_PREAMBLE : header.kv_end])
    size = len(head) + len(body)
    return head + body + b"\0" * (-size % header.alignment)
