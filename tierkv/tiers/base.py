"""The one interface every tier offers, so the store moves blocks without caring where they live.

A tier is a pool of fixed-size slots, one block each. It knows nothing about recency or other
tiers: the index decides what lives where, the placement policy decides what moves, the tier
keeps bytes. What differs between kinds of memory is said by capabilities, never by the store
asking which class a tier is:

- `verify_reads`: blocks read from the tier are checked against their checksums (the device
  tier's bytes never left the GPU, so it says no; `StoreConfig.verify_reads=False` says no for
  every tier). A verifying tier gives every block it takes in a checksum if it has none yet
  (`write`, `copy_to`, `save_from_engine`); tiers that keep a checksum in their own records
  (disk manifest, remote values) compute one on every write even when they do not verify, so a
  store opened later with verification on can check what an unverified one wrote.
- `hashes_in_place`: `checksums` reads no rows out (memory), so a block can be verified where it lies.
- `read_to`: slots as rows on a GPU in one copy, so that a block bound for an engine's GPU pages is
  verified there (`TREE_CHECKSUM` on the GPU) before it is scattered.
- `copy_to`: a direct slot-to-slot copy into another tier, when both sides allow it.
- `save_from_engine` / `load_into_engine`: the engine's pages to slots and back, straight where
  the tier's memory is addressable by the copy kernels, through a temporary otherwise.
- `persistent`: the tier keeps blocks across a restart; the store journals its slot changes,
  asks it to `recover` at open and to `commit` after every operation.
- `agent`: a tier that must act on the store's behalf between operations (the elastic tier
  giving memory back to a shared GPU budget) returns an agent that the store calls.
- `shared`: the tier holds blocks that other stores wrote (a remote tier shared by a fleet), which
  this store's index cannot know of. Where the index stops short on a chain, the store asks the
  tier how far the chain goes there (`probe`, one batched round trip) and indexes what it found
  with slots of that tier (`adopt`).
- `read_some`: a read that may fail for some rows without failing the rest (a value that a shared
  tier lost, or that someone else overwrote): the store treats those rows as blocks that failed
  verification, never serves them, and reads on with a shorter prefix.
- `takes_writes`: the store may place, demote and write blocks here (a read-only shared tier
  says no: the tier above it then deletes its victims, as a last tier does).
- `write_through`: every new block is copied here as soon as it is stored, whatever tier it went
  to (so other stores sharing the tier see it at once), not only when it is demoted.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TierKVError
from ..ops.checksum import block_checksums

if TYPE_CHECKING:
    from ..index import Block, Index
    from ..layout import KVLayout
    from ..ops.engine_layout import EngineKV
    from ..ops.layer_copy import LayerCopy
    from ..placement import Placement


@dataclass
class Recovery:
    """What a persistent tier found when the store opened."""

    blocks: int = 0
    dropped: int = 0  # entries that could not be trusted: orphans, bad slots, duplicates


@dataclass(frozen=True)
class TierRead:
    """Rows read from a tier, and the positions among them that could not be read (their rows are junk)."""

    rows: torch.Tensor
    unreadable: tuple[int, ...] = ()


@dataclass(frozen=True)
class StoreAccess:
    """What a tier's agent may use of the store: its placement policy, its lock, and `locked()`.

    `locked` runs one operation the way a public call does (lock held, changes committed after).
    """

    placement: Placement
    lock: threading.RLock
    locked: Callable[[], AbstractContextManager[None]]
    position: int  # the tier's place in the hierarchy, fastest first
    is_closed: Callable[[], bool]


class TierAgent:
    """Work a tier does for the store between operations; every hook defaults to nothing."""

    def before_operation(self) -> None:
        """Called with the store lock held, before each public operation."""

    def after_operation(self) -> None:
        """Called with the store lock held, after each public operation."""

    def shrink(self, target_bytes: int) -> int:
        raise TierKVError("this tier cannot shrink")

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Called once when the store closes, before the tiers close."""


class Tier(ABC):
    """A slot pool on one kind of memory. Slots are ints in `[0, num_slots)`."""

    verify_reads = True
    hashes_in_place = False  # `checksums` hashes the slots where they lie (memory), not rows read out
    persistent = False
    shared = False  # holds blocks other stores wrote: asked (`probe`) where the index stops short
    takes_writes = True  # the store may place, demote and write blocks here
    write_through = False  # every new block is copied here as it is stored, not only when demoted
    section: str | None = None  # the key under which `stats()` shows `describe()`, if any

    def __init__(self, name: str, num_slots: int, slot_bytes: int) -> None:
        if num_slots < 0:
            raise ValueError(f"{name} tier: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        # Highest slots last so that pop() hands out low slots first: keeps memory dense.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    # -- slots ---------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Up to `n` free slots (fewer when the pool runs out); never evicts."""
        n = min(n, len(self._free))
        if n <= 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        taken.reverse()
        return taken

    def free(self, slots: Sequence[int]) -> None:
        self._free.extend(slots)

    # -- bytes ---------------------------------------------------------------------

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where `read` returns its rows."""

    @abstractmethod
    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """Gather slots into a new `[len(slots), slot_bytes]` uint8 tensor on `self.device`."""

    @abstractmethod
    def write(self, slots: Sequence[int], rows: torch.Tensor, blocks: Sequence[Block]) -> None:
        """Store the payloads `rows` (`[len(slots), slot_bytes]` uint8, any device) of `blocks` in `slots`."""

    def read_some(self, slots: Sequence[int]) -> TierRead:
        """`read`, except that a tier whose rows can fail one by one reports those instead of raising."""
        return TierRead(self.read(slots))

    def read_to(self, slots: Sequence[int], device: torch.device) -> TierRead:
        """`read_some` with the rows on `device`: how a read bound for a GPU is verified there, after its one copy."""
        got = self.read_some(slots)
        return TierRead(got.rows.to(device), got.unreadable)

    def checksums(self, slots: Sequence[int]) -> list[int]:
        """The checksum of each slot's bytes as they are now (`TREE_CHECKSUM`); tiers that can hash in place override."""
        return block_checksums(self.read(slots))

    def copy_to(self, slots: Sequence[int], other: Tier, other_slots: Sequence[int], blocks: Sequence[Block]) -> bool:
        """Copy our slots into `other`'s directly; False when there is no direct path (the store reads and writes)."""
        return False

    def save_from_engine(self, slots: Sequence[int], engine: EngineKV, engine_slots: torch.Tensor, layout: KVLayout,
                         blocks: Sequence[Block]) -> None:
        """Copy the engine tokens `engine_slots` (from `chunk_slots`) into `slots`, one block each."""
        from ..ops.transfer import gather_engine_blocks

        rows = torch.empty((len(slots), self.slot_bytes), dtype=torch.uint8, device=engine.device)
        gather_engine_blocks(engine, engine_slots, rows, layout)
        self.write(slots, rows, blocks)

    def load_into_engine(self, slots: Sequence[int], engine: EngineKV, engine_slots: torch.Tensor,
                         layout: KVLayout, rows: torch.Tensor | None = None) -> None:
        """Copy `slots` (or `rows` already read from them) into the engine tokens `engine_slots`.

        GPU copies are ordered on the engine device's current stream.
        """
        from ..ops.transfer import scatter_engine_blocks

        scatter_engine_blocks(engine, engine_slots, self.read(slots) if rows is None else rows, layout)

    def load_layers_into_engine(self, slots: Sequence[int], engine: EngineKV, engine_slots: torch.Tensor,
                                layout: KVLayout, expected: Sequence[int | None], path: str) -> LayerCopy | None:
        """Queue a layer-by-layer copy of `slots` into the engine's GPU pages, verified against `expected` on the
        GPU (`tierkv.ops.layer_copy`), or None when this tier cannot (the caller then loads them whole)."""
        return None

    # -- shared tiers --------------------------------------------------------------

    def probe(self, keys: Sequence[bytes], idents: Sequence[bytes]) -> list[int]:
        """The checksums of the leading blocks of a chain (`keys` with their `idents`) that this tier
        holds though the index does not know them, in chain order: as many as it holds. Shared tiers
        only; a fault is a shorter answer, never an error."""
        return []

    def adopt(self, slots: Sequence[int], blocks: Sequence[Block]) -> None:
        """Blocks that `probe` found are now indexed with `slots` of this tier: remember which is where."""
        raise TierKVError(f"{self.name} tier: only a shared tier adopts blocks it did not write")

    # -- lifecycle -----------------------------------------------------------------

    def recover(self, index: Index, position: int) -> Recovery:
        """A persistent tier rebuilds the index entries of the blocks it kept; others have none."""
        return Recovery()

    def commit(self, index: Index, position: int) -> list[Block]:
        """Make the journaled slot changes durable; returns blocks whose copy here was lost (write failed)."""
        return []

    def flush(self, index: Index, position: int) -> None:
        """Before a clean close: finish queued writes and journal what the final commit must record."""

    def agent(self, store: StoreAccess) -> TierAgent | None:
        """The agent acting for this tier between operations, if it needs one."""
        return None

    def describe(self) -> dict[str, Any]:
        """Tier-specific facts for `stats()[self.section]`."""
        return {}

    def close(self) -> None:
        """Release the tier's memory; the default has nothing to release."""


def stamp_checksums(blocks: Sequence[Block], sums: Sequence[int]) -> None:
    """Give blocks that have no checksum yet the one of the bytes just stored."""
    for b, s in zip(blocks, sums):
        if b.checksum is None:
            b.checksum = s


def need_checksums(blocks: Sequence[Block]) -> bool:
    return any(b.checksum is None for b in blocks)
