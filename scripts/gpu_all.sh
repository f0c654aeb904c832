#!/usr/bin/env bash
# The whole GPU pass in one call on the GPU machine: tests marked gpu, then the benchmarks, a short table last.
#   bash scripts/gpu_all.sh OUTDIR        (wheels for kvikio and lmdb in .whl/, see docs/performance.md)
# Each step has its own time limit (seconds, STEP_S_<name> overrides), so one that hangs costs
# only its own share of the machine; steps to skip: SKIP="kernels elastic ...". The kernel
# table is skipped unless KERNEL_BENCH=1 (docs/kernels.md has it).
set -uo pipefail
dest=${1:?usage: gpu_all.sh OUTDIR}
mkdir -p "$dest"
# Every step's log and table is written in a work directory; OUTDIR gets three files (the device
# tool brings back at most 8): tables.md (every table), summary.txt (what is printed last) and
# gpu_all.tgz (everything).
out=$(mktemp -d /tmp/gpu_all.XXXXXX)
finish() {  # also when the run is cut short: what was measured comes back
  cat "$out"/*.md > "$dest/tables.md" 2>/dev/null
  tar czf "$dest/gpu_all.tgz" -C "$out" .
}
trap finish EXIT
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
# The source tree, and connectors/ under its installed name (tierkv_connectors), without pip.
mkdir -p /tmp/tierkv-path && ln -sfn "$PWD/connectors" /tmp/tierkv-path/tierkv_connectors
export PYTHONPATH="$PWD:/tmp/tierkv-path:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
git log -1 --format='commit %h %s' 2>/dev/null || true
python3 -m tierkv info > "$out/info.txt" 2>&1; head -12 "$out/info.txt"

status=()
step() {  # step NAME DEFAULT_SECONDS COMMAND...: run it under its limit, keep its log, note how it ended
  local name=$1 limit=$2; shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then status+=("$name: skipped"); return; fi
  local var="STEP_S_$name"; limit=${!var:-$limit}
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -25 "$out/$name.log"
  status+=("$name: rc $rc, $((SECONDS - start)) s")
}

step pytest_gpu 170 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rfE
step path 130 python3 scripts/gpu_path_bench.py "$out/path.md" "$out/path.png"
step hf_ttft 150 python3 scripts/gpu_hf_ttft_bench.py "$out/hf_ttft.md" --trials 2
step preempt 240 python3 scripts/bench_preempt_gpu.py "$out/preempt.md"
step checksum 40 python3 scripts/bench_checksum_gpu.py
step store 60 python3 scripts/gpu_store_bench.py "$out/store.md" /tmp/tierkv-bench
step elastic 40 python3 scripts/bench_elastic_gpu.py "$out/elastic.json"
# asv is not installed there: the GPU asv benchmark's tracks, run as asv would (setup, track, teardown)
step asv_gpu 90 python3 -c '
import sys; sys.path.insert(0, "asv_bench")
from benchmarks.bench_gpu_path import PublicPathRatio as B
for name in [m for m in dir(B) if m.startswith("track_")]:
    b = B(); b.setup()
    try: print(f"asv bench_gpu_path.PublicPathRatio.{name}: {getattr(b, name)():.3f}")
    finally: b.teardown()
'

if [ "${KERNEL_BENCH:-0}" = 1 ]; then step kernels 120 python3 scripts/gpu_bench.py "$out/kernels.md"; fi

{
echo
echo "== summary"
grep -E "passed|failed" "$out/pytest_gpu.log" 2>/dev/null | tail -1
for table in path hf_ttft preempt; do
  [ -f "$out/$table.md" ] && { echo "-- $table"; grep -E '^\|' "$out/$table.md" | head -32; }
done
[ -f "$out/asv_gpu.log" ] && grep "^asv " "$out/asv_gpu.log"
printf '%s\n' "${status[@]}"
} | tee "$dest/summary.txt"
