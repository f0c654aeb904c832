"""tierkv: a tiered KV-cache store for LLM inference.

KV blocks live in GPU memory, pinned host memory (and, later, NVMe), are found by a chained
hash of the token prefix they encode, and move between tiers by prefix-aware LRU.
"""

from .config import StoreConfig
from .errors import CapacityError, ConfigError, LayoutMismatchError, TierKVError
from .keys import chain_keys
from .layout import KVLayout
from .namespace import Namespace
from .store import BlockStore, Lease

__all__ = [
    "BlockStore",
    "CapacityError",
    "ConfigError",
    "KVLayout",
    "LayoutMismatchError",
    "Lease",
    "Namespace",
    "StoreConfig",
    "TierKVError",
    "chain_keys",
]

__version__ = "0.1.0"
