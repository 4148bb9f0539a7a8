#!/usr/bin/env bash
# One device call that finds where time goes before a change (run from the repo root, about
# 9 minutes on an H200); each step has its own time limit and its log lands in OUT_DIR:
#   bash benchmarks/gpu_profile_round.sh OUT_DIR [FLA_SITE]
# 1. benchmarks/diagnose_fla.py with fla-core importable from FLA_SITE (kept off the other
#    steps' path: transformers would bind fla in the CPU oracle of the GPU tests);
# 2. prefill with 16 adapters and base (bench_prefill.py --profile 4x2048): the LoRA share;
# 3. decode with 16 adapters, every request one, at 1 and 64 sequences, profiled at 1;
# 4. the GPU fused-op tests and tests/model/test_cuda.py.
set -uo pipefail
out=$1 fla=${2:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=".:${PYTHONPATH:-}"
step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its log, print its tail
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - start)) s"
  tail -"${TAIL:-6}" "$out/$name.log"
}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
[ -n "$fla" ] && PYTHONPATH="$PYTHONPATH:$fla" step fla "${FLA_S:-120}" python3 benchmarks/diagnose_fla.py
step prefill_lora "${PREFILL_S:-100}" python3 benchmarks/bench_prefill.py --layers 48 --lora 16 \
  --batches 64x128 4x2048 --profile 4x2048 --out "$out/prefill_lora.json"
step prefill_base "${PREFILL_S:-100}" python3 benchmarks/bench_prefill.py --layers 48 \
  --batches 64x128 16x512 4x2048 1x8192 --profile 4x2048 --out "$out/prefill_base.json"
step decode_lora "${DECODE_S:-100}" python3 benchmarks/bench_decode.py --layers 48 --lora 16 \
  --concurrency 1 64 --max-tokens 32 --profile 8 --profile-concurrency 1 --out "$out/decode_lora.json"
step gpu_tests "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider -rf \
  tests/kernels/test_gpu_fused_ops.py tests/model/test_cuda.py
