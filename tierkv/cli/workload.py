"""A synthetic multi-turn chat workload: the traffic a prefix cache exists for, without a model.

Many users share a few system prompts, and each conversation grows turn by turn: the prompt of
turn t is the prompt of turn t-1, the answer to it, and a new user message. Requests of
different users are interleaved, so a store sees the mix of shared prefixes, private growing
prefixes and cold starts that chat serving produces.

Everything is drawn from numpy generators seeded by `(seed, user)`, so a user's conversation
is the same whatever the number of other users, and the whole stream is reproducible. The
stream is cheap to make (numpy only) because the demo and the benchmarks replay it.

`replay` serves the stream from a `BlockStore` the way an engine would: load the stored prefix,
"compute" the rest, store it. No model runs: a block's KV is its chain key repeated
(`synthetic_kv`), which is deterministic in the prefix it encodes, so every block the store
serves can be checked bit for bit against what it should hold.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CapacityError, TierKVError
from ..keys import chain_keys
from ..layout import KVLayout
from ..namespace import Namespace
from ..store import BlockStore

_INT32_LIMIT = 2**31


@dataclass(frozen=True)
class ChatRequest:
    """One prompt sent to the engine: the whole conversation so far, ending in a user message."""

    user: int
    turn: int
    system_prompt: int
    tokens: np.ndarray  # 1-D int32


@dataclass(frozen=True)
class ChatWorkload:
    """Shape of the synthetic chat traffic.

    users: conversations; turns: prompts per conversation; system_prompts: distinct system
    prompts, user u gets prompt u % system_prompts; system_tokens: length of each system
    prompt; user_tokens / answer_tokens: length of each user message / model answer;
    vocab_size: token ids are drawn from [0, vocab_size); seed: makes the stream reproducible.
    """

    users: int = 48
    turns: int = 6
    system_prompts: int = 4
    system_tokens: int = 1024
    user_tokens: int = 64
    answer_tokens: int = 192
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "turns", "system_prompts", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ChatWorkload.{name} must be an int >= 1, got {value!r}")
        for name in ("system_tokens", "user_tokens", "answer_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ChatWorkload.{name} must be an int >= 0, got {value!r}")
        if self.vocab_size > _INT32_LIMIT:
            raise ValueError(f"ChatWorkload.vocab_size must be <= 2**31 (token ids are int32), got {self.vocab_size}")
        if self.system_tokens + self.user_tokens == 0:
            raise ValueError("ChatWorkload: system_tokens and user_tokens are both 0, so every first prompt would be empty")

    @property
    def num_requests(self) -> int:
        return self.users * self.turns

    def prompt_tokens(self, turn: int) -> int:
        """Length of the prompt of `turn` (0-based): the same for every user."""
        return self.system_tokens + turn * (self.user_tokens + self.answer_tokens) + self.user_tokens

    @property
    def total_prompt_tokens(self) -> int:
        return self.users * sum(self.prompt_tokens(t) for t in range(self.turns))

    def requests(self) -> Iterator[ChatRequest]:
        """Every request in arrival order: users interleaved at random, each user's turns in order."""
        rng = np.random.default_rng([self.seed, _ORDER_STREAM])
        order = np.repeat(np.arange(self.users), self.turns)
        rng.shuffle(order)
        systems = [self._draw(np.random.default_rng([self.seed, _SYSTEM_STREAM, s]), self.system_tokens)
                   for s in range(self.system_prompts)]
        conversations: dict[int, _Conversation] = {}
        for user in order.tolist():
            conv = conversations.get(user)
            if conv is None:
                system = user % self.system_prompts
                conv = conversations[user] = _Conversation(
                    system, np.random.default_rng([self.seed, _USER_STREAM, user]), [systems[system]]
                )
            else:
                conv.parts.append(self._draw(conv.rng, self.answer_tokens))
            conv.parts.append(self._draw(conv.rng, self.user_tokens))
            tokens = np.concatenate(conv.parts)
            conv.parts = [tokens]  # keep one array so the next turn copies the history once
            yield ChatRequest(user=user, turn=conv.turn, system_prompt=conv.system, tokens=tokens)
            conv.turn += 1
            if conv.turn == self.turns:
                del conversations[user]

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, self.vocab_size, size=n, dtype=np.int32)


# Independent generator streams, so that changing one part of the workload leaves the others.
_ORDER_STREAM, _SYSTEM_STREAM, _USER_STREAM = 0, 1, 2


class _Conversation:
    __slots__ = ("system", "rng", "parts", "turn")

    def __init__(self, system: int, rng: np.random.Generator, parts: list[np.ndarray]) -> None:
        self.system = system
        self.rng = rng
        self.parts = parts
        self.turn = 0


# A small model's KV: 64 KiB blocks of 16 tokens, the size the benchmarks use too.
SYNTHETIC_LAYOUT = KVLayout(num_layers=8, kv_factor=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_tokens=16)
SYNTHETIC_NAMESPACE = Namespace(model="tierkv-synthetic-chat")


class WrongKVError(TierKVError):
    """The store served a block whose bytes differ from what was put for that prefix: a bug."""


def _key_words(keys: Sequence[bytes], device: torch.device | str) -> torch.Tensor:
    """Each 16-byte key as two int64 words, `[n, 1, 2]`, ready to broadcast over a block."""
    raw = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.int64).view(len(keys), 1, 2)
    return raw.to(device)


def _check_synthetic_layout(layout: KVLayout) -> None:
    if layout.block_bytes % 16:
        raise ValueError(f"synthetic KV repeats 16-byte keys, so block_bytes must be a multiple of 16, got {layout.block_bytes}")


def synthetic_kv(keys: Sequence[bytes], layout: KVLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stand-in for prefill: each block's bytes are its 16-byte chain key, repeated.

    Cheap (one broadcast copy of int64 words), and a function of the whole prefix, like real KV.
    """
    _check_synthetic_layout(layout)
    n, words = len(keys), layout.block_bytes // 16
    if n == 0:
        return torch.empty((0, *layout.block_shape), dtype=layout.dtype, device=device)
    rows = _key_words(keys, device).expand(n, words, 2).contiguous()
    return rows.view(torch.uint8).view(layout.dtype).view(n, *layout.block_shape)


def holds_synthetic_kv(kv: torch.Tensor, keys: Sequence[bytes]) -> bool:
    """Whether `kv` is bit for bit `synthetic_kv(keys)`, checked without building that tensor."""
    n = len(keys)
    if kv.shape[0] != n:
        return False
    if n == 0:
        return True
    words = kv.contiguous().view(torch.uint8).reshape(n, -1, 16).view(torch.int64)
    return torch.equal(words, _key_words(keys, kv.device).expand_as(words))


@dataclass(frozen=True)
class ReplayResult:
    requests: int
    prompt_tokens: int
    served_tokens: int  # loaded from the store instead of computed
    computed_tokens: int  # synthetic prefill: the uncached blocks and each prompt's partial tail
    verified_blocks: int  # served blocks checked bit-exact against their synthetic KV
    unstored_requests: int  # put refused with CapacityError: served, but their new blocks not kept
    first_capacity_error: str | None
    elapsed_s: float


def check_fits(store: BlockStore, workload: ChatWorkload) -> None:
    """Refuse up front a store whose tiers together cannot hold one whole prompt."""
    need = workload.prompt_tokens(workload.turns - 1) // store.layout.block_tokens
    room = sum(t.num_slots for t in store.tiers)
    if need > room:
        sizes = ", ".join(f"{t.name} {t.num_slots}" for t in store.tiers)
        raise CapacityError(
            f"the longest prompt needs {need} blocks of {store.layout.block_bytes} bytes, but the tiers hold "
            f"only {room} together ({sizes}); raise device_bytes / host_bytes or use fewer turns"
        )


def replay(store: BlockStore, requests: Iterable[ChatRequest]) -> ReplayResult:
    """Serve each request from `store`: get its stored prefix, compute the rest, put the whole prompt.

    A `put` refused for lack of room does not fail the request, as in an engine: the request
    was served, its new blocks are just not kept. Such refusals are counted.
    """
    layout = store.layout
    _check_synthetic_layout(layout)
    bt = layout.block_tokens
    seed = store.namespace.digest(layout)
    count = prompt = served = verified = unstored = 0
    first_error: str | None = None
    start = time.perf_counter()
    for req in requests:
        keys = chain_keys(seed, req.tokens, bt)
        cached = store.get(req.tokens)
        k = cached.shape[0]
        if not holds_synthetic_kv(cached, keys[:k]):
            raise WrongKVError(
                f"user {req.user} turn {req.turn}: the store served {k} blocks and not all of them hold "
                "the KV that was put for that prefix"
            )
        if k < len(keys):
            fresh = synthetic_kv(keys[k:], layout, cached.device)
            try:
                store.put(req.tokens, torch.cat([cached, fresh]))
            except CapacityError as e:
                unstored += 1
                first_error = first_error or f"user {req.user} turn {req.turn}: {e}"
        count += 1
        prompt += len(req.tokens)
        served += k * bt
        verified += k
    return ReplayResult(
        requests=count,
        prompt_tokens=prompt,
        served_tokens=served,
        computed_tokens=prompt - served,
        verified_blocks=verified,
        unstored_requests=unstored,
        first_capacity_error=first_error,
        elapsed_s=time.perf_counter() - start,
    )
