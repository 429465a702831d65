#!/usr/bin/env bash
# The one-GPU runs the open issues wait for, in one device call (one H200; an H100 for all but the 48-layer bf16
# parts). Each run writes its log under $OUT; a summary table comes last. Run from the repository root, after the
# wheels are installed (see docs/performance.md, "Running on the GPU machines"):
#
#   bash scripts/gpu_session.sh            # everything (about 9 minutes on an H200)
#   bash scripts/gpu_session.sh tests      # only the GPU test suite
#
# What each run shows:
#   gpu-tests        issues 14 (must-show 2), 15, 17: the GPU suite, nothing skipped (missing kernels fail)
#   overlap-on/off   issue 16 (must-shows 1, 3): LLM.generate decode beside bench model's step, same run, with
#                    overlapped scheduling on and off (greedy outputs of both are compared by the test suite)
#   serve-c1/c64     issue 16 (must-show 2): bench serve against the same engine, random 1024 in / 256 out
#   tp2-gloo         issue 15 (must-show 2): two ranks on one GPU over gloo (kernels on sharded shapes)
#   fp8-48           issue 13: the full 48-layer FP8 model, bench model decode and prefill
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
ONLY=${1:-all}
PY=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

run() {  # run NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-14s rc=%-4s %5ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$OUT/$name.log")" \
        >> "$OUT/summary.txt"
}

run gpu-tests 240 "$PY" -m pytest -m gpu tests -q -x -p no:cacheprovider
if [ "$ONLY" = tests ]; then cat "$OUT/summary.txt"; exit 0; fi

"$PY" -m nextserve bench config --num-layers 12 --out /tmp/next12 > /dev/null
"$PY" -m nextserve bench config --num-layers 48 --out /tmp/next48 > /dev/null
SLICE=(--model /tmp/next12 --load-format dummy --context-length 4096 --mem-fraction-static 0.6)
OFFLINE=(--no-loop --num-prompts 1,16,64,128 --input-len 1024 --output-len 256 --compare-model)
run overlap-on 240 "$PY" -m nextserve bench offline "${SLICE[@]}" "${OFFLINE[@]}" --output-json "$OUT/overlap-on.json"
run overlap-off 240 "$PY" -m nextserve bench offline "${SLICE[@]}" "${OFFLINE[@]}" --disable-overlap-schedule \
    --output-json "$OUT/overlap-off.json"

"$PY" -m nextserve serve "${SLICE[@]}" --port 8123 > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do grep -q "nextserve ready" "$OUT/server.log" && break; sleep 1; done
SERVE=(--base-url http://127.0.0.1:8123 --dataset random --random-input-len 1024 --random-output-len 256)
run serve-c1 120 "$PY" -m nextserve bench serve "${SERVE[@]}" --num-prompts 8 --max-concurrency 1 \
    --output-json "$OUT/serve-c1.json"
run serve-c64 180 "$PY" -m nextserve bench serve "${SERVE[@]}" --num-prompts 128 --max-concurrency 64 \
    --output-json "$OUT/serve-c64.json"
kill "$SERVER"
wait "$SERVER" 2> /dev/null

run tp2-gloo 180 "$PY" -m nextserve bench model --num-layers 4 --tp-size 2 --dist-backend gloo --device cuda:0 \
    --batch-sizes 1 --contexts 1024 --prefill-lens 2048 --output-json "$OUT/tp2-gloo.json"
run fp8-48 300 "$PY" -m nextserve bench model --num-layers 48 --quantization fp8 --batch-sizes 1,64 \
    --contexts 1024 --prefill-lens 8192 --output-json "$OUT/fp8-48.json"

echo "git revision (this checkout): $(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
cat "$OUT/summary.txt"
