#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 10 minutes on a machine with one CUDA GPU:
#   1. bench/check_flex_cuda.py: Gemma's attention through compiled flex_attention against the eager math, forward
#      and backward (PASS or FAIL, with each path's peak memory and time);
#   2. python bench.py --device cuda: the speed table on the GPU and the real-shape steps (step time, tokens/s, MFU,
#      peak CUDA memory next to the cost model's estimate).
# Each step has its own time limit, so one that hangs leaves the others their time. The logs and
# results-cuda.json go to $OUT if it is set, else to bench/gpu-out/. torchrun over NCCL needs two GPUs or more:
# bench/check_torchrun_cuda.py says how to run it.
#
#   bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/gpu-out}
mkdir -p "$out"
python=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$out/machine.txt"
timeout 150 "$python" bench/check_flex_cuda.py 2>&1 | tee "$out/flex.log"
timeout 420 "$python" bench.py --device cuda --out "$out/results-cuda.json" 2>&1 | tee "$out/bench.log"
