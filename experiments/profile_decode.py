"""Where a decode step's time goes, per XLA operation, from JAX's profiler.

Question: which operations of one jitted `steps.decode.decode_step` take the time, at a given
batch size and sampling mode? Runs the step under `jax.profiler.trace`, reads the trace's
per-operation events, and groups them by the operation's output shape from the compiled HLO
(the shape says which product it is: [B, 3072] is SmolLM2's gate/up, [B, V] the output
projection, ...). Profiling slows the step: compare shares, not absolute times.

    python experiments/profile_decode.py --batch 8             # SmolLM2, greedy
    python experiments/profile_decode.py --batch 1 --sampled
    python experiments/profile_decode.py --tiny                # random tiny model, seconds
"""

import collections
import dataclasses
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import common
import jax
import jax.numpy as jnp

import realm_jax as rj
from realm_jax.kv_cache import init_cache
from realm_jax.sampling import Sampling
from realm_jax.steps.decode import decode_step
from realm_jax.steps.state import StepSpec, Weights

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
    config = model.config
    sampling = Sampling(temperature=0.7, top_k=40, top_p=0.95) if sampled else Sampling()
    weights = Weights(model.params)
    rows = common.step_rows(sampling, batch)  # every step fed token 0
    cache = init_cache(config, batch, window, model.dtype, stacked=False)
    cache = dataclasses.replace(cache, lengths=jnp.full((batch,), filled, jnp.int32))
    spec = StepSpec(config, attn_len=window)
    shapes = output_shapes(decode_step.lower(weights, rows, cache, spec=spec).compile().as_text())

    def step(cache):
        token, _, cache = decode_step(weights, rows, cache, spec=spec)
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
    parser = common.parser(__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sampled", action="store_true", help="temperature 0.7, top-k/p")
    args = parser.parse_args(argv)
    path = common.model_path(args.tiny, args.model)
    if args.tiny:
        sizes = dict(window=16, filled=8, steps=2)
    else:
        sizes = dict(window=256, filled=128, steps=5)
    model = rj.load_model(path)
    result = dict(
        model=Path(path).name,
        machine=common.machine(),
        **profile(model, args.batch, args.sampled, **sizes),
    )
    out = common.output_folder(args, common.RESULTS / "profile_decode")
    stem = f"profile_decode_b{args.batch}_{'sampled' if args.sampled else 'greedy'}"
    common.write(stem, result, markdown(result), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
