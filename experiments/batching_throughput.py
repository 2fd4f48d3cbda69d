"""Static vs continuous batching vs one request at a time, on a mixed-length workload.

Question: how much throughput and latency does continuous batching (a finished request's
slot is refilled at once) buy over static batching (a batch of `max_batch` requests runs
until its longest member finishes, then the next batch starts) and over serving requests one
at a time, for the real model on this machine?

    python experiments/batching_throughput.py          # real model -> results/batching_throughput.*
    python experiments/batching_throughput.py --tiny   # seconds-long smoke run, random model

Variants of the continuous policy: mixed tenants (every request names one of four random
rank-8 adapters on all projections, served side by side by the multi-adapter path) and
speculative decoding (a layer-skip draft of the model's first layers, k = 4).

Workload: N requests, all arriving at t = 0, prompt and output lengths lognormal (clipped), a
fixed seed. All three policies run through `rj.Engine` (one-at-a-time is `max_batch=1`), so
they share every jitted step. Each policy runs once untimed to compile its shapes, then timed.
Time to first token (TTFT) and latency are measured from t = 0 to the request's first token /
its end, on the host clock after each step's tokens reach the host.
"""

import json
import sys
import time
from pathlib import Path

import common
import lora_strategies
import numpy as np

import realm_jax as rj


def workload(model, count, prompt_median, output_median, max_len, seed=0):
    """`count` requests with lognormal prompt / output lengths (sigma 0.6), greedy, no EOS stop."""
    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(np.log(prompt_median), 0.6, count), 1, max_len // 2)
    outputs = np.clip(rng.lognormal(np.log(output_median), 0.6, count), 1, max_len // 2)
    return [
        dict(
            ids=rng.integers(3, model.config.vocab_size, int(p)).tolist(),
            max_new_tokens=int(n),
            stop_at_eos=False,
        )
        for p, n in zip(prompts, outputs, strict=True)
    ]


def random_adapters(model, count: int, rank: int = 8) -> dict:
    """`count` random adapters on every projection (lora_strategies.random_adapter)."""
    return {
        f"tenant-{i}": lora_strategies.random_adapter(model, rank, seed=i) for i in range(count)
    }


def serve(model, requests, *, policy, max_batch, max_seq_len, tenants=None, draft=None, variant=""):
    """Run the workload under one policy; return per-request times and the total.

    tenants: {name: adapter}; request i then uses tenant i % len(tenants).
    draft: a draft model for speculative decoding (k = 4).
    """
    batch = 1 if policy == "one at a time" else max_batch
    engine = rj.Engine(model, max_batch=batch, max_seq_len=max_seq_len, draft=draft)
    names = sorted(tenants or {})
    for name in names:
        engine.add_adapter(name, tenants[name])
    if names:
        requests = [dict(r, adapter=names[i % len(names)]) for i, r in enumerate(requests)]
    groups = (
        [requests]
        if policy == "continuous"
        else [requests[i : i + batch] for i in range(0, len(requests), batch)]
    )
    first, end, tokens = {}, {}, 0
    start = time.perf_counter()
    offset = 0
    for group in groups:  # static: the next group waits for the whole previous one
        ids = [engine.submit(**r) for r in group]
        index = {rid: offset + i for i, rid in enumerate(ids)}
        offset += len(group)
        for event in engine.stream():
            now = time.perf_counter() - start
            i = index[event.request_id]
            if event.token is not None:
                tokens += 1
                first.setdefault(i, now)
            if event.done:
                end[i] = now
    total = time.perf_counter() - start
    ttft = np.array([first[i] for i in range(len(requests))])
    latency = np.array([end[i] for i in range(len(requests))])
    return dict(
        policy=policy + variant,
        max_batch=batch,
        requests=len(requests),
        new_tokens=tokens,
        total_s=total,
        tok_s=tokens / total,
        ttft_p50_s=float(np.percentile(ttft, 50)),
        ttft_p99_s=float(np.percentile(ttft, 99)),
        latency_p50_s=float(np.percentile(latency, 50)),
        latency_p99_s=float(np.percentile(latency, 99)),
    )


PLANS = {
    "tiny": dict(
        count=8, prompt_median=5, output_median=6, max_batch=4, max_seq_len=64, draft_layers=1
    ),
    "full": dict(
        count=12, prompt_median=32, output_median=16, max_batch=8, max_seq_len=256, draft_layers=8
    ),
}
RUNS = ("continuous", "static", "one at a time", "tenants", "speculative")


def run(
    tiny: bool,
    model_path: str | None = None,
    *,
    plan: dict | None = None,
    runs: tuple[str, ...] = RUNS,
    dtype: str = "float32",
) -> dict:
    """Serve the workload under each of `runs`; returns the result dict `main` writes.

    Args:
      tiny: a random tiny model and the "tiny" plan (seconds).
      model_path: a GGUF file instead of the default model.
      plan: overrides of the plan's keys (count, prompt_median, output_median, ...).
      runs: which of RUNS to serve ("tenants" and "speculative" are continuous variants).
      dtype: the weights' dtype.
    """
    plan = {**PLANS["tiny" if tiny else "full"], **(plan or {})}
    path = common.model_path(tiny, model_path)
    model = rj.load_model(path, dtype=dtype)
    requests = workload(
        model, plan["count"], plan["prompt_median"], plan["output_median"], plan["max_seq_len"]
    )
    rows = []
    sizes = dict(max_batch=plan["max_batch"], max_seq_len=plan["max_seq_len"])
    kinds = {  # built on demand: adapters and drafts only for the runs that use them
        "continuous": lambda: dict(policy="continuous"),
        "static": lambda: dict(policy="static"),
        "one at a time": lambda: dict(policy="one at a time"),
        "tenants": lambda: dict(
            policy="continuous", tenants=random_adapters(model, 4), variant=", 4 tenants"
        ),
        "speculative": lambda: dict(
            policy="continuous",
            draft=rj.layer_skip_draft(model, plan["draft_layers"]),
            variant=f", speculative (layer-skip {plan['draft_layers']}, k=4)",
        ),
    }
    for kwargs in (kinds[name]() for name in runs):
        serve(model, requests, **kwargs, **sizes)  # compile every shape this policy meets
        row = serve(model, requests, **kwargs, **sizes)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return dict(
        model=Path(path).name,
        dtype=str(model.dtype),
        plan=plan,
        prompt_lengths=[len(r["ids"]) for r in requests],
        output_lengths=[r["max_new_tokens"] for r in requests],
        machine=common.machine(),
        rows=rows,
    )


def markdown(result: dict) -> str:
    plan = result["plan"]
    lines = [
        f"`{result['model']}` ({result['dtype']}, {result['machine']['device']}): "
        f"{plan['count']} requests at t = 0, prompt lengths {min(result['prompt_lengths'])}.."
        f"{max(result['prompt_lengths'])} (median {plan['prompt_median']}), outputs "
        f"{min(result['output_lengths'])}..{max(result['output_lengths'])} "
        f"(median {plan['output_median']}), max_batch {plan['max_batch']}.",
        "",
        "| policy | batch | new tokens | total s | tok/s | vs continuous | TTFT p50 / p99 s "
        "| latency p50 / p99 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best = result["rows"][0]["tok_s"]
    for r in result["rows"]:
        lines.append(
            f"| {r['policy']} | {r['max_batch']} | {r['new_tokens']} | {r['total_s']:.2f} | "
            f"{r['tok_s']:.1f} | {r['tok_s'] / best:.2f}x | {r['ttft_p50_s']:.2f} / "
            f"{r['ttft_p99_s']:.2f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Bars of tok/s and latency p50 / p99 per policy; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    labels = [r["policy"].replace(", ", ",\n") for r in rows]
    x = np.arange(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.bar(x, [r["tok_s"] for r in rows], color="tab:blue")
    left.set_ylabel("new tokens / s")
    left.set_title("throughput")
    right.bar(x - 0.2, [r["latency_p50_s"] for r in rows], 0.4, label="p50")
    right.bar(x + 0.2, [r["latency_p99_s"] for r in rows], 0.4, label="p99")
    right.set_ylabel("request latency, s (all arrive at t = 0)")
    right.set_title("latency")
    right.legend()
    for axis in (left, right):
        axis.set_xticks(x, labels, fontsize=7)
    fig.suptitle(f"{result['model']}, {result['machine']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    result = run(args.tiny, args.model)
    out = common.output_folder(args)
    common.write("batching_throughput", result, markdown(result), out, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
