"""The connector's settings: `kv_connector_extra_config` plus `TIERKV_*` variables, checked at start.

Every key of the extra config is either a `StoreConfig` field or one of `CONNECTOR_KEYS`; anything
else is refused with the list of known keys, so a typo fails the engine's start instead of being
ignored. `TIERKV_<FIELD>` variables override the store fields of the extra config (an operator can
move the disk tier without editing the serving command). The connector's own defaults differ
from a bare `BlockStore`'s in one place: `device_bytes` is 0, because vLLM's paged KV cache is the
GPU tier and a second GPU copy would only waste memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tierkv import ConfigError, StoreConfig, parse_bool, parse_int

CONNECTOR_KEYS = frozenset({"block_tokens", "model_fingerprint", "async_disk_loads", "async_saves", "max_pending_saves"})
STORE_KEYS = frozenset(f.name for f in fields(StoreConfig))
STORE_DEFAULTS: dict[str, Any] = {"device_bytes": 0}


@dataclass(frozen=True)
class ConnectorConfig:
    """What the connector was asked to do.

    store: capacities and placement of each worker's `BlockStore` (its disk tier gets one
        subdirectory per tensor-parallel rank under `disk_path`).
    block_tokens: tokens per stored block; None takes vLLM's block size. It must divide vLLM's
        block size or be a whole multiple of it.
    model_fingerprint: identity of the weights when they cannot be read from local files
        (or to share a store between copies of the same weights at different paths).
    async_disk_loads: hits that need a disk read load in the background while other requests
        run, instead of inside the step that schedules them.
    async_saves: saves run on a worker thread, off the engine's step (vLLM keeps a finished
        request's blocks until its saves are done); false saves inside `wait_for_save`.
    max_pending_saves: saves queued at most; past that new saves are dropped (counted), never waited for.
    """

    store: StoreConfig
    block_tokens: int | None = None
    model_fingerprint: str | None = None
    async_disk_loads: bool = True
    async_saves: bool = True
    max_pending_saves: int = 64

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> ConnectorConfig:
        extra = dict(extra or {})
        unknown = sorted(set(extra) - CONNECTOR_KEYS - STORE_KEYS)
        if unknown:
            raise ConfigError(
                f"kv_connector_extra_config: unknown key(s) {unknown}; "
                f"known keys are {sorted(CONNECTOR_KEYS | STORE_KEYS)}"
            )
        base = {**STORE_DEFAULTS, **{k: v for k, v in extra.items() if k in STORE_KEYS}}
        try:
            store = StoreConfig.from_env(environ, base=base)
        except ConfigError as e:
            raise ConfigError(f"tierkv connector (kv_connector_extra_config or TIERKV_* variables): {e}") from None
        if store.disk_path is not None:
            _check_disk_root(Path(store.disk_path).expanduser())
        block_tokens = extra.get("block_tokens")
        fingerprint = extra.get("model_fingerprint")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
            raise ConfigError(f"kv_connector_extra_config.model_fingerprint: expected a non-empty string, got {fingerprint!r}")
        if block_tokens is not None:
            block_tokens = parse_int(block_tokens, "kv_connector_extra_config.block_tokens", minimum=1)
        return cls(
            store=store,
            block_tokens=block_tokens,
            model_fingerprint=fingerprint,
            async_disk_loads=parse_bool(extra.get("async_disk_loads", True), "kv_connector_extra_config.async_disk_loads"),
            async_saves=parse_bool(extra.get("async_saves", True), "kv_connector_extra_config.async_saves"),
            max_pending_saves=parse_int(extra.get("max_pending_saves", 64), "kv_connector_extra_config.max_pending_saves",
                                        minimum=1),
        )

    def resolve_block_tokens(self, vllm_block_size: int) -> int:
        """`block_tokens`, defaulted and checked against vLLM's block size.

        Smaller than vLLM's block size is allowed where pages are token by token (hits then end
        inside vLLM blocks); `layout.check_whole_pages` refuses it for backends whose pages are not.
        """
        bt = self.block_tokens or vllm_block_size
        if vllm_block_size % bt and bt % vllm_block_size:
            raise ConfigError(
                f"kv_connector_extra_config.block_tokens: {bt} and vLLM's block size {vllm_block_size} "
                "must be whole multiples of one another"
            )
        return bt


def _check_disk_root(path: Path) -> None:
    """The disk tier's root must exist: each rank creates its own subdirectory inside it."""
    if not path.exists():
        raise ConfigError(
            f"disk_path: {path} does not exist; create it first (the connector keeps one "
            "subdirectory per tensor-parallel rank in it)"
        )
    if not path.is_dir():
        raise ConfigError(f"disk_path: {path} is not a directory")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"disk_path: {path} is not readable and writable by this process")
