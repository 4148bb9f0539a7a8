#!/usr/bin/env bash
# Prefill of two source trees in one device call (run from the repo root), after the GPU tests
# of the prefill attention path in AFTER_TREE:
#   bash benchmarks/compare_prefill.sh OUT_DIR BEFORE_TREE AFTER_TREE [bench_prefill.py flags]
# Both trees run AFTER_TREE's benchmarks/bench_prefill.py against their own engine (48 layers
# of the Qwen3-30B-A3B shape, dummy bf16 weights); results land in OUT_DIR/before.json and after.json.
# BEFORE_FLAGS (env) replaces the flags for the before tree (e.g. to leave out a batch it OOMs on).
set -uo pipefail
out=$1 before=$2 after=$3
shift 3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
script=$(cd "$after" && pwd)/benchmarks/bench_prefill.py
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$out/gpu.txt"
(cd "$after" && timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_prefill_attention.py tests/model/test_attention_isolation.py tests/gpu \
  tests/model/test_cuda.py) > "$out/gpu_tests.log" 2>&1
tail -4 "$out/gpu_tests.log"
for name in before after; do
  tree=$before; [ "$name" = after ] && tree=$after
  flags=("$@"); [ "$tree" = "$before" ] && [ -n "${BEFORE_FLAGS:-}" ] && read -ra flags <<< "$BEFORE_FLAGS"
  start=$(date +%s)
  (cd "$tree" && PYTHONPATH=. python3 "$script" "${flags[@]}" --out "$out/$name.json") \
    > "$out/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$out/$name.log"; }
  echo "$name: $(( $(date +%s) - start )) s"
  grep -o "{'batch'.*" "$out/$name.log"
done
