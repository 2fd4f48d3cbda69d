"""Engine throughput at 1 and 8 steps per device call, and one request through the Engine.

Question (issue 19): the Engine is now the one driver; it runs up to `steps_per_call` decode
steps per device call, and `rj.generate` is a one-request run of it. Does the Engine's
throughput hold at every batch size against one step per call, and against the Engine before
the change? Does one request decode as fast through a long-lived `Engine(max_batch=1)` as
through `rj.generate`, and as fast as `rj.generate` did before?

    python experiments/engine_throughput.py --baseline /tmp/before   # a checkout of the old code
    python experiments/engine_throughput.py --tiny                    # smoke run, random model

Each tree (this checkout, and `--baseline` when given) is measured in its own process per
round (PYTHONPATH = the tree, so it imports its own realm_jax), the trees taking turns for
`--rounds` rounds; each figure is the median over rounds. In each process and for each case,
an untimed pass compiles every program the timed pass runs (for the engines, the same
requests with 2-token budgets: the same prompt buckets and attention window; for
`rj.generate`, the same call), then the timed pass runs once. The rounds'
processes share a persistent compilation cache, which only the untimed passes touch.

Cases (greedy, no EOS stop, one model file for every tree):
- single: one request (prompt 32 tokens, 64 new tokens) through `rj.generate`, and through
  an `Engine(max_batch=1)` built once (this checkout only: the old Engine shares the path);
  ms per new token, the first token (the prefill) included.
- mixed: `count` requests at t = 0 with lognormal prompt and output lengths (a fixed seed),
  through `Engine(max_batch=B)` at B = 1, 4, 8 and `steps_per_call` 1 and 8 (the old tree:
  its one step per call); new tokens per second over the whole run, and the p50 / p99 of
  request latency (t = 0 to the request's last token, on the host clock).
- warmup (this checkout, once, in a fresh process): `Engine(max_batch=8, max_seq_len=2048)
  .warmup()` without and with a layer-skip draft: programs, compilations and seconds.
"""

import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np

PLANS = {
    "full": dict(
        single_prompt=32, single_new=64, count=16, prompt_median=48, output_median=32,
        max_prompt=128, max_output=64, max_seq_len=256, batches=(1, 4, 8), steps=(1, 8),
        warmup_batch=8, warmup_seq_len=2048, warmup_draft_layers=8,
    ),
    "tiny": dict(
        single_prompt=8, single_new=8, count=6, prompt_median=8, output_median=6,
        max_prompt=16, max_output=8, max_seq_len=64, batches=(1, 2), steps=(1, 4),
        warmup_batch=2, warmup_seq_len=64, warmup_draft_layers=1,
    ),
}  # fmt: skip


def workload(plan: dict, vocab_size: int) -> list[dict]:
    """The mixed requests: lognormal lengths (sigma 0.6), clipped, from seed 0."""
    rng = np.random.default_rng(0)
    count = plan["count"]
    prompts = np.clip(rng.lognormal(np.log(plan["prompt_median"]), 0.6, count), 1, None)
    outputs = np.clip(rng.lognormal(np.log(plan["output_median"]), 0.6, count), 1, None)
    return [
        dict(
            ids=rng.integers(3, vocab_size, min(int(p), plan["max_prompt"])).tolist(),
            max_new_tokens=min(int(n), plan["max_output"]),
        )
        for p, n in zip(prompts, outputs, strict=True)
    ]


def _serve(rj, model, requests, batch, max_seq_len, steps_per_call, budget=None):
    """Run `requests` through one Engine; (seconds, new tokens, latencies [s])."""
    kwargs = {}
    if steps_per_call is not None:
        kwargs["steps_per_call"] = steps_per_call
    engine = rj.Engine(model, max_batch=batch, max_seq_len=max_seq_len, **kwargs)
    start = time.perf_counter()
    ids = [
        engine.submit(r["ids"], budget or r["max_new_tokens"], stop_at_eos=False) for r in requests
    ]
    ends = {}
    for event in engine.stream():
        if event.done:
            ends[event.request_id] = time.perf_counter() - start
    seconds = time.perf_counter() - start
    results = engine.run()
    return seconds, sum(len(results[i]) for i in ids), [ends[i] for i in ids]


def worker(model_file: str, plan: dict) -> dict:
    """One round in this process, with whatever realm_jax is importable (the tree's)."""
    import realm_jax as rj

    model = rj.load_model(model_file)
    has_steps = "steps_per_call" in inspect.signature(rj.Engine).parameters
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, model.config.vocab_size, plan["single_prompt"]).tolist()
    new = plan["single_new"]
    out = dict(realm_jax=str(Path(rj.__file__).parent), has_steps_per_call=has_steps, cases=[])

    # compile: the same call untimed (its cache capacity, hence its programs, follows the
    # budget, so a shorter warm-up call would leave the timed one compiling)
    rj.generate(model, prompt, new, stop_at_eos=False)
    start = time.perf_counter()
    tokens = rj.generate(model, prompt, new, stop_at_eos=False)
    seconds = time.perf_counter() - start
    assert len(tokens) == new
    out["cases"].append(dict(case="single", path="rj.generate", ms_per_token=1e3 * seconds / new))
    if has_steps:
        engine = rj.Engine(model, max_batch=1, max_seq_len=plan["max_seq_len"])
        engine.submit(prompt, 2, stop_at_eos=False)
        engine.run()  # compile
        start = time.perf_counter()
        rid = engine.submit(prompt, new, stop_at_eos=False)
        assert engine.run()[rid] == tokens
        seconds = time.perf_counter() - start
        out["cases"].append(
            dict(case="single", path="Engine(max_batch=1)", ms_per_token=1e3 * seconds / new)
        )

    requests = workload(plan, model.config.vocab_size)
    for batch in plan["batches"]:
        for steps in plan["steps"] if has_steps else (None,):
            _serve(rj, model, requests, batch, plan["max_seq_len"], steps, budget=2)  # compile
            seconds, count, latencies = _serve(
                rj, model, requests, batch, plan["max_seq_len"], steps
            )
            out["cases"].append(
                dict(
                    case="mixed",
                    batch=batch,
                    steps_per_call=steps,
                    seconds=seconds,
                    new_tokens=count,
                    tok_s=count / seconds,
                    latency_p50_s=float(np.percentile(latencies, 50)),
                    latency_p99_s=float(np.percentile(latencies, 99)),
                )
            )
    return out


def warmup_worker(model_file: str, plan: dict) -> dict:
    """`Engine.warmup()` at the plan's warm-up size, without and with a layer-skip draft."""
    import realm_jax as rj

    model = rj.load_model(model_file)
    rows = []
    for depth in (None, plan["warmup_draft_layers"]):
        draft = None if depth is None else rj.layer_skip_draft(model, depth)
        engine = rj.Engine(model, plan["warmup_batch"], plan["warmup_seq_len"], draft=draft)
        rows.append(dict(draft_layers=depth, **engine.warmup()))
    return dict(max_batch=plan["warmup_batch"], max_seq_len=plan["warmup_seq_len"], rows=rows)


def _run_tree(tree: Path, model_file: str, plan_name: str, mode: str = "--worker") -> dict:
    # the tree first, then what the caller had (where the GPU machine installs its wheels)
    path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    if mode == "--worker":  # later rounds load their programs (never timed) from disk
        cache = Path(tempfile.gettempdir()) / "realm-jax-engine-throughput-cache"
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
        )
    command = [sys.executable, __file__, mode, model_file, plan_name]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker for {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _key(case: dict) -> tuple:
    return (case["case"], case.get("path"), case.get("batch"), case.get("steps_per_call"))


def run(
    tiny: bool, model: str | None, baseline: str | None, rounds: int, warmup: bool = True
) -> dict:
    plan_name = "tiny" if tiny else "full"
    model_file = str(common.model_path(tiny, model))
    trees = {"this checkout": common.REPO}
    if baseline:
        trees["baseline"] = Path(baseline).resolve()
    raw = {name: [] for name in trees}
    for r in range(rounds):
        for name, tree in trees.items():
            raw[name].append(_run_tree(tree, model_file, plan_name))
            print(f"round {r}: {name} done", file=sys.stderr, flush=True)
    rows = []
    for name, runs in raw.items():
        for case in runs[0]["cases"]:
            same = [c for run_ in runs for c in run_["cases"] if _key(c) == _key(case)]
            row = {k: v for k, v in case.items() if k not in ("seconds",)}
            for field in ("ms_per_token", "tok_s", "latency_p50_s", "latency_p99_s"):
                if field in case:
                    row[field] = common.median(c[field] for c in same)
                    row[f"{field}_runs"] = [c[field] for c in same]
            rows.append(dict(tree=name, revision=common.revision(trees[name]), **row))
    warmup = _run_tree(common.REPO, model_file, plan_name, "--warmup-worker") if warmup else None
    return dict(
        model=Path(model_file).name,
        plan=PLANS[plan_name],
        warmup=warmup,
        rounds=rounds,
        trees={name: str(tree) for name, tree in trees.items()},
        imported={name: runs[0]["realm_jax"] for name, runs in raw.items()},
        machine=common.machine(),
        rows=rows,
    )


def markdown(result: dict) -> str:
    rows = result["rows"]
    plan = result["plan"]
    lines = [
        f"`{result['model']}` on {result['machine']['device']}, medians of {result['rounds']} "
        f"alternated rounds (one process per tree and round). Single: prompt "
        f"{plan['single_prompt']}, {plan['single_new']} new tokens. Mixed: {plan['count']} "
        f"requests at t = 0, prompts median {plan['prompt_median']} (<= {plan['max_prompt']}), "
        f"outputs median {plan['output_median']} (<= {plan['max_output']}).",
        "",
        "| tree | revision | case | path / batch | steps per call | ms per token | tok/s "
        "| latency p50 / p99 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["case"] == "single":
            lines.append(
                f"| {r['tree']} | {r['revision']} | single | {r['path']} | | "
                f"{r['ms_per_token']:.2f} | | |"
            )
        else:
            steps = r["steps_per_call"] if r["steps_per_call"] is not None else "1 (old engine)"
            lines.append(
                f"| {r['tree']} | {r['revision']} | mixed | batch {r['batch']} | {steps} | | "
                f"{r['tok_s']:.1f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} |"
            )
    warmup = result["warmup"]
    if warmup:  # left out with --skip-warmup
        lines += [
            "",
            f"Warm-up, `Engine(max_batch={warmup['max_batch']}, max_seq_len="
            f"{warmup['max_seq_len']}).warmup()` (this checkout, one run each, a fresh process):",
            "",
            "| draft | programs | compilations | seconds |",
            "|---|---|---|---|",
        ]
        for r in warmup["rows"]:
            draft = "none" if r["draft_layers"] is None else f"layer-skip {r['draft_layers']}"
            lines.append(
                f"| {draft} | {r['programs']} | {r['compilations']} | {r['seconds']:.1f} |"
            )
    lines += ["", "Ratios (medians, same rounds):", ""]
    ours = {_key(r): r for r in rows if r["tree"] == "this checkout"}
    base = {_key(r): r for r in rows if r["tree"] == "baseline"}
    generate = ours.get(("single", "rj.generate", None, None))
    engine = ours.get(("single", "Engine(max_batch=1)", None, None))
    if generate and engine:
        lines.append(
            f"- one request, Engine(max_batch=1) / rj.generate time per token: "
            f"{engine['ms_per_token'] / generate['ms_per_token']:.3f}"
        )
    old_generate = base.get(("single", "rj.generate", None, None))
    if generate and old_generate:
        lines.append(
            f"- one request, rj.generate before / now time per token: "
            f"{old_generate['ms_per_token'] / generate['ms_per_token']:.3f}x faster now"
        )
    for batch in plan["batches"]:
        steps = plan["steps"]
        one, many = (
            ours.get(("mixed", None, batch, steps[0])),
            ours.get(("mixed", None, batch, steps[-1])),
        )
        old = base.get(("mixed", None, batch, None))
        if one and many:
            line = (
                f"- batch {batch}: {steps[-1]} / {steps[0]} steps per call "
                f"{many['tok_s'] / one['tok_s']:.3f}x tok/s"
            )
            if old:
                line += (
                    f"; against the old engine {many['tok_s'] / old['tok_s']:.3f}x "
                    f"({steps[-1]} per call), {one['tok_s'] / old['tok_s']:.3f}x ({steps[0]})"
                )
            lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ("--worker", "--warmup-worker"):
        function = worker if sys.argv[1] == "--worker" else warmup_worker
        print(json.dumps(function(sys.argv[2], PLANS[sys.argv[3]])))
        return 0
    parser = common.parser(__doc__)
    parser.add_argument("--baseline", help="another checkout of this repository to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-warmup", action="store_true", help="leave out the warm-up part")
    args = parser.parse_args(argv)
    rounds = 1 if args.tiny else args.rounds
    result = run(args.tiny, args.model, args.baseline, rounds, not args.skip_warmup)
    common.write("engine_throughput", result, markdown(result), common.output_folder(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
