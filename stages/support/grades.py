"""GradES (arXiv:2509.01842): freeze each weight matrix once it stops changing.

Every ``compute_interval`` optimizer steps the L1 norm of each tracked matrix's change since the previous check
is compared with its group's tau (``vision_tau`` for the vision tower, ``language_tau`` for the language model
and connector). After the grace period (``alpha`` x max_steps) a matrix under tau is frozen
(``requires_grad=False``, gradient dropped); training stops once the frozen fraction reaches
``max_frozen_ratio``. Under DDP, rank 0 decides and broadcasts, so every rank freezes the same matrices at the
same step. With LoRA the tracked "matrix" is each adapter's A/B pair.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import TrainerCallback

# Module-name patterns per group, covering Idefics3/SmolVLM, LLaVA and Qwen2-VL naming.
DEFAULT_PATTERNS = {
    "vision": [r"vision_model\.", r"vision_tower\.", r"\bvisual\.", r"vision_encoder\."],
    "language": [r"text_model\.", r"language_model\.", r"\blm_head\b", r"connector\.", r"multi_modal_projector\.",
                 r"\bmodel\.layers\.", r"merger\."],
}


def group_of(name: str, patterns: dict[str, list[str]]) -> str | None:
    """'vision', 'language' or None for a parameter/module name (vision patterns win)."""
    for group in ("vision", "language"):
        if any(re.search(p, name) for p in patterns.get(group, [])):
            return group
    return None


@dataclass
class Tracked:
    name: str
    group: str
    params: list[torch.nn.Parameter]
    previous: list[torch.Tensor] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)
    frozen_at: int | None = None


def trackable(model: torch.nn.Module, patterns: dict[str, list[str]]) -> list[Tracked]:
    """The weight matrices GradES watches: 2-D trainable weights, or LoRA A/B pairs when adapters exist."""
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad and (".lora_A." in n or ".lora_B." in n)}
    out: list[Tracked] = []
    if lora:
        pairs: dict[str, list] = {}
        for n, p in lora.items():
            pairs.setdefault(re.sub(r"\.lora_[AB]\..*$", "", n), []).append(p)
        for module, params in sorted(pairs.items()):
            group = group_of(module, patterns)
            if group:
                out.append(Tracked(module, group, params))
        return out
    for n, p in model.named_parameters():
        if p.requires_grad and p.dim() == 2 and not n.endswith("embed_tokens.weight"):
            group = group_of(n, patterns)
            if group:
                out.append(Tracked(n, group, [p]))
    return out


class GradESCallback(TrainerCallback):
    """Freezes converged matrices; ``log(metrics, step)`` receives step metrics (e.g. MLflow)."""
    def __init__(self, vision_tau: float, language_tau: float, alpha: float, compute_interval: int,
                 max_frozen_ratio: float = 1.0, patterns: dict[str, list[str]] | None = None, log=None):
        self.tau = {"vision": vision_tau, "language": language_tau}
        self.alpha, self.interval, self.max_frozen_ratio = alpha, compute_interval, max_frozen_ratio
        self.patterns = patterns or DEFAULT_PATTERNS
        self.log = log
        self.tracked: list[Tracked] = []
        self.events: list[dict] = []
        self.stopped_at: int | None = None

    # -- Trainer hooks -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tracked = trackable(_unwrap(model), self.patterns)
        if not self.tracked:
            raise ValueError("GradES: no weight matrix matches the vision/language patterns")
        for t in self.tracked:
            t.previous = [p.detach().clone() for p in t.params]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for t in self.tracked:  # a frozen matrix gets no gradient and so no update
            if t.frozen_at is not None:
                for p in t.params:
                    p.grad = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.interval:
            return
        changes = {}
        for t in self.tracked:
            if t.frozen_at is not None:
                continue
            change = sum(float((p.detach() - prev).abs().sum()) for p, prev in zip(t.params, t.previous, strict=False))
            t.previous = [p.detach().clone() for p in t.params]
            t.history.append((step, change))
            changes[t.name] = change
        grace = step >= self.alpha * state.max_steps
        decide = [t.name for t in self.tracked
                  if grace and t.frozen_at is None and changes.get(t.name, float("inf")) < self.tau[t.group]]
        decide = _broadcast(decide)  # rank 0's decision is everyone's
        for t in self.tracked:
            if t.name in decide:
                t.frozen_at = step
                for p in t.params:
                    p.requires_grad_(False)
                    p.grad = None
                self.events.append({"step": step, "matrix": t.name, "group": t.group, "change": changes[t.name]})
        metrics = self.metrics(changes)
        metrics["grades/freeze_events"] = float(len(decide))
        if self.log is not None and state.is_world_process_zero:
            self.log(metrics, step)
        if metrics["grades/frozen_fraction"] >= self.max_frozen_ratio:
            self.stopped_at = step
            control.should_training_stop = True

    # -- reporting -----------------------------------------------------------------------------------------
    def metrics(self, changes: dict[str, float] | None = None) -> dict[str, float]:
        out = {"grades/frozen_fraction": _frac(self.tracked)}
        for group in ("vision", "language"):
            members = [t for t in self.tracked if t.group == group]
            if members:
                out[f"grades/frozen_fraction_{group}"] = _frac(members)
                live = [changes[t.name] for t in members if changes and t.name in changes]
                if live:
                    out[f"grades/change_{group}"] = sum(live) / len(live)
        return out

    def history(self) -> dict[str, dict]:
        """Per matrix: its group, (step, change) checks and the step it froze at (None if never)."""
        return {t.name: {"group": t.group, "changes": t.history, "frozen_at": t.frozen_at} for t in self.tracked}

    def summary(self) -> dict[str, float]:
        out = self.metrics()
        out["grades/matrices"] = float(len(self.tracked))
        out["grades/stopped_at_step"] = float(self.stopped_at or 0)
        return out

    def plot(self, path: str) -> None:
        """Change per matrix over steps (log scale), tau per group, freeze points."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for ax, group in zip(axes, ("vision", "language"), strict=False):
            for t in (t for t in self.tracked if t.group == group):
                if t.history:
                    steps, values = zip(*t.history, strict=False)
                    ax.plot(steps, values, lw=0.6, alpha=0.5)
                    if t.frozen_at is not None:
                        ax.scatter([steps[-1]], [values[-1]], marker="x", color="black", s=14, zorder=3)
            ax.axhline(self.tau[group], color="red", ls="--", lw=1, label=f"{group}_tau = {self.tau[group]:g}")
            ax.set_yscale("log")
            ax.set_title(f"{group}: L1 weight change per {self.interval} steps (x = frozen)")
            ax.set_xlabel("step")
            ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _frac(items: list[Tracked]) -> float:
    return sum(t.frozen_at is not None for t in items) / len(items) if items else 0.0


def _unwrap(model):
    return getattr(model, "module", model)


def _broadcast(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj
