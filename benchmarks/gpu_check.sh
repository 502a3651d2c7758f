#!/usr/bin/env bash
# The GPU check: CUDA tests, then the full Huginn-0125 shape (bf16, random weights) eager against compiled, into one
# results folder. Installs nothing from the network (the GPU machine has none): depthwave goes in with
# `pip install --no-deps --no-build-isolation -e .` when it is not importable. Every part runs under its own
# timeout so that the whole finishes in under 8 minutes and a slow part still leaves the others' results.
#
#   bash benchmarks/gpu_check.sh [results folder]        # default benchmarks/results/gpu-check
#   DEVICE=cpu SHAPE="--width 128 --heads 4 --vocab 1024 --dtype float32" bash benchmarks/gpu_check.sh /tmp/x
#                                                        # the same steps on a CPU, small (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu-check}
device=${DEVICE:-cuda}
shape=${SHAPE:---dtype bfloat16 --new-tokens 32}
py=${PYTHON:-python}
mkdir -p "$out"
began=$(date +%s)

log() { echo "[gpu_check $(($(date +%s) - began)) s] $*" | tee -a "$out/summary.txt"; }

"$py" -c "import depthwave" 2>/dev/null || "$py" -m pip install --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1
{
    date -u
    "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    command -v nvidia-smi >/dev/null && nvidia-smi
} >"$out/environment.txt" 2>&1
log "environment: $(head -2 "$out/environment.txt" | tail -1)"

# The CUDA tests (they skip without CUDA): bf16 on CUDA against fp32 on the CPU, the engine on CUDA against the CPU,
# the compiled pass with CUDA graphs against eager.
timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_static.py::test_cuda_bf16_close_to_cpu_fp32" \
    >"$out/tests.txt" 2>&1
log "tests (rc $?): $(tail -1 "$out/tests.txt")"

# Eager alone first (quick), then eager against compiled: if compiling runs out of time the eager figures stand.
timeout 80 "$py" benchmarks/bench_huginn_shape.py --device "$device" $shape --repeats 1 \
    --out "$out/bench_huginn_shape-eager.json" >"$out/bench_huginn_shape-eager.txt" 2>&1
log "eager bench (rc $?)"
# Compiled in two parts, each under its own timeout, so that B = 1 (static and diffusion) stands even if compiling
# the wider buckets runs out of time.
timeout 140 "$py" benchmarks/bench_huginn_shape.py --device "$device" $shape --repeats 2 --compile --batch-sizes 1 \
    --out "$out/bench_huginn_shape-compiled-b1.json" >"$out/bench_huginn_shape-compiled-b1.txt" 2>&1
log "compiled bench, B = 1 (rc $?)"
timeout 130 "$py" benchmarks/bench_huginn_shape.py --device "$device" $shape --repeats 2 --compile --no-static \
    --batch-sizes 4,16,64 --out "$out/bench_huginn_shape-compiled-wide.json" \
    >"$out/bench_huginn_shape-compiled-wide.txt" 2>&1
log "compiled bench, B = 4, 16, 64 (rc $?)"
grep -h '^|' "$out"/bench_huginn_shape-*.txt | tee -a "$out/summary.txt"
log "done"
