#!/usr/bin/env bash
# The checks that need a CUDA device, in one command (a few minutes on one GPU):
#   1. the card and the software;
#   2. tests/test_cuda.py: the reference path on the GPU against the CPU path;
#   3. benchmarks/run.py --only c,e --device cuda: the loss step on the GPU (sections c-cuda and
#      e-cuda of docs/benchmarks.md);
#   4. the whole test suite on that machine's torch (the CPU path on another torch version), in
#      parallel where pytest-xdist is installed.
# Usage: bash benchmarks/cuda_check.sh [OUTDIR]   (logs and the updated docs/benchmarks.md there)
# Environment: SECTIONS (default c,e), SUITE_TIMEOUT (seconds for step 4, default 240).
set -u
out=${1:-/tmp/glofnd-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | tee "$out/gpu.txt"
$py -c "import sys, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))" \
    | tee -a "$out/gpu.txt"
if ! $py setup.py -q build_ext --inplace >"$out/build.log" 2>&1; then
    echo "the C extension did not build (see build.log): the CPU side runs the reference path"
fi
$py -c "from glofnd import _ops; print('CPU implementation:', _ops.implementation)"
echo "== tests/test_cuda.py"
$py -m pytest tests/test_cuda.py -q -p no:cacheprovider -p no:logging -rs 2>&1 \
    | tee "$out/test_cuda.log" | tail -25
echo "== benchmarks ${SECTIONS:-c,e} on cuda"
$py benchmarks/run.py --only "${SECTIONS:-c,e}" --device cuda >"$out/bench.log" 2>&1
echo "exit $?"; grep -E "^- target|^\| (simclr|sogclr|clip)" "$out/bench.log"
cp docs/benchmarks.md "$out/benchmarks.md"
echo "== the whole test suite on this machine's torch (the CPU path on another torch version)"
par=""
if $py -c "import xdist" 2>/dev/null; then par="-n 8"; fi  # 16 cores there; the suite is xdist-safe
timeout "${SUITE_TIMEOUT:-240}" $py -m pytest tests -q -p no:cacheprovider -p no:logging -p no:benchmark $par \
    --deselect tests/test_install.py -rfE --tb=short 2>&1 | tee "$out/suite.log" | tail -40
