#!/usr/bin/env bash
# The whole GPU pass in one call on the GPU machine: tests marked gpu, then every benchmark.
#   bash scripts/gpu_all.sh OUTDIR        (wheels for kvikio and lmdb in .whl/, see docs/performance.md)
set -uo pipefail
out=${1:?usage: gpu_all.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m tierkv info | tee "$out/info.txt" | head -20
echo "== pytest -m gpu"
python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rfE > "$out/pytest_gpu.txt" 2>&1; tail -30 "$out/pytest_gpu.txt"
echo "== public data path"
python3 scripts/gpu_path_bench.py "$out/path.md" "$out/path.png"
echo "== store + disk"
python3 scripts/gpu_store_bench.py "$out/store.md" /tmp/tierkv-bench
if [ "${KERNEL_BENCH:-1}" = 1 ]; then echo "== kernels"
python3 scripts/gpu_bench.py "$out/kernels.md" 2>&1 | tail -60; fi
echo "== elastic"
python3 scripts/bench_elastic_gpu.py "$out/elastic.json" 2>&1 | tail -25
echo "== decode under a page budget (issue 15)"
python3 scripts/bench_preempt_gpu.py "$out/preempt.md" 2>&1 | tail -20
