"""What each way of running LoRA adapters costs per decoded token, and in memory.

Question: how fast do the base model, a merged adapter, one unmerged adapter and a batch of
rows with different adapters (multi-adapter: a stack gathered per row) decode, as the rank
(4..64) and the number of distinct adapters in the batch (1..batch) vary? What does an
adapter cost in memory, and what does merging cost?

    python experiments/lora_strategies.py            # real model, writes results/lora_strategies.*
    python experiments/lora_strategies.py --tiny     # seconds-long smoke run on a random model

Adapters are random, target every projection (q, k, v, o, gate, up, down) and are built in
memory (`lora.adapters.adapter_from_tensors`): speed depends only on shapes. Decode steps are
the step that `rj.generate`'s device loop runs, called alone (`steps.decode.decode_step`), on
a cache filled to `prompt_len` positions (its contents do not change the work). Timings exclude
compilation (reported separately), wait with `block_until_ready`, and quote the median of
repeated runs.
`run(tiny)` returns the result dict, so a GPU suite can import it.
"""

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import bench_attention
import common
import jax
import jax.numpy as jnp
import numpy as np

import realm_jax as rj
from realm_jax.kv_cache import init_cache
from realm_jax.layout import expected_shapes, lora_pieces
from realm_jax.lora.adapters import adapter_from_tensors, adapter_nbytes
from realm_jax.sampling import Sampling
from realm_jax.steps.decode import bucket, decode_step, decode_window
from realm_jax.steps.state import StepSpec, Weights

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

TINY_PLAN = dict(
    batch=2, ranks=(4,), distinct=(1, 2), prompt_len=16, steps=4, repeats=2, new_tokens=4
)
FULL_PLAN = dict(
    batch=8,
    ranks=(4, 16, 64),
    distinct=(1, 2, 4, 8),
    prompt_len=128,
    steps=12,
    repeats=3,
    new_tokens=32,
)


def random_adapter(model, rank: int, seed: int):
    """A random adapter of rank `rank` on every projection of every layer."""
    rng = np.random.default_rng(seed)
    config = model.config
    tensors = {}
    for i in range(config.n_layers):
        for kind in KINDS:
            shape_a, shape_b = expected_shapes(config, kind, rank)
            a = rng.standard_normal(shape_a).astype(np.float32) / np.sqrt(shape_a[1])
            b = 0.01 * rng.standard_normal(shape_b).astype(np.float32)
            tensors[f"blk.{i}.{kind}.weight"] = (a, b, 2.0)
    stacked = not isinstance(model.params.layers, tuple)
    return adapter_from_tensors(config, tensors, dtype=model.dtype, stacked=stacked)


def lora_parameters(config, rank: int) -> int:
    """Numbers in a PEFT file for one adapter of rank `rank` on every projection."""
    total = 0
    for kind in KINDS:
        shape_a, shape_b = expected_shapes(config, kind, rank)
        total += int(np.prod(shape_a)) + int(np.prod(shape_b))
    return total * config.n_layers


class DecodeCase:
    """One decode configuration with its own cache, stepped by `steps.decode.decode_step`:
    `batch` greedy rows whose cache holds `prompt_len` positions (their contents do not
    change the work), each row running adapter `adapter_ids[b]` of `lora` (None: no LoRA)."""

    def __init__(self, model, params, lora, adapter_ids, plan, **labels):
        self.labels = labels
        batch = labels["batch"]
        self.weights = Weights(params, lora=lora)
        total = plan["prompt_len"] + plan["steps"] * plan["repeats"] + 1
        capacity = bucket(total)
        self.spec = StepSpec(model.config, decode_window(total, capacity))
        stacked = not isinstance(params.layers, tuple)
        cache = init_cache(model.config, batch, capacity, model.dtype, stacked=stacked)
        lengths = jnp.full((batch,), plan["prompt_len"], jnp.int32)
        self.cache = dataclasses.replace(cache, lengths=lengths)
        self.rows = common.step_rows(Sampling(), batch, adapter_ids)
        self.times: list[float] = []
        self.compile_s = 0.0

    def _step(self) -> jax.Array:
        token, _, self.cache = decode_step(self.weights, self.rows, self.cache, spec=self.spec)
        self.rows = dataclasses.replace(self.rows, tokens=token)  # the next step's input
        return token

    def step(self) -> float:
        """Run one decode step; return its wall-clock seconds."""
        (seconds,) = common.time_call(self._step, repeats=1)
        return seconds


def time_cases(cases: list[DecodeCase], plan, log, threads: int | None = None) -> None:
    """Compile every case, then time `steps` steps of each case in turn, `repeats` rounds.

    The cases compile side by side: each runs its first step on a pool of `threads`
    (`bench_attention.side_by_side`, default its COMPILE_THREADS). A case that shares its
    program with another (merged with base, multi-adapter at any number of distinct
    adapters) waits for that one compilation, so its compile seconds are the wait.
    Interleaving the cases spreads the load that other processes put on a shared machine
    over all of them instead of over whichever case ran at the time.
    """
    bench = bench_attention
    jobs = {i: case.step for i, case in enumerate(cases)}
    for case, out in zip(
        cases, bench.side_by_side(jobs, threads or bench.COMPILE_THREADS).values(), strict=True
    ):
        if isinstance(out, Exception):
            raise RuntimeError(f"compiling {case.labels}") from out
        case.compile_s = out[1]
        log(f"compiled {case.labels} in {case.compile_s:.1f} s")
    for _ in range(plan["repeats"]):
        for case in cases:
            case.times += [case.step() for _ in range(plan["steps"])]


def time_generate(model, adapters, plan) -> list[dict]:
    """Seconds of `rj.generate` for `new_tokens` greedy tokens after a `prompt_len` prompt,
    one request end to end (merge included), per strategy: first call and the median of
    `repeats` later calls, interleaved."""
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, plan["prompt_len"])
    runs = {(strategy, rank): [] for rank in adapters for strategy in ("merged", "unmerged")}
    for _ in range(plan["repeats"] + 1):
        for strategy, rank in runs:
            start = time.perf_counter()
            rj.generate(
                model,
                prompt.tolist(),
                plan["new_tokens"],
                stop_at_eos=False,
                adapter=adapters[rank],
                lora_strategy=strategy,
            )
            runs[strategy, rank].append(time.perf_counter() - start)
    return [
        dict(strategy=strategy, rank=rank, s=common.median(t[1:]), first_call_s=t[0])
        for (strategy, rank), t in runs.items()
    ]


def _load(tiny: bool, model_path: str | None, dtype: str):
    return rj.load_model(common.model_path(tiny, model_path), dtype=dtype)


def run(
    tiny: bool,
    model_path: str | None = None,
    log=print,
    *,
    plan: dict | None = None,
    dtype: str = "float32",
    compile_threads: int | None = None,
) -> dict:
    """Measure every strategy; returns the result dict that `main` writes as JSON.

    Args:
      tiny: a random tiny model and TINY_PLAN (seconds).
      model_path: a GGUF file instead of the default model.
      log: where progress lines go.
      plan: overrides of the plan's keys (batch, ranks, distinct, prompt_len, ...).
      dtype: the weights' dtype.
      compile_threads: cases compiled side by side (`time_cases`); 1: one at a time.
    """
    plan = {**(TINY_PLAN if tiny else FULL_PLAN), **(plan or {})}
    start = time.perf_counter()
    model = _load(tiny, model_path, dtype)
    load_s = time.perf_counter() - start
    config, batch = model.config, plan["batch"]
    middle = plan["ranks"][len(plan["ranks"]) // 2]  # the rank of the merged and distinct runs
    cases = [
        DecodeCase(model, model.params, None, None, plan, strategy="base", batch=b)
        for b in (1, batch)
    ]
    memory = []
    for rank in plan["ranks"]:
        adapter = random_adapter(model, rank, seed=rank)
        start = time.perf_counter()
        jax.block_until_ready(rj.merge_adapter(model.params, adapter))
        first = time.perf_counter() - start
        start = time.perf_counter()
        merged = jax.block_until_ready(rj.merge_adapter(model.params, adapter))
        merge_s = time.perf_counter() - start
        # multi-adapter: slot 0 = base, slots 1..batch = distinct adapters
        others = [random_adapter(model, rank, seed=100 * rank + j) for j in range(batch)]
        stack = rj.stack_adapters([None, *others])
        memory.append(
            dict(
                rank=rank,
                lora_parameters=lora_parameters(config, rank),
                file_bytes_float32=4 * lora_parameters(config, rank),
                pytree_bytes=adapter_nbytes(adapter),
                multi_stack_bytes=adapter_nbytes(stack),
                merge_s=merge_s,
                merge_first_call_s=first,
            )
        )
        log(json.dumps(memory[-1]))
        labels = dict(batch=1, rank=rank, distinct=1)
        if rank == middle:  # merged params have the base's shapes: one rank says it all
            cases.append(DecodeCase(model, merged, None, None, plan, strategy="merged", **labels))
        single = rj.stack_adapters([adapter])
        ids = [0]
        cases.append(
            DecodeCase(model, model.params, single, ids, plan, strategy="unmerged", **labels)
        )
        for d in plan["distinct"] if rank == middle else (batch,):
            ids = [1 + (row % d) for row in range(batch)]
            cases.append(
                DecodeCase(
                    model,
                    model.params,
                    stack,
                    ids,
                    plan,
                    strategy="multi",
                    batch=batch,
                    rank=rank,
                    distinct=d,
                )
            )
        del merged, others

    time_cases(cases, plan, log, compile_threads)
    rows = []
    for case in cases:
        median, best = common.median(case.times), min(case.times)
        row = {"rank": 0, "distinct": 0, **case.labels}
        row.update(
            ms_per_step=1e3 * median,
            best_ms_per_step=1e3 * best,
            tok_s=row["batch"] / median,
            best_tok_s=row["batch"] / best,
            compile_s=case.compile_s,
        )
        rows.append(row)
        log(json.dumps(row))
    del cases
    generate = []  # new_tokens = 0 (the GPU suite's plan) leaves out the end-to-end rows
    if plan["new_tokens"]:
        adapters = {middle: random_adapter(model, middle, seed=middle)}
        generate = time_generate(model, adapters, plan)
    for g in generate:
        log(json.dumps(g))

    return dict(
        model=Path(model.path).name,
        dtype=str(model.dtype),
        tiny=tiny,
        plan=plan,
        machine=dict(
            common.machine(),
            processor=platform.processor(),
            devices=[str(d) for d in jax.devices()],
        ),
        load_s=load_s,
        base_weight_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params)),
        fused_leaves={k: p.leaf for k, p in lora_pieces(config).items()},
        memory=memory,
        rows=rows,
        generate=generate,
    )


def markdown(result: dict) -> str:
    """The tables of docs/lora.md for one result."""
    base = {r["batch"]: r for r in result["rows"] if r["strategy"] == "base"}
    lines = [
        f"Model `{result['model']}` ({result['dtype']}, {result['machine']['backend']}), "
        f"prompt {result['plan']['prompt_len']} positions in the cache, "
        f"{result['plan']['steps']} decode steps x {result['plan']['repeats']} rounds, "
        "cases interleaved; adapters on all 7 projections of every layer.",
        "",
        "| strategy | batch | rank | distinct adapters | ms / step (median) | ms / step (best) "
        "| tok/s (best) | vs base (best) | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = r["best_tok_s"] / base[r["batch"]]["best_tok_s"]
        lines.append(
            f"| {r['strategy']} | {r['batch']} | {r['rank'] or '-'} | {r['distinct'] or '-'} | "
            f"{r['ms_per_step']:.1f} | {r['best_ms_per_step']:.1f} | {r['best_tok_s']:.1f} | "
            f"{ratio:.2f}x | {r['compile_s']:.1f} |"
        )
    if result["generate"]:
        lines += [
            "",
            f"One request end to end (`rj.generate`, prompt {result['plan']['prompt_len']}, "
            f"{result['plan']['new_tokens']} new tokens, batch 1), median after a first call:",
            "",
            "| lora_strategy | rank | s per request | first call s (compiles) |",
            "|---|---|---|---|",
        ]
    for g in result["generate"]:
        lines.append(f"| {g['strategy']} | {g['rank']} | {g['s']:.2f} | {g['first_call_s']:.1f} |")
    lines += [
        "",
        f"| rank | LoRA parameters | file bytes (f32) | our pytree bytes | stack of "
        f"{result['plan']['batch'] + 1} (base + {result['plan']['batch']}) "
        "| merge s (first call) |",
        "|---|---|---|---|---|---|",
    ]
    for m in result["memory"]:
        lines.append(
            f"| {m['rank']} | {m['lora_parameters']:,} | {m['file_bytes_float32'] / 1e6:.2f} MB "
            f"| {m['pytree_bytes'] / 1e6:.2f} MB | {m['multi_stack_bytes'] / 1e6:.2f} MB "
            f"| {m['merge_s']:.3f} ({m['merge_first_call_s']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """tok/s against rank per strategy; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for strategy, batch, marker in (("unmerged", 1, "o"), ("multi", result["plan"]["batch"], "s")):
        points = [
            r
            for r in rows
            if r["strategy"] == strategy and (strategy != "multi" or r["distinct"] == batch)
        ]
        left.plot(
            [r["rank"] for r in points],
            [r["best_tok_s"] for r in points],
            marker=marker,
            label=f"{strategy} (batch {batch})",
        )
    for r in rows:
        if r["strategy"] in ("base", "merged"):
            left.axhline(
                r["best_tok_s"],
                linestyle="--" if r["strategy"] == "base" else ":",
                color="gray",
                label=f"{r['strategy']} (batch {r['batch']})",
            )
    left.set_xscale("log", base=2)
    left.set_ylim(bottom=0)
    left.set_xlabel("LoRA rank")
    left.set_ylabel("decode tokens / s")
    left.legend(fontsize=7)
    multi = [r for r in rows if r["strategy"] == "multi"]
    rank = sorted({r["rank"] for r in multi}, key=lambda k: -sum(r["rank"] == k for r in multi))[0]
    points = [r for r in multi if r["rank"] == rank]
    right.plot(
        [r["distinct"] for r in points],
        [r["best_tok_s"] for r in points],
        marker="s",
        label=f"multi-adapter, rank {rank}",
    )
    base = next(
        r for r in rows if r["strategy"] == "base" and r["batch"] == result["plan"]["batch"]
    )
    right.axhline(base["best_tok_s"], linestyle="--", color="gray", label="base")
    right.set_xlabel(f"distinct adapters in a batch of {result['plan']['batch']}")
    right.set_ylabel("decode tokens / s")
    right.set_ylim(bottom=0)
    right.legend(fontsize=7)
    fig.suptitle(f"LoRA decode speed, {result['model']} ({result['machine']['backend']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    out = common.output_folder(args)
    result = run(args.tiny, args.model)
    result["plot"] = "lora_strategies.png" if plot(result, out / "lora_strategies.png") else None
    common.write("lora_strategies", result, markdown(result), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
