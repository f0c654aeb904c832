"""The vLLM connector refuses bad settings at start, with a message that names them.

The connector is built here the way vLLM builds it (a real `VllmConfig` from `EngineArgs`, a
real `KVCacheConfig`) in the scheduler role, which needs no running engine; that one real engine
also reports these errors is checked in test_vllm_engine.py.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)
from vllm_model import make_model  # noqa: E402

import tierkv  # noqa: E402
import tierkv_connectors.vllm.config as connector_config  # noqa: E402
from tierkv import ConfigError, KVLayout, Namespace  # noqa: E402
from tierkv_connectors.vllm import TierKVConnector  # noqa: E402
from tierkv_connectors.vllm.config import ConnectorConfig  # noqa: E402
from tierkv_connectors.vllm.identity import engine_namespace, weights_fingerprint  # noqa: E402
from tierkv_connectors.vllm.layout import check_whole_pages  # noqa: E402

NAMES = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("vllm-model") / "tiny")


def kv_cache_config(*specs: Any) -> KVCacheConfig:
    specs = specs or (FullAttentionSpec(block_size=128, num_kv_heads=1, head_size=32, dtype=torch.float32),)
    groups = [KVCacheGroupSpec(NAMES if i == 0 else [f"model.layers.{i + 1}.attn"], s) for i, s in enumerate(specs)]
    return KVCacheConfig(num_blocks=16, kv_cache_tensors=[], kv_cache_groups=groups)


def connector(model: Path, extra: dict[str, Any], policy: str = "recompute",
              cache: KVCacheConfig | None = None) -> TierKVConnector:
    transfer = KVTransferConfig(kv_connector="TierKVConnector", kv_connector_module_path="tierkv_connectors.vllm",
                                kv_role="kv_both", kv_load_failure_policy=policy, kv_connector_extra_config=extra)
    config = EngineArgs(model=str(model), dtype="float32", enforce_eager=True, max_model_len=1024,
                        kv_transfer_config=transfer).create_engine_config()
    return TierKVConnector(config, KVConnectorRole.SCHEDULER, cache or kv_cache_config())


def test_a_good_config_builds_the_store_layout(model: Path, tmp_path: Path) -> None:
    c = connector(model, {"block_tokens": 256, "host_bytes": "1GiB", "disk_path": str(tmp_path)})
    layout = c._scheduler.layout
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_tokens) == (2, 1, 32, 256)
    assert connector(model, {})._scheduler.layout.block_tokens == 128, "defaults to vLLM's block size"


def test_blocks_smaller_than_a_cpu_page_are_refused_when_the_connector_is_built(model: Path) -> None:
    """On the CPU platform (CPU attention pages, copied only whole) in both roles, before anything is matched."""
    with pytest.raises(ConfigError, match="less than vLLM's block size 128.*--block-size that divides 32"):
        connector(model, {"block_tokens": 32})


@pytest.mark.parametrize("extra, named", [
    ({"host_byte": "1GiB"}, "host_byte"),
    ({"disk_path": "/nonexistent/tierkv"}, "disk_path"),
    ({"block_tokens": 48}, "block_tokens"),
    ({"block_tokens": 0}, "block_tokens"),
    ({"host_bytes": "lots"}, "host_bytes"),
    ({"durability": "sometimes"}, "durability"),
    ({"async_disk_loads": "maybe"}, "async_disk_loads"),
    ({"model_fingerprint": ""}, "model_fingerprint"),
])
def test_bad_extra_config_fails_at_start_naming_the_key(model: Path, extra: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        connector(model, extra)


def test_disk_path_that_is_a_file_is_refused(model: Path, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ConfigError, match="disk_path.*not a directory"):
        connector(model, {"disk_path": str(path)})


def test_failing_requests_on_load_errors_is_refused(model: Path) -> None:
    with pytest.raises(ConfigError, match="kv_load_failure_policy"):
        connector(model, {}, policy="fail")


@pytest.mark.parametrize("spec, reason", [
    (SlidingWindowSpec(block_size=128, num_kv_heads=1, head_size=32, dtype=torch.float32, sliding_window=64),
     "not plain full attention"),
    (FullAttentionSpec(block_size=128, num_kv_heads=1, head_size=32, dtype=torch.float32, head_size_v=64),
     "head sizes differ"),
    (MLAAttentionSpec(block_size=128, num_kv_heads=1, head_size=32, dtype=torch.float32), "MLAAttentionSpec"),
])
def test_models_whose_kv_cannot_be_stored_are_refused(model: Path, spec: Any, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        connector(model, {}, cache=kv_cache_config(spec))


def test_hybrid_models_with_two_cache_groups_are_refused(model: Path) -> None:
    full = FullAttentionSpec(block_size=128, num_kv_heads=1, head_size=32, dtype=torch.float32)
    with pytest.raises(ConfigError, match="2"):
        connector(model, {}, cache=kv_cache_config(full, full))


@pytest.mark.parametrize("extra, expected", [
    ({}, (None, True)),
    ({"block_tokens": "32", "async_disk_loads": "off"}, (32, False)),
    ({"block_tokens": 64, "async_disk_loads": "Yes"}, (64, True)),
    ({"block_tokens": " 16 ", "async_disk_loads": 0}, (16, False)),
])
def test_connector_keys_take_the_spellings_store_fields_take(extra: dict[str, Any], expected: tuple[Any, bool]) -> None:
    config = ConnectorConfig.from_extra(extra, environ={})
    assert (config.block_tokens, config.async_disk_loads) == expected


@pytest.mark.parametrize("extra, message", [
    ({"block_tokens": True}, r"^kv_connector_extra_config\.block_tokens: expected a whole number >= 1, got True$"),
    ({"block_tokens": "32.0"}, r"^kv_connector_extra_config\.block_tokens: expected a whole number >= 1, got '32\.0'$"),
    ({"block_tokens": -16}, r"^kv_connector_extra_config\.block_tokens: expected a whole number >= 1, got -16$"),
    ({"async_disk_loads": "maybe"}, r"^kv_connector_extra_config\.async_disk_loads: expected true or false .*'maybe'$"),
    ({"async_disk_loads": 2}, r"^kv_connector_extra_config\.async_disk_loads: expected true or false .*got 2$"),
])
def test_bad_connector_keys_name_the_key_and_what_is_expected(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConnectorConfig.from_extra(extra, environ={})


def test_the_connector_config_uses_only_public_tierkv_names() -> None:
    tree = ast.parse(Path(connector_config.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tierkv":
            assert node.module == "tierkv" and node.level == 0, ast.unparse(node)
            assert {a.name for a in node.names} <= set(tierkv.__all__), ast.unparse(node)
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "tierkv" for a in node.names), ast.unparse(node)


def test_environment_overrides_the_extra_config_and_unknown_variables_fail() -> None:
    config = ConnectorConfig.from_extra({"host_bytes": "1GiB"}, environ={"TIERKV_HOST_BYTES": "2GiB"})
    assert config.store.host_bytes == 2 << 30
    assert config.store.device_bytes == 0, "vLLM's pages are the GPU tier: no second device copy by default"
    with pytest.raises(ConfigError, match="TIERKV_HOST_BYTE"):
        ConnectorConfig.from_extra({}, environ={"TIERKV_HOST_BYTE": "2GiB"})


def test_fingerprint_follows_the_weights_not_the_path(model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    config = (model / "config.json").read_text()
    assert weights_fingerprint(str(model), None, config, "float32") == weights_fingerprint(str(copy), None, config, "float32")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(str(model), None, config, "float32") != weights_fingerprint(str(copy), None, config, "float32")
    assert weights_fingerprint(str(model), None, config, "float32") != weights_fingerprint(str(model), None, config, "bfloat16")


def test_namespace_names_a_local_model_by_its_directory_not_its_path(model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / model.name
    shutil.copytree(model, copy)
    assert engine_namespace(str(model), "f", 0, 1) == engine_namespace(str(copy), "f", 0, 1)
    assert engine_namespace("org/some-model", "f", 0, 1).model == "org/some-model"
    assert engine_namespace(str(model), "f", 0, 2) != engine_namespace(str(model), "f", 1, 2)


def test_block_tokens_default_to_vllms_and_must_be_multiples_of_one_another() -> None:
    assert ConnectorConfig.from_extra({}).resolve_block_tokens(128) == 128
    assert ConnectorConfig.from_extra({"block_tokens": 256}).resolve_block_tokens(128) == 256
    assert ConnectorConfig.from_extra({"block_tokens": 32}).resolve_block_tokens(128) == 32  # token-major pages allow it
    with pytest.raises(ConfigError, match="whole multiples of one another"):
        ConnectorConfig.from_extra({"block_tokens": 48}).resolve_block_tokens(128)


def test_blocks_that_would_cut_a_cpu_attention_page_are_refused_with_what_to_do() -> None:
    """vLLM's CPU attention keeps K channel-major in each page: only whole pages can be copied."""
    with pytest.raises(ConfigError, match=r"block_tokens is 32, less than vLLM's block size 128.*channel-major"
                                          r".*--block-size that divides 32"):
        check_whole_pages("CPU_ATTN", 32, 128)
    check_whole_pages("CPU_ATTN", 128, 128)
    check_whole_pages("CPU_ATTN", 256, 128)
    check_whole_pages("FLASH_ATTN", 32, 128)  # token-major pages: a part of a page is a run of tokens


def test_an_engine_page_format_of_its_own_gets_keys_of_its_own(model: Path) -> None:
    plain, cpu = engine_namespace(str(model), "f", 0, 1), engine_namespace(str(model), "f", 0, 1, "CPU_ATTN")
    layout = KVLayout(num_layers=2, kv_factor=2, num_kv_heads=1, head_dim=32, dtype=torch.float32, block_tokens=128)
    assert plain.digest(layout) != cpu.digest(layout)
    assert "kv_format" not in plain.to_dict()  # token-major KV keeps the keys and disk identity it had
    assert plain.digest(layout) == Namespace(model=plain.model, weights_fingerprint="f").digest(layout)
