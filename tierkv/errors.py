"""Exceptions tierkv raises on purpose, so callers can tell them from bugs."""

from __future__ import annotations


class TierKVError(Exception):
    """Base of every error tierkv raises deliberately."""


class CapacityError(TierKVError):
    """The store cannot make room: every block that could move is leased or the data is too big.

    Raised before anything is written, so a failed `put` leaves the store as it was.
    """


class LayoutMismatchError(TierKVError, ValueError):
    """A tensor, a store directory or a peer disagrees with the store's layout or namespace."""


class ConfigError(TierKVError, ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


class StorageError(TierKVError):
    """A file system or device under a tier failed: it is full, it returned an I/O error, or a file is damaged.

    The message names the path and what to do. The store itself never lets one escape a
    `put` or `get`: a failed read drops the copy, a failed write drops the block, a failed
    manifest commit stays pending and is retried; it is raised where nothing else can be done
    (a data file that cannot be created at open).
    """


class GraphCaptureError(TierKVError):
    """A decode step could not be captured as a CUDA graph; the message says how to run it eagerly."""
