#!/usr/bin/env bash
# Every check that needs a GPU, in one command for a lent GPU machine
# (the device tool; see its README): the tests marked `gpu` and
# bench_power.py's GPU part, with the results under $OUT.
#
# That machine has its own Python (3.12, with CuPy, NVML, pandas, numpy,
# matplotlib) and no network: first, here, fetch the packages it lacks as
# wheels into .whl/ (ignored by git) with tests/gpu/fetch_wheels.sh, then
# call the device tool with carry=[".whl"] and the command
#   bash tests/gpu/run_gpu_checks.sh
set -uo pipefail
OUT="${OUT:-/tmp/aimss-gpu-checks}"
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu checks: the carried wheels did not install"; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import aimss_dask, cupy, pynvml; print('aimss_dask', aimss_dask.__version__, 'cupy', cupy.__version__)" \
    2>&1 | tee "$OUT/versions.txt"
# The files that hold `gpu` tests (others may import what the device image lacks).
files=$(grep -l "mark.gpu" tests/test_*.py)
python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors $files 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 420 python3 benchmarks/bench_power.py --part gpu --reps 2 --out "$OUT" 2>&1 | tee "$OUT/bench-power.log"
echo "gpu tests rc=$tests_rc"
exit "$tests_rc"
