#!/usr/bin/env bash
# One device call's round of checks after a change (run from the repo root, about 9 minutes on
# an H200); each step has its own time limit, and its log lands in OUT_DIR:
#   bash benchmarks/gpu_round.sh OUT_DIR BEFORE_TREE
# 1. decode throughput of BEFORE_TREE against this tree, interleaved (compare_decode.sh: 48
#    layers of the Qwen3-30B-A3B shape, base and LoRA, 1 / 64 / 256 sequences);
# 2. the GPU suites: tests/gpu, tests/kernels, tests/model/test_cuda.py;
# 3. the fused small ops against the torch sequences they replace (bench_kernels.py --fused-ops);
# 4. prefill throughput and the attention op's share (bench_prefill.py --layers 48 --attention);
# 5. where a LoRA decode step of one sequence spends its time (bench_decode.py --profile);
# 6. benchmarks/diagnose_fla.py, where fla-core is importable.
set -uo pipefail
out=$1 before=$2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=".:${PYTHONPATH:-}"
step() {  # step NAME SECONDS COMMAND...: run it under a limit, keep its log, print its tail
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: rc $? in $((SECONDS - start)) s"
  tail -"${TAIL:-6}" "$out/$name.log"
}
mkdir -p "$out/decode"
step decode "${DECODE_S:-270}" bash benchmarks/compare_decode.sh "$out/decode" "$before" .
step gpu_tests "${TESTS_S:-130}" python3 -m pytest -q -p no:cacheprovider -rf tests/gpu tests/kernels \
  tests/model/test_cuda.py
step fused_ops 40 python3 benchmarks/bench_kernels.py --fused-ops
step prefill 70 python3 benchmarks/bench_prefill.py --layers 48 --attention --out "$out/prefill.json"
step lora_profile 50 python3 benchmarks/bench_decode.py --layers 48 --lora --concurrency 1 \
  --max-tokens 8 --profile 16 --profile-concurrency 1
python3 -c "import fla" 2>/dev/null && step fla 40 python3 benchmarks/diagnose_fla.py
