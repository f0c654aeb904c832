"""The disk tier's lifecycle: open a store directory, recover its blocks, commit, close.

The store decides what moves; this module makes what lands on disk survive a crash: data
first, made durable per the durability setting, then the manifest entry in one LMDB commit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import StoreConfig
from ...errors import TierKVError
from ...index import Block, Index
from ...layout import KVLayout
from .manifest import DirectoryLock, Manifest, Record
from ...namespace import Namespace
from .tier import DiskTier, slot_stride


def prepare_directory(path: str) -> Path:
    """The disk tier's directory, created if only its last component is missing."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise TierKVError(f"disk_path {p} is a file, not a directory; point disk_path at a directory")
    if not p.exists():
        if not p.parent.is_dir():
            raise TierKVError(f"disk_path {p} does not exist, nor does its parent {p.parent}; create it first")
        try:
            p.mkdir()
        except OSError as e:
            raise TierKVError(f"disk_path {p} cannot be created: {e.strerror}") from None
    if not os.access(p, os.R_OK | os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise TierKVError(f"disk_path {p}: permission denied (the store needs read and write access)")
    return p


@dataclass
class Recovery:
    """What a warm start found in the manifest."""

    blocks: int = 0
    dropped: int = 0  # entries that could not be trusted: orphans, bad slots, duplicates


class DiskPersistence:
    """Owns the disk tier, its manifest and the directory lock of one open store."""

    def __init__(self, config: StoreConfig, layout: KVLayout, namespace: Namespace) -> None:
        assert config.disk_path is not None
        self.directory = prepare_directory(config.disk_path)
        self.durability = config.durability
        self._recovered_tick = 0
        self._in_flight: dict[int, tuple[int, Block]] = {}  # slot -> (write generation, block)
        self._lock = DirectoryLock(self.directory)
        try:
            self.manifest = Manifest(self.directory, durable=config.durability != "none")
            identity = {
                "layout": layout.to_dict(),
                "namespace": {k: v for k, v in namespace.to_dict().items() if k != "tenant"},
                "block_bytes": layout.block_bytes,
            }
            self.manifest.check_identity(identity)
            num_slots = config.disk_bytes // slot_stride(layout.block_bytes)
            self.tier = DiskTier(self.directory, num_slots, layout.block_bytes, io_threads=config.io_threads,
                                 io=config.disk_io, writeback_bytes=config.writeback_bytes,
                                 sync_writes=config.durability != "none")
        except BaseException:
            if hasattr(self, "manifest"):
                self.manifest.close()
            self._lock.release()
            raise

    def recover(self, index: Index, tier: int) -> Recovery:
        """Rebuild the index entries of every trustworthy manifest record, parents first.

        A record is dropped if its parent is missing, its slot is out of range (disk_bytes
        shrank) or already taken, or its parent chain loops: none of them can be served.
        """
        records = self.manifest.load()
        num_slots = self.tier.num_slots
        accepted: dict[bytes, bool] = {}  # key -> kept (True) or dropped (False)
        used: set[int] = set()
        order: list[tuple[bytes, bytes, bool, int, int, int]] = []
        dropped: list[bytes] = []
        for key in records:
            # Walk up to a settled ancestor (or a root), then settle the chain top-down.
            chain: list[bytes] = []
            on_chain: set[bytes] = set()
            cur = key
            ok = True
            while cur not in accepted:
                record = records.get(cur)
                if record is None or cur in on_chain:  # missing parent, or a loop
                    ok = False
                    break
                chain.append(cur)
                on_chain.add(cur)
                if record[3]:  # is_root
                    break
                cur = record[4][:16]
            else:
                ok = accepted[cur]
            for k in reversed(chain):
                slot, checksum, last_use, is_root, ident = records[k]
                ok = ok and 0 <= slot < num_slots and slot not in used
                accepted[k] = ok
                if ok:
                    used.add(slot)
                    order.append((k, ident, bool(is_root), slot, last_use, checksum))
                else:
                    dropped.append(k)
        self._recovered_tick = max((e[4] for e in order), default=0)
        index.restore(tier, order)
        self.tier.take(used)
        self.manifest.commit([], dropped)
        return Recovery(blocks=len(order), dropped=len(dropped))

    def write_behind(self, slots: list[int], rows: torch.Tensor, blocks: list[Block]) -> None:
        """Hand a batch to the write-back thread; its manifest entries wait for the write."""
        for slot, gen, block in zip(slots, self.tier.write_behind(slots, rows), blocks):
            self._in_flight[slot] = (gen, block)

    def commit(self, index: Index, tier: int) -> list[Block]:
        """Record in the manifest what reached disk since the last commit, and what left it.

        Entries of blocks still in the write-back queue wait until their write completes, so
        the manifest never names bytes that are not on disk. Returns blocks whose write-back
        failed: the store drops those disk copies.
        """
        completed, failed = self.tier.queue.take_results()
        for slot, gen in completed:
            entry = self._in_flight.get(slot)
            if entry is not None and entry[0] == gen:
                del self._in_flight[slot]
                index.dirty[entry[1].key] = entry[1]
        lost = []
        for slot, gen, _error in failed:
            entry = self._in_flight.get(slot)
            if entry is not None and entry[0] == gen:
                del self._in_flight[slot]
                if entry[1].slots[tier] == slot:
                    lost.append(entry[1])
        if not index.dirty:
            return lost
        puts: list[Record] = []
        deletes: list[bytes] = []
        for key, b in index.dirty.items():
            slot = b.slots[tier]
            if slot >= 0 and index.blocks.get(key) is b:
                if slot in self._in_flight:
                    continue  # committed when its write completes
                assert b.checksum is not None, "a block reached disk without a checksum"
                puts.append(Record(key, slot, b.checksum, b.last_use, b.parent is None, b.ident))
            else:
                deletes.append(key)
        index.dirty.clear()
        if self.durability != "none":
            self.tier.sync()
        self.manifest.commit(puts, deletes)
        return lost

    def commit_written(self, block: Block, slot: int) -> None:
        """durability="every": make one block durable and record it before the next is written."""
        assert block.checksum is not None
        self.tier.sync()
        self.manifest.commit([Record(block.key, slot, block.checksum, block.last_use, block.parent is None, block.ident)], [])

    def save_recency(self, index: Index, tier: int) -> None:
        """Write the last use of disk blocks touched since open, so a restart evicts in our order."""
        since = self._recovered_tick
        index.dirty.update((b.key, b) for b in index.blocks.values() if b.slots[tier] >= 0 and b.last_use > since)
        if self.commit(index, tier):
            raise AssertionError("write-back results must be drained before the recency save")

    def close(self) -> None:
        self.tier.close()
        self.manifest.close()
        self._lock.release()
