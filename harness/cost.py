"""Accelerator accounting: devices held x wall time, busy time, and the price of it."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

GPU_ALIASES = ("T4", "L4", "A10G", "A100", "H100", "H200")


def gpu_alias(name: str) -> str:
    """'Tesla T4' -> 'T4', 'NVIDIA H100 80GB HBM3' -> 'H100'; 'CPU' and unknown names pass through."""
    upper = name.upper()
    return next((alias for alias in GPU_ALIASES if alias in upper), name)


def device_kind(use_gpu: bool) -> str:
    """The priced device model seen from this process: a GPU alias, else 'CPU'."""
    if use_gpu:
        import torch
        if torch.cuda.is_available():
            return gpu_alias(torch.cuda.get_device_name(0))
    return "CPU"


def price_per_hour(kind: str, prices: dict[str, float], override: float | None) -> float:
    if override is not None:
        return override
    if kind not in prices:
        raise KeyError(f"no price for device '{kind}': set cost.price_per_hour or cost.prices.{kind}")
    return prices[kind]


@dataclass
class Meter:
    """Collects a stage's device time: `held` while devices are acquired, `busy` inside steps."""
    devices: float = 0.0
    kind: str = "CPU"
    held_seconds: float = 0.0
    busy_seconds: float = 0.0

    @contextmanager
    def hold(self, devices: float, kind: str):
        self.devices, self.kind = devices, kind
        start = time.perf_counter()
        try:
            yield self
        finally:
            self.held_seconds += time.perf_counter() - start

    def add_busy(self, seconds: float) -> None:
        self.busy_seconds += seconds

    def summary(self, prices: dict[str, float], override: float | None) -> dict[str, float]:
        hours = self.held_seconds * self.devices / 3600.0
        busy = self.busy_seconds * self.devices / 3600.0
        usd = hours * price_per_hour(self.kind, prices, override) if hours else 0.0
        out = {"cost/accelerator_hours": hours, "cost/usd": usd}
        if self.busy_seconds:  # only stages that time their steps report busy time and utilization
            out |= {"cost/busy_hours": busy, "cost/utilization": busy / hours}
        return out
