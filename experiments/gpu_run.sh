#!/usr/bin/env bash
# The GPU lease's commands (run experiments/gpu_prepare.sh here first). A device call carries
# at most 64 MiB and the model file is 94 MiB, so the lease is two calls, the second within the
# machine's 30 s warm window so that the model's first half is still there; each call runs half
# of the suite:
#   1. carry [".whl", ".model/part-00"], command: bash experiments/gpu_run.sh 1
#      the tests marked gpu (the native Pallas kernels against the float64 reference, and a
#      bfloat16 forward through them against the float32 one), then
#      the card's ceilings, TinyLlama-1.1B and Llama-2-7B shapes and the attention sweep
#   2. carry [".whl", ".model/part-01", ".model/SHA256"], command: bash experiments/gpu_run.sh 2
#      rebuilds the model file and checks its SHA-256, then the ceilings again, SmolLM2-135M
#      decode/prefill and the LoRA, speculative and batching parts (all need its weights)
# `bash experiments/gpu_run.sh all` runs both halves in one call where the file is there.
# Then, here: python experiments/gpu_suite.py --merge CALL1/gpu_suite.json CALL2/gpu_suite.json
# --out DIR (calls in the order they ran; a part run again later is taken from the later call).
# TESTS_TIMEOUT, SUITE_TIMEOUT (seconds) and DEADLINE (seconds into the suite after which no
# part starts) fit a call to what is left of the lease; SUITE_ARGS is added to the suite's
# arguments (a later --only replaces the stage's). In the second lease call 1 took 139 s of
# suite (237 s of device time with the machine's start) and call 2's parts, as they now are,
# 31 + 25 + 50 + 42 s (docs/results.md), so both fit the defaults with room for a rerun.
# With the model missing, the suite times SmolLM2's shapes with random weights and skips the
# parts that need its real weights. Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX takes 75% of the card by default; the suite is the card's only user, and the 7B rows
# need the room (its stacked program asked for 16 GiB more at 75% and ran out, in the first run)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
model_args=()
if [ "$stage" != 1 ] && [ -f .model/part-00 ] && [ -f .model/part-01 ] && [ -f .model/SHA256 ]; then
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
case $stage in
    1) only=(--only TinyLlama-1.1B,Llama-2-7B,bench_attention) ;;
    2) only=(--only SmolLM2-135M,lora_strategies,speculative_sweep,batching_throughput) ;;
    *) only=() ;;
esac
if [ "$stage" != 2 ]; then
    timeout "${TESTS_TIMEOUT:-90}" python3 -m pytest -q -m gpu tests/test_attention.py \
        tests/test_bfloat16.py -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -15
fi
# SUITE_ARGS=--tiny makes a CPU smoke run of this script. The suite first; then, in stage 2
# (or all), the one-driver benchmark: the Engine at 1 and 8 steps per call and one request
# through it against rj.generate (issue 19; one round, without the CPU's old-tree baseline).
timeout "${SUITE_TIMEOUT:-330}" python3 experiments/gpu_suite.py --out "$out" "${only[@]}" \
    --deadline "${DEADLINE:-240}" "${model_args[@]}" ${SUITE_ARGS:-} \
    2>&1 | tee "$out/gpu_suite.log" | tail -40
if [ "$stage" != 1 ]; then
    timeout "${ENGINE_TIMEOUT:-150}" python3 experiments/engine_throughput.py --rounds 1 \
        --skip-warmup --out "$out/engine_throughput" "${model_args[@]}" ${ENGINE_ARGS:-} \
        2>&1 | tee "$out/engine_throughput.log" | tail -25
fi
