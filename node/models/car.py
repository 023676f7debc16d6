"""Reading a CARv1 stream (``ipfs dag export``) one block at a time.

A CAR is ``varint(len) header`` then sections ``varint(len) CID block``. The
header (dag-cbor: roots and version) is only length-checked: the caller knows
which root it asked for, and ``DagAssembler`` refuses any block it did not
expect, so the header cannot mislead it. Sizes are capped so that a hostile
stream cannot make us buffer more than one block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from node.errors import ModelError
from node.models.cid import CID, read_varint
from node.models.dag import MAX_BLOCK_SIZE

MAX_HEADER_SIZE = 64 * 1024
_MAX_SECTION = MAX_BLOCK_SIZE + 64  # block + its CID


class _Buffer:
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = bytearray()
        self._pos = 0

    def _fill(self, n: int) -> bool:
        while len(self._buf) - self._pos < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            self._buf += chunk
        return True

    def varint(self) -> int | None:
        """The next varint, or None at a clean end of stream."""
        if not self._fill(1):
            return None
        for width in range(1, 11):
            if not self._fill(width):
                raise ModelError("CAR stream ends inside a length prefix")
            if not self._buf[self._pos + width - 1] & 0x80:
                value, end = read_varint(bytes(self._buf[self._pos : self._pos + width]))
                self._pos += width
                return value
        raise ModelError("CAR stream has an oversized length prefix")

    def take(self, n: int) -> bytes:
        if not self._fill(n):
            raise ModelError(f"CAR stream ends inside a section ({n} bytes announced)")
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out


def read_car(chunks: Iterable[bytes]) -> Iterator[tuple[CID, bytes]]:
    """Yield (CID, block) from CAR bytes arriving in ``chunks`` of any size.

    Raises:
        ModelError: the stream is not a well-formed CARv1, or a section is too large.
    """
    buf = _Buffer(chunks)
    header_len = buf.varint()
    if header_len is None:
        raise ModelError("empty CAR stream")
    if header_len > MAX_HEADER_SIZE:
        raise ModelError(f"CAR header of {header_len} bytes is over the {MAX_HEADER_SIZE} byte limit")
    buf.take(header_len)
    while (length := buf.varint()) is not None:
        if length > _MAX_SECTION:
            raise ModelError(f"CAR section of {length} bytes is over the {_MAX_SECTION} byte limit")
        section = buf.take(length)
        cid, pos = CID.read(section, 0)
        yield cid, section[pos:]
