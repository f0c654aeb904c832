"""The disk tier: data files, an LMDB manifest, recovery at open and a write-behind queue."""

from .tier import DiskTier, kvikio_status, slot_stride

__all__ = ["DiskTier", "kvikio_status", "slot_stride"]
