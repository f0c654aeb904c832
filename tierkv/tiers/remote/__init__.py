"""The remote tier: a Redis Cluster (or one Redis server) shared by a fleet of stores, below each one's disk."""

from .tier import RemoteTier

__all__ = ["RemoteTier"]
