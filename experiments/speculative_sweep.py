"""Speculative decoding with layer-skip drafts: acceptance, speed-up, and the model of both.

Question: for SmolLM2-135M drafting for itself with its first d layers, what acceptance rate
alpha and what speed-up over plain decoding does each number of draft tokens k give, greedy
and sampled, and does Leviathan et al.'s prediction
    speed-up = (1 - alpha^(k+1)) / ((1 - alpha) (k c + 1))
hold, with alpha measured (accepted / tested draft tokens) and c the cost of one draft token
relative to one target decode step (measured by decoding with the draft alone)? And how much
does running several speculative steps per device call save over one step per call?

    python experiments/speculative_sweep.py            # real model -> results/speculative_sweep.*
    python experiments/speculative_sweep.py --tiny     # seconds-long smoke run, random model

Protocol: one chat prompt, `tokens` new tokens, EOS not stopping (every run does the same
work). A run is timed from its first token (prefill excluded) to its last, on the host clock;
tok/s = (tokens - 1) / that time. Each configuration runs once untimed for a few tokens to
compile its step, then timed. Plain decoding (`rj.stream`) is timed the same way, for the
target (the baseline, re-timed right before each speculative run because the shared VM's load
drifts by tens of percent within minutes) and for each draft (its per-token cost over the
target's, timed back to back, is c). The cost v of verifying k + 1 tokens in one target
forward is measured in decode steps: the paper's model takes v = 1, which holds where a
forward is memory-bound (a GPU at small batch) but not for XLA's CPU matrix products, so the
table gives the prediction both ways. Greedy speculative output is checked against plain
greedy token for token.

Every run goes through `rj.stream`, a one-slot `rj.Engine`. Plain decoding runs its default
of STEPS_PER_CALL (8) steps per device call. The speculative rows run one step per call
(ROW_STEPS_PER_CALL), as the host loop did, which was the speculative default when the
committed rows were measured, so that they stay comparable. The "loops" comparison sets 1
step per call against 8 for one (depth, k) pair: the same tokens, fewer dispatches. It used
to set the host loop against an on-device `lax.while_loop` over the whole generation; results
from before the steps API keep those keys, "host" and "device".
"""

import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import bench_attention
import common
import jax
import jax.numpy as jnp
import numpy as np

import realm_jax as rj
from realm_jax.engine import STEPS_PER_CALL
from realm_jax.generation import SpeculativeStats
from realm_jax.kv_cache import init_cache
from realm_jax.sampling import Sampling
from realm_jax.steps.decode import bucket, decode_window
from realm_jax.steps.state import StepSpec

PROMPT = "Write a short story about a robot who learns to paint. Make it vivid."
MODES = {"greedy": rj.Sampling(), "sampled": rj.Sampling(temperature=0.7, top_p=0.95)}

PLANS = {
    # The grid, k = 1..8 at three depths spanning low to high acceptance. On the
    # shared 2-core CPU each (depth, k) compiles its own step (~15-25 s for SmolLM2) and a
    # token costs 50-500 ms, so the CPU plan decodes 32 tokens a run (~25 minutes in all).
    "cpu": dict(
        depths=(12, 20, 28), ks=tuple(range(1, 9)), tokens=32, loop_check=(20, 2), loop_repeats=2
    ),
    "gpu": dict(
        depths=(12, 20, 28), ks=tuple(range(1, 9)), tokens=128, loop_check=(20, 4), loop_repeats=2
    ),
    "tiny": dict(depths=(1,), ks=(2,), tokens=12, loop_check=(1, 2), loop_repeats=1),
}
# Speculative steps per device call: the sweep's rows (the host loop's one step per call), and
# the two settings of the "loops" comparison with their labels in the result.
ROW_STEPS_PER_CALL = 1
LOOPS = {1: "1 step per call", STEPS_PER_CALL: f"{STEPS_PER_CALL} steps per call"}
# The labels of results from before the steps API: the host loop (one step per call) and the
# on-device loop (one call for the whole generation).
OLD_LOOPS = {"host": "host loop", "device": "on-device `lax.while_loop`"}


def predicted_speedup(alpha: float, k: int, c: float, verify: float = 1.0) -> float:
    """Leviathan et al. 2023, Theorem 3.8: expected tokens per step over the step's cost, in
    target decode steps: k draft tokens at c each, and one verification forward of k + 1
    tokens, which the paper takes to cost one decode step (verify = 1)."""
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * c + verify)


def forward_seconds(model, prompt_len: int, t: int, window: int, repeats: int = 5) -> float:
    """Median seconds to append t tokens to a one-row cache after a prompt_len prefill, with
    attention over `window` positions (`steps.decode.append_and_sample` jitted, the target
    forward of T tokens that a verification runs)."""
    capacity = window
    cache = init_cache(model.config, 1, capacity, model.dtype)
    greedy = common.step_rows(Sampling(), 1)
    prompt = jnp.full((1, bucket(prompt_len)), 100, jnp.int32)
    _, _, cache = common.prefill_step(
        model.params, None, prompt, jnp.asarray([prompt_len], jnp.int32), cache, greedy,
        spec=StepSpec(model.config, prompt.shape[1]),
    )  # fmt: skip
    tokens, count = jnp.full((1, t), 200, jnp.int32), jnp.asarray([t], jnp.int32)
    spec = StepSpec(model.config, window)
    state = {"cache": cache}

    def append():
        out = common.prefill_step(
            model.params, None, tokens, count, state["cache"], greedy, spec=spec
        )
        state["cache"] = out[2]
        return out

    times = common.time_call(append, repeats=repeats + 1)  # the first call compiles
    return common.median(times[1:])


def timed_tokens(tokens_iter) -> tuple[list[int], float]:
    """Drain a token iterator; return (tokens, seconds from the first token to the last)."""
    out, start = [], None
    for token in tokens_iter:
        out.append(token)
        if start is None:
            start = time.perf_counter()
    return out, time.perf_counter() - start


def warm(tokens_iter, count: int = 3) -> None:
    """Pull a few tokens (compiling the steps), then drop the rest of the run."""
    for i, _ in enumerate(tokens_iter):
        if i + 1 >= count:
            break
    tokens_iter.close()


def plain_per_token(model, ids, tokens, sampling) -> tuple[list[int], float]:
    """Plain decoding: (tokens, seconds per token after the first)."""
    warm(rj.stream(model, ids, tokens, sampling, 0, False))
    out, seconds = timed_tokens(rj.stream(model, ids, tokens, sampling, 0, False))
    return out, seconds / (len(out) - 1)


def speculative_run(
    model, ids, tokens, sampling, draft, k, steps_per_call=ROW_STEPS_PER_CALL
) -> dict:
    """One timed speculative run (after an untimed warm-up); stats and timing."""
    kwargs = dict(draft=draft, num_draft_tokens=k, steps_per_call=steps_per_call)
    warm(rj.stream(model, ids, tokens, sampling, 0, False, **kwargs))
    stats = SpeculativeStats()
    out, seconds = timed_tokens(
        rj.stream(model, ids, tokens, sampling, 0, False, stats=stats, **kwargs)
    )
    return dict(
        tokens=out,
        s_per_token=seconds / (len(out) - 1),
        alpha=stats.acceptance_rate,
        tokens_per_call=stats.tokens_per_call,
        s_per_step=seconds / stats.target_calls,
        position_acceptance=[None if math.isnan(a) else a for a in stats.position_acceptance],
        histogram=stats.histogram,
        target_calls=stats.target_calls,
    )


def compile_all(model, ids, plan, drafts, windows, threads: int | None) -> dict:
    """Compile every program the sweep times, side by side, by running each configuration
    for a few tokens on a pool of `threads` (`bench_attention.side_by_side`): on a GPU a
    program of the unrolled 30-layer model takes ~6-12 s to compile, the sweep has ~20, and
    one after another they were nearly all of its time. The timed runs below then find them
    compiled. Returns {"threads", "seconds"}; a job's error is raised here."""
    bench = bench_attention
    threads = threads or bench.COMPILE_THREADS
    tokens, greedy = plan["tokens"], MODES["greedy"]

    def plain(m, sampling):
        return lambda: warm(rj.stream(m, ids, tokens, sampling, 0, False))

    def speculative(depth, k, sampling, steps_per_call):
        kwargs = dict(draft=drafts[depth], num_draft_tokens=k, steps_per_call=steps_per_call)
        return lambda: warm(rj.stream(model, ids, tokens, sampling, 0, False, **kwargs))

    jobs = {("plain", mode): plain(model, sampling) for mode, sampling in MODES.items()}
    for k, window in windows.items():
        for t in (1, k + 1):
            jobs["verify", k, t] = functools.partial(
                forward_seconds, model, len(ids), t, window, repeats=1
            )
    for depth in plan["depths"]:
        jobs["draft", depth] = plain(drafts[depth], greedy)
        for k in plan["ks"]:
            for mode, sampling in MODES.items():
                jobs["speculative", depth, k, mode] = speculative(
                    depth, k, sampling, ROW_STEPS_PER_CALL
                )
    depth, k = plan["loop_check"]
    for n in LOOPS:
        jobs["speculative", depth, k, "greedy", n] = speculative(depth, k, greedy, n)
    start = time.perf_counter()
    for key, out in bench.side_by_side(jobs, threads).items():
        if isinstance(out, Exception):
            raise RuntimeError(f"compiling {key}") from out
    seconds = time.perf_counter() - start
    print(f"compiled {len(jobs)} runs' programs in {seconds:.1f} s on {threads} threads")
    return dict(threads=threads, seconds=seconds)


def load(tiny: bool, dtype: str, model_path: str | None = None):
    """The model and its chat prompt ids (a random 2-layer model and random ids with --tiny)."""
    if tiny:
        from realm_jax.config import tiny as tiny_config
        from realm_jax.testing import random_tensors, write_gguf

        config = tiny_config(vocab_size=300, n_layers=2, tied_embeddings=False)
        path = Path(tempfile.mkdtemp()) / "tiny.gguf"
        write_gguf(path, config, random_tensors(config, seed=3))
        model = rj.load_model(path, dtype=dtype)
        return model, np.random.default_rng(0).integers(3, 300, 20).tolist()
    model = rj.load_model(common.model_path(False, model_path), dtype=dtype)
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    return model, model.tokenizer.encode(text)


def run(
    tiny: bool,
    model_path: str | None = None,
    *,
    plan: dict | None = None,
    dtype: str | None = None,
    compile_threads: int | None = None,
) -> dict:
    """Run the sweep; return the result dict (see `markdown`).

    Args:
      tiny: a random 2-layer model and the "tiny" plan (seconds).
      model_path: a GGUF file instead of the default model.
      plan: overrides of the plan's depths / ks / tokens / loop_check.
      dtype: weights' dtype; default bfloat16 on a GPU, float32 elsewhere.
      compile_threads: runs that compile the sweep's programs side by side before any
        timing (default bench_attention's COMPILE_THREADS); 1 compiles one at a time.
    """
    backend = jax.default_backend()
    dtype = dtype or ("bfloat16" if backend == "gpu" else "float32")
    name = "tiny" if tiny else ("gpu" if backend == "gpu" else "cpu")
    plan = {**PLANS[name], **(plan or {})}
    start = time.perf_counter()
    model, ids = load(tiny, dtype, model_path)
    tokens = plan["tokens"]
    depth, k = plan["loop_check"]
    drafts = {d: rj.layer_skip_draft(model, d) for d in (*plan["depths"], depth)}
    windows = {
        k: decode_window(len(ids) + tokens + k, bucket(len(ids) + tokens + k)) for k in plan["ks"]
    }
    warm_s = compile_all(model, ids, plan, drafts, windows, compile_threads)
    baseline = {}
    for mode, sampling in MODES.items():
        out, seconds = plain_per_token(model, ids, tokens, sampling)
        baseline[mode] = dict(tokens=out, s_per_token=seconds)
        print(f"plain {mode}: {1e3 * seconds:.1f} ms/token", flush=True)
    # Verification cost: one target forward of k + 1 tokens, in decode steps (T = 1), at the
    # attention window the speculative runs use (prompt + tokens + k, bucketed).
    verify = {}
    for k in plan["ks"]:
        one = forward_seconds(model, len(ids), 1, windows[k])
        verify[k] = forward_seconds(model, len(ids), k + 1, windows[k]) / one
        print(f"verify k = {k}: {verify[k]:.2f} decode steps", flush=True)
    rows = []
    for depth in plan["depths"]:
        _, seconds = plain_per_token(drafts[depth], ids, tokens, MODES["greedy"])
        _, target_seconds = plain_per_token(model, ids, tokens, MODES["greedy"])
        cost = seconds / target_seconds  # both timed back to back: the VM's load drifts
        print(f"draft {depth} layers: {1e3 * seconds:.1f} ms/token, c = {cost:.3f}", flush=True)
        for k in plan["ks"]:
            for mode, sampling in MODES.items():
                # plain decoding timed right before each run, for the same reason
                _, plain_s = plain_per_token(model, ids, tokens, sampling)
                r = speculative_run(model, ids, tokens, sampling, drafts[depth], k)
                row = dict(
                    depth=depth,
                    k=k,
                    mode=mode,
                    c=cost,
                    alpha=r["alpha"],
                    tokens_per_call=r["tokens_per_call"],
                    predicted_tokens_per_call=predicted_speedup(r["alpha"], k, 0.0),
                    ms_per_token=1e3 * r["s_per_token"],
                    plain_ms_per_token=1e3 * plain_s,
                    speedup=plain_s / r["s_per_token"],
                    predicted_speedup=predicted_speedup(r["alpha"], k, cost),
                    verify=verify[k],
                    predicted_speedup_measured_verify=predicted_speedup(
                        r["alpha"], k, cost, verify[k]
                    ),
                    ms_per_step=1e3 * r["s_per_step"],
                    predicted_ms_per_step=1e3 * plain_s * (k * cost + verify[k]),
                    position_acceptance=r["position_acceptance"],
                    histogram=r["histogram"],
                    target_calls=r["target_calls"],
                )
                if mode == "greedy":
                    row["matches_plain_greedy"] = r["tokens"] == baseline["greedy"]["tokens"]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "histogram"}), flush=True)
    depth, k = plan["loop_check"]
    draft = drafts[depth]
    loops, outputs = {label: [] for label in LOOPS.values()}, {}
    for _ in range(plan["loop_repeats"]):  # alternated: a load change hits both
        for n, label in LOOPS.items():
            r = speculative_run(model, ids, tokens, MODES["greedy"], draft, k, steps_per_call=n)
            loops[label].append(1e3 * r["s_per_token"])
            outputs[label] = r["tokens"]
            print(f"{label} (depth {depth}, k {k}): {loops[label][-1]:.1f} ms/token")
    loops = {label: dict(ms_per_token=min(ms), runs_ms_per_token=ms) for label, ms in loops.items()}
    loops.update(depth=depth, k=k, same_tokens=len({tuple(t) for t in outputs.values()}) == 1)
    return dict(
        model=Path(model.path).name if not tiny else "tiny random (2 layers)",
        n_layers=model.config.n_layers,
        dtype=dtype,
        prompt_tokens=len(ids),
        new_tokens=tokens,
        plan=plan,
        machine=common.machine(),
        baseline_ms_per_token={m: 1e3 * b["s_per_token"] for m, b in baseline.items()},
        rows=rows,
        loops=loops,
        compile_threads=warm_s["threads"],
        warm_s=warm_s["seconds"],
        seconds=time.perf_counter() - start,
    )


def markdown(result: dict) -> str:
    """The results as markdown: one line of context, the sweep table, the comparison of steps
    per call (or, in results from before the steps API, of the host and device loops)."""
    base = result["baseline_ms_per_token"]
    lines = [
        f"`{result['model']}` ({result['n_layers']} layers, {result['dtype']}, "
        f"{result['machine']['backend']}), prompt {result['prompt_tokens']} tokens, "
        f"{result['new_tokens']} new tokens; plain decoding {base['greedy']:.1f} ms/token "
        f"greedy, {base['sampled']:.1f} sampled; sweep wall time {result['seconds']:.0f} s"
        + (
            f", of which {result['warm_s']:.0f} s compiling its programs side by side "
            f"({result['compile_threads']} threads)."
            if "warm_s" in result
            else "."
        ),
        "",
        "| draft layers | k | mode | c | v | alpha | tokens/call (predicted) | ms/step "
        "(predicted) | ms/token | speed-up | predicted, v = 1 | predicted, measured v "
        "| greedy = plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        same = {True: "yes", False: "**no**"}.get(r.get("matches_plain_greedy"), "")
        lines.append(
            f"| {r['depth']} | {r['k']} | {r['mode']} | {r['c']:.2f} | {r['verify']:.2f} | "
            f"{r['alpha']:.2f} | {r['tokens_per_call']:.2f} ({r['predicted_tokens_per_call']:.2f})"
            f" | {r['ms_per_step']:.1f} ({r['predicted_ms_per_step']:.1f}) | "
            f"{r['ms_per_token']:.1f} | {r['speedup']:.2f}x | {r['predicted_speedup']:.2f}x | "
            f"{r['predicted_speedup_measured_verify']:.2f}x | {same} |"
        )
    loops = result["loops"]
    labels = [key for key in loops if key not in ("depth", "k", "same_tokens")]
    names = {label: OLD_LOOPS.get(label, label) for label in labels}
    runs = len(loops[labels[0]]["runs_ms_per_token"])
    lines += [
        "",
        " vs ".join(names.values()).capitalize()
        + f" (draft {loops['depth']} layers, k = {loops['k']}, greedy, fastest of {runs} "
        "alternated runs): "
        + ", ".join(
            f"{names[label]} {loops[label]['ms_per_token']:.1f} ms/token" for label in labels
        )
        + f"; same tokens: {loops['same_tokens']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Measured (points) and predicted speed-up against k (solid: the paper's model, v = 1;
    dashed: with the measured verification cost v), one colour per depth; False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, mode in zip(axes, MODES, strict=True):
        for i, depth in enumerate(result["plan"]["depths"]):
            rows = [r for r in result["rows"] if r["depth"] == depth and r["mode"] == mode]
            ks = [r["k"] for r in rows]
            color = f"C{i}"
            ax.plot(ks, [r["speedup"] for r in rows], "o", color=color, label=f"{depth} layers")
            ax.plot(ks, [r["predicted_speedup"] for r in rows], "-", color=color, alpha=0.6)
            measured_v = [r["predicted_speedup_measured_verify"] for r in rows]
            ax.plot(ks, measured_v, "--", color=color, alpha=0.6)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{mode}\nmeasured (points); predicted, v = 1 (solid) / measured v (dashed)")
        ax.set_xlabel("draft tokens k")
    axes[0].set_ylabel("speed-up over plain decoding")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--depths", type=int, nargs="+", help="draft depths (layers)")
    parser.add_argument("--ks", type=int, nargs="+", help="draft token counts")
    parser.add_argument("--tokens", type=int, help="new tokens per run")
    args = parser.parse_args(argv)
    overrides = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in dict(depths=args.depths, ks=args.ks, tokens=args.tokens).items()
        if value is not None
    }
    out = common.output_folder(args)
    result = run(args.tiny, args.model, plan=overrides)
    result["plot"] = plot(result, out / "speculative_sweep.png")
    common.write("speculative_sweep", result, markdown(result), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
