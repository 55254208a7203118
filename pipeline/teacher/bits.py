"""Bit-level primitives of the teacher-cache codec: fixed-width integer packing and Elias–Fano sets.

Design: everything is whole-array numpy, never a Python loop over items. `unpack_uint` reads each item
as an unaligned big-endian 8-byte word (a stride-1 `>u8` view over a zero-padded copy of the bytes)
and two shifts; since 8 items span exactly `width` bytes, each of the 8 bit phases is a plain strided
slice of that view (no index arrays), so decoding costs a few operations per item whatever the width
(≤ 57 bits, the most an 8-byte window holds after a 7-bit offset). Elias–Fano stores a non-decreasing
sequence of `n` integers below `u` in n·L + n + ⌊(u−1)/2^L⌋ + 1 bits, L = ⌊log2(u/n)⌋, within about
2 bits per item of the information floor log2 C(u, n), and decodes with one `unpackbits` and one
`flatnonzero` over the upper part.

Cost: encoding allocates a [count, width] bit matrix (count·width bytes); decoding allocates a few
int64 arrays of `count` items plus one byte per bit of the Elias–Fano upper part.

Bit order everywhere is MSB first: bit j of a stream is bit 7 − (j mod 8) of byte j // 8.
"""
from __future__ import annotations

import numpy as np

from pipeline.teacher.errors import CacheError

MAX_WIDTH = 57  # an item at bit offset ≤ 7 must fit one 8-byte window
_COUNT = np.dtype("<u4")


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def packed_bytes(count: int, width: int) -> int:
    """Bytes that `count` items of `width` bits take once packed (zero-padded to a whole byte)."""
    return (count * width + 7) // 8


def _check_width(width: int) -> None:
    if not 0 <= width <= MAX_WIDTH:
        raise CacheError(f"bit width must be in [0, {MAX_WIDTH}], got {width}")


def pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers, each written in `width` bits MSB first, as one byte-padded uint8 stream."""
    _check_width(width)
    values = np.asarray(values)
    if values.size and values.dtype.kind not in "iu":
        raise CacheError(f"pack_uint: expected integers, got dtype {values.dtype}")
    values = values.reshape(-1)
    if values.size and (int(values.min()) < 0 or int(values.max()) >= 1 << width):
        raise CacheError(f"pack_uint: values must lie in [0, 2**{width}), got [{values.min()}, {values.max()}]")
    if width == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1))


def unpack_uint(buf: np.ndarray, count: int, width: int, byte_offset: int = 0, where: str = "") -> np.ndarray:
    """The `count` integers of `width` bits that `pack_uint` wrote at `buf[byte_offset:]`, as int64."""
    _check_width(width)
    need = packed_bytes(count, width)
    if byte_offset < 0 or len(buf) - byte_offset < need:
        raise CacheError(f"{_prefix(where)}expected {need} bytes of {count} packed {width}-bit values at byte "
                         f"{byte_offset}, but only {max(0, len(buf) - byte_offset)} remain")
    if width == 0 or count == 0:
        return np.zeros(count, np.int64)
    groups = (count + 7) // 8  # 8 items span exactly `width` bytes, so bit offsets repeat every 8 items
    padded = np.zeros(groups * width + 8, np.uint8)
    padded[:need] = buf[byte_offset:byte_offset + need]
    # words[j] = the big-endian 8 bytes starting at byte j (an unaligned, overlapping view).
    words = np.ndarray((padded.size - 7,), dtype=">u8", buffer=padded, strides=(1,))
    out = np.empty((groups, 8), np.uint64)
    for phase in range(8):  # item 8g + phase starts at bit 8g·width + phase·width
        first = (phase * width) >> 3
        out[:, phase] = words[first:first + groups * width:width]
    out <<= (np.arange(8, dtype=np.uint64) * np.uint64(width)) & np.uint64(7)
    out >>= np.uint64(64 - width)
    return out.reshape(-1)[:count].view(np.int64)


def low_bits(count: int, universe: int) -> int:
    """Elias–Fano's low-part width L = max(0, ⌊log2(universe / count)⌋); 0 for an empty sequence."""
    if count <= 0:
        return 0
    return max(0, (universe // count).bit_length() - 1)


def _upper_bits(count: int, universe: int) -> int:
    """Bits of the upper part: one per item plus one per high bucket; none for an empty sequence."""
    if count == 0:
        return 0
    return count + ((universe - 1) >> low_bits(count, universe)) + 1


def ef_size_bits(count: int, universe: int) -> int:
    """Bits of an Elias–Fano block's low and upper parts, unpadded (the 4-byte count header excluded)."""
    return count * low_bits(count, universe) + _upper_bits(count, universe)


def ef_block_bytes(count: int, universe: int) -> int:
    """Bytes of a whole Elias–Fano block as `ef_encode` writes it (header and byte padding included)."""
    return (_COUNT.itemsize + packed_bytes(count, low_bits(count, universe))
            + packed_bytes(_upper_bits(count, universe), 1))


def ef_encode(values: np.ndarray, universe: int) -> bytes:
    """A non-decreasing int sequence in [0, universe) as an Elias–Fano block.

    Layout: u32 little-endian count; the low L bits of each item (`pack_uint`, byte-padded); the upper
    part, `count + ((universe − 1) >> L) + 1` bits where item i sets bit (values[i] >> L) + i (byte-padded).
    An empty sequence is the header alone.
    """
    values = np.asarray(values).reshape(-1)
    count = values.size
    if count and values.dtype.kind not in "iu":
        raise CacheError(f"ef_encode: expected integers, got dtype {values.dtype}")
    if count >= 1 << 32:
        raise CacheError(f"ef_encode: {count} items exceed the u32 count header")
    values = values.astype(np.int64)
    if count and (values[0] < 0 or values[-1] >= universe):
        raise CacheError(f"ef_encode: values must lie in [0, {universe}), got [{values[0]}, {values[-1]}]")
    if count > 1 and not (values[1:] >= values[:-1]).all():
        raise CacheError("ef_encode: values must be non-decreasing")
    header = np.array([count], _COUNT).tobytes()
    if count == 0:
        return header
    width = low_bits(count, universe)
    low = pack_uint(values & ((1 << width) - 1), width)
    upper = np.zeros(_upper_bits(count, universe), np.uint8)
    upper[(values >> width) + np.arange(count)] = 1
    return header + low.tobytes() + np.packbits(upper).tobytes()


def _as_bytes(buf: bytes | np.ndarray) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, np.uint8)


def ef_decode(buf: bytes | np.ndarray, universe: int, offset: int = 0, where: str = "") -> tuple[np.ndarray, int]:
    """(values int64, byte offset just past the block) of the Elias–Fano block at `buf[offset:]`."""
    data = _as_bytes(buf)
    if offset < 0 or data.size - offset < _COUNT.itemsize:
        raise CacheError(f"{_prefix(where)}expected a 4-byte Elias–Fano count at byte {offset}, "
                         f"but only {max(0, data.size - offset)} bytes remain")
    count = int(data[offset:offset + 4].view(_COUNT)[0])
    end = offset + ef_block_bytes(count, universe)
    if end > data.size:
        raise CacheError(f"{_prefix(where)}an Elias–Fano block of {count} values below {universe} needs "
                         f"{end - offset} bytes at byte {offset}, but only {data.size - offset} remain")
    if count == 0:
        return np.zeros(0, np.int64), end
    width = low_bits(count, universe)
    low_start = offset + _COUNT.itemsize
    low = unpack_uint(data, count, width, low_start, where)
    ones = np.flatnonzero(np.unpackbits(data[low_start + packed_bytes(count, width):end]).view(bool))
    if ones.size != count or ones[-1] >= _upper_bits(count, universe):
        raise CacheError(f"{_prefix(where)}corrupt Elias–Fano block at byte {offset}: expected {count} set bits "
                         f"in its upper part, found {ones.size}")
    ones -= np.arange(count)
    values = (ones << width) | low
    if values.max() >= universe:
        raise CacheError(f"{_prefix(where)}corrupt Elias–Fano block at byte {offset}: "
                         f"a value {values.max()} is not below {universe}")
    return values, end
