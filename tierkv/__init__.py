"""tierkv: a tiered KV-cache store for LLM inference.

KV blocks live in GPU memory, pinned host memory and NVMe, are found by a chained hash of the
token prefix they encode, and move between tiers by prefix-aware LRU. This module is the public
API: engines and users import only the names listed in `__all__`.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import StoreConfig, parse_bool, parse_bytes, parse_float, parse_int
    from .decode.budget import DecodeBudget
    from .decode.manager import PageManager, StepPlan
    from .errors import CapacityError, ConfigError, GraphCaptureError, LayoutMismatchError, StorageError, TierKVError
    from .keys import KeyChain, chain_keys
    from .layer_load import LayerLoad
    from .layout import KVLayout, dtype_name
    from .namespace import Namespace
    from .ops.engine_layout import DimOrder, EngineKV, EngineKVLayout
    from .store import BlockStore, Lease

# Names are imported on first use (PEP 562), so `import tierkv` (and the `tierkv` command's
# --help) does not pay for torch; `from tierkv import BlockStore` works as usual.
_HOME = {
    "StoreConfig": "config", "parse_bool": "config", "parse_bytes": "config", "parse_float": "config",
    "parse_int": "config", "CapacityError": "errors", "ConfigError": "errors", "GraphCaptureError": "errors",
    "LayoutMismatchError": "errors",
    "StorageError": "errors", "TierKVError": "errors", "KeyChain": "keys", "chain_keys": "keys", "KVLayout": "layout",
    "dtype_name": "layout",
    "Namespace": "namespace", "DimOrder": "ops.engine_layout", "EngineKV": "ops.engine_layout",
    "EngineKVLayout": "ops.engine_layout", "BlockStore": "store", "Lease": "store", "LayerLoad": "layer_load",
    "DecodeBudget": "decode.budget", "PageManager": "decode.manager", "StepPlan": "decode.manager",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'tierkv' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "BlockStore",
    "CapacityError",
    "ConfigError",
    "DecodeBudget",
    "DimOrder",
    "EngineKV",
    "EngineKVLayout",
    "GraphCaptureError",
    "KVLayout",
    "KeyChain",
    "LayerLoad",
    "LayoutMismatchError",
    "Lease",
    "Namespace",
    "PageManager",
    "StepPlan",
    "StorageError",
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
