"""tierkv: a tiered KV-cache store for LLM inference.

KV blocks live in GPU memory, pinned host memory and NVMe, are found by a chained hash of the
token prefix they encode, and move between tiers by prefix-aware LRU. This module is the public
API: engines and users import only the names listed in `__all__`.
"""

from .config import StoreConfig, parse_bool, parse_bytes, parse_float, parse_int
from .errors import CapacityError, ConfigError, LayoutMismatchError, TierKVError
from .keys import KeyChain, chain_keys
from .layout import KVLayout, dtype_name
from .namespace import Namespace
from .ops.engine_layout import DimOrder, EngineKV, EngineKVLayout
from .store import BlockStore, Lease

__all__ = [
    "BlockStore",
    "CapacityError",
    "ConfigError",
    "DimOrder",
    "EngineKV",
    "EngineKVLayout",
    "KVLayout",
    "KeyChain",
    "LayoutMismatchError",
    "Lease",
    "Namespace",
    "StoreConfig",
    "TierKVError",
    "chain_keys",
    "dtype_name",
    "parse_bool",
    "parse_bytes",
    "parse_float",
    "parse_int",
]

__version__ = "0.1.0"
