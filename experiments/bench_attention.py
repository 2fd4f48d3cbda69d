"""Attention kernels on one device: our Pallas kernels against our XLA path, cuDNN and JAX's
bundled Pallas kernels, as a share of the device's measured ceilings.

Question: how close do our flash-attention kernels (realm_jax/attention/pallas.py) come to
cuDNN's flash attention in causal prefill, and to the memory-bandwidth roofline in decode?

    python experiments/bench_attention.py            # full sweep on a GPU (< 5 min on an H100)
    python experiments/bench_attention.py --tiny     # CPU smoke run (Pallas in interpret mode)

- Ceilings first: a large device-to-device copy (`x + 1` over 2 GiB: bytes read + written
  per second) and a large bfloat16 matmul (8192^3, float32 accumulation).
- Prefill: causal, T = S from 512 to 16384, B = 16384 // T (16k tokens per call), N*H = 2048
  with head dim 64 (N=32, K=8) or 128 (N=16, K=4): the FlashAttention-2 paper's setting,
  with GQA ratio 4. TFLOP/s count the causal half only: 4 * B * N * H * T(T+1)/2.
- Decode: T = 1 at the end of full caches, S from 1k to 32k, B 1, 8, 64, N=32, K=8, H=128
  (Llama-3-8B's attention). GB/s count the K and V bytes that must be read, 2 * B*S*K*H*2.
- Implementations: "pallas" (ours; the caches in their stored [B, K, S, H] layout seen
  through a swapaxes view, as the model passes them), "xla" (ours, same layout), "cudnn"
  (`jax.nn.dot_product_attention(implementation="cudnn")`, caches [B, S, K, H], its native
  layout), "jax_mha" (jax.experimental.pallas.ops.gpu.attention.mha; no GQA, so K/V are
  repeated to N heads outside the timing; T and S must be multiples of its 128 blocks) and
  "jax_decode" (jax.experimental.pallas.ops.gpu.decode_attention.gqa). An implementation
  that cannot run a shape is recorded with the reason, not dropped.

Every time is the median of 5 timed batches after a warm-up call (compile time recorded
separately), each batch of enough back-to-back calls to last ~20 ms, waited for with
`block_until_ready`. Writes DIR/bench_attention.json and DIR/bench_attention.md.
"""

import functools
import math
import os
import platform
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import common
import jax
import jax.numpy as jnp

from realm_jax.attention.pallas import pallas_attention
from realm_jax.attention.xla import xla_attention

OURS = "pallas"
XLA_SCORES_LIMIT = 8e9  # bytes of float32 scores the XLA path may materialise before we skip it
BATCH_SECONDS = 0.02  # each timed batch of calls lasts about this long
REPEATS = 5
# Threads that compile programs side by side (`compile_ahead`); 1 compiles one at a time.
COMPILE_THREADS = min(8, os.cpu_count() or 1)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def time_call(fn, *args) -> dict:
    """Median seconds per call of `fn(*args)` (a jitted or compiled function), and the
    seconds of the first call, which compiles a jitted `fn` and is left out."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    inner = max(1, min(100, int(BATCH_SECONDS / max(time.perf_counter() - start, 1e-6))))
    batches = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        batches.append((time.perf_counter() - start) / inner)
    return dict(seconds=common.median(batches), first_call_s=first_call_s, calls_per_batch=inner)


def compile_ahead(jobs: dict, threads: int) -> dict:
    """{key: (jitted function, args, static kwargs)} -> {key: (compiled program, seconds), or
    the exception that stopped it}.

    Each job is lowered here in turn (tracing holds the GIL) and its XLA compilation handed to
    a pool of `threads` as soon as it is lowered; XLA compiles outside the GIL, so the programs
    compile side by side on the host's cores. `seconds` is a compilation's own wall
    time, with the others running beside it. Lowering needs only shapes: args may be
    `jax.ShapeDtypeStruct`s."""

    def compile_one(lowered):
        start = time.perf_counter()
        return lowered.compile(), time.perf_counter() - start

    pending = {}
    with ThreadPoolExecutor(threads) as pool:
        for key, (fn, args, kwargs) in jobs.items():
            try:
                pending[key] = pool.submit(compile_one, fn.lower(*args, **kwargs))
            except Exception as error:  # one job's failure is its own
                pending[key] = error
    out = {}
    for key, job in pending.items():
        try:
            out[key] = job if isinstance(job, Exception) else job.result()
        except Exception as error:
            out[key] = error
    return out


def side_by_side(jobs: dict, threads: int) -> dict:
    """{key: callable of no arguments} -> {key: (its result, seconds) or the exception it
    raised}, the calls run on a pool of `threads`.

    For programs that only a run compiles (the steps inside a generation stream), where
    `compile_ahead` has nothing to lower: a job that runs a few steps compiles them, and XLA
    compiles outside the GIL, so the jobs' programs compile side by side. Jobs that need the
    same program wait for its one compilation (jit compiles a program once, whichever
    thread asks first); `seconds` includes that wait."""

    def timed(job):
        start = time.perf_counter()
        return job(), time.perf_counter() - start

    with ThreadPoolExecutor(threads) as pool:
        pending = {key: pool.submit(timed, job) for key, job in jobs.items()}
    out = {}
    for key, future in pending.items():
        try:
            out[key] = future.result()
        except Exception as error:  # one job's failure is its own
            out[key] = error
    return out


def measure_ceilings(tiny: bool) -> dict:
    """Device-to-device copy GB/s (read + write) and bf16 matmul TFLOP/s."""
    n = (1 << 20) if tiny else (1 << 30)  # bf16 elements: 2 MiB or 2 GiB
    x = jnp.ones((n,), jnp.bfloat16)
    copy = time_call(jax.jit(lambda x: x + 1), x)
    del x
    m = 256 if tiny else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    mm = time_call(matmul, a, a)
    return dict(
        copy_gb_s=2 * n * 2 / copy["seconds"] / 1e9,
        matmul_tflop_s=2 * m**3 / mm["seconds"] / 1e12,
    )


def prefill_configs(tiny: bool) -> list[dict]:
    if tiny:
        return [dict(b=1, t=128, n=4, k=2, h=64)]
    out = []
    for h, lengths in ((128, (512, 1024, 2048, 4096, 8192, 16384)), (64, (512, 2048, 8192))):
        n = 2048 // h
        out += [dict(b=16384 // t, t=t, n=n, k=n // 4, h=h) for t in lengths]
    return out


def decode_configs(tiny: bool) -> list[dict]:
    if tiny:
        return [dict(b=2, s=256, n=4, k=2, h=64)]
    return [dict(b=b, s=s, n=32, k=8, h=128) for b in (1, 8, 64) for s in (1024, 8192, 32768)]


def _repeat_heads(cache: jax.Array, group: int) -> jax.Array:
    """[B, S, K, H] -> [B, S, N, H], each KV head repeated for its G query heads."""
    return jnp.repeat(cache, group, axis=2)


def prefill_impls(config: dict, dtype, interpret: bool) -> dict:
    """name -> (jitted fn, args) or a reason string, for one causal prefill shape."""
    b, t, n, k, h = (config[x] for x in "btnkh")
    rng = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(rng[0], (b, t, n, h), dtype)
    k_stored = jax.random.normal(rng[1], (b, k, t, h), dtype)  # [B, K, S, H]
    v_stored = jax.random.normal(rng[2], (b, k, t, h), dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = jnp.full((b,), t, jnp.int32)
    args = (q, k_stored, v_stored, positions, lengths)
    impls = {}

    def ours(attend):
        def fn(q, k_stored, v_stored, positions, lengths):
            view = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, S, K, H]
            return attend(q, view(k_stored), view(v_stored), positions, lengths)

        return jax.jit(fn)

    impls[OURS] = (ours(functools.partial(pallas_attention, interpret=interpret)), args)
    scores_bytes = 4 * b * n * t * t
    if scores_bytes > XLA_SCORES_LIMIT:
        impls["xla"] = f"skipped: would materialise {scores_bytes / 1e9:.0f} GB of scores"
    else:
        impls["xla"] = (ours(xla_attention), args)
    k_bskh, v_bskh = (jnp.swapaxes(x, 1, 2) for x in (k_stored, v_stored))  # [B, S, K, H]
    if _on_gpu():
        cudnn = functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"
        )
        impls["cudnn"] = (jax.jit(cudnn), (q, k_bskh, v_bskh))
    else:
        impls["cudnn"] = "unavailable: needs a GPU"
    if t % 128:
        impls["jax_mha"] = "unavailable: T and S must be multiples of its 128 blocks"
    else:
        mha = _bundled("attention")
        if isinstance(mha, str):
            impls["jax_mha"] = mha
        else:
            fn = functools.partial(
                mha.mha,
                segment_ids=None,
                sm_scale=1 / math.sqrt(h),
                causal=True,
                interpret=interpret,
            )
            reps = (_repeat_heads(x, n // k) for x in (k_bskh, v_bskh))  # [B, S, N, H]
            impls["jax_mha"] = (jax.jit(fn), (q, *reps))
    return impls


def decode_impls(config: dict, dtype, interpret: bool) -> dict:
    """name -> (jitted fn, args) or a reason string, for one T = 1 decode shape."""
    b, s, n, k, h = (config[x] for x in "bsnkh")
    rng = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(rng[0], (b, 1, n, h), dtype)
    k_stored = jax.random.normal(rng[1], (b, k, s, h), dtype)  # [B, K, S, H]
    v_stored = jax.random.normal(rng[2], (b, k, s, h), dtype)
    positions = jnp.full((b, 1), s - 1, jnp.int32)
    lengths = jnp.full((b,), s, jnp.int32)
    args = (q, k_stored, v_stored, positions, lengths)

    def ours(attend):
        def fn(q, k_stored, v_stored, positions, lengths):
            view = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [B, S, K, H]
            return attend(q, view(k_stored), view(v_stored), positions, lengths)

        return jax.jit(fn)

    impls = {
        OURS: (ours(functools.partial(pallas_attention, interpret=interpret)), args),
        "xla": (ours(xla_attention), args),
    }
    k_bskh, v_bskh = (jnp.swapaxes(x, 1, 2) for x in (k_stored, v_stored))  # [B, S, K, H]
    if _on_gpu():
        cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
        impls["cudnn"] = (jax.jit(cudnn), (q, k_bskh, v_bskh))
    else:
        impls["cudnn"] = "unavailable: needs a GPU"
    decode = _bundled("decode_attention")
    if isinstance(decode, str):
        impls["jax_decode"] = decode
    else:
        fn = functools.partial(decode.gqa, interpret=interpret)
        impls["jax_decode"] = (jax.jit(fn), (q[:, 0], k_bskh, v_bskh, None, lengths))
    return impls


def _bundled(name: str):
    """jax.experimental.pallas.ops.gpu.<name>, or why it is unavailable (newer JAX deprecates
    these modules; the warning is recorded, not raised)."""
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(f"jax.experimental.pallas.ops.gpu.{name}")
        except Exception as error:  # absent in this JAX version
            return f"unavailable: {type(error).__name__}: {error}"


def _measure(impls: dict, threads: int) -> dict:
    """Time every runnable implementation, all compiled first side by side (`compile_ahead`);
    failures become reasons."""
    jobs = {name: (*value, {}) for name, value in impls.items() if not isinstance(value, str)}
    with warnings.catch_warnings():  # lowering traces: newer JAX deprecates the bundled ops
        warnings.simplefilter("ignore", DeprecationWarning)
        programs = compile_ahead(jobs, threads)
    out = {}
    for name, value in impls.items():
        if isinstance(value, str):
            out[name] = dict(status=value)
            continue
        try:
            if isinstance(programs[name], Exception):
                raise programs[name]
            compiled, compile_s = programs[name]
            out[name] = dict(status="ok", compile_s=compile_s, **time_call(compiled, *value[1]))
        except Exception as error:  # e.g. cuDNN refusing a shape, or out of memory
            out[name] = dict(status=f"failed: {type(error).__name__}: {str(error)[:300]}")
        programs[name] = None  # its executable goes before the next one runs
    return out


def _summarise(row: dict, metric: str, amount: float, ceiling: float) -> dict:
    """Add throughput (`metric` = amount / seconds), ratio to ceiling, ours vs best other."""
    for timing in row["impls"].values():
        if timing["status"] == "ok":
            timing[metric] = amount / timing["seconds"]
            timing["share_of_ceiling"] = timing[metric] / ceiling
    others = [
        (timing[metric], name)
        for name, timing in row["impls"].items()
        if name != OURS and timing["status"] == "ok"
    ]
    ours = row["impls"][OURS]
    if others and ours["status"] == "ok":
        best, best_name = max(others)
        row["best_other"] = best_name
        row["ours_over_best_other"] = ours[metric] / best
    return row


def run(
    tiny: bool = False, budget_s: float = 240.0, compile_threads: int = COMPILE_THREADS
) -> dict:
    """The whole sweep; returns the JSON-able result. Shapes left when `budget_s` seconds
    have passed are recorded as skipped, so the sweep always ends in time. Each shape's
    implementations compile side by side on `compile_threads` threads."""
    start = time.perf_counter()
    dtype = jnp.float32 if tiny and not _on_gpu() else jnp.bfloat16
    interpret = not _on_gpu()
    ceilings = measure_ceilings(tiny)
    result = dict(
        device=jax.devices()[0].device_kind,
        backend=jax.default_backend(),
        jax=jax.__version__,
        python=platform.python_version(),
        machine=common.machine(),
        dtype=jnp.dtype(dtype).name,
        ceilings=ceilings,
        prefill=[],
        decode=[],
    )

    def out_of_time() -> bool:
        return time.perf_counter() - start > budget_s

    for config in prefill_configs(tiny):
        b, t, n, h = (config[x] for x in "btnh")
        if out_of_time():
            result["prefill"].append(dict(config, skipped="time budget"))
            continue
        row = dict(config, impls=_measure(prefill_impls(config, dtype, interpret), compile_threads))
        flops = 4 * b * n * h * t * (t + 1) / 2
        result["prefill"].append(
            _summarise(row, "tflop_s", flops / 1e12, ceilings["matmul_tflop_s"])
        )
    for config in decode_configs(tiny):
        b, s, k, h = (config[x] for x in "bskh")
        if out_of_time():
            result["decode"].append(dict(config, skipped="time budget"))
            continue
        row = dict(config, impls=_measure(decode_impls(config, dtype, interpret), compile_threads))
        gigabytes = 2 * b * s * k * h * jnp.dtype(dtype).itemsize / 1e9
        result["decode"].append(_summarise(row, "gb_s", gigabytes, ceilings["copy_gb_s"]))
    result["seconds"] = time.perf_counter() - start
    return result


IMPL_ORDER = (OURS, "xla", "cudnn", "jax_mha", "jax_decode")


def _cell(timing: dict | None, metric: str) -> str:
    if timing is None:
        return ""
    if timing["status"] != "ok":
        return timing["status"].split(":")[0]
    return f"{timing[metric]:.3g} ({1e3 * timing['seconds']:.3g} ms)"


def markdown(result: dict) -> str:
    """Two tables: prefill TFLOP/s and decode GB/s, each implementation's ms alongside."""
    c = result["ceilings"]
    lines = [
        f"Device: {result['device']} ({result['backend']}, jax {result['jax']}, "
        f"{result['dtype']}); measured ceilings: copy {c['copy_gb_s']:.3g} GB/s, bf16 matmul "
        f"{c['matmul_tflop_s']:.3g} TFLOP/s; sweep {result['seconds']:.0f} s.",
        "",
        "Causal prefill, TFLOP/s (ms):",
        "",
        "| B | T=S | N/K | H | " + " | ".join(IMPL_ORDER[:4]) + " | ours / best other | "
        "ours / matmul ceiling |",
        "|---|---|---|---|" + "---|" * 6,
    ]
    for row in result["prefill"]:
        lines.append(_row(row, f"{row['b']} | {row['t']}", "tflop_s", IMPL_ORDER[:4]))
    lines += [
        "",
        "Decode (T = 1, full caches), GB/s of K and V read (ms):",
        "",
        "| B | S | N/K | H | "
        + " | ".join((*IMPL_ORDER[:3], IMPL_ORDER[4]))
        + " | ours / best other | ours / copy ceiling |",
        "|---|---|---|---|" + "---|" * 6,
    ]
    for row in result["decode"]:
        names = (*IMPL_ORDER[:3], IMPL_ORDER[4])
        lines.append(_row(row, f"{row['b']} | {row['s']}", "gb_s", names))
    return "\n".join(lines) + "\n"


def _row(row: dict, lead: str, metric: str, names) -> str:
    heads = f"{row['n']}/{row['k']} | {row['h']}"
    if "skipped" in row:
        return f"| {lead} | {heads} | " + " | ".join(["skipped"] * len(names)) + " | | |"
    cells = [_cell(row["impls"].get(name), metric) for name in names]
    ours = row["impls"][OURS]
    ratio = (
        f"{row['ours_over_best_other']:.2f} ({row['best_other']})" if "best_other" in row else ""
    )
    share = f"{100 * ours['share_of_ceiling']:.0f}%" if ours["status"] == "ok" else ""
    return f"| {lead} | {heads} | " + " | ".join(cells) + f" | {ratio} | {share} |"


def main(argv=None) -> int:
    parser = common.parser(__doc__, model=False)  # --tiny: CPU smoke sizes, seconds
    parser.add_argument("--budget", type=float, default=240.0, help="seconds before skipping")
    parser.add_argument(
        "--compile-threads", type=int, default=COMPILE_THREADS, help="1: one at a time"
    )
    args = parser.parse_args(argv)
    result = run(tiny=args.tiny, budget_s=args.budget, compile_threads=args.compile_threads)
    common.write("bench_attention", result, markdown(result), common.output_folder(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
