"""The scheduler asks the shared tier, off its own thread, how far a request's prefix goes there.

The mirror (scheduler.py) knows what this engine's workers hold; what other engines of a fleet
published to a shared tier (a Redis Cluster) only that tier knows. vLLM's scheduler must not wait
on the network, and `get_num_new_matched_tokens` may answer "not yet" (None): so the first time a
request's prefix runs past the mirror, the question goes to a background thread and the request
waits a step; the next time, the answer is there. One lookup store per tensor-parallel rank
(each rank stores its own shard under its own namespace) holds no local memory and opens the
shared tier read-only: `BlockStore.match` asks it in one batched round trip and changes nothing.
A hit beyond the mirror is loaded by the worker like a disk hit, asynchronously; its store finds
the blocks where its own index stops short.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from tierkv import BlockStore, KVLayout, Namespace, StoreConfig

log = logging.getLogger("tierkv.vllm")


@dataclass
class _Asked:
    blocks: int  # how many blocks of the prompt were asked about
    answer: Future[int]  # blocks every rank's shared tier holds, from the first


class SharedLookup:
    """Background questions to the shared tier, one per request (asked again when the request grew)."""

    def __init__(self, layout: KVLayout, namespaces: list[Namespace], config: StoreConfig) -> None:
        lookup = StoreConfig(device_bytes=0, host_bytes=0, device="cpu", pin_host=False, remote_url=config.remote_url,
                             remote_timeout_s=config.remote_timeout_s, remote_read_only=True,
                             remote_bytes=config.remote_bytes)
        self.block_tokens = layout.block_tokens
        self._stores = [BlockStore(layout, ns, lookup) for ns in namespaces]
        self.tier = self._stores[0].tier_names[-1]  # the shared tier's name, as the workers' stores call it
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierkv-lookup")
        self._asked: dict[str, _Asked] = {}

    def held(self, req_id: str, tokens: list[int], tenant: str) -> int | None:
        """Leading blocks of `tokens` the shared tier holds for every rank; None until the answer is in."""
        blocks = len(tokens) // self.block_tokens
        asked = self._asked.get(req_id)
        if asked is None or asked.blocks < blocks:
            self._asked[req_id] = _Asked(blocks, self._pool.submit(self._ask, tokens, tenant))
            return None
        if not asked.answer.done():
            return None
        return min(asked.answer.result(), blocks)

    def _ask(self, tokens: list[int], tenant: str) -> int:
        try:
            return min(store.match(tokens, tenant=tenant) for store in self._stores) // self.block_tokens
        except Exception:  # a lookup that fails is a miss; the tier counts and logs its own faults
            log.exception("tierkv: lookup in the shared tier failed; counted as a miss")
            return 0

    def forget(self, req_id: str) -> None:
        self._asked.pop(req_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for store in self._stores:
            store.close()
