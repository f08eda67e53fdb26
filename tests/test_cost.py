"""The held-time split (runtime.cost.Meter): every held device-second lands in exactly one phase, and utilization is
the busy phases over held, whatever the workers report."""
from __future__ import annotations

import pytest
from helpers import property_settings
from hypothesis import given
from hypothesis import strategies as st

from runtime.cost import BUSY_PHASES, PHASES, Meter

seconds = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)
reports = st.lists(st.tuples(seconds, st.dictionaries(st.sampled_from(PHASES[:-1]), seconds, max_size=5)),
                   max_size=6)


@property_settings(200)
@given(held=st.floats(min_value=1e-3, max_value=1e5), devices=st.sampled_from([0.5, 1.0, 2.0, 8.0]),
       workers=reports)
def test_the_split_covers_the_held_time_and_utilization_is_busy_over_held(held, devices, workers):
    meter = Meter(devices=devices, held_seconds=held, hold_began=1000.0)
    for delay, phases in workers:
        meter.add_worker(1000.0 + delay, phases, devices / max(1, len(workers)))
    split = meter.split()
    assert list(split) == list(PHASES) and all(v >= 0 for v in split.values())
    spent = sum(v for k, v in split.items() if k != "idle")
    assert sum(split.values()) == pytest.approx(max(held * devices, spent))  # idle is what no phase accounts for
    summary = meter.summary({"CPU": 0.045}, None)
    busy = sum(split[p] for p in BUSY_PHASES)
    if busy:
        assert summary["cost/utilization"] == pytest.approx(min(1.0, busy / (held * devices)))
        assert summary["cost/busy_hours"] == pytest.approx(busy / 3600)
    else:
        assert "cost/utilization" not in summary


def test_a_worker_placed_late_counts_its_wait_as_start_and_idle_is_named_by_nobody():
    meter = Meter(devices=2.0, held_seconds=10.0, hold_began=500.0)
    meter.add_worker(502.0, {"steps": 5.0, "saving": 1.0}, 2.0)
    assert meter.split() == {"start": 4.0, "steps": 10.0, "generation": 0.0, "scoring": 0.0, "saving": 2.0,
                             "idle": 4.0}
    assert meter.summary({"CPU": 0.045}, None)["cost/utilization"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown phase 'idle'"):
        meter.add("idle", 1.0)
    with pytest.raises(ValueError, match="unknown phase 'loading'"):
        meter.add_worker(502.0, {"loading": 1.0}, 2.0)
