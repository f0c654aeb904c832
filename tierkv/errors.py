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
