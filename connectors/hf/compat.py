"""The one place that knows the keyword under which transformers hands a KV cache to a model.

transformers 5.20 renamed it: `generate` and every model's forward took `past_key_values=`
before, and take `cache=` since (the old name still works with a `FutureWarning` until 5.40 for
forwards and 6.0 for `generate`). What matters for reuse is the name `generate` uses when it
calls the model's forward, because the hooks that check the model really received the
`TierKVCache` read it from the forward's keyword arguments: read under the wrong name, a cache
that did reach the model looks dropped, and `TierKV.generate` recomputes every prompt.

The name is read once, from the signature of `GenerationMixin.prepare_inputs_for_generation`
(which builds the forward's inputs), not from a version number: a release that renames it again
without keeping either name fails at import with an error saying so.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from transformers import GenerationMixin

# Newest first: the name this transformers passes, and the one its deprecation shim still accepts.
_KNOWN = ("cache", "past_key_values")


def _cache_keyword() -> str:
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    for name in _KNOWN:
        if name in parameters:
            return name
    raise ImportError(
        "tierkv_connectors.hf cannot tell how this transformers hands a cache to a model: "
        f"GenerationMixin.prepare_inputs_for_generation takes {list(parameters)}, none of {list(_KNOWN)}"
    )


CACHE_KEYWORD: str = _cache_keyword()
"""`"cache"` on transformers >= 5.20, `"past_key_values"` before."""


def cache_argument(cache: Any) -> dict[str, Any]:
    """`{CACHE_KEYWORD: cache}`: spread into `model.generate(...)` or `model(...)` to hand it `cache`."""
    return {CACHE_KEYWORD: cache}


def given_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache a forward call received, under this transformers' name or the deprecated one (None if neither)."""
    for name in _KNOWN:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
