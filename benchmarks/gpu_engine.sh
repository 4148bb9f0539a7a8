#!/usr/bin/env bash
# End-to-end engine checks and decode throughput on a CUDA GPU (run from the repo root):
#   bash benchmarks/gpu_engine.sh OUT_DIR
# 1. (last) bf16 engine vs fp32 transformers (4 architectures) and a mixed 2D/3D LoRA batch, Triton
#    path; model-level CUDA tests; the whole CPU engine suite with the engine on the GPU (fp32,
#    Triton kernels) against transformers on the CPU; the kernel op tests in bf16 and fp32.
# 2. (first) decode throughput, Qwen3-30B-A3B shape, 12 layers, dummy weights: base with CUDA graphs
#    (plus a profile of 8 decode steps), with LoRA (base / 2D / 3D requests in round-robin), and
#    base in eager mode (the baseline of the same run).
set -uo pipefail
out=${1:-.}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 benchmarks/bench_decode.py --layers 12 --concurrency 1 16 64 --max-tokens 32 \
  --out "$out/decode_base.json" --profile 8 > "$out/decode_base.log" 2>&1
tail -3 "$out/decode_base.log"
python3 benchmarks/bench_decode.py --layers 12 --concurrency 1 16 64 --max-tokens 32 --lora \
  --out "$out/decode_lora.json" > "$out/decode_lora.log" 2>&1
tail -3 "$out/decode_lora.log"
python3 benchmarks/bench_decode.py --layers 12 --concurrency 1 16 64 --max-tokens 32 \
  --enforce-eager --out "$out/decode_eager.json" > "$out/decode_eager.log" 2>&1
tail -3 "$out/decode_eager.log"
timeout "${TEST_TIMEOUT:-1200}" python3 -m pytest -q -p no:cacheprovider tests/gpu tests/model/test_cuda.py tests/kernels \
  tests/engine 2>&1 | tee "$out/gpu_tests.log" | tail -15
