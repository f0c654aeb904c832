"""tierkv as a vLLM KV connector: prefix hits from host memory and disk are loaded, not recomputed.

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "TierKVConnector",
        "kv_connector_module_path": "tierkv_connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"host_bytes": "8GiB", "disk_path": "/nvme/tierkv", "disk_bytes": "200GiB"}}'

The connector is two objects: one in the scheduler (`SchedulerSide`: hit decisions from a mirror
of what the workers store, load and save jobs) and one in each worker (`WorkerSide`: the store,
and the copies between it and vLLM's pages). They talk only through vLLM's scheduler output and
model runner output; docs/vllm.md explains the design. Keys are tierkv's chained hashes of the
token ids seeded by the model's namespace, so a restarted engine, or another engine on the same
store directory, hits the blocks stored before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from tierkv import ConfigError, EngineKV, dtype_name

from .config import ConnectorConfig
from .identity import engine_namespace, weights_fingerprint
from .layout import WHOLE_PAGE_BACKENDS, AttentionKV, attention_kv, check_whole_pages, engine_kv
from .lookup import SharedLookup
from .meta import ResidencyReport, TierKVMetadata
from .metrics import StatsReporter, TierKVPromMetrics, TierKVStats
from .scheduler import SchedulerSide
from .step_time import StepTime
from .worker import WorkerSide, rank_store_config

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

def _hit_source(tier: str) -> CacheHitSource:
    """vLLM's name for hits from a tier: its own where it has one (device, host, disk), else "external"."""
    try:
        return CacheHitSource(tier)
    except ValueError:
        return CacheHitSource.EXTERNAL_UNSPECIFIED


def _platform_page_format() -> str:
    """The attention backend whose page format this platform's engine uses, when it is one of
    `WHOLE_PAGE_BACKENDS` (vLLM on CPU: CPU_ATTN); else "" (GPU backends keep pages token by token).

    Known in both roles before any model runs, so the scheduler's keys and the workers' agree,
    and blocks in a page format of their own never match an engine that reads pages token by token.
    """
    from vllm.platforms import current_platform

    return "CPU_ATTN" if current_platform.is_cpu() else ""


def _check_engine(vllm_config: VllmConfig) -> None:
    """Engine settings the connector cannot work with, refused before anything is loaded."""
    transfer = vllm_config.kv_transfer_config
    assert transfer is not None, "vLLM builds a KV connector only from a kv_transfer_config"
    policy = transfer.kv_load_failure_policy
    if policy != "recompute":
        raise ConfigError(
            f'kv_transfer_config.kv_load_failure_policy is "{policy}": set it to "recompute", so that a block '
            "tierkv cannot load (evicted meanwhile, or corrupt on disk) is recomputed instead of failing the request"
        )
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size != 1:
        raise ConfigError("tierkv connector: pipeline parallelism is not supported (each stage holds other layers)")
    if parallel.decode_context_parallel_size != 1:
        raise ConfigError("tierkv connector: decode context parallelism is not supported (KV is split by token)")


class TierKVConnector(KVConnectorBase_V1):
    """`KVConnectorBase_V1` over a tierkv `BlockStore` per worker; both roles (kv_both)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _check_engine(vllm_config)
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None, "vLLM builds a KV connector only from a kv_transfer_config"
        config = ConnectorConfig.from_extra(transfer.kv_connector_extra_config)
        self._attention: AttentionKV = attention_kv(kv_cache_config)
        layout = self._attention.store_layout(config.resolve_block_tokens(self._attention.block_size))
        self._page_format = _platform_page_format()
        check_whole_pages(self._page_format, layout.block_tokens, self._attention.block_size)  # both roles, at start
        model = vllm_config.model_config
        fingerprint = config.model_fingerprint or weights_fingerprint(
            model.model, model.revision, model.hf_config.to_json_string(), dtype_name(layout.dtype))
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._kv_caches: dict[str, torch.Tensor] | None = None
        self.step_time = StepTime()  # worker side: what the hooks below cost the engine's step
        if role == KVConnectorRole.SCHEDULER:
            namespaces = [engine_namespace(model.model, fingerprint, r, tp_size, self._page_format) for r in range(tp_size)]
            shared = SharedLookup(layout, namespaces, config.store) if config.store.remote_url is not None else None
            self._scheduler = SchedulerSide(layout, namespaces, config.async_disk_loads, config.async_saves, shared)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            self._worker = WorkerSide(layout, engine_namespace(model.model, fingerprint, rank, tp_size, self._page_format),
                                      rank_store_config(config.store, rank, tp_size), self._attention,
                                      async_saves=config.async_saves, max_pending_saves=config.max_pending_saves)

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache, not a hand-off: a save lost to preemption is only a future miss."""
        return False

    # -- worker side -------------------------------------------------------------------

    def _engine(self, kv_caches: dict[str, torch.Tensor]) -> EngineKV:
        context = self._vllm_config.compilation_config.static_forward_context
        backends = {context[name].get_attn_backend().get_name() for name in self._attention.layer_names}
        if len(backends) != 1:
            raise ConfigError(f"tierkv connector: attention layers use several backends {sorted(backends)}")
        layout = self._vllm_config.cache_config.get_resolved_kv_cache_layout()
        backend = backends.pop()
        if (backend in WHOLE_PAGE_BACKENDS) != bool(self._page_format):  # the start-up checks were for another one
            raise ConfigError(f"tierkv connector: attention backend {backend} on this platform is not the one its "
                              f"keys were made for ({self._page_format or 'token-major pages'})")
        return engine_kv(kv_caches, self._attention, backend, layout.name)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._kv_caches = kv_caches
        self._worker.open(self._engine(kv_caches))

    def unregister_kv_caches(self) -> None:
        """Sleep mode (vLLM >= 0.33): vLLM's pages go away; stop copying into them. Idempotent."""
        if self._worker is not None:
            self._worker.unbind()

    def restore_kv_caches(self) -> None:
        """Wake-up (vLLM >= 0.33): bind the pages again, checked as at start. Idempotent."""
        if self._worker is not None and self._kv_caches is not None:
            self._worker.bind(self._engine(self._kv_caches))

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """vLLM >= 0.33 asks before allowing sleep mode; the store outlives vLLM's pages, so yes."""
        return True

    def _meta(self) -> TierKVMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, TierKVMetadata)
        return meta

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        with self.step_time.hook("load"):
            self._worker.start_loads(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        """The forward pass waits (on the GPU) for this layer of the step's loads only (see `WorkerSide.wait_for_layer`)."""
        assert self._worker is not None
        self._worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        """Nothing per layer: a stored block holds every layer, so it is saved once all are written (`wait_for_save`)."""

    def wait_for_save(self) -> None:
        """Queue this step's saves (asynchronous by default: the step does not wait for them)."""
        assert self._worker is not None
        with self.step_time.hook("save"):
            self._worker.save(self._meta())

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Before vLLM reuses preempted requests' pages: their queued saves finish."""
        assert self._worker is not None and isinstance(kv_connector_metadata, TierKVMetadata)
        with self.step_time.hook("preempt"):  # waits for the saves of preempted requests: not the cost of a save
            self._worker.handle_preemptions(kv_connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose saves are done, so vLLM frees their blocks; requests whose async load is done)."""
        assert self._worker is not None
        with self.step_time.hook("save"):
            saved = self._worker.finished_saves(finished_req_ids) or None
        with self.step_time.hook("load"):
            loaded = self._worker.finished_loads() or None
        self.step_time.end_step()  # called once per step, after its forward pass
        return saved, loaded

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        with self.step_time.hook("load"):
            return self._worker.load_errors()

    def build_connector_worker_meta(self) -> ResidencyReport | None:
        assert self._worker is not None
        with self.step_time.hook("other"):
            return self._worker.report()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()

    # -- metrics in vLLM's /metrics (connectors/vllm/metrics.py) --------------------------

    def get_kv_connector_stats(self) -> TierKVStats | None:
        """This worker's store figures since its last report, at most once a second (None between)."""
        worker = self._worker
        if worker is None or worker.store is None:
            return None
        reporter = self.__dict__.setdefault("_stats_reporter", StatsReporter(worker.rank))
        store = worker.store
        return reporter.report(store.metric_families)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TierKVStats | None:
        return TierKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> TierKVPromMetrics:
        return TierKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def tierkv_stats(self) -> dict[str, Any]:
        """This worker's store stats, connector counters and step costs (see `worker_stats`, `step_time.py`)."""
        assert self._worker is not None
        return {**self._worker.stats(), "step_time": self.step_time.summary()}

    # -- scheduler side ------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        assert self._scheduler is not None
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.match(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        assert self._scheduler is not None
        sources = self._scheduler.hit_sources(request, num_external_tokens)
        out: dict[CacheHitSource, int] = {}
        for name, n in sources.items():
            source = _hit_source(name)
            out[source] = out.get(source, 0) + n
        return out

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, ResidencyReport):
            self._scheduler.apply(report)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Blocks are saved in the steps that fill them; with saves still queued, vLLM frees them once
        `get_finished` reports the request."""
        assert self._scheduler is not None
        return self._scheduler.finished(request), None


def worker_stats(worker: Any) -> dict[str, Any]:
    """For `LLM.collective_rpc(worker_stats)`: the tierkv stats of each worker's connector.

    (Passing a function needs `VLLM_ALLOW_INSECURE_SERIALIZATION=1` in vLLM >= 0.10.)
    """
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    connector = get_kv_transfer_group()
    if not isinstance(connector, TierKVConnector):
        raise TypeError(f"the engine's KV connector is {type(connector).__name__}, not TierKVConnector")
    return connector.tierkv_stats()
