"""`harness reproduce`'s tolerance (issue #38): the manifest records where a run ran, and a rerun is held exact on the
same CPU model and thread count, to a stated CPU tolerance elsewhere, to +-0.005 on a GPU; each branch says why."""
from __future__ import annotations

import pytest

from harness.reproduce import (
    CPU_TOLERANCE,
    GPU_TOLERANCE,
    compare_metrics,
    reproduction_record,
    tolerance_for,
)

EPYC = {"cpu": "AMD EPYC", "cpu_count": 2}


def cpu_run(cpu: str = "AMD EPYC", threads: int = 2, isa: str = "AVX2") -> dict:
    return {"reproduction": reproduction_record([{"name": "sft", "device": "CPU"}],
                                                [{"cpu": cpu, "cpu_capability": isa}], threads)}


def gpu_run() -> dict:
    return {"reproduction": reproduction_record([{"name": "sft", "device": "H200"}, {"name": "data"}], [EPYC], 2)}


def test_the_record_says_where_a_run_ran():
    assert cpu_run()["reproduction"] == {"device_class": "cpu", "cpu": "AMD EPYC", "cpu_capability": "AVX2",
                                         "threads": 2, "tolerance": 0.0, "tolerance_elsewhere": CPU_TOLERANCE}
    assert gpu_run()["reproduction"] == {"device_class": "gpu", "devices": ["H200"], "tolerance": GPU_TOLERANCE}


@pytest.mark.parametrize(("recorded", "now", "given", "expected", "why"), [
    (cpu_run(), cpu_run(), None, 0.0, "exact: the same CPU as recorded, AMD EPYC (AVX2), 2 threads"),
    (cpu_run(), cpu_run("Intel Xeon"), None, CPU_TOLERANCE, "another CPU, instruction set or thread count"),
    (cpu_run(), cpu_run(threads=4), None, CPU_TOLERANCE, "another CPU, instruction set or thread count"),
    (cpu_run(), cpu_run(isa="AVX512"), None, CPU_TOLERANCE, "rerun on the recorded CPU to check exactly"),
    (gpu_run(), gpu_run(), None, GPU_TOLERANCE, "a GPU run (H200)"),
    (cpu_run(), gpu_run(), None, GPU_TOLERANCE, "a GPU run"),
    ({}, cpu_run(), None, CPU_TOLERANCE, "recorded before vlmlab kept where it ran"),
    (gpu_run(), gpu_run(), 0.1, 0.1, "--tolerance"),
])
def test_each_branch_and_its_reason(recorded, now, given, expected, why):
    tolerance, reason = tolerance_for(recorded, now, given)
    assert tolerance == expected and why in reason


def test_absolute_on_0_1_metrics_relative_elsewhere():
    recorded = {"eval/vqa_accuracy": 0.500, "sft/train_loss": 2.0, "sft/train_runtime": 10.0}
    rows = {r["metric"]: r for r in compare_metrics(recorded, {"eval/vqa_accuracy": 0.504, "sft/train_loss": 2.009,
                                                              "sft/train_runtime": 99.0}, GPU_TOLERANCE)}
    assert rows["eval/vqa_accuracy"]["ok"] and rows["sft/train_loss"]["ok"]  # 0.004 <= 0.005; 0.009 <= 0.005 x 2
    assert "sft/train_runtime" not in rows  # timing measures the machine, never compared
    worse = compare_metrics(recorded, {"eval/vqa_accuracy": 0.506, "sft/train_loss": 2.011}, GPU_TOLERANCE)
    assert [r["ok"] for r in worse] == [False, False]
    exact = compare_metrics({"eval/vqa_accuracy": 0.5}, {"eval/vqa_accuracy": 0.5 + 1e-12}, 0.0)
    assert not exact[0]["ok"]
