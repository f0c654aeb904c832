"""One Redis value per block: a header that says exactly which block it is, then the payload.

A block is written with a single SET, so a reader sees the whole old value or the whole new one,
never half of each (LMCache's Redis path writes two keys per chunk and cannot promise that). The
key is `tierkv:` and the block key in hex, with no hash tag, so blocks spread over every shard.

The header (little-endian) is what a reader checks before it trusts a value:

    magic "TKVR" | format version u16 | ident length u16 | namespace digest 16 B | layout digest 16 B
    | block key 16 B | payload checksum u64 (TREE_CHECKSUM) | payload length u64 | ident (parent key + token ids)

The namespace digest is that of the store's namespace without its tenant (model, weights, tensor
shard, adapter, layout): the tenant salts the key chain itself, and the ident ties each block to
its parent's key, so a block of another tenant can never match the key and ident asked for. Any
difference from what the reader asked for, a length that is not the header plus the payload, or
a payload that fails its checksum, makes the value a miss: counted, never served.

The payload checksum is the one every tier uses (`tierkv.integrity.TREE_CHECKSUM`), so a block
read from Redis is verified like any other, on the GPU when it is bound for one. Format 1 carried
whole-block xxh3_64 checksums: its values are foreign to today's readers (a counted miss, written
again by the store that recomputes them), never an error.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum

import xxhash

from ...layout import KVLayout
from ...namespace import Namespace

MAGIC = b"TKVR"
FORMAT_VERSION = 2  # 2: TREE_CHECKSUM payload checksums; 1: whole-block xxh3_64 (foreign now)
KEY_PREFIX = b"tierkv:"
_FIXED = struct.Struct("<4sHH16s16s16sQQ")


class Problem(str, Enum):
    """Why a value is not the block asked for (the names of the tier's miss counters)."""

    MISSING = "missing"  # no such key (never written, expired, or evicted by the server)
    TORN = "torn"  # wrong length: truncated or appended to
    FOREIGN = "foreign"  # not a tierkv record of this namespace, layout, key and tokens
    REPLACED = "replaced"  # a valid record of the same block, but not the bytes this store indexed


def record_key(key: bytes) -> bytes:
    """The Redis key of a block key."""
    return KEY_PREFIX + key.hex().encode()


def layout_digest(layout: KVLayout) -> bytes:
    return xxhash.xxh3_128_digest(json.dumps(layout.to_dict(), sort_keys=True, separators=(",", ":")).encode())


@dataclass(frozen=True)
class RecordFormat:
    """The records of one store: its namespace and layout digests, and the sizes they imply."""

    namespace: bytes
    layout: bytes
    payload_bytes: int
    ident_bytes: int

    @classmethod
    def for_store(cls, namespace: Namespace, layout: KVLayout) -> RecordFormat:
        return cls(namespace.with_tenant("").digest(layout), layout_digest(layout), layout.block_bytes,
                   16 + 4 * layout.block_tokens)

    @property
    def header_bytes(self) -> int:
        return _FIXED.size + self.ident_bytes

    @property
    def value_bytes(self) -> int:
        return self.header_bytes + self.payload_bytes

    def header(self, key: bytes, ident: bytes, checksum: int) -> bytes:
        if len(ident) != self.ident_bytes:
            raise ValueError(f"remote record: ident of {len(ident)} bytes, the layout says {self.ident_bytes}")
        return _FIXED.pack(MAGIC, FORMAT_VERSION, len(ident), self.namespace, self.layout, key, checksum,
                           self.payload_bytes) + ident

    def read_header(self, head: bytes | memoryview, key: bytes, ident: bytes) -> int | Problem:
        """The payload checksum a header promises, or why it is not the header of block `key` with `ident`."""
        if len(head) < self.header_bytes:
            return Problem.MISSING if not len(head) else Problem.TORN
        magic, version, ident_len, namespace, layout, got_key, checksum, payload = _FIXED.unpack_from(head)
        if (magic != MAGIC or version != FORMAT_VERSION or ident_len != self.ident_bytes or namespace != self.namespace
                or layout != self.layout or got_key != key or payload != self.payload_bytes
                or head[_FIXED.size : self.header_bytes] != ident):
            return Problem.FOREIGN
        return int(checksum)

    def check_value(self, value: bytes | memoryview | None, key: bytes, ident: bytes, checksum: int | None) -> Problem | None:
        """None when `value` is block `key`'s record with the payload checksum `checksum` (if known)."""
        if not value:
            return Problem.MISSING
        if len(value) != self.value_bytes:
            return Problem.TORN
        found = self.read_header(value, key, ident)
        if isinstance(found, Problem):
            return found
        if checksum is not None and found != checksum:
            return Problem.REPLACED
        return None
