"""Benchmarks run (quick sizes) and print their ratio lines; the numbers themselves are not asserted."""

import re
import subprocess
import sys

import pytest

from ..helpers import ROOT

pytestmark = pytest.mark.slow  # multi-process or end-to-end: minutes on 2 cores


def test_fused_loss_benchmark_quick():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fused_loss.py"), "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"fused_linear/naive peak_mem_ratio=\d+\.\d+ time_ratio=\d+\.\d+", lines[-1])
    assert any(re.fullmatch(r"fused_linear scaling 2048/512 peak_mem_ratio=\d+\.\d+", line) for line in lines)


def _run_quick(script, *args):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()


def test_weight_sync_benchmark_quick():
    lines = _run_quick("bench_weight_sync.py")
    assert re.fullmatch(r"resharder/memcpy throughput_ratio=\d+\.\d+", lines[-1])
    assert re.fullmatch(r"collectives resharder/memcpy throughput_ratio=\d+\.\d+", lines[-2])
    assert any(re.fullmatch(r"per_tensor/bucketed time_ratio=\d+\.\d+", line) for line in lines)


def test_weight_sync_benchmark_of_a_moe_model_under_ep2_quick():
    lines = _run_quick("bench_weight_sync.py", "--moe")
    assert "Qwen3-MoE, TP=2 (SP) x PP=2 x EP=2" in lines[0]
    assert re.fullmatch(r"resharder/memcpy throughput_ratio=\d+\.\d+", lines[-1])


def test_convert_memory_benchmark_quick():
    lines = _run_quick("bench_convert_memory.py")
    assert re.fullmatch(r"megatron_to_hf peak_rss_mb=\d+ above_import_floor_mb=-?\d+ bound_mb=\d+", lines[-1])


def test_dynamic_sampling_benchmark_quick():
    lines = _run_quick("bench_dynamic_sampling.py")
    assert re.fullmatch(r"streaming/rounds generated_tokens_per_kept_group ratio=\d+\.\d+", lines[-1])


def test_rollout_scaling_benchmark_quick():
    lines = _run_quick("bench_rollout_scaling.py")
    assert re.fullmatch(r"engines 2/1 throughput_ratio=\d+\.\d+", lines[-1])


def test_busy_machine_benchmark_quick():
    lines = _run_quick("bench_busy_machine.py")
    assert re.fullmatch(r"passive/default busy_slowdown ratio=\d+\.\d+", lines[-1])


def test_dp_balance_benchmark_quick():
    lines = _run_quick("bench_dp_balance.py")
    assert re.fullmatch(r"balanced/consecutive max_over_mean_cost ratio=\d+\.\d+", lines[-1])
    assert any(re.fullmatch(r"balanced/consecutive train_step_seconds ratio=\d+\.\d+", line) for line in lines)
