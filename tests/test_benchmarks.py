"""The committed benchmark results are what the benchmark script writes, and hold the headline figures."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("benchmark_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result():
    return json.loads((BENCH / "results" / "benchmark_cpu.json").read_text())


def test_committed_table_is_generated_from_the_committed_json(run_module, result):
    """Nobody edited the Markdown by hand, and the script's table still reads every key."""
    assert run_module.markdown(result) == (BENCH / "results" / "benchmark_cpu.md").read_text()


def test_headline_figures_follow_from_the_measurements(result):
    rounds = result["rounds"]
    speedup = min(rounds["dataloader_round_seconds"]) / min(rounds["fedavg_round_seconds"])
    assert result["round_speedup_vs_dataloader_loop"] == pytest.approx(speedup, abs=1e-3)
    skymask = rounds["phases"][rounds["engine"]]["skymask"]
    assert result["skymask_server_share_at_100"] == pytest.approx(skymask["defense"] / skymask["total"], abs=1e-4)
    assert not result["env"]["quick"] and result["env"].get("git_dirty") is False
