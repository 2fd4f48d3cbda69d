"""Experiment scripts run at their tiny size (CPU smoke runs; the numbers are not checked).

`gpu_suite.py --tiny` runs the attention, LoRA, speculative and batching experiments through
their `run(tiny=True)`, so their results are checked there rather than run twice.

The experiments folder goes on `sys.path` here, as it is for a script run from it, so that the
experiments (and `common`, their shared module) import by name.
"""

import importlib
import inspect
import json
import logging
import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax as rj
from realm_jax.testing import TOLERANCES

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))


@pytest.mark.slow
def test_bench_decode_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXPERIMENTS / "bench_decode.py"), run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads((tmp_path / "bench_decode.json").read_text())
    assert {row["layout"] for row in result["rows"]} == {"unrolled", "stacked (scan)"}
    assert all(row["decode_tok_s"] > 0 for row in result["rows"])
    assert (tmp_path / "bench_decode.md").read_text().count("\n") >= 4


@pytest.mark.slow
def test_gpu_suite_tiny_and_the_experiments_it_runs(tmp_path, monkeypatch):
    import gpu_suite as suite

    saved = []  # the part running at each save: the files are rewritten after every part
    markdown = suite.markdown
    monkeypatch.setattr(suite, "markdown", lambda r: saved.append(r["in_progress"]) or markdown(r))
    code = suite.main(["--tiny", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["errors"] == {} and result["skipped"] == {}
    assert code == 0
    parts = ["bench_attention", "lora_strategies", "speculative_sweep", "batching_throughput"]
    assert saved == ["decode/prefill tiny (random)", *parts, None, None]  # last: the print
    assert {row["batch"] for row in result["decode"]} == {1, 8}
    layouts = {(row["layout"], row["batch"]) for row in result["decode"]}
    assert layouts == {(name, b) for name in ("unrolled", "stacked (scan)") for b in (1, 8)}
    assert all(row["ms_per_step"] > 0 for row in result["decode"])
    assert all(row["ms"] > 0 for row in result["prefill"])
    assert all(row["compile_s"] > 0 for row in result["decode"] + result["prefill"])
    assert all(row["temp_gb"] is not None for row in result["decode"] + result["prefill"])
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| model | layers | batch |" in table

    attention = result["bench_attention"]
    for row in attention["prefill"] + attention["decode"]:
        assert row["impls"]["pallas"]["status"] == "ok" and row["impls"]["pallas"]["seconds"] > 0
        assert row["impls"]["xla"]["status"] == "ok"

    lora = result["lora_strategies"]
    assert {row["strategy"] for row in lora["rows"]} == {"base", "merged", "unmerged", "multi"}
    assert all(row["best_tok_s"] > 0 and row["tok_s"] > 0 for row in lora["rows"])
    assert {g["strategy"] for g in lora["generate"]} == {"merged", "unmerged"}
    assert all(m["pytree_bytes"] > 0 for m in lora["memory"])

    speculative = result["speculative_sweep"]
    greedy = [row for row in speculative["rows"] if row["mode"] == "greedy"]
    assert greedy and all(row["matches_plain_greedy"] for row in greedy)
    assert speculative["loops"]["same_tokens"]
    assert {"1 step per call", "8 steps per call"} <= set(speculative["loops"])
    assert "1 step per call vs 8 steps per call" in table

    batching = result["batching_throughput"]
    policies = [row["policy"] for row in batching["rows"]]
    assert policies[:3] == ["continuous", "static", "one at a time"]
    assert len({row["new_tokens"] for row in batching["rows"]}) == 1  # same work for each
    for part in ("bench_attention", "lora_strategies", "speculative_sweep", "batching_throughput"):
        assert f"### {part}" in table

    # what a call cut off by its timeout leaves (the suite saves after every part)
    assert result["in_progress"] is None and "Cut off" not in table
    partial = {
        k: v for k, v in result.items() if k not in ("speculative_sweep", "batching_throughput")
    }
    partial["in_progress"] = "speculative_sweep"
    cut = markdown(partial)
    assert "### lora_strategies" in cut and "### batching_throughput" not in cut
    assert "Cut off while running speculative_sweep" in cut


def test_common_parser_folders_and_output(tmp_path, capsys):
    """The shared command line and output: --tiny runs write to a fresh temporary folder
    unless --out says where, a full run to the results (or an experiment's own folder
    there); `write` leaves the JSON, the table and the plot, and prints the table; every
    result's machine names the revision it measured."""
    import common

    args = common.parser("First line.\nMore.").parse_args(["--tiny"])
    assert (args.tiny, args.model, args.out) == (True, None, None)
    first, second = common.output_folder(args), common.output_folder(args)
    assert first != second and first.is_dir() and common.RESULTS not in first.parents
    args = common.parser("Doc.").parse_args(["--out", str(tmp_path / "a")])
    assert common.output_folder(args) == tmp_path / "a" and (tmp_path / "a").is_dir()
    args = common.parser("Doc.", model=False).parse_args([])
    assert not hasattr(args, "model") and common.output_folder(args) == common.RESULTS
    assert (
        common.output_folder(args, tmp_path / "b") == tmp_path / "b" and (tmp_path / "b").is_dir()
    )
    assert common.model_path(False, "m.gguf") == Path("m.gguf")

    def plot(result, path):
        path.write_text(str(result["n"]))
        return True

    common.write("thing", dict(n=3), "| a |\n", tmp_path, plot)
    assert json.loads((tmp_path / "thing.json").read_text()) == dict(n=3)
    assert (tmp_path / "thing.md").read_text() == "| a |\n"
    assert (tmp_path / "thing.png").read_text() == "3"
    assert "| a |" in capsys.readouterr().out
    machine = common.machine()
    assert {"platform", "backend", "device", "jax", "jaxlib", "numpy"} <= set(machine)
    if (EXPERIMENTS.parent / ".git").exists():  # a checkout (not a copied tree)
        commit = machine["revision"].removesuffix("-dirty")
        assert commit and all(c in "0123456789abcdef" for c in commit)
    assert common.revision(tmp_path) is None  # not a git checkout
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert len(common.time_call(jnp.add, 1.0, 2.0, repeats=3)) == 3


def test_gpu_suite_sizes_fit_each_experiment():
    """The suite's full-size arguments (only run on a GPU) bind to each experiment's `run`, and
    their plan keys are keys the experiment's own plans have: a typo here would only show on
    the GPU machine, in its short lease."""
    import gpu_suite as suite

    own_plans = {
        "lora_strategies": lambda m: m.FULL_PLAN,
        "speculative_sweep": lambda m: m.PLANS["gpu"],
    }
    assert set(suite.PARTS) == {
        "bench_attention", "lora_strategies", "speculative_sweep", "batching_throughput"
    }  # fmt: skip
    for part, kwargs in suite.PARTS.items():
        module = importlib.import_module(part)
        assert suite.MODULES[part] is module
        if part in suite.NEEDS_MODEL:
            kwargs = dict(kwargs, model_path="SmolLM2.gguf")
        inspect.signature(module.run).bind(False, **kwargs)
        if "plan" in kwargs:
            assert set(kwargs["plan"]) <= set(own_plans[part](module)), part
        if "runs" in kwargs:
            assert set(kwargs["runs"]) <= set(module.RUNS), part
    lora_plan = suite.PARTS["lora_strategies"]["plan"]
    assert lora_plan["batch"] == 32 and set(lora_plan["distinct"]) == {1, 8, 32}


def test_gpu_suite_merges_the_lease_calls(tmp_path):
    """The committed H100 leases' calls merge into one result: every model's rows and every
    part once, each call's ceilings kept; a part run again in a later call (after a change)
    is taken from that call; results from two devices are refused."""
    import gpu_suite as suite

    folder = EXPERIMENTS / "results" / "gpu_suite"
    # the first lease: two disjoint calls, the first with errors (the 7B stacked rows)
    calls = [
        json.loads((folder / "lease1" / f"call{i}" / "gpu_suite.json").read_text()) for i in (1, 2)
    ]
    merged = suite.merge(calls)
    assert [c["ceilings"] for c in merged["calls"]] == [c["ceilings"] for c in calls]
    assert merged["decode"] == calls[0]["decode"] + calls[1]["decode"]
    assert set(suite.PARTS) <= set(merged) and merged["skipped"] == {}
    assert set(merged["errors"]) == set(calls[0]["errors"]) | set(calls[1]["errors"])
    assert "superseded" not in merged
    table = suite.markdown(merged)
    assert table.count("call 1 (") == 1 and table.count("call 2 (") == 1
    floor_ms, _ = suite.step_floor_ms(merged)
    smol = next(r for r in merged["decode"] if r["model"] == "SmolLM2-135M" and r["batch"] == 1)
    assert floor_ms < smol["ms_per_step"]  # a floor, below the step that it comes from
    assert "as a share of the floor" in table
    paths = [str(folder / "lease1" / f"call{i}" / "gpu_suite.json") for i in (1, 2)]
    code = suite.main(["--merge", *paths, "--out", str(tmp_path / "lease1")])
    assert code == 1  # the run's errors (the 7B stacked rows) make the exit code 1
    assert json.loads((tmp_path / "lease1" / "gpu_suite.json").read_text()) == json.loads(
        (folder / "lease1" / "gpu_suite.json").read_text()
    )  # the committed merged result is this merge
    # the second lease: call 2's LoRA and speculative parts rerun in call 4 after a change,
    # its batching part (skipped there) run in call 3
    paths = [folder / "lease2" / f"call{i}" / "gpu_suite.json" for i in (1, 2, 3, 4)]
    calls = [json.loads(path.read_text()) for path in paths]
    merged = suite.merge(calls)
    assert merged["superseded"] == {
        part: dict(left_out=2, kept=4) for part in ("lora_strategies", "speculative_sweep")
    }
    assert merged["lora_strategies"] == calls[3]["lora_strategies"]
    assert merged["speculative_sweep"] == calls[3]["speculative_sweep"]
    assert merged["batching_throughput"] == calls[2]["batching_throughput"]
    assert merged["skipped"] == {} and merged["errors"] == {}
    assert merged["decode"] == calls[0]["decode"] + calls[1]["decode"]
    kept = sum(calls[0]["seconds"].values()) - calls[0]["seconds"]["total"]  # all of call 1
    kept += calls[1]["seconds"]["decode_prefill"] + calls[2]["seconds"]["batching_throughput"]
    kept += calls[3]["seconds"]["lora_strategies"] + calls[3]["seconds"]["speculative_sweep"]
    assert merged["seconds"]["kept"] == pytest.approx(kept)
    assert "lora_strategies of call 2, rerun in call 4" in suite.markdown(merged)
    code = suite.main(["--merge", *map(str, paths), "--out", str(tmp_path / "lease2")])
    assert code == 0
    assert json.loads((tmp_path / "lease2" / "gpu_suite.json").read_text()) == json.loads(
        (folder / "lease2" / "gpu_suite.json").read_text()
    )
    with pytest.raises(SystemExit, match="different devices"):
        suite.merge([calls[0], dict(calls[1], device_kind="another card")])
    assert suite.selected("SmolLM2-135M (random weights)", {"SmolLM2-135M"})
    assert not suite.selected("Llama-2-7B", {"TinyLlama-1.1B", "bench_attention"})
    with pytest.raises(SystemExit):  # argparse: an unknown name is an error, not an empty run
        suite.main(["--only", "Llama-3", "--out", str(tmp_path)])


def test_decode_ab_tiny(tmp_path):
    """One round of one tree, in its child process: every figure is there and positive."""
    import decode_ab as module

    assert module.main(["--tiny", "--trees", ".", "--rounds", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "decode_ab.json").read_text())
    (row,) = result["rows"]
    modes = ("greedy", "sampled")
    assert set(row["decode_ms"]) == {f"batch {b} {m}" for b in (1, 2) for m in modes}
    assert set(row["prefill_ms"]) == {"5 tokens"}
    assert all(
        v > 0
        for v in [*row["load_ms"].values(), *row["decode_ms"].values(), *row["prefill_ms"].values()]
    )
    assert "| . |" in (tmp_path / "decode_ab.md").read_text()


def test_profile_decode_tiny(tmp_path):
    """The profiler's per-operation events are found and named by their HLO output shapes."""
    import profile_decode as module

    assert module.main(["--tiny", "--batch", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "profile_decode_b2_greedy.json").read_text())
    assert result["ops_ms_per_step"] > 0
    ops = [g["op"] for g in result["groups"]]
    # the output projection: logits [B, V] = [2, 300] from a product (a dot or a fusion)
    assert any(op.startswith("f32[2,300]") for op in ops), ops


def test_side_by_side_runs_every_job_and_compiles_a_shared_program_once():
    """`side_by_side` returns each job's result and seconds, or the exception it raised; jobs
    that need the same new program get one compilation between them (jit waits for the one
    under way), which the speculative and LoRA parts rely on to compile each program once."""
    import bench_attention as bench

    finished = []

    class Compiles(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation of jit(shared)" in record.getMessage():
                finished.append(record)

    @jax.jit
    def shared(x):
        for _ in range(50):  # long enough to compile that the jobs overlap
            x = jnp.sin(x) @ x
        return x

    handler, logger = Compiles(), logging.getLogger("jax")
    logger.addHandler(handler)
    was = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # the context manager is per thread
    try:
        x = 0.5 * jnp.eye(16)
        jobs = {i: lambda: jax.block_until_ready(shared(x)) for i in range(4)}
        out = bench.side_by_side({**jobs, "bad": lambda: 1 / 0}, threads=4)
    finally:
        jax.config.update("jax_log_compiles", was)
        logger.removeHandler(handler)
    assert isinstance(out.pop("bad"), ZeroDivisionError)
    assert all(np.array_equal(result, out[0][0]) and s >= 0 for result, s in out.values())
    assert len(finished) == 1


def test_probe_dispatch_tiny(tmp_path):
    """Every mode is timed, and the stepping modes (host loops and the on-device loop) run the
    same greedy steps: they end on the same token."""
    import probe_dispatch as module

    assert module.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "probe_dispatch.json").read_text())
    assert set(result["ms_per_step"]) == set(module.MODES + module.STREAM_MODES)
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    assert result["same_last_token"]
    assert result["array_leaves"] > 2 * result["n_layers"]


@pytest.mark.slow
def test_probe_greedy_ties_tiny(tmp_path):
    """The probe runs and records each pair; `first_difference` finds where two generations
    part and reads the target's logits for both tokens there."""
    import probe_greedy_ties as module
    import speculative_sweep

    assert module.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "probe_greedy_ties.json").read_text())
    assert [(r["dtype"], r["draft_layers"], r["k"]) for r in result["rows"]] == [("bfloat16", 1, 2)]
    assert all(r["same"] == (r["first_difference"] is None) for r in result["rows"])
    model, ids = speculative_sweep.load(True, "float32")
    difference = module.first_difference(model, ids, [5, 6, 7], [5, 9, 7])
    assert (difference["index"], difference["plain_token"], difference["spec_token"]) == (1, 6, 9)
    row = np.asarray(rj.logits(model, [*ids, 5])[-1], np.float64)
    assert difference["gap"] == pytest.approx(abs(row[6] - row[9]))
    assert module.first_difference(model, ids, [5, 6], [5, 6]) is None
    assert module.bfloat16_spacing(19.2) == 0.125  # 2^4 <= 19.2 < 2^5: 2^(4 - 7)


def test_probe_decode_attention_tiny(tmp_path):
    """Every formulation computes the same attention as ours, and each is timed."""
    import probe_decode_attention as module

    assert module.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "probe_decode_attention.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {
        "ours (xla_attention)", "G, T as two free axes", "K stored [B, K, H, S]",
        "multiply-reduce", "scores only", "values only",
    }  # fmt: skip
    assert all(row["ms"] > 0 for row in rows.values())
    atol, rtol = TOLERANCES[("float32", "op")]  # one float32 op's rounding, per layer
    bound = result["size"]["layers"] * (atol + rtol * result["max_abs_output"])
    for name in ("G, T as two free axes", "K stored [B, K, H, S]", "multiply-reduce"):
        assert rows[name]["max_abs_diff"] <= bound, name


@pytest.mark.slow
def test_engine_throughput_tiny(tmp_path):
    """Both trees' workers run (this checkout as its own baseline), every case and the
    warm-up give a well-formed row, and each tree imported its own realm_jax."""
    import engine_throughput

    assert engine_throughput.main(["--tiny", "--baseline", ".", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "engine_throughput.json").read_text())
    assert set(result["imported"]) == {"this checkout", "baseline"}
    assert all(path.endswith("realm_jax") for path in result["imported"].values())
    plan = result["plan"]
    mixed = [r for r in result["rows"] if r["case"] == "mixed" and r["tree"] == "this checkout"]
    assert {(r["batch"], r["steps_per_call"]) for r in mixed} == {
        (b, s) for b in plan["batches"] for s in plan["steps"]
    }
    assert all(r["tok_s"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] for r in mixed)
    singles = {r["path"] for r in result["rows"] if r["case"] == "single"}
    assert singles == {"rj.generate", "Engine(max_batch=1)"}
    assert [r["compilations"] > 0 for r in result["warmup"]["rows"]] == [True, True]
    assert "Ratios" in (tmp_path / "engine_throughput.md").read_text()
