"""Values as bytes, the same in every layer: one header byte, then the (maybe compressed) payload.

Serialization is safe by default: orjson or msgpack, never pickle — a cache anyone can write to
(a shared Redis) must not be able to make a reader execute code. A value neither can encode (a set,
an object) is refused with a `TypeError` naming its type.

The header byte holds the serializer (low bits) and whether the payload is zstandard-compressed
(bit 7), so a reader needs no configuration to decode an entry, and a namespace can change its
serializer or threshold without invalidating what is stored. Bytes that do not decode raise
`CorruptEntry`: the cache counts them and treats them as a miss.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack
import orjson
import zstandard

JSON, MSGPACK = 1, 2
COMPRESSED = 0x80
SERIALIZERS = {"json": JSON, "msgpack": MSGPACK}
# Level 3 (zstd's default) compresses JSON records 5-10x at several hundred MB/s. python-zstandard's
# (de)compressor objects must not be used by two threads at once (that crashes the interpreter), so
# each thread has its own.
_ZSTD_LEVEL = 3
_per_thread = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    compressor = getattr(_per_thread, "compressor", None)
    if compressor is None:
        compressor = _per_thread.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_per_thread, "decompressor", None)
    if decompressor is None:
        decompressor = _per_thread.decompressor = zstandard.ZstdDecompressor()
    return decompressor


# A decompressed entry larger than this is refused as corrupt (a zstd bomb in a shared Redis).
MAX_DECODED_BYTES = 256 * 1024 * 1024


class CorruptEntry(Exception):
    """Stored bytes that do not decode: a miss, never a crash."""


def encode(value: Any, serializer: str = "json", compress_over_bytes: int | None = 1024) -> bytes:
    return encode_sized(value, serializer, compress_over_bytes)[0]


def encode_sized(
    value: Any, serializer: str = "json", compress_over_bytes: int | None = 1024
) -> tuple[bytes, int]:
    """(the entry's bytes, the encoded value's size before compression)."""
    kind = SERIALIZERS[serializer]
    try:
        payload = orjson.dumps(value) if kind == JSON else msgpack.packb(value, use_bin_type=True)
    except (TypeError, orjson.JSONEncodeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"the cache stores {serializer} values only: cannot encode {type(value).__name__} ({exc})"
        ) from None
    if compress_over_bytes is not None and len(payload) > compress_over_bytes:
        compressed = _compressor().compress(payload)
        if len(compressed) < len(payload):
            return bytes([kind | COMPRESSED]) + compressed, len(payload) + 1
    return bytes([kind]) + payload, len(payload) + 1


def decode(data: bytes) -> Any:
    if not data:
        raise CorruptEntry("empty entry")
    header, payload = data[0], data[1:]
    kind = header & ~COMPRESSED
    try:
        if header & COMPRESSED:
            payload = _decompressor().decompress(payload, max_output_size=MAX_DECODED_BYTES)
        if kind == JSON:
            return orjson.loads(payload)
        if kind == MSGPACK:
            return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (zstandard.ZstdError, orjson.JSONDecodeError, ValueError, msgpack.UnpackException) as exc:
        raise CorruptEntry(f"undecodable entry: {exc}") from None
    raise CorruptEntry(f"unknown entry header {header:#x}")


def is_compressed(data: bytes) -> bool:
    return bool(data) and bool(data[0] & COMPRESSED)
