"""Two models on one GPU taking turns: what an elastic device tier buys over a static split.

Each model serves chat traffic in bursts: during a burst a group of users holds multi-turn
conversations (each turn's prompt extends the previous one), then the model goes quiet while
the other model has its burst, and so on. Under a static split each store owns half of the GPU
budget whatever the traffic; with elastic tiers the busy store takes the idle one's pages (down
to the idle store's minimum), and the idle store demotes its blocks to host instead of losing
them.

`run_bursts` replays the same traffic in either mode through real stores (KV is the synthetic,
bit-checked KV of `tierkv.cli.workload`) and reports, per model and in total, the tokens served
from the device tier, the device hit rate and the tokens recomputed. It runs on CPU (host page
backend) and on a GPU (CUDA VMM); the asv benchmark and `scripts/bench_elastic_gpu.py` use it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..config import StoreConfig
from ..layout import KVLayout
from ..namespace import Namespace
from ..store import BlockStore
from .workload import SYNTHETIC_LAYOUT, ChatRequest, ChatWorkload, replay

MODES = ("static", "elastic")


@dataclass(frozen=True)
class BurstScenario:
    """Sizes of the two-model scenario.

    budget_bytes: GPU memory for both device tiers together (static: half each).
    host_bytes: host tier of each store. min_bytes: what each elastic store keeps when the
    other needs memory. bursts: bursts per model. users_per_burst, turns: conversations of
    one burst and their length; by default a burst's conversations need more than half of the
    budget and less than all of it, so a static half is too small and the whole is enough.
    """

    budget_bytes: int = 64 << 20
    host_bytes: int = 16 << 20
    min_bytes: int = 8 << 20
    bursts: int = 3
    users_per_burst: int = 8
    turns: int = 8
    layout: KVLayout = SYNTHETIC_LAYOUT
    device: str = "cpu"
    page_bytes: int | None = None

    def workload(self, model: int) -> ChatWorkload:
        return ChatWorkload(users=self.bursts * self.users_per_burst, turns=self.turns, system_prompts=2,
                            system_tokens=512, user_tokens=64, answer_tokens=192, seed=model)

    def burst(self, model: int, requests: list[ChatRequest], index: int) -> list[ChatRequest]:
        """Requests of burst `index` of `model`: every turn of its group of users, interleaved."""
        return [r for r in requests if r.user // self.users_per_burst == index]

    def config(self, mode: str, budget_name: str) -> StoreConfig:
        if mode == "static":
            return StoreConfig(device=self.device, device_bytes=self.budget_bytes // 2, host_bytes=self.host_bytes)
        if mode == "elastic":
            return StoreConfig(device=self.device, device_bytes=self.budget_bytes, host_bytes=self.host_bytes,
                               device_elastic=True, device_min_bytes=self.min_bytes, device_page_bytes=self.page_bytes,
                               gpu_budget_name=budget_name, gpu_budget_bytes=self.budget_bytes)
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclass(frozen=True)
class ModelOutcome:
    requests: int
    prompt_tokens: int
    device_tokens: int  # served from the device tier
    recomputed_tokens: int  # not served from any tier (includes each prompt's partial last block)
    device_hit_rate: float  # blocks found on the device / blocks looked up

    @property
    def served_tokens(self) -> int:
        return self.prompt_tokens - self.recomputed_tokens


@dataclass(frozen=True)
class BurstOutcome:
    mode: str
    models: list[ModelOutcome]
    shrinks: int  # shrink requests acted on (elastic)
    elapsed_s: float

    @property
    def prompt_tokens(self) -> int:
        return sum(m.prompt_tokens for m in self.models)

    @property
    def device_tokens(self) -> int:
        return sum(m.device_tokens for m in self.models)

    @property
    def recomputed_tokens(self) -> int:
        return sum(m.recomputed_tokens for m in self.models)

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode, "prompt_tokens": self.prompt_tokens, "device_tokens": self.device_tokens,
            "device_token_share": self.device_tokens / self.prompt_tokens, "recomputed_tokens": self.recomputed_tokens,
            "shrinks": self.shrinks, "elapsed_s": round(self.elapsed_s, 3),
            "models": [{**m.__dict__, "served_tokens": m.served_tokens} for m in self.models],
        }


def run_bursts(scenario: BurstScenario, mode: str) -> BurstOutcome:
    """Replay the alternating bursts of two models through two stores configured for `mode`."""
    name = f"bursts-{uuid.uuid4().hex[:12]}"
    configs = [scenario.config(mode, name) for _ in range(2)]
    streams = [list(scenario.workload(m).requests()) for m in range(2)]
    stores = [BlockStore(scenario.layout, Namespace(model=f"model-{'ab'[m]}"), configs[m]) for m in range(2)]
    totals = [[0, 0, 0] for _ in range(2)]  # requests, prompt tokens, computed tokens
    start = time.perf_counter()
    try:
        for b in range(scenario.bursts):
            for m in range(2):
                result = replay(stores[m], scenario.burst(m, streams[m], b))
                totals[m][0] += result.requests
                totals[m][1] += result.prompt_tokens
                totals[m][2] += result.computed_tokens
        elapsed = time.perf_counter() - start
        models = []
        shrinks = 0
        for m, s in enumerate(stores):
            stats = s.stats()
            dev = stats["tiers"]["device"]
            looked_up = dev["hits"] + dev["misses"]
            models.append(ModelOutcome(
                requests=totals[m][0], prompt_tokens=totals[m][1],
                device_tokens=dev["hits"] * scenario.layout.block_tokens, recomputed_tokens=totals[m][2],
                device_hit_rate=dev["hits"] / looked_up if looked_up else 0.0,
            ))
            shrinks += stats["elastic"]["shrinks"] if "elastic" in stats else 0  # a static tier has no section
        return BurstOutcome(mode, models, shrinks, elapsed)
    finally:
        for s in stores:
            s.close()
