#!/usr/bin/env bash
# Run here (with network) before a GPU lease: stage what the offline GPU machine lacks.
#   .whl/    the gguf wheel (the GPU image has jax 0.11, chex, sentencepiece, tokenizers,
#            safetensors, numpy and pytest, but not gguf)
#   .model/  SmolLM2-135M-Instruct.Q4_1.gguf (94 MiB) in two halves plus its SHA-256: a
#            device call carries at most 64 MiB, so the halves travel in two calls
# Both folders are git-ignored. Then see experiments/gpu_run.sh for the two calls.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
mkdir -p .whl .model
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any -d .whl "gguf==$("$python" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
model=$("$python" -c 'from realm_jax.loading import default_model_path; print(default_model_path())')
rm -f .model/part-*
split -n 2 -d "$model" .model/part-
(cd "$(dirname "$model")" && sha256sum "$(basename "$model")") > .model/SHA256
ls -l .whl .model
