#!/usr/bin/env bash
# The whole H200 session of the CUDA benchmark in three device calls, each well inside the 10-minute
# limit; long work runs detached (setsid) and survives between calls while the machine stays warm.
#
#   here:   bash scripts/h200_session.sh prep           # wheels -> .whl/, trimmed llama.cpp -> .llama/
#   device: bash scripts/h200_session.sh start          # carry .whl .llama: build, generate (detached), gpu_check
#   device: bash scripts/h200_session.sh bench          # bench_cuda.py (detached), waits, copies results
#   device: bash scripts/h200_session.sh collect        # waits for what is left, copies results
#
# Results land in $OUT (the device tool's output folder) and in $D/results on the device.
# Environment: LAYERS (5: both formats of 5 layers of 397B geometry fit the 64 GB disk), JOBS (llama build, 10).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?prep|start|bench|collect}
OUT=${OUT:-$PWD/out}
D=${D:-/data}
LAYERS=${LAYERS:-5}
mkdir -p "$OUT"

wait_for() {  # FILE SECONDS: wait until FILE exists or SECONDS passed
    local t=0
    while [ ! -e "$1" ] && [ "$t" -lt "$2" ]; do sleep 5; t=$((t + 5)); done
    [ -e "$1" ]
}

device_env() {
    if [ -d .whl ] && [ ! -d /tmp/site ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    fi
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    mkdir -p "$D/results" || { D=/tmp/data; mkdir -p "$D/results"; }
}

case "$STAGE" in
prep)  # on the development machine: what the device cannot fetch
    mkdir -p .whl .llama
    for p in jsonschema==4.25.1 jsonschema-specifications==2025.9.1 referencing==0.36.2 rpds-py==0.27.1 gguf==0.19.0; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$p" || exit 1
    done
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps llama-cpp-python==0.3.36 -d "$tmp" ||
        echo "pip could not prepare the sdist; fetch llama_cpp_python-0.3.36.tar.gz into $tmp by hand"
    tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp" || exit 1
    src="$tmp/llama_cpp_python-0.3.36/vendor"
    # llama-bench needs ggml, src, common, vendor, tools and app (the CMake files name them); not the rest
    rm -rf "$src"/llama.cpp/{models,docs,media,tests,examples,benches,pocs,gguf-py,skills,tools/ui}
    tar cJf .llama/llama-src.tar.xz -C "$src" llama.cpp && rm -rf "$tmp"
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >>.git/info/exclude
    grep -qx '/.llama/' .git/info/exclude || echo /.llama/ >>.git/info/exclude
    du -sh .whl .llama
    ;;
start)
    device_env
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; df -h "$D" | tail -1
    rm -rf /tmp/ll && mkdir -p /tmp/ll
    setsid bash -c "cd /tmp/ll && tar xJf $PWD/.llama/llama-src.tar.xz && cd llama.cpp &&
        cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
          -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > /tmp/ll/cmake.log 2>&1 &&
        nice -n 10 cmake --build build --target llama-bench -j ${JOBS:-10} > /tmp/ll/build.log 2>&1;
        echo \$? > /tmp/ll/done" </dev/null >/dev/null 2>&1 &
    python3 setup.py build_ext --inplace -q >/tmp/ext.log 2>&1 || tail -20 /tmp/ext.log
    setsid bash -c "nice -n 5 python3 scripts/make_synthetic.py $D/m --geometry qwen35-397b --layers $LAYERS \
        --gguf $D/m.gguf --jobs 5 > /tmp/gen.log 2>&1; echo \$? > /tmp/gen.done" </dev/null >/dev/null 2>&1 &
    timeout 500 python3 scripts/gpu_check.py --out "$OUT" --skip-kernels --skip-ncu --budget-s 480 2>&1 |
        tee "$OUT/gpu_check.log" | grep -A80 '==== summary'
    cp "$OUT"/gpu_check.json "$D/results/" 2>/dev/null
    tail -2 /tmp/gen.log; tail -2 /tmp/ll/cmake.log /tmp/ll/build.log 2>/dev/null
    ;;
bench)
    device_env
    wait_for /tmp/gen.done 240 || { echo "generator not done"; tail -5 /tmp/gen.log; exit 1; }
    wait_for /tmp/ll/done 120 || echo "llama-bench not built yet: llama.cpp rows will be missing"
    LB=/tmp/ll/llama.cpp/build/bin/llama-bench
    [ -x "$LB" ] || { tail -20 /tmp/ll/build.log /tmp/ll/cmake.log 2>/dev/null; LB=""; }
    setsid bash -c "python3 scripts/bench_cuda.py $D/m $D/m.gguf ${LB:+--llama-bench $LB} --out $D/results \
        > $D/results/bench_cuda.log 2>&1; echo \$? > /tmp/bench.done" </dev/null >/dev/null 2>&1 &
    wait_for /tmp/bench.done 520
    cp "$D"/results/bench_cuda.{json,md,log} "$OUT/" 2>/dev/null
    cat "$D/results/bench_cuda.md" 2>/dev/null || tail -30 "$D/results/bench_cuda.log"
    ;;
collect)
    device_env
    wait_for /tmp/bench.done 540
    cp "$D"/results/bench_cuda.{json,md,log} "$OUT/" 2>/dev/null
    cat "$D/results/bench_cuda.md" 2>/dev/null || tail -30 "$D/results/bench_cuda.log"
    ;;
*)
    echo "unknown stage $STAGE (prep|start|bench|collect)" >&2
    exit 2
    ;;
esac
