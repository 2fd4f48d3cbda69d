"""Decode and prefill speed of two (or more) checkouts of this repository, alternated.

Question: did a change make the jitted steps faster? On a shared machine, timing one tree and
then the other mixes the change with the machine's drift (this dev VM drifts by up to ~50%
over minutes). So each tree is measured in its own process, the trees take turns for
`--rounds` rounds, and each figure is the median over rounds of per-round medians.

    git worktree add /tmp/before <revision>
    python experiments/decode_ab.py --trees /tmp/before . --out experiments/results/decode_ab
    python experiments/decode_ab.py --tiny --trees . .     # smoke run on a random tiny model

Per tree and round: `rj.load_model` (the GGUF read, dequantized and put on the device); then
`batching.decode_step` at batch 1 and 8, greedy and sampled (temperature 0.7, top-k 40, top-p
0.95), on a cache filled to 128 positions with a 256-position window; and
`batching.prefill_step` for prompts of several lengths at batch 1 (a short "prompt" is also
what a speculative verify of k + 1 tokens costs). The trees must share these functions'
signatures. Compilation is excluded (each shape runs once first).
"""

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLED = dict(temperature=0.7, top_k=40, top_p=0.95)
PLANS = {
    "full": dict(batches=(1, 8), steps=20, filled=128, window=256, prompts=(5, 9, 128)),
    "tiny": dict(batches=(1, 2), steps=3, filled=8, window=16, prompts=(5,)),
}


def measure(tree: str, tiny: bool) -> dict:
    """One round for the checkout at `tree` (imported from there); runs in a child process."""
    sys.path.insert(0, str(Path(tree).resolve()))
    import jax
    import jax.numpy as jnp

    import realm_jax as rj
    from realm_jax.batching import decode_step, prefill_step
    from realm_jax.kv_cache import init_cache
    from realm_jax.sampling import Sampling, SamplingParams

    plan = PLANS["tiny" if tiny else "full"]
    if tiny:
        # written out here, not `testing.tiny_model_file`: older checkouts lack that helper
        from realm_jax.config import tiny as tiny_config
        from realm_jax.testing import random_tensors, write_gguf

        config = tiny_config(vocab_size=300)
        path = Path(tempfile.mkdtemp()) / "tiny.gguf"
        write_gguf(path, config, random_tensors(config))
    else:
        from realm_jax.cli import default_model_path

        path = default_model_path()
    jax.devices()  # the backend's start-up, outside the load's time
    start = time.perf_counter()
    model = rj.load_model(path)
    load_ms = {"model": 1e3 * (time.perf_counter() - start)}
    config, params = model.config, model.params

    def timed(fn, repeats):
        jax.block_until_ready(fn())  # compiles on the first shape
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    result = {"tree": tree, "load_ms": load_ms, "decode_ms": {}, "prefill_ms": {}}
    for batch in plan["batches"]:
        zeros, active = jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool)
        for mode, sampling in (("greedy", Sampling()), ("sampled", Sampling(**SAMPLED))):
            rows = SamplingParams.from_rows([sampling] * batch)
            cache = init_cache(config, batch, plan["window"], model.dtype, stacked=False)
            filled = jnp.full((batch,), plan["filled"], jnp.int32)
            state = {"cache": dataclasses.replace(cache, lengths=filled), "token": zeros}

            def step(rows=rows, state=state, zeros=zeros, active=active):
                # each step appends one position; the window holds them all
                token, _, state["cache"] = decode_step(
                    params, state["token"], active, state["cache"], rows, zeros, zeros,
                    config=config, attn_len=plan["window"],
                )  # fmt: skip
                state["token"] = token
                return token

            result["decode_ms"][f"batch {batch} {mode}"] = timed(step, plan["steps"])
    greedy = SamplingParams.from_rows([Sampling()])
    zeros = jnp.zeros((1,), jnp.int32)
    for length in plan["prompts"]:
        tokens = jnp.ones((1, length), jnp.int32)
        capacity = max(length, plan["window"])

        def prefill(tokens=tokens, capacity=capacity, length=length):
            lengths = jnp.full((1,), length, jnp.int32)
            cache = init_cache(config, 1, capacity, model.dtype, stacked=False)  # donated
            return prefill_step(
                params, tokens, lengths, cache, greedy, zeros, zeros,
                config=config, attn_len=length,
            )[0]  # fmt: skip

        result["prefill_ms"][f"{length} tokens"] = timed(prefill, max(3, plan["steps"] // 4))
    return result


def run(trees: list[str], rounds: int, tiny: bool, log=print) -> dict:
    """Alternate the trees' child processes for `rounds` rounds; medians over rounds."""
    per_tree: dict[str, list[dict]] = {tree: [] for tree in trees}
    for i in range(rounds):
        for tree in trees:
            command = [sys.executable, __file__, "--child", tree] + (["--tiny"] if tiny else [])
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            per_tree[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
            log(f"round {i + 1}/{rounds} {tree}: {per_tree[tree][-1]['decode_ms']}")
    rows = []
    for tree, results in per_tree.items():
        row = {"tree": tree, "revision": _revision(tree)}
        for kind in ("load_ms", "decode_ms", "prefill_ms"):
            row[kind] = {
                name: statistics.median(r[kind][name] for r in results) for name in results[0][kind]
            }
            row[kind + "_rounds"] = {name: [r[kind][name] for r in results] for name in row[kind]}
        rows.append(row)
    return dict(tiny=tiny, rounds=rounds, plan=PLANS["tiny" if tiny else "full"], rows=rows)


def _revision(tree: str) -> str:
    done = subprocess.run(
        ["git", "-C", tree, "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return done.stdout.strip() or "?"


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", default=["."], help="checkouts to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="random tiny model, seconds")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one round of one tree
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.tiny)))
        return 0
    result = run(args.trees, args.rounds, args.tiny)
    out = args.out or (Path(tempfile.mkdtemp()) if args.tiny else RESULTS / "decode_ab")
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_ab.json").write_text(json.dumps(result, indent=1))
    (out / "decode_ab.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
