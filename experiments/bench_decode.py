"""Prefill and decode speed of the real model on this machine, and what limits it.

Question: how fast do our jitted steps prefill and decode SmolLM2-135M at batch 1 and 8, with
layers stacked under `lax.scan` or unrolled, and how close is batch-1 decode to the
memory-bandwidth ceiling (bytes of weights read per token / measured copy bandwidth)?

    python experiments/bench_decode.py            # real model, writes results/bench_decode.*
    python experiments/bench_decode.py --tiny     # seconds-long smoke run on a random model

Timings exclude compilation (one warm-up call per shape first, compile time reported
separately), wait with `block_until_ready`, and quote the median of repeated runs.
"""

import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np

import realm_jax as rj
from realm_jax.kv_cache import init_cache
from realm_jax.model import stack_layers
from realm_jax.sampling import Sampling
from realm_jax.steps.decode import bucket, decode_step, decode_window
from realm_jax.steps.state import StepSpec, Weights


def copy_bandwidth_gbs(megabytes: int, repeats: int = 5) -> float:
    """Median bytes moved per second (read + write) by a large NumPy copy."""
    src = np.ones(megabytes * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / common.median(times) / 1e9


def bench_model(model, *, batch, prompt_len, decode_steps, repeats):
    """Prefill `prompt_len` tokens into `batch` rows, then decode `decode_steps` tokens.

    The cache holds prompt + decode steps (rounded up as `generate` does); prefill attends
    over the padded prompt and decode over the window `generate` would use at the last step.
    """
    capacity = bucket(prompt_len + decode_steps)
    window = decode_window(prompt_len + decode_steps, capacity)
    config = model.config
    stacked = not isinstance(model.params.layers, tuple)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    rows = common.step_rows(Sampling(), batch)  # greedy
    weights = Weights(model.params)
    prefill_spec = StepSpec(config, attn_len=prompt_len)
    decode_spec = StepSpec(config, attn_len=window)

    def fresh_cache():
        return init_cache(config, batch, capacity, model.dtype, stacked=stacked)

    def prefill():
        return common.prefill_step(
            model.params, None, tokens, lengths, fresh_cache(), rows, spec=prefill_spec
        )

    start = time.perf_counter()
    token, _, cache = jax.block_until_ready(prefill())
    prefill_compile = time.perf_counter() - start
    prefill_times = common.time_call(prefill, repeats=repeats)

    state = {"rows": dataclasses.replace(rows, tokens=token), "cache": cache}

    def decode():
        token, _, state["cache"] = decode_step(
            weights, state["rows"], state["cache"], spec=decode_spec
        )
        state["rows"] = dataclasses.replace(state["rows"], tokens=token)
        return token

    start = time.perf_counter()
    jax.block_until_ready(decode())
    decode_compile = time.perf_counter() - start
    decode_times = []
    for _ in range(repeats):
        token, _, state["cache"] = prefill()
        state["rows"] = dataclasses.replace(rows, tokens=token)
        decode_times.append(common.median(common.time_call(decode, repeats=decode_steps)))
    prefill_s = common.median(prefill_times)
    decode_s = common.median(decode_times)
    return dict(
        layout="stacked (scan)" if stacked else "unrolled",
        batch=batch,
        prompt_len=prompt_len,
        capacity=capacity,
        decode_window=window,
        prefill_ms=1e3 * prefill_s,
        prefill_tok_s=batch * prompt_len / prefill_s,
        decode_ms_per_step=1e3 * decode_s,
        decode_tok_s=batch / decode_s,
        compile_s=dict(prefill=prefill_compile, decode=decode_compile),
    )


def weight_bytes(model) -> int:
    """Bytes of weights read per decode step: every leaf but the embedding, of which a step
    gathers only B rows; the output projection (the same array when tied) is read whole)."""
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    return total - model.params.embed.size * model.params.embed.dtype.itemsize


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--hf-python",
        help="a Python with torch + transformers: also run hf_baseline.py in this run and "
        "report our speeds as ratios to HF's",
    )
    args = parser.parse_args(argv)

    path = common.model_path(args.tiny, args.model)
    if args.tiny:
        plan = dict(batches=(1, 2), contexts=(16,), decode_steps=4, repeats=2)
        bandwidth_mb = 64
    else:
        plan = dict(batches=(1, 8), contexts=(128, 1024), decode_steps=32, repeats=5)
        bandwidth_mb = 512
    out = common.output_folder(args)

    hf = None
    if args.hf_python:
        script = Path(__file__).resolve().parent / "hf_baseline.py"
        subprocess.run([args.hf_python, str(script), "--out", str(out)], check=True)
        hf = json.loads((out / "hf_baseline.json").read_text())

    start = time.perf_counter()
    model = rj.load_model(path)
    load_s = time.perf_counter() - start
    bandwidth = copy_bandwidth_gbs(bandwidth_mb)
    models = {
        "unrolled": model,
        "stacked": rj.Model(model.config, stack_layers(model.params), model.tokenizer, model.path),
    }
    rows = []
    for name, m in models.items():
        for batch in plan["batches"]:
            for context in plan["contexts"]:
                # long contexts at batch 1 only: a batch-8 1024-token prefill is ~50 s here
                if context != plan["contexts"][0] and (name == "stacked" or batch > 1):
                    continue
                row = bench_model(
                    m,
                    batch=batch,
                    prompt_len=context,
                    decode_steps=plan["decode_steps"],
                    repeats=plan["repeats"],
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    nbytes = weight_bytes(model)
    ceiling = bandwidth * 1e9 / nbytes
    result = dict(
        model=Path(path).name,
        dtype=str(model.dtype),
        machine=dict(common.machine(), processor=platform.processor(), cpus=jax.device_count()),
        load_s=load_s,
        copy_bandwidth_gb_s=bandwidth,
        weight_bytes_per_token=nbytes,
        batch1_decode_ceiling_tok_s=ceiling,
        rows=rows,
        hf_baseline=hf,
    )
    lines = [
        f"Model `{result['model']}` ({result['dtype']}), loaded in {load_s:.1f} s; "
        f"copy bandwidth {bandwidth:.1f} GB/s; {nbytes / 1e6:.0f} MB of weights read per "
        f"decode step -> batch-1 ceiling {ceiling:.0f} tok/s.",
        "",
        "| layout | batch | prompt | decode window | prefill tok/s | decode ms/step "
        "| decode tok/s | % of ceiling (B=1) | compile s (prefill/decode) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{100 * r['decode_tok_s'] / ceiling:.0f}%" if r["batch"] == 1 else ""
        lines.append(
            f"| {r['layout']} | {r['batch']} | {r['prompt_len']} | {r['decode_window']} | "
            f"{r['prefill_tok_s']:.0f} | {r['decode_ms_per_step']:.2f} | "
            f"{r['decode_tok_s']:.1f} | {share} | {r['compile_s']['prefill']:.1f} / "
            f"{r['compile_s']['decode']:.1f} |"
        )
    if hf is not None:
        lines += [
            "",
            f"HF transformers {hf['transformers']} (torch {hf['torch']}, float32, "
            f"{hf['threads']} threads), same run, prompt 128:",
            "",
            "| batch | HF prefill tok/s | HF decode tok/s | ours (unrolled) decode tok/s | ratio |",
            "|---|---|---|---|---|",
        ]
        for h in hf["rows"]:
            ours = next(
                r
                for r in rows
                if r["batch"] == h["batch"]
                and r["prompt_len"] == h["prompt_len"]
                and r["layout"] == "unrolled"
            )
            lines.append(
                f"| {h['batch']} | {h['prefill_tok_s']:.0f} | {h['decode_tok_s']:.1f} | "
                f"{ours['decode_tok_s']:.1f} | {ours['decode_tok_s'] / h['decode_tok_s']:.2f}x |"
            )
    common.write("bench_decode", result, "\n".join(lines) + "\n", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
