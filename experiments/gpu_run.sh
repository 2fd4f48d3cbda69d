#!/usr/bin/env bash
# The GPU lease's command (see experiments/gpu_prepare.sh, run here first). Two device calls,
# the second within the machine's 30 s warm window, so that the model's first half is still
# there:
#   1. carry [".model/part-00"], command: true
#   2. carry [".whl", ".model/part-01", ".model/SHA256"],
#      command: bash experiments/gpu_run.sh   (timeout_s 600)
# It installs gguf from .whl, rebuilds the model file and checks its SHA-256, runs the tests
# marked gpu (the native Pallas kernels against the float64 reference), then the suite. With
# the model missing, the suite times SmolLM2's shapes with random weights and skips the parts
# that need its real weights. Everything lands in $OUT (gpu_tests.log, gpu_suite.*).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
model_args=()
if [ -f .model/part-00 ] && [ -f .model/part-01 ] && [ -f .model/SHA256 ]; then
    name=$(awk '{print $2}' .model/SHA256)
    cat .model/part-00 .model/part-01 > "/tmp/$name"
    if (cd /tmp && sha256sum -c --quiet "$OLDPWD/.model/SHA256"); then
        model_args=(--model "/tmp/$name")
    else
        echo "model halves do not match .model/SHA256: timing random weights instead"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
timeout 150 python3 -m pytest -q -m gpu tests/test_attention.py -p no:cacheprovider \
    2>&1 | tee "$out/gpu_tests.log" | tail -5
# SUITE_ARGS=--tiny makes a CPU smoke run of this script.
timeout 400 python3 experiments/gpu_suite.py --out "$out" "${model_args[@]}" ${SUITE_ARGS:-} \
    2>&1 | tee "$out/gpu_suite.log" | tail -60
