#!/usr/bin/env bash
# Decode throughput of two source trees in one device call, interleaved per mode so that both
# see the same card state (run from the repo root):
#   bash benchmarks/compare_decode.sh OUT_DIR BEFORE_TREE AFTER_TREE [bench_decode.py flags]
# Each tree runs its own benchmarks/bench_decode.py (48 layers of the Qwen3-30B-A3B shape, dummy
# bf16 weights, CUDA graphs) for base and for --lora; results land in OUT_DIR/<mode>_<tree>.json.
set -uo pipefail
out=$1 before=$2 after=$3
shift 3
flags=(--layers 48 --concurrency 1 64 256 --max-tokens 32 "$@")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$out/gpu.txt"
for mode in base lora; do
  extra=(); [ "$mode" = lora ] && extra=(--lora)
  for tree in "$before" "$after"; do
    name="${mode}_$(basename "$tree")"
    start=$(date +%s)
    (cd "$tree" && PYTHONPATH=".:${PYTHONPATH:-}" python3 benchmarks/bench_decode.py "${flags[@]}" "${extra[@]}" \
      --out "$out/$name.json") > "$out/$name.log" 2>&1 || { echo "$name failed"; tail -5 "$out/$name.log"; }
    echo "$name: $(( $(date +%s) - start )) s"
  done
done
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
for name, r in runs.items():
    print(name, " ".join(f"{x['concurrency']}:{x['tokens_per_s']}" for x in r["results"]))
PY
