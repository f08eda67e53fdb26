"""Accelerator accounting: devices held x wall time, busy time, and the price of it."""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from runtime.errors import ConfigError


@dataclass(frozen=True)
class Price:
    usd_per_hour: float
    source: str
    date: str


# Public on-demand list prices, USD per device-hour (CPU: per core-hour), keyed by the exact device model. A run on
# a device not listed stops before its first stage unless cost.prices.<MODEL> or cost.price_per_hour is set.
PRICE_TABLE = {
    "CPU": Price(0.045, "AWS EC2 c7i.large, us-east-1 ($0.0893/h for 2 vCPU)", "2026-11"),
    "T4": Price(0.35, "Google Cloud GPU pricing, NVIDIA T4, us-central1", "2026-11"),
    "V100": Price(0.55, "Lambda, 8x Tesla V100 16 GB ($4.40/h)", "2026-11"),
    "A10": Price(0.75, "Lambda, 1x A10 24 GB", "2026-11"),
    "L4": Price(0.805, "AWS EC2 g6.xlarge (1x L4), us-east-1", "2026-11"),
    "A10G": Price(1.006, "AWS EC2 g5.xlarge (1x A10G), us-east-1", "2026-11"),
    "L40S": Price(1.861, "AWS EC2 g6e.xlarge (1x L40S), us-east-1", "2026-11"),
    "A100-40GB": Price(1.29, "Lambda, 1x A100 40 GB SXM4", "2026-11"),
    "A100-80GB": Price(1.79, "Lambda, 8x A100 80 GB SXM4 ($14.32/h)", "2026-11"),
    "GH200": Price(1.49, "Lambda, 1x GH200 96 GB", "2026-11"),
    "H100": Price(2.49, "Lambda, 1x H100 80 GB PCIe", "2026-11"),
    "H200": Price(3.50, "specialty clouds' on-demand H200 SXM, low end of $3.50-4.50 (Mercatus price survey)",
                  "2026-05"),
}
DEFAULT_PRICES = {model: price.usd_per_hour for model, price in PRICE_TABLE.items()}
UNLABELLED_GPU = "unlabelled-GPU"


def gpu_alias(name: str) -> str:
    """The price-table model of a device name, from torch ('Tesla T4', 'NVIDIA A100-SXM4-80GB', 'NVIDIA GH200 480GB')
    or Ray's accelerator_type ('L40S', 'A100-80G'). The model is the first word after the vendor, matched whole (L40S
    is not L4, GH200 is not H200), an A100 also by its memory. Other names come back as Ray spells them ('RTX-A6000').
    """
    words = [w for w in re.findall(r"[A-Z0-9]+", name.upper()) if w not in ("NVIDIA", "TESLA")]
    model = words[0] if words else ""
    if model == "A100":
        memory = next((w[:2] for w in words[1:] if w in ("40G", "40GB", "80G", "80GB")), None)
        return f"A100-{memory}GB" if memory else "A100"  # Ray labels both sizes 'A100': priced only when told
    if model in PRICE_TABLE:
        return model
    return re.sub(r"^(NVIDIA|Tesla)\s+", "", name.strip()).replace(" ", "-") or name


def device_model(use_gpu: bool) -> str:
    """The priced device model seen from this process: a GPU alias, else 'CPU'."""
    if use_gpu:
        import torch
        if torch.cuda.is_available():
            return gpu_alias(torch.cuda.get_device_name(0))
    return "CPU"


def cluster_gpus(nodes: list[dict]) -> set[str]:
    """GPU models of a Ray cluster's live GPU nodes (``ray.nodes()``), from the ``accelerator_type:<model>`` resource
    Ray gives each; the most specific label wins (``A100-80G`` over ``A100``)."""
    models = set()
    for node in nodes:
        resources = node.get("Resources", {})
        if node.get("Alive") and resources.get("GPU", 0) > 0:
            labels = [key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
            models.add(gpu_alias(max(labels, key=len)) if labels else UNLABELLED_GPU)
    return models


def price_per_hour(device: str, prices: dict[str, float], override: float | None) -> float:
    if override is not None:
        return override
    if device not in prices:
        raise ConfigError(f"cost: no price for device '{device}': set cost.price_per_hour or cost.prices.{device}")
    return prices[device]


# Where a stage's held device time goes (device-seconds; they add up to what it held). **Busy** is the device at work:
# inside training steps (forward, backward, optimizer update), generation, and scoring forward passes (likelihoods of
# given answers; lm-eval's hf-multimodal model has none, so today's protocols score nothing on the device). Not busy:
# start (placement, process start, imports, model and task load), saving (checkpoints, the final model, their
# upload), idle (the rest of the held time: logging, collating inputs between batches, lm-eval's filters and metrics,
# waiting on another worker's tail, teardown). Utilization = busy / held, so no target is met by redefinition.
PHASES = ("start", "steps", "generation", "scoring", "saving", "idle")
BUSY_PHASES = ("steps", "generation", "scoring")


@dataclass
class Meter:
    """Collects a stage's device time: `held` while devices are acquired, and what the held device-seconds were
    spent on (``PHASES``), as the workers measured it."""
    devices: float = 0.0
    device: str = "CPU"  # the priced device model (a price-table key): CPU, T4, A100-80GB...
    held_seconds: float = 0.0
    holding_since: float | None = None  # perf_counter() when the current hold began
    hold_began: float = 0.0  # time.time() when the current (or last) hold began: workers report Unix times
    hold_ended: float = 0.0
    spent: dict[str, float] = field(default_factory=dict)  # device-seconds per phase, idle left out

    @contextmanager
    def hold(self, devices: float, device: str):
        self.devices, self.device = devices, device
        start = self.holding_since = time.perf_counter()
        self.hold_began = time.time()
        try:
            yield self
        finally:
            self.held_seconds += time.perf_counter() - start
            self.hold_ended = time.time()
            self.holding_since = None

    def usd_so_far(self, prices: dict[str, float], override: float | None) -> float:
        """What the devices held so far cost, the current hold included (the console's running total)."""
        since = self.holding_since
        seconds = self.held_seconds + (time.perf_counter() - since if since is not None else 0.0)
        return seconds * self.devices / 3600.0 * price_per_hour(self.device, prices, override) if seconds else 0.0

    def add(self, phase: str, device_seconds: float) -> None:
        if phase not in PHASES or phase == "idle":
            raise ValueError(f"unknown phase {phase!r}: one of {PHASES[:-1]} (idle is what is left)")
        self.spent[phase] = self.spent.get(phase, 0.0) + max(0.0, device_seconds)

    def add_hold(self, began: float, ended: float, devices: float, device: str) -> None:
        """A hold that ran outside ``hold()``, from ``began`` to ``ended`` (Unix times), on ``devices`` devices: an
        eval's scoring of a model while the next stage trained. (``held_seconds`` counts this meter's ``devices``.)"""
        if not self.devices:
            self.devices, self.device = devices, device
        self.held_seconds += max(0.0, ended - began) * devices / self.devices

    def add_worker(self, began: float, phases: dict[str, float], devices: float,
                   hold_began: float | None = None) -> None:
        """One worker's report from the last hold (or the hold that began at ``hold_began``): the seconds it spent per
        phase since it ``began`` (Unix time), on ``devices`` devices. Between the hold's start and ``began`` the
        worker was being placed and started."""
        self.add("start", (began - (self.hold_began if hold_began is None else hold_began)) * devices)
        for phase, seconds in phases.items():
            self.add(phase, seconds * devices)

    def split(self) -> dict[str, float]:
        """Device-seconds per phase; ``idle`` is the held time no phase accounts for."""
        held = self.held_seconds * self.devices
        out = {phase: self.spent.get(phase, 0.0) for phase in PHASES[:-1]}
        out["idle"] = max(0.0, held - sum(out.values()))
        return out

    def summary(self, prices: dict[str, float], override: float | None) -> dict[str, float]:
        held = self.held_seconds * self.devices
        hours = held / 3600.0
        busy = sum(self.spent.get(phase, 0.0) for phase in BUSY_PHASES)  # device-seconds, as split() counts them
        usd = hours * price_per_hour(self.device, prices, override) if hours else 0.0
        out = {"cost/accelerator_hours": hours, "cost/usd": usd}
        if busy and held:  # only stages that hold devices and time their work report busy time and utilization
            out |= {"cost/busy_hours": busy / 3600.0, "cost/utilization": min(1.0, busy / held)}
        return out
