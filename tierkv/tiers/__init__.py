"""Storage tiers: each a pool of fixed-size slots behind the `Tier` interface."""

from .base import Tier
from .memory import MemoryTier

__all__ = ["MemoryTier", "Tier"]
