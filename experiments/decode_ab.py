"""Decode and prefill speed of two (or more) checkouts of this repository, alternated.

Question: did a change make the jitted steps faster? On a shared machine, timing one tree and
then the other mixes the change with the machine's drift (this dev VM drifts by up to ~50%
over minutes). So each tree is measured in its own process, the trees take turns for
`--rounds` rounds, and each figure is the median over rounds of per-round medians.

    git worktree add /tmp/before <revision>
    python experiments/decode_ab.py --trees /tmp/before . --out experiments/results/decode_ab
    python experiments/decode_ab.py --tiny --trees . .     # smoke run on a random tiny model

Per tree and round: `rj.load_model` (the GGUF read, dequantized and put on the device); then
one decode step (`steps.decode.decode_step`) at batch 1 and 8, greedy and sampled
(temperature 0.7, top-k 40, top-p 0.95), on a cache filled to 128 positions with a
256-position window; and a prefill (`steps.decode.append_and_sample`, jitted) of prompts of
several lengths at batch 1 into a fresh cache (a short "prompt" is also what a speculative
verify of k + 1 tokens costs). A tree from before the steps API (`realm_jax/steps`) is
measured through its `batching.decode_step` and `batching.prefill_step`, the same
computations, so a change can be compared with the revision before that API. Compilation is
excluded (each shape runs once first). Every tree reads the same model file (`--model`, or
one random tiny model with `--tiny`), resolved by this checkout.
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import common

SAMPLED = dict(temperature=0.7, top_k=40, top_p=0.95)
PLANS = {
    "full": dict(batches=(1, 8), steps=20, filled=128, window=256, prompts=(5, 9, 128)),
    "tiny": dict(batches=(1, 2), steps=3, filled=8, window=16, prompts=(5,)),
}


def _steps(model):
    """The tree's steps for `model`, through the step API of the realm_jax imported:
    `realm_jax.steps`, or `realm_jax.batching` in trees from before it.

    Returns:
      (decode(rows, cache, window) -> (rows with the new tokens, cache),
       prefill(tokens [1, T], lengths [1], cache, rows) -> first token [1],
       rows(sampling, batch) -> the rows of a batch on the device: `Rows`, or for
       `batching` a (tokens, active, sampling, seeds, request ids) tuple).
    """
    import jax
    import numpy as np

    from realm_jax.sampling import SamplingParams

    config, params = model.config, model.params
    try:
        from realm_jax.steps.decode import decode_step
        from realm_jax.steps.state import StepSpec, Weights
    except ImportError:  # before the steps API
        from realm_jax.batching import decode_step, prefill_step

        def rows(sampling, batch):
            zeros = jax.device_put(np.zeros(batch, np.int32))
            active = jax.device_put(np.ones(batch, bool))
            sampling = jax.device_put(SamplingParams.from_rows([sampling] * batch))
            return zeros, active, sampling, zeros, zeros

        def decode(rows, cache, window):
            token, active, sampling, seeds, ids = rows
            token, _, cache = decode_step(
                params, token, active, cache, sampling, seeds, ids, config=config,
                attn_len=window,
            )  # fmt: skip
            return (token, active, sampling, seeds, ids), cache

        def prefill(tokens, lengths, cache, rows):
            _, _, sampling, seeds, ids = rows
            return prefill_step(
                params, tokens, lengths, cache, sampling, seeds, ids, config=config,
                attn_len=tokens.shape[1],
            )[0]  # fmt: skip

        return decode, prefill, rows

    weights = Weights(params)

    def decode(rows, cache, window):
        token, _, cache = decode_step(weights, rows, cache, spec=StepSpec(config, window))
        return dataclasses.replace(rows, tokens=token), cache

    def prefill(tokens, lengths, cache, rows):
        spec = StepSpec(config, attn_len=tokens.shape[1])
        return common.prefill_step(params, None, tokens, lengths, cache, rows, spec=spec)[0]

    return decode, prefill, common.step_rows


def measure(tree: str, model_path: str, tiny: bool) -> dict:
    """One round for the checkout at `tree` (imported from there); runs in a child process."""
    sys.path.insert(0, str(Path(tree).resolve()))
    import jax
    import jax.numpy as jnp

    import realm_jax as rj
    from realm_jax.kv_cache import init_cache
    from realm_jax.sampling import Sampling

    plan = PLANS["tiny" if tiny else "full"]
    jax.devices()  # the backend's start-up, outside the load's time
    start = time.perf_counter()
    model = rj.load_model(model_path)
    load_ms = {"model": 1e3 * (time.perf_counter() - start)}
    config = model.config
    decode, prefill, step_rows = _steps(model)

    def timed(fn, repeats):
        jax.block_until_ready(fn())  # compiles on the first shape
        return 1e3 * common.median(common.time_call(fn, repeats=repeats))

    result = {"tree": tree, "load_ms": load_ms, "decode_ms": {}, "prefill_ms": {}}
    for batch in plan["batches"]:
        for mode, sampling in (("greedy", Sampling()), ("sampled", Sampling(**SAMPLED))):
            cache = init_cache(config, batch, plan["window"], model.dtype, stacked=False)
            filled = jnp.full((batch,), plan["filled"], jnp.int32)
            state = {"cache": dataclasses.replace(cache, lengths=filled)}
            state["rows"] = step_rows(sampling, batch)

            def step(state=state):
                # each step appends one position; the window holds them all
                state["rows"], state["cache"] = decode(
                    state["rows"], state["cache"], plan["window"]
                )
                return state["cache"].lengths  # an output of the step: waits for it

            result["decode_ms"][f"batch {batch} {mode}"] = timed(step, plan["steps"])
    greedy = step_rows(Sampling(), 1)
    for length in plan["prompts"]:
        tokens = jnp.ones((1, length), jnp.int32)
        capacity = max(length, plan["window"])

        def prefill_fresh(tokens=tokens, capacity=capacity, length=length):
            lengths = jnp.full((1,), length, jnp.int32)
            cache = init_cache(config, 1, capacity, model.dtype, stacked=False)  # donated
            return prefill(tokens, lengths, cache, greedy)

        result["prefill_ms"][f"{length} tokens"] = timed(prefill_fresh, max(3, plan["steps"] // 4))
    return result


def run(trees: list[str], rounds: int, tiny: bool, model_path: Path, log=print) -> dict:
    """Alternate the trees' child processes for `rounds` rounds, each reading `model_path`;
    medians over rounds."""
    per_tree: dict[str, list[dict]] = {tree: [] for tree in trees}
    for i in range(rounds):
        for tree in trees:
            command = [sys.executable, __file__, "--child", tree, "--model", str(model_path)]
            command += ["--tiny"] if tiny else []
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            per_tree[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
            log(f"round {i + 1}/{rounds} {tree}: {per_tree[tree][-1]['decode_ms']}")
    rows = []
    for tree, results in per_tree.items():
        row = {"tree": tree, "revision": common.revision(tree) or "?"}
        for kind in ("load_ms", "decode_ms", "prefill_ms"):
            row[kind] = {
                name: common.median(r[kind][name] for r in results) for name in results[0][kind]
            }
            row[kind + "_rounds"] = {name: [r[kind][name] for r in results] for name in row[kind]}
        rows.append(row)
    plan = PLANS["tiny" if tiny else "full"]
    return dict(tiny=tiny, rounds=rounds, plan=plan, machine=common.machine(), rows=rows)


def markdown(result: dict) -> str:
    first = result["rows"][0]
    names = [("load_ms", n) for n in first["load_ms"]]
    names += [("decode_ms", n) for n in first["decode_ms"]]
    names += [("prefill_ms", n) for n in first["prefill_ms"]]
    lines = [
        f"{result['rounds']} alternated rounds; ms, median over rounds "
        "(load: `rj.load_model`; decode: per step; prefill: per prompt at batch 1).",
        "",
        "| tree | revision | " + " | ".join(f"{k[:-3]} {n}" for k, n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for row in result["rows"]:
        cells = [f"{row[k][n]:.1f}" for k, n in names]
        lines.append(f"| {row['tree']} | {row['revision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--trees", nargs="+", default=["."], help="checkouts to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one round of one tree
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.tiny)))
        return 0
    model_path = common.model_path(args.tiny, args.model)
    result = run(args.trees, args.rounds, args.tiny, model_path)
    out = common.output_folder(args, common.RESULTS / "decode_ab")
    common.write("decode_ab", result, markdown(result), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
