"""tierkv inside real vLLM engines on CPU: same tokens, hits after a restart, corruption recomputed.

Four engine processes share one tiny float32 Llama (tests/vllm_model.py), in this order:

1. a reference engine without the connector and without prefix caching;
2. engine A with the connector and vLLM's prefix caching on (scheduler and worker in separate
   processes, vLLM's default on CPU): it computes and stores, then, after each reset of vLLM's
   prefix cache, must take every shared prefix from tierkv;
3. engine B on the same store directory after A has exited, prefix caching off, scheduler and
   worker in one process, with one stored block corrupted on disk before it starts: a restart
   hits everything A stored (decode blocks included), and the corrupt block is detected and
   recomputed;
4. an engine whose configuration does not match the store directory: it must not start.

Every engine must produce exactly the reference's greedy tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("vllm")

from tierkv.tiers.disk.manifest import Manifest  # noqa: E402
from tierkv.tiers.disk import slot_stride  # noqa: E402

from vllm_model import make_model, run_engine  # noqa: E402

pytestmark = pytest.mark.slow

BT = 32  # tierkv block_tokens
ENGINE = {"block_size": BT}  # vLLM's too, in every engine here: its CPU attention pages are copied only whole
SYS_A = list(range(3, 303))  # 300 tokens shared by family A
SYS_B = [5 + (i * 7) % 500 for i in range(260)]  # 260 tokens shared by family B


def tail(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 500, n)]


PROMPTS = [
    {"tokens": SYS_A + tail(0, 16)},
    {"tokens": SYS_A + tail(1, 16)},
    {"tokens": SYS_A + tail(1, 16), "salt": "tenant-b"},
    {"tokens": SYS_B + tail(2, 16)},
    {"tokens": SYS_B + tail(3, 16)},
]
STRANGER = {"tokens": SYS_A + tail(0, 16), "salt": "stranger"}  # tokens stored, but by another tenant
NEXT_TURN = {"extend": [0, 0], "tokens": tail(4, 20)}  # prompt 0, its 16-token answer, 20 more
CORRUPT_BLOCK = 5  # of family B: tokens 160..191


def phases(reset: bool) -> list[dict[str, Any]]:
    """First pass, a second pass with a stranger tenant, then the next turn of prompt 0."""
    return [
        {"prompts": PROMPTS},
        {"prompts": [*PROMPTS, STRANGER], "reset_prefix_cache": reset},
        {"prompts": [NEXT_TURN], "reset_prefix_cache": reset},
    ]


def connector(store: Path, **extra: Any) -> dict[str, Any]:
    return {"disk_path": str(store), "disk_bytes": "64MiB", "host_bytes": "64MiB", "block_tokens": BT, **extra}


def tokens(result: dict[str, Any]) -> list[list[list[int]]]:
    return [[o["tokens"] for o in phase] for phase in result["phases"]]


def cached(result: dict[str, Any], phase: int) -> list[int]:
    return [o["cached"] for o in result["phases"][phase]]


def run(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    result, output = run_engine(spec, env=env)
    assert result is not None, f"the engine failed:\n{output[-8000:]}"
    result["output"] = output
    return result


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("vllm-engine") / "tiny")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tierkv-store")


@pytest.fixture(scope="module")
def reference(model: Path) -> dict[str, Any]:
    return run({"model": str(model), "engine": ENGINE, "prefix_caching": False, "max_tokens": 16, "phases": phases(reset=False)},
               env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


@pytest.fixture(scope="module")
def engine_a(model: Path, store_dir: Path, reference: dict[str, Any]) -> dict[str, Any]:
    return run({"model": str(model), "engine": ENGINE, "prefix_caching": True, "max_tokens": 16, "connector": connector(store_dir),
                "phases": phases(reset=True)})


def _corrupt(store_dir: Path, token_ids: list[int], writer_output: str = "") -> None:
    """Flip one byte of the stored block whose own token ids are `token_ids` (`writer_output`: the
    output of the engine that stored it, shown if the block is not there)."""
    directory = store_dir / "rank0-of-1"
    manifest = Manifest(directory, durable=False)
    try:
        records = manifest.load().records
    finally:
        manifest.close()
    target = np.asarray(token_ids, dtype="<i4").tobytes()
    found = [r.slot for r in records.values() if r.ident[16:] == target]
    assert len(found) == 1, (f"{len(found)} disk records hold the block to corrupt ({len(records)} records); "
                             f"the engine that stored it said:\n{writer_output[-6000:]}")
    (slot,) = found
    block_bytes = 2 * 2 * BT * 1 * 32 * 4  # layers, K/V, tokens, kv heads, head dim, float32
    with (directory / "data000.bin").open("r+b") as f:
        f.seek(slot * slot_stride(block_bytes) + 123)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x08]))


@pytest.fixture(scope="module")
def engine_b(model: Path, store_dir: Path, engine_a: dict[str, Any]) -> dict[str, Any]:
    _corrupt(store_dir, SYS_B[CORRUPT_BLOCK * BT:(CORRUPT_BLOCK + 1) * BT], engine_a["output"])
    return run({"model": str(model), "engine": ENGINE, "prefix_caching": False, "max_tokens": 16, "connector": connector(store_dir),
                "phases": phases(reset=False)}, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def test_connector_with_prefix_caching_gives_the_reference_tokens(engine_a: dict, reference: dict) -> None:
    assert tokens(engine_a) == tokens(reference)


def test_shared_prefixes_come_from_tierkv_once_vllm_forgets_them(engine_a: dict) -> None:
    # After reset_prefix_cache vLLM holds nothing: every cached token was loaded by tierkv, up to
    # the last whole block before each prompt's last token; the stranger's salt matches nothing.
    assert cached(engine_a, 1) == [288, 288, 288, 256, 256, 0]
    (stats,) = engine_a["stats"]
    assert stats["load_errors"] == 0
    assert stats["loaded_blocks"] >= 9 + 9 + 8  # prompt 0, tenant-b's copy and family B each once at least
    assert stats["store"]["disk"]["path"].endswith("rank0-of-1")
    assert engine_a["cached_by_source"].get("host", 0) >= 288 + 288 + 256, "vLLM's metrics name the tier"
    assert "disk" not in engine_a["cached_by_source"]


def test_the_connector_reports_what_its_hooks_cost_each_engine_step(engine_a: dict) -> None:
    (stats,) = engine_a["stats"]
    steps = stats["step_time"]
    assert steps["steps"] >= 16, "get_finished closes every step the engine ran"
    for kind in ("save", "load", "other"):
        t = steps[f"{kind}_ms"]
        assert 0 <= t["mean"] <= t["p99"] <= t["max"], (kind, t)
    assert steps["save_ms"]["max"] > 0 and steps["load_ms"]["max"] > 0, "saves were queued and blocks loaded"


def test_next_turn_hits_the_blocks_saved_while_decoding(engine_a: dict) -> None:
    # 316 prompt tokens + 16 generated: the block of tokens 288..319 was completed by decoding.
    assert cached(engine_a, 2) == [320]


def test_restart_on_the_same_store_hits_and_gives_the_reference_tokens(engine_b: dict, reference: dict) -> None:
    assert tokens(engine_b) == tokens(reference)
    first = cached(engine_b, 0)
    assert first[:3] == [288, 288, 288], "a restarted engine with no prefix cache loads family A from disk"
    assert cached(engine_b, 1)[5] == 288, "A stored the stranger's blocks under its own salt: they hit now"
    assert cached(engine_b, 2) == [320], "decode blocks stored by the first engine survive the restart"
    (stats,) = engine_b["stats"]
    assert stats["store"]["disk"]["recovered_blocks"] > 0
    assert engine_b["cached_by_source"].get("disk", 0) >= 3 * 288 + 320, "vLLM's metrics name the tier"


def test_corrupt_block_is_detected_and_recomputed(engine_b: dict, reference: dict) -> None:
    (stats,) = engine_b["stats"]
    assert stats["store"]["tiers"]["disk"]["corrupt"] >= 1, "the flipped byte was caught by the checksum"
    assert stats["load_errors"] >= 1, "the blocks past it were reported to vLLM"
    assert "Recovered from KV load failure" in engine_b["output"]
    assert tokens(engine_b)[0][3:] == tokens(reference)[0][3:], "family B's tokens are the reference's"


def test_store_of_another_layout_is_refused_at_start(model: Path, store_dir: Path, engine_b: dict) -> None:
    result, output = run_engine({"model": str(model), "engine": ENGINE, "connector": connector(store_dir, block_tokens=64),
                                 "phases": [{"prompts": PROMPTS[:1]}]}, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert result is None, "an engine with block_tokens 64 opened a store of 32-token blocks"
    assert "LayoutMismatchError" in output and "block_tokens" in output
