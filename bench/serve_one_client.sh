#!/usr/bin/env bash
# `pagoda serve` and `vllm serve` (tuned) on the tiny Llama, one after the other, driven by
# one client, vLLM's own `vllm bench serve` from the anchor: random 128 -> 128 tokens,
# ignore_eos, at concurrency 64 (128 requests) and 1 (16 requests), after a warm-up
# round each. The client runs on the same cores as the server. Results (vLLM's JSON)
# go to $OUT (default /tmp/serve-one-client); one line per run is printed.
#
#   ANCHOR_DIR=$HOME/.cache/pagoda-anchor bash bench/serve_one_client.sh
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ANCHOR_DIR:-$HOME/.cache/pagoda-anchor}
M=${MODEL:-$A/tiny-llama}
OUT=${OUT:-/tmp/serve-one-client}
mkdir -p "$OUT"

client() {  # port concurrency requests name
    "$A/venv/bin/python" "$A/vllm_cli.py" bench serve --backend vllm \
        --base-url "http://127.0.0.1:$1" --endpoint /v1/completions --model "$M" \
        --tokenizer "$M" --dataset-name random --random-input-len 128 \
        --random-output-len 128 --num-prompts "$3" --max-concurrency "$2" --ignore-eos \
        --save-result --result-dir "$OUT" --result-filename "$4.json" > "$OUT/$4.log" 2>&1
    python3 - "$OUT/$4.json" "$4" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: {d['output_throughput']:.1f} out tok/s, TPOT p50 "
      f"{d['median_tpot_ms']:.2f} ms, TTFT p50 {d['median_ttft_ms']:.1f} ms, "
      f"{d['completed']} completed")
PY
}

up() {  # port
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$1/v1/models" > /dev/null && return 0
        sleep 1
    done
    echo "the server on port $1 did not come up" >&2
    return 1
}

measure() {  # port name
    client "$1" 64 64 "$2-warm-up" > /dev/null
    client "$1" 64 128 "$2-c64"
    client "$1" 1 16 "$2-c1"
}

.venv/bin/pagoda serve --model "$M" --served-model-name "$M" --port 8100 --grpc-port 0 \
    --kv-cache-memory 4GiB --max-model-len 512 > "$OUT/pagoda.log" 2>&1 &
pid=$!
up 8100 && measure 8100 pagoda
kill -TERM "$pid"
wait "$pid" || true

tcmalloc=$A/debs/root/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
VLLM_CPU_OMP_THREADS_BIND=0-$(($(nproc) - 1)) LD_PRELOAD="$tcmalloc:$A/venv/lib/libiomp5.so" \
VLLM_USE_AOT_COMPILE=0 VLLM_CPU_KVCACHE_SPACE=4 \
    "$A/venv/bin/python" "$A/vllm_cli.py" serve "$M" --port 8200 --dtype bfloat16 \
    --max-model-len 512 > "$OUT/vllm.log" 2>&1 &
pid=$!
up 8200 && measure 8200 vllm
kill -TERM "$pid"
wait "$pid" || true
