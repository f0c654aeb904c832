"""tierkv as a vLLM KV connector (`kv_connector_module_path: "tierkv_connectors.vllm"`).

`connector.py` is the `KVConnectorBase_V1` vLLM loads; `scheduler.py` and `worker.py` are its two
halves, `meta.py` what they send each other, `layout.py`, `identity.py` and `config.py` how vLLM's
cache, model and settings become tierkv's layout, namespace and store config.
"""

from .connector import TierKVConnector, worker_stats

__all__ = ["TierKVConnector", "worker_stats"]
