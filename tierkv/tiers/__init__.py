"""Storage tiers behind the `Tier` interface, and the one place that says which tiers a store has.

`TIER_FACTORIES` lists, fastest first, one function per kind of tier: given the store's config it
returns that tier, or None when the config asks for none. Adding a kind of tier is one module
under `tiers/` plus one entry here; the store itself never names a kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import StoreConfig
from ..errors import ConfigError
from ..layout import KVLayout
from ..namespace import Namespace
from .base import Recovery, StoreAccess, Tier, TierAgent
from .memory import MemoryTier, PoolTier

__all__ = ["TIER_FACTORIES", "MemoryTier", "PoolTier", "Recovery", "StoreAccess", "Tier", "TierAgent", "TierSpec", "build_tiers",
           "close_tiers"]


@dataclass(frozen=True)
class TierSpec:
    """What a tier factory gets: the store's config, layout and namespace."""

    config: StoreConfig
    layout: KVLayout
    namespace: Namespace


def _resolve_device(config: StoreConfig) -> torch.device:
    if config.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {config.device!r} was asked for but CUDA is not available here; use 'cpu' or leave it unset")
    return torch.device(config.device)


def device_tier(spec: TierSpec) -> Tier:
    """GPU memory (CPU memory without a GPU); never verified: its bytes never leave the device."""
    config, bb = spec.config, spec.layout.block_bytes
    device = _resolve_device(config)
    if config.device_elastic:
        from .elastic import elastic_device_tier

        return elastic_device_tier(config, bb, device, spec.namespace.model)
    return MemoryTier("device", config.device_bytes // bb, bb, device, verify_reads=False)


def host_tier(spec: TierSpec) -> Tier:
    """Host RAM, pinned where CUDA is available so that GPU copies are asynchronous DMA."""
    config = spec.config
    pin = torch.cuda.is_available() if config.pin_host is None else config.pin_host
    if pin and not torch.cuda.is_available():
        raise ConfigError("pin_host: pinned memory needs CUDA, which is not available here; set pin_host to false")
    bb = spec.layout.block_bytes
    return MemoryTier("host", config.host_bytes // bb, bb, torch.device("cpu"), pin=pin, verify_reads=config.verify_reads)


def disk_tier(spec: TierSpec) -> Tier | None:
    """Data files and a manifest under `disk_path`, when one is set."""
    if spec.config.disk_path is None:
        return None
    from .disk import DiskTier

    return DiskTier(spec.config, spec.layout, spec.namespace)


def remote_tier(spec: TierSpec) -> Tier | None:
    """A Redis Cluster (or plain Redis) that a fleet of stores shares, below the disk, when `remote_url` is set."""
    if spec.config.remote_url is None:
        return None
    from .remote import RemoteTier

    return RemoteTier(spec.config, spec.layout, spec.namespace)


TIER_FACTORIES: list[Callable[[TierSpec], Tier | None]] = [device_tier, host_tier, disk_tier, remote_tier]


def build_tiers(spec: TierSpec) -> list[Tier]:
    """The store's tiers, fastest first; if one cannot be built, those built before are closed."""
    tiers: list[Tier] = []
    try:
        for factory in TIER_FACTORIES:
            tier = factory(spec)
            if tier is not None:
                tiers.append(tier)
    except BaseException:
        close_tiers(tiers)
        raise
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise AssertionError(f"tier names must be unique, got {names}")
    return tiers


def close_tiers(tiers: list[Tier]) -> None:
    """Close every tier, slowest first; the first failure is raised after all were tried."""
    errors = []
    for tier in reversed(tiers):
        try:
            tier.close()
        except Exception as e:  # close every tier; report the first failure after
            errors.append(e)
    if errors:
        raise errors[0]
