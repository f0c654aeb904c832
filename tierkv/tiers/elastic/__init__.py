"""The elastic device tier: CUDA VMM pages mapped as slots are used, a GPU budget shared across stores."""

from .tier import ElasticTier, elastic_device_tier

__all__ = ["ElasticTier", "elastic_device_tier"]
