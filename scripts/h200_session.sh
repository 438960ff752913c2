#!/usr/bin/env bash
# The whole H200 session of the CUDA benchmark: one detached pipeline that survives between device calls
# while the machine stays warm, and calls that wait for it and bring back what it has written so far.
#
#   here:   bash scripts/h200_session.sh prep     # wheels -> .whl/, trimmed llama.cpp source -> .llama/
#   device: bash scripts/h200_session.sh start    # (carry .whl .llama) starts the pipeline, waits ~9 min
#   device: bash scripts/h200_session.sh wait     # again within the machine's 30 s warm period, until "pipeline done"
#           (2026-12-02c: start 541 s, wait 555 s, then WAIT_S=515 for the third call, which ended with 58 s of
#           the 1,800 left: the 12-layer runs and the 35B case fit, the 2-layer A/B and transformers did not;
#           2026-12-03, SKIP="q35 hf": a failed start cost 91 s, then start 541, wait 557, wait 444 with 53 s left:
#           the 12-layer runs and the 2-layer A/B. Only 8 files come back from $OUT: collect copies 7 at most,
#           so copy nothing more into $OUT by hand, or the benchmark JSONs are the ones left behind)
#   here:   DRY=1 D=/tmp/dry bash scripts/h200_session.sh pipeline   # the same steps on the CPU, tiny models
#
# The pipeline (2026-12-02: 28 minutes; the device budget is 30, the machine's start included):
#   1. llama-bench built for sm_90 (detached, ~8.5 min), the C extension, gpu_check.py (GPU correctness, the
#      decode kernels' launch configs and variants, the GPU tests; GPU_CHECK_S, default 560 s: about the build's
#      time) while the GGUF of STREAM_LAYERS layers of Qwen3.5-397B geometry is written alone;
#   2. bench_cuda.py, streaming and fully resident, llama.cpp on the GGUF; the GGUF deleted, the pack of the
#      same weights written; bench_cuda.py --merge, flashmoe-pack (with a profile of the resident step):
#      one format at a time, since both formats of 12 layers (47 + 56 GB) do not fit the 64 GB disk together;
#   3. fully resident, Qwen3.5-35B-A3B geometry (40 layers, K=8), both formats;
#   4. on 2 layers: flashmoe-pack streaming with and without overlap (FLASHMOE_CUDA_SERIAL=1) and the
#      page-locked host tier (FLASHMOE_CUDA_PINNED_HOST=0); then the naive baseline, transformers +
#      accelerate offload, on the same 2 layers (what a short budget loses first).
# Results: $D/results/{stream,q35,two}/bench_cuda.{json,md}, transformers/, gpu_check.json, copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?prep|start|wait|pipeline}
OUT=${OUT:-$PWD/out}
D=${D:-/data}
DRY=${DRY:-0}  # DRY=1: the whole pipeline on this machine's CPU with tiny models (no GPU, no llama.cpp)
SKIP=${SKIP:-}  # steps to leave out, for a short device budget: any of gpu_check stream q35 two hf (e.g. SKIP="two hf";
                # stream: the 12-layer runs, both engines, streaming and resident)
skip() { [[ " $SKIP " == *" $1 "* ]]; }
if [ "$DRY" = 1 ]; then
    GEO=tiny GEO35=tiny STREAM_LAYERS=3 KS="2 1" K35=2 DEV=cpu SMALL="--tokens 4 --resident-tokens 4 --prompt 16"
else
    GEO=qwen35-397b GEO35=qwen35-35b STREAM_LAYERS=${STREAM_LAYERS:-12} KS="10 4" K35=8 DEV=cuda SMALL=""
fi
DONE=/tmp/fmp-pipeline.done
mkdir -p "$OUT"

wait_for() {  # FILE SECONDS: wait until FILE exists or SECONDS passed
    local t=0
    while [ ! -e "$1" ] && [ "$t" -lt "$2" ]; do sleep 5; t=$((t + 5)); done
    [ -e "$1" ]
}

device_env() {
    if [ "$DRY" != 1 ] && [ -d .whl ] && [ ! -d /tmp/site ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    fi
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    mkdir -p "$D/results" 2>/dev/null || { D=/tmp/data; mkdir -p "$D/results"; }
}

step() { echo "[$(date +%T)] $*" | tee -a "$D/results/pipeline.log"; }

collect() {
    for f in "$D"/results/pipeline.log "$D"/results/gpu_check.json "$D"/results/{stream,q35,two}/bench_cuda.json \
        "$D"/results/stream/bench_cuda.md "$D"/results/transformers/transformers.json; do
        [ -e "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")_$(basename "$f")"
    done
    cat "$D/results/pipeline.log" 2>/dev/null
    cat "$D"/results/*/bench_cuda.md 2>/dev/null || true
}

pipeline() {
    device_env
    step "start: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), $(nproc) cores, $(df -h "$D" | tail -1)"
    rm -rf /tmp/ll /tmp/gen1.done && mkdir -p /tmp/ll
    local REPO=$PWD
    [ "$DRY" = 1 ] && echo 1 >/tmp/ll/done  # no llama.cpp build in a dry run
    [ "$DRY" = 1 ] || (cd /tmp/ll && tar xJf "$REPO/.llama/llama-src.tar.xz" && cd llama.cpp &&
        cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/tmp/ll/cmake.log 2>&1 &&
        nice -n 10 cmake --build build --target llama-bench -j 10 >/tmp/ll/build.log 2>&1
        echo $? >/tmp/ll/done) &
    python3 setup.py build_ext --inplace -q >/tmp/ext.log 2>&1 || step "C extension failed: $(tail -3 /tmp/ext.log)"
    local G=$D/m$STREAM_LAYERS
    if skip stream; then echo skipped >/tmp/gen1.done; else
        (nice -n 5 python3 scripts/make_synthetic.py --gguf "$G.gguf" --geometry $GEO --layers "$STREAM_LAYERS" \
            --jobs 6 >"$D/results/gen1.log" 2>&1; echo $? >/tmp/gen1.done) &
    fi
    step "gpu_check"
    # GPU_CHECK_ARGS: more options, e.g. --skip-kernels (no sweep: the shipped configs, and the tests get its time)
    [ "$DRY" = 1 ] || skip gpu_check || python3 scripts/gpu_check.py --out "$D/results" --skip-ncu --budget-s "${GPU_CHECK_S:-560}" \
        ${GPU_CHECK_ARGS:-} >"$D/results/gpu_check.log" 2>&1
    step "gpu_check rc $? ($(grep -o "pytest [a-z]* rc [^ ]*" "$D/results/gpu_check.log" 2>/dev/null | tr '\n' ' '))"
    # the decode launch configs the sweep picked for this GPU, for every run below (gpu_check.json keeps them)
    if [ -s "$D/results/decode_configs.json" ]; then
        export FLASHMOE_DECODE_CONFIGS=$D/results/decode_configs.json
        step "decode configs: $(tr -d ' \n' <"$FLASHMOE_DECODE_CONFIGS")"
    fi
    # a model-level failure on the GPU (new kernels run there for the first time): benchmark the torch path
    if [ "$DRY" != 1 ] && ! skip gpu_check && ! python3 -c "import json, sys; r = json.load(open('$D/results/gpu_check.json'))
sys.exit(any('error' in str(r.get(k, {}))[:20] or not r.get(k) for k in ('conformance', 'graph')))"; then
        export FLASHMOE_CUDA_LAYER_KERNELS=0 FLASHMOE_CUDA_FUSE=0 FLASHMOE_CUDA_PINNED_HOST=0
        step "gpu_check's conformance or graph section failed: FLASHMOE_CUDA_LAYER_KERNELS=0 FLASHMOE_CUDA_FUSE=0 FLASHMOE_CUDA_PINNED_HOST=0 from here on"
    fi
    wait_for /tmp/gen1.done 900; step "GGUF written: rc $(cat /tmp/gen1.done)"
    wait_for /tmp/ll/done 900; step "llama-bench build rc $(cat /tmp/ll/done)"
    local LB=/tmp/ll/llama.cpp/build/bin/llama-bench
    [ -x "$LB" ] || step "no llama-bench: $(tail -n 5 /tmp/ll/build.log /tmp/ll/cmake.log 2>&1)"
    # the same 12 layers fully resident too (48 GB of experts fit the H200's VRAM): no third generation
    if ! skip stream; then
    local B=(python3 scripts/bench_cuda.py "$G" "$G.gguf" --llama-bench "$LB" --out "$D/results/stream" --merge
             --device $DEV --k $KS $SMALL)
    "${B[@]}" >"$D/results/stream.log" 2>&1; step "llama.cpp streaming + resident rc $?"
    rm -f "$G.gguf"
    nice -n 5 python3 scripts/make_synthetic.py "$G" --geometry $GEO --layers "$STREAM_LAYERS" --jobs 6 \
        >>"$D/results/gen1.log" 2>&1
    step "pack written: rc $?"
    "${B[@]}" >>"$D/results/stream.log" 2>&1; step "flashmoe streaming + resident rc $?"
    rm -rf "$G"
    fi
    if ! skip q35; then
    local Q=$D/q35
    nice -n 5 python3 scripts/make_synthetic.py "$Q" --geometry $GEO35 --gguf "$Q.gguf" --jobs 8 >"$D/results/gen35.log" 2>&1
    step "35B pair written: rc $?"
    python3 scripts/bench_cuda.py "$Q" "$Q.gguf" --llama-bench "$LB" --out "$D/results/q35" --skip stream --k $K35 \
        --device $DEV $SMALL \
        >"$D/results/q35.log" 2>&1
    step "35B resident rc $?"
    rm -rf "$Q" "$Q.gguf"
    fi
    # flashmoe-pack streaming 2 layers with one feature off at a time (overlap, the page-locked host tier) under
    # the host limit scaled to 2 layers (24 GB x 2-layer GGUF / 54.9 GB)
    local T=$D/m2
    if ! skip two || ! skip hf; then
        nice -n 5 python3 scripts/make_synthetic.py "$T" --geometry $GEO --layers 2 --jobs 2 >"$D/results/gen3.log" 2>&1
    fi
    if ! skip two; then
    python3 scripts/bench_cuda.py "$T" "$T.gguf" --out "$D/results/two" --skip resident --gpu-layers 1 --ab overlap pinned \
        --mem-limit 5.18e9 --device $DEV --k $KS $SMALL >"$D/results/two.log" 2>&1
    step "flashmoe 2 layers rc $?"
    fi
    # last (it has not finished inside a session's device time so far): transformers + accelerate offload, the
    # naive baseline, on the same 2 layers (bf16 experts are 3.2x the 4-bit bytes: 2 layers = 30 GB)
    if ! skip hf; then
    python3 scripts/bench_transformers.py export "$T" "$D/hf2" --layers 2 --jobs 16 >"$D/results/export.log" 2>&1
    step "transformers export rc $?"
    mkdir -p "$D/results/transformers"
    local TA=(--vram-experts 12e9 --mem-limit 5.18e9 --drop-caches --time-cap 90 --timeout 400)
    [ "$DRY" = 1 ] && TA=(--device cpu --prompt 16 --tokens 2)
    python3 scripts/bench_transformers.py run "$D/hf2" --k $KS "${TA[@]}" \
        --json "$D/results/transformers/transformers.json" >"$D/results/transformers.log" 2>&1
    step "transformers rc $?"
    fi
    touch $DONE
}

case "$STAGE" in
prep) # on the development machine: what the device cannot fetch
    mkdir -p .whl .llama
    for p in jsonschema==4.25.1 jsonschema-specifications==2025.9.1 referencing==0.36.2 rpds-py==0.27.1 gguf==0.19.0; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$p" || exit 1
    done
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps llama-cpp-python==0.3.36 -d "$tmp" || exit 1
    tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" || exit 1
    src="$tmp/llama_cpp_python-0.3.36/vendor"
    # llama-bench needs ggml, src, common, vendor, tools and app (CMake names them); not the rest
    rm -rf "$src"/llama.cpp/{models,docs,media,tests,examples,benches,pocs,gguf-py,skills,tools/ui}
    tar cJf .llama/llama-src.tar.xz -C "$src" llama.cpp && rm -rf "$tmp"
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >>.git/info/exclude
    grep -qx '/.llama/' .git/info/exclude || echo /.llama/ >>.git/info/exclude
    du -sh .whl .llama
    ;;
start)
    rm -f $DONE
    setsid bash "$0" pipeline </dev/null >/tmp/fmp-pipeline.out 2>&1 &
    wait_for $DONE "${WAIT_S:-540}" && echo "pipeline done"
    collect
    ;;
wait)
    wait_for $DONE "${WAIT_S:-560}" && echo "pipeline done"
    device_env >/dev/null
    collect
    ;;
pipeline)
    pipeline
    ;;
*)
    echo "unknown stage $STAGE (prep|start|wait|pipeline)" >&2
    exit 2
    ;;
esac
