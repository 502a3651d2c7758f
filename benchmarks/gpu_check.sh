#!/usr/bin/env bash
# The GPU check: CUDA tests, then the full Huginn-0125 shape (bf16, random weights) eager against compiled, and where
# a compiled engine's start-up goes, into one results folder. Installs nothing from the network (the GPU machine has
# none): depthwave goes in with `pip install --no-deps --no-build-isolation -e .` when it is not importable. Every
# part runs under its own timeout, cut to what is left of BUDGET seconds (default 470: the whole finishes in under 8
# minutes), and a part with under 20 s left is skipped, so a slow part still leaves the others' results.
#
#   bash benchmarks/gpu_check.sh [results folder]        # default benchmarks/results/gpu-check
#   DEVICE=cpu SHAPE="--width 128 --heads 4 --vocab 1024 --dtype float32" BUDGET=900 bash benchmarks/gpu_check.sh /tmp/x
#                                                        # the same steps on a CPU, small (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-check}
device=${DEVICE:-cuda}
shape=${SHAPE:---dtype bfloat16}
py=${PYTHON:-python}
budget=${BUDGET:-470}
mkdir -p "$out"
began=$(date +%s)

log() { echo "[gpu_check $(($(date +%s) - began)) s] $*" | tee -a "$out/summary.txt"; }
# step NAME MAX_SECONDS COMMAND...: runs COMMAND into $out/NAME.txt under min(MAX, what is left of the budget).
step() {
    local name=$1 most=$2 left
    shift 2
    left=$((budget - ($(date +%s) - began)))
    if ((left < 20)); then
        log "$name: skipped ($left s left)"
        return
    fi
    timeout $((most < left ? most : left)) "$@" >"$out/$name.txt" 2>&1
    log "$name (rc $?): $(grep -v '^\s*$' "$out/$name.txt" | tail -1)"
}

"$py" -c "import depthwave" 2>/dev/null || "$py" -m pip install --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
{
    date -u
    "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    command -v nvidia-smi >/dev/null && nvidia-smi
} >"$out/environment.txt" 2>&1
log "environment: $(head -2 "$out/environment.txt" | tail -1)"

# The CUDA tests that compile nothing (they skip without CUDA): bf16 on CUDA against fp32 on the CPU, the engine on
# CUDA against the CPU.
step tests 100 "$py" -m pytest -q -p no:cacheprovider --durations=5 tests/test_cuda.py -k "not compiled" \
    "tests/test_static.py::test_cuda_bf16_close_to_cpu_fp32"
# Eager alone first (quick): if compiling runs out of time the eager figures stand.
step bench_huginn_shape-eager 70 "$py" benchmarks/bench_huginn_shape.py --device "$device" $shape --new-tokens 32 \
    --repeats 1 --out "$out/bench_huginn_shape-eager.json"
# Compiling one (rows, queries) bucket, four graphs, takes about 40 s on an H200, so every bucket of an engine (32
# graphs) does not fit in this check: the compiled runs compile only the graphs they reach (--lazy-compile), static
# decoding first (one bucket), then diffusion at B = 1 (up to four).
step bench_huginn_shape-compiled-static 130 "$py" benchmarks/bench_huginn_shape.py --device "$device" $shape \
    --new-tokens 32 --repeats 2 --compile --batch-sizes 1 --no-diffusion --lazy-compile \
    --out "$out/bench_huginn_shape-compiled-static.json"
# The compiled pass with CUDA graphs against eager, static decoding (the diffusion case compiles too many buckets).
step tests-compiled 100 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "compiled and static"
step bench_huginn_shape-compiled-diffusion 160 "$py" benchmarks/bench_huginn_shape.py --device "$device" $shape \
    --new-tokens 32 --repeats 2 --compile --batch-sizes 1 --no-static --lazy-compile \
    --out "$out/bench_huginn_shape-compiled-diffusion.json"
# Where compile time goes and what one compiled call saves, per graph, on the built-in model.
step compile_probe-builtin 60 "$py" benchmarks/compile_probe.py --device "$device" --widths 1,4 \
    --out "$out/compile_probe-builtin.json"
grep -h '^B=\|^|' "$out"/compile_probe-*.txt "$out"/bench_huginn_shape-*.txt | tee -a "$out/summary.txt"
log "done"
