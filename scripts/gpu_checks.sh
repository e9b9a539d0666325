#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (docs/cluster.md "On a GPU"):
#   1. pytest tests/test_fsdp_precision.py: fp16 + GradScaler resumed, an FSDP2 bf16
#      batch-norm student with a FitNets adapter distilled and resumed on the GPU;
#   2. bench/gpu_fsdp.py: DDP / FSDP x fp32 / bf16 samples/s and peak GPU memory
#      (bench/RESULTS.md and bench/results/gpu_fsdp.json, written after every row).
# Each step has its own time limit so a slow one cannot starve the other. Usage, from
# the repository root with kdflow's dependencies importable:
#   bash scripts/gpu_checks.sh [OUT_DIR]   # OUT_DIR gets log, RESULTS.md, gpu_fsdp.json
set -uo pipefail
out="${1:-gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/log"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print('torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$log" || exit 2
# -m "not slow": the 2-CPU-worker FSDP test is CI's (it needs the S3 test server)
timeout "${KD_GPU_TEST_S:-240}" python3 -m pytest -x -q -p no:cacheprovider -m "not slow" \
  tests/test_fsdp_precision.py -o addopts="--durations=5" 2>&1 | tee -a "$log"
echo "PYTEST_RC=$?" | tee -a "$log"
timeout "${KD_GPU_BENCH_S:-360}" python3 bench/gpu_fsdp.py --epochs 3 2>&1 | tee -a "$log"
echo "BENCH_RC=$?" | tee -a "$log"
cp bench/RESULTS.md "$out/" 2>/dev/null
cp bench/results/gpu_fsdp.json "$out/" 2>/dev/null
exit 0
