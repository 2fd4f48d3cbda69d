"""Experiment scripts run at their tiny size (CPU smoke runs; the numbers are not checked)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


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
def test_batching_throughput_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["batching_throughput.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXPERIMENTS / "batching_throughput.py"), run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads((tmp_path / "batching_throughput.json").read_text())
    assert [row["policy"] for row in result["rows"]][:3] == [
        "continuous",
        "static",
        "one at a time",
    ]
    assert len({row["new_tokens"] for row in result["rows"]}) == 1  # same work for each policy


@pytest.mark.slow
def test_bench_attention_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXPERIMENTS / "bench_attention.py"), run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads((tmp_path / "bench_attention.json").read_text())
    for row in result["prefill"] + result["decode"]:
        assert row["impls"]["pallas"]["status"] == "ok" and row["impls"]["pallas"]["seconds"] > 0
        assert row["impls"]["xla"]["status"] == "ok"
    assert (tmp_path / "bench_attention.md").read_text().count("\n") >= 8


@pytest.mark.slow
def test_lora_strategies_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lora_strategies.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXPERIMENTS / "lora_strategies.py"), run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads((tmp_path / "lora_strategies.json").read_text())
    strategies = {row["strategy"] for row in result["rows"]}
    assert strategies == {"base", "merged", "unmerged", "multi"}
    assert all(row["best_tok_s"] > 0 and row["tok_s"] > 0 for row in result["rows"])
    assert {g["strategy"] for g in result["generate"]} == {"merged", "unmerged"}
    assert all(m["pytree_bytes"] > 0 for m in result["memory"])
    assert (tmp_path / "lora_strategies.md").read_text().count("\n") >= 8


@pytest.mark.slow
def test_speculative_sweep_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["speculative_sweep.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXPERIMENTS / "speculative_sweep.py"), run_name="__main__")
    assert exit_info.value.code == 0
    result = json.loads((tmp_path / "speculative_sweep.json").read_text())
    greedy = [row for row in result["rows"] if row["mode"] == "greedy"]
    assert greedy and all(row["matches_plain_greedy"] for row in greedy)
    assert result["loops"]["same_tokens"]
    assert (tmp_path / "speculative_sweep.md").read_text().count("\n") >= 5


@pytest.mark.slow
def test_gpu_suite_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--tiny", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXPERIMENTS / "gpu_suite.py"), run_name="__main__")
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["errors"] == {}
    assert exit_info.value.code == 0
    parts = ("bench_attention", "lora_strategies", "speculative_sweep", "batching_throughput")
    assert all(part in result for part in parts)
    assert {row["batch"] for row in result["decode"]} == {1, 8}
    assert all(row["ms_per_step"] > 0 for row in result["decode"])
    assert all(row["ms"] > 0 for row in result["prefill"])
    assert "| model | batch |" in (tmp_path / "gpu_suite.md").read_text()
