"""The remote tier: KV blocks in a Redis Cluster that a fleet of stores shares, below each one's disk.

One machine's memory and disk hold one node's prefixes; behind a load balancer every node would
compute the same system prompts again, and a node that starts is cold. With this tier a prefix
one node computed is a hit on every other node.

Its slots are virtual: the tier hands out ints like any other and remembers which block each
one stands for, so the index, eviction and promotion treat it like any tier. Capacity is
`remote_bytes` worth of index entries, not the cluster's memory, and forgetting is all that
eviction here does: the store never deletes a block other nodes may be reading (the cluster's
own maxmemory policy and `remote_ttl_s` bound what it holds). What others wrote, the index
learns where a chain stops short (`probe`: the headers of the next blocks, one batched round
trip; `adopt`), with the payload checksum each header promises, against which the store verifies
the bytes when it reads them.

Every value is checked against what was asked (`record.py`) and anything else is a miss,
counted. Every network fault is a miss or a skipped write, counted and logged at a limited rate
(`faults.py`), never an exception (`client.py`); writes go out asynchronously (`writer.py`), and
a write that did not land is forgotten from the index by the tier's agent after the operation.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ...errors import TierKVError
from ...integrity import checksum_blocks
from ...remote_url import parse_remote_url
from ..base import StoreAccess, Tier, TierAgent, TierRead, need_checksums, stamp_checksums
from .client import Fault, RemoteClient, load_redis
from .faults import FaultLog
from .record import Problem, RecordFormat, record_key
from .rows import AREAS
from .wire import Filled, Request
from .writer import PendingWrite, WriteBehind

if TYPE_CHECKING:
    from ...config import StoreConfig
    from ...index import Block
    from ...layout import KVLayout
    from ...namespace import Namespace

PROBE_WINDOW = 256  # keys in the first probe round; each further round (all found so far) doubles
READ_BATCH_BYTES = 128 << 20  # replies asked for in one round trip at most (the servers buffer them)
SUBMIT_BYTES = 8 << 20  # a write is staged and queued in parts this large, so sending overlaps staging


@dataclass
class Traffic:
    """One direction's totals, for stats() and Prometheus: operations, blocks, bytes, seconds."""

    ops: int = 0
    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0

    def add(self, blocks: int, nbytes: int, seconds: float) -> None:
        self.ops += 1
        self.blocks += blocks
        self.bytes += nbytes
        self.seconds += seconds
        self.max_seconds = max(self.max_seconds, seconds)

    def describe(self, name: str) -> dict[str, float]:
        return {f"{name}_total": self.ops, f"{name}_blocks_total": self.blocks, f"{name}_bytes_total": self.bytes,
                f"{name}_seconds_total": round(self.seconds, 6), f"{name}_max_seconds": round(self.max_seconds, 6)}


class RemoteTier(Tier):
    """Blocks as records in Redis (cluster or single server), shared with every store on the same servers."""

    shared = True
    section = "remote"

    def __init__(self, config: StoreConfig, layout: KVLayout, namespace: Namespace) -> None:
        assert config.remote_url is not None
        load_redis()  # a missing client library is a configuration error, raised now
        super().__init__("remote", 0, layout.block_bytes)
        self.verify_reads = config.verify_reads  # off: reads unchecked; records still carry a checksum for other stores
        self.num_slots = config.remote_bytes // layout.block_bytes  # virtual: handed out as they are needed
        self._next_slot = 0
        self._blocks: dict[int, Block] = {}  # slot -> the block it stands for
        self.target = parse_remote_url(config.remote_url).with_environment()
        self.format = RecordFormat.for_store(namespace, layout)
        self.read_only = config.remote_read_only
        self.takes_writes = not self.read_only
        self.write_through = config.remote_write == "through" and not self.read_only
        self.write_mode = "read-only" if self.read_only else config.remote_write
        self.ttl_s = config.remote_ttl_s
        self._set_options: tuple[bytes, ...] = () if config.remote_ttl_s is None else (
            b"PX", b"%d" % max(1, round(config.remote_ttl_s * 1000)))
        # With a TTL, a read starts a block's lifetime again (GETEX), so hot blocks outlive cold ones;
        # a read-only node (whose ACL may allow reads only) leaves lifetimes to the writers.
        self._get = (b"GETEX", self._set_options) if self._set_options and not self.read_only else (b"GET", ())
        self.timeout_s = config.remote_timeout_s
        self.faults = FaultLog()
        self.problems: Counter[str] = Counter()  # values read that were not the block asked for, by Problem
        self.lost: Counter[str] = Counter()  # writes that did not land, by reason
        self.probes, self.reads, self.writes = Traffic(), Traffic(), Traffic()
        self.probe_found = 0
        self.client = RemoteClient(self.target, config.remote_timeout_s, self.faults)
        self.writer = WriteBehind(self._send, self.format.value_bytes, limit_bytes=config.writeback_bytes,
                                  max_wait_s=config.remote_timeout_s)
        self.client.connect()  # early, so a wrong address or password is logged at start; never fatal

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    # -- virtual slots -----------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free) + self.num_slots - self._next_slot

    @property
    def used_slots(self) -> int:
        return self.num_slots - self.free_slots

    def allocate(self, n: int) -> list[int]:
        n = min(n, self.free_slots)
        if n <= 0:
            return []
        reused = min(n, len(self._free))
        taken = self._free[len(self._free) - reused :]
        del self._free[len(self._free) - reused :]
        taken.extend(range(self._next_slot, self._next_slot + n - reused))
        self._next_slot += n - reused
        return taken

    def free(self, slots: Sequence[int]) -> None:
        """Forget the blocks of `slots`; their records stay in the cluster, for the nodes that read them."""
        for s in slots:
            self._blocks.pop(s, None)
        self._free.extend(slots)

    # -- lookups -----------------------------------------------------------------------

    def probe(self, keys: Sequence[bytes], idents: Sequence[bytes]) -> list[int]:
        """Checksums from the headers of the leading blocks of the chain held here (GETRANGE + STRLEN per key).

        The first round asks `PROBE_WINDOW` keys, one batch over all shards; only a chain found whole
        so far is asked further, in rounds twice as long, so a cold prompt costs one small round trip.
        """
        if not keys or not self.client.available:
            return []
        start = time.perf_counter()
        head = self.format.header_bytes
        sums: list[int] = []
        window, pos, asked = PROBE_WINDOW, 0, 0
        while pos < len(keys):
            part = range(pos, min(len(keys), pos + window))
            requests = []
            for i in part:
                rk = record_key(keys[i])
                requests += [Request((b"GETRANGE", rk, b"0", b"%d" % (head - 1))), Request((b"STRLEN", rk))]
            replies = self.client.execute(requests)
            asked += len(part)
            for j, i in enumerate(part):
                checksum = self._probed(replies[2 * j], replies[2 * j + 1], keys[i], idents[i])
                if checksum is None:
                    break
                sums.append(checksum)
            else:
                pos, window = pos + len(part), window * 2
                continue
            break
        self.probes.add(asked, 0, time.perf_counter() - start)
        self.probe_found += len(sums)
        return sums

    def _probed(self, head: Any, length: Any, key: bytes, ident: bytes) -> int | None:
        """The checksum a probed header promises, or None (counted) when the chain ends at this key."""
        for reply in (head, length):
            if isinstance(reply, Fault):
                self.faults.note(reply.kind, reply.detail)
                return None
        if not length:
            return None  # not stored: the ordinary end of a chain
        found = self.format.read_header(head, key, ident) if length == self.format.value_bytes else Problem.TORN
        if isinstance(found, Problem):
            self.problems[found.value] += 1
            self.faults.note(f"value_{found.value}", f"probe of {key.hex()}")
            return None
        return found

    def adopt(self, slots: Sequence[int], blocks: Sequence[Block]) -> None:
        for slot, block in zip(slots, blocks):
            self._blocks[slot] = block

    # -- reads ------------------------------------------------------------------------

    def read_some(self, slots: Sequence[int]) -> TierRead:
        """Payloads of the slots' records; a fault, or a value that is not the block indexed, is an unreadable row.

        Records still queued for writing come from the queue; the rest are GETs, one batch per
        `READ_BATCH_BYTES`, one pipeline per shard.
        """
        out = AREAS.rows(len(slots), self.slot_bytes)
        return TierRead(out, self.read_into(slots, out))

    def read_into(self, slots: Sequence[int], out: torch.Tensor) -> tuple[int, ...]:
        """Read the slots' payloads into the rows of `out` (CPU uint8); returns the positions that failed.

        Each value is received straight into a header buffer and its row (no intermediate copy).
        """
        rows = out.numpy()
        head = self.format.header_bytes
        blocks = [self._block(s) for s in slots]
        unreadable: list[int] = []
        wanted: list[int] = []
        for i, block in enumerate(blocks):
            if not self.writer.copy_queued(record_key(block.key), head, rows[i]):
                wanted.append(i)
        per_batch = max(1, READ_BATCH_BYTES // self.format.value_bytes)
        for lo in range(0, len(wanted), per_batch):
            part = wanted[lo : lo + per_batch]
            start = time.perf_counter()
            heads = [memoryview(bytearray(head)) for _ in part]
            command, options = self._get
            requests = [Request((command, record_key(blocks[i].key), *options), (h, memoryview(rows[i])))
                        for i, h in zip(part, heads)]
            replies = self.client.execute(requests) if self.client.available \
                else [Fault("unreachable", self.target.redacted())] * len(part)
            got = 0
            for i, h, reply in zip(part, heads, replies):
                problem = self._check_read(reply, h, blocks[i])
                if problem is None:
                    got += 1
                else:
                    unreadable.append(i)
            self.reads.add(got, got * self.slot_bytes, time.perf_counter() - start)
        return tuple(sorted(unreadable))

    def _check_read(self, reply: Any, head: memoryview, block: Block) -> str | None:
        """None when `reply` filled the row with `block`'s record, else why not (counted)."""
        if isinstance(reply, Fault):
            self.faults.note(reply.kind, reply.detail)
            return reply.kind
        if reply is None:
            problem: Problem | None = Problem.MISSING
        elif not isinstance(reply, Filled) or not reply.fits:
            problem = Problem.TORN
        else:
            found = self.format.read_header(head, block.key, block.ident)
            problem = found if isinstance(found, Problem) else (
                Problem.REPLACED if block.checksum is not None and found != block.checksum else None)
        if problem is None:
            return None
        self.problems[problem.value] += 1
        if problem is not Problem.MISSING:
            self.faults.note(f"value_{problem.value}", f"read of {block.key.hex()}")
        return problem.value

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        result = self.read_some(slots)
        if result.unreadable:
            raise TierKVError(f"remote tier: {len(result.unreadable)} of {len(slots)} blocks could not be read "
                              f"from {self.target.redacted()} (see stats()['remote'])")
        return result.rows

    def _block(self, slot: int) -> Block:
        block = self._blocks.get(slot)
        if block is None:
            raise TierKVError(f"remote tier: slot {slot} holds no block (a slot read before it was written or adopted)")
        return block

    # -- writes -----------------------------------------------------------------------

    def write(self, slots: Sequence[int], rows: torch.Tensor, blocks: Sequence[Block]) -> None:
        """Queue one record per block (header + payload, one SET each); never waits for the network."""
        if self.read_only:
            raise TierKVError("remote tier: remote_read_only is set, so nothing may be written to it")
        if not len(slots):
            return
        if rows.shape != (len(slots), self.slot_bytes) or rows.dtype != torch.uint8:
            raise ValueError(f"remote tier: write needs uint8 rows of shape {(len(slots), self.slot_bytes)}, "
                             f"got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.to("cpu").contiguous()
        head = self.format.header_bytes
        step = max(1, SUBMIT_BYTES // self.format.value_bytes)
        for lo in range(0, len(slots), step):  # staged and queued a part at a time: the sending starts at once
            part = rows[lo : lo + step]
            part_blocks = blocks[lo : lo + step]
            if need_checksums(part_blocks):
                stamp_checksums(part_blocks, checksum_blocks(part))
            writes = []
            for slot, block, row in zip(slots[lo : lo + step], part_blocks, part.numpy()):
                assert block.checksum is not None
                self._blocks[slot] = block
                value = self.writer.buffer()
                value[:head] = np.frombuffer(self.format.header(block.key, block.ident, block.checksum), dtype=np.uint8)
                value[head:] = row
                writes.append(PendingWrite(record_key(block.key), value, block, slot))
            self.writer.submit(writes)

    def _send(self, batch: Sequence[PendingWrite]) -> list[str | None]:
        """The writer thread's batch: one SET per record, one pipeline per shard."""
        start = time.perf_counter()
        replies = self.client.execute([Request((b"SET", w.key, w.value.data, *self._set_options)) for w in batch])
        out: list[str | None] = []
        stored = 0
        for reply in replies:
            if isinstance(reply, Fault):
                self.faults.note(reply.kind, reply.detail)
                out.append(reply.kind)
            else:
                out.append(None)
                stored += 1
        self.writes.add(stored, stored * self.format.value_bytes, time.perf_counter() - start)
        return out

    def take_lost(self) -> list[PendingWrite]:
        """Writes that did not land since the last call (counted by reason)."""
        lost = self.writer.take_lost()
        for w in lost:
            self.lost[w.reason] += 1
        return lost

    # -- lifecycle -----------------------------------------------------------------------

    def agent(self, store: StoreAccess) -> TierAgent:
        return _ForgetLostWrites(self, store)

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.target.redacted(),
            "mode": self.client.mode,
            "write": self.write_mode,
            "ttl_s": self.ttl_s,
            "breakers": self.client.breaker_states(),
            "write_queue_bytes": self.writer.queued_bytes,
            **self.probes.describe("probes"),
            "probe_found_blocks_total": self.probe_found,
            **self.reads.describe("reads"),
            **self.writes.describe("writes"),
            "bad_values_total": dict(self.problems),
            "lost_writes_total": dict(self.lost),
            "faults_total": dict(self.faults.counts),
        }

    def close(self) -> None:
        """Send what is queued (waiting a few timeouts at most: a dead cluster must not hang a close), then disconnect."""
        try:
            self.writer.close(timeout=max(5.0, 4 * self.timeout_s))
        finally:
            self.client.close()


class _ForgetLostWrites(TierAgent):
    """After each store operation: forget remote copies whose write did not land, so the index does not promise them."""

    def __init__(self, tier: RemoteTier, store: StoreAccess) -> None:
        self.tier = tier
        self.store = store

    def after_operation(self) -> None:
        t, index = self.store.position, self.store.placement.index
        for w in self.tier.take_lost():
            if w.block.slots[t] == w.slot and index.blocks.get(w.block.key) is w.block:
                self.store.placement.discard_copy(w.block, t)
