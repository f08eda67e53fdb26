"""GradES: exactly the converged matrix freezes, only after the grace period, and then never changes."""
from __future__ import annotations

import pytest
import torch
from transformers import TrainerControl, TrainerState

from runtime.config import load_config
from runtime.errors import ConfigError
from stages.support.grades import GradESCallback, trackable


class TinyVLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
        self.text_model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))

    def forward(self, x):
        return self.text_model(self.vision_model(x))


def test_freezes_exactly_the_converged_matrix_after_grace():
    torch.manual_seed(0)
    model = TinyVLM()
    vision_w = model.vision_model[0].weight
    opt = torch.optim.SGD([{"params": [vision_w], "lr": 0.1},
                           {"params": list(model.text_model.parameters()), "lr": 0.1}])
    cb = GradESCallback(vision_tau=1e-6, language_tau=1e-6, alpha=0.5, compute_interval=2)
    state, control = TrainerState(max_steps=20), TrainerControl()
    state.is_world_process_zero = True
    cb.on_train_begin(None, state, control, model=model)
    assert [t.name for t in cb.tracked] == ["vision_model.0.weight", "text_model.0.weight", "text_model.1.weight"]

    frozen_at_step = {}
    for step in range(1, 21):
        if step == 3:
            opt.param_groups[0]["lr"] = 0.0  # the vision matrix stops changing from step 3 on
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        cb.on_pre_optimizer_step(None, state, control)
        before = vision_w.detach().clone()
        opt.step()
        opt.zero_grad()
        state.global_step = step
        cb.on_step_end(None, state, control, model=model)
        for t in cb.tracked:
            if t.frozen_at is not None:
                frozen_at_step.setdefault(t.name, t.frozen_at)
        if step < 10:
            assert not frozen_at_step, f"froze during the grace period (step {step})"
        if "vision_model.0.weight" in frozen_at_step and step > frozen_at_step["vision_model.0.weight"]:
            assert vision_w.grad is None and not vision_w.requires_grad
            assert torch.equal(before, vision_w.detach())  # no update
    # grace = alpha * max_steps = 10; checks every 2 steps -> the vision matrix freezes at step 10, exactly
    assert frozen_at_step == {"vision_model.0.weight": 10}
    assert cb.metrics()["grades/frozen_fraction_vision"] == 1.0
    assert cb.metrics()["grades/frozen_fraction_language"] == 0.0
    assert not control.should_training_stop


def test_stops_when_all_frozen_and_plots(tmp_path):
    model = TinyVLM()
    cb = GradESCallback(vision_tau=1.0, language_tau=1.0, alpha=0.0, compute_interval=1)
    state, control = TrainerState(max_steps=10), TrainerControl()
    state.is_world_process_zero = True
    cb.on_train_begin(None, state, control, model=model)
    state.global_step = 1
    cb.on_step_end(None, state, control, model=model)  # nothing changed: every change is 0 < tau
    assert control.should_training_stop and cb.summary()["grades/frozen_fraction"] == 1.0
    cb.plot(str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_lora_pairs_are_tracked():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(TinyVLM(), LoraConfig(r=2, target_modules=["0", "1"]))
    names = [t.name for t in trackable(model, {"vision": [r"vision_model\."], "language": [r"text_model\."]})]
    assert names == ["base_model.model.text_model.0", "base_model.model.text_model.1",
                     "base_model.model.vision_model.0"]
    assert all(len(t.params) == 2 for t in trackable(model, {"vision": [r"vision_model\."],
                                                             "language": [r"text_model\."]}))


@pytest.mark.parametrize("override, message", [
    ("sft.grades.vision_tau=-1", "sft.grades.vision_tau: Input should be greater than or equal to 0"),
    ("sft.grades.alpha=1.5", "sft.grades.alpha: Input should be less than or equal to 1"),
    ("sft.grades.patterns={vision: ['(']}", "not a valid regex"),
])
def test_invalid_settings_fail_at_config_time(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, ["sft.grades.enabled=true", override])


def test_patterns_matching_nothing_fail_at_check():
    from stages import sft

    cfg = load_config(None, ["sft.grades.enabled=true", "sft.grades.patterns={vision: ['no_such_tower'], "
                             "language: ['text_model']}"])
    with pytest.raises(ConfigError, match="sft.grades.patterns.vision: no parameter of the model matches"):
        sft.check(cfg)
    sft.check(load_config(None, ["sft.grades.enabled=true"]))  # the defaults match the tiny Idefics3


def test_two_ddp_workers_freeze_the_same_matrices_at_the_same_step(ray_session, workdir):
    """GradES under Ray Train DDP with 2 CPU workers: rank 0 decides and broadcasts; both ranks agree."""
    import json

    from helpers import tiny_overrides

    from harness.pipeline import run_pipeline

    overrides = tiny_overrides(**{
        "resources.workers": 2, "resources.cpus_per_worker": 1, "sft.max_steps": 12, "sft.batch_size": 4,
        "sft.grades.enabled": "true", "sft.grades.alpha": 0.25, "sft.grades.compute_interval": 2,
        "sft.grades.vision_tau": 1e9, "sft.grades.language_tau": 1e9, "sft.grades.max_frozen_ratio": 1.0})
    result = run_pipeline(load_config(None, overrides), "sft")
    stage_dir = workdir / "runs" / result["run_id"] / "sft"
    rank0 = json.loads((stage_dir / "grades_events_rank0.json").read_text())
    rank1 = json.loads((stage_dir / "grades_events_rank1.json").read_text())
    assert rank0 and [(e["step"], e["matrix"]) for e in rank0] == [(e["step"], e["matrix"]) for e in rank1]
    assert {e["step"] for e in rank0} == {4}  # first check at or after the grace period (0.25 x 12 = 3)
    assert result["metrics"]["sft/grades/frozen_fraction"] == 1.0
    assert result["metrics"]["sft/steps"] == 4  # everything frozen: training stopped early
    assert (stage_dir / "grades_convergence.png").exists()


@pytest.mark.parametrize("name, group", [
    # Idefics3 / SmolVLM
    ("model.vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision"),
    ("model.text_model.layers.3.mlp.down_proj.weight", "language"),
    ("model.connector.modality_projection.proj.weight", "language"),
    # LLaVA
    ("model.vision_tower.encoder.layers.1.mlp.fc1.weight", "vision"),
    ("model.language_model.layers.0.self_attn.o_proj.weight", "language"),
    ("model.multi_modal_projector.linear_1.weight", "language"),
    ("lm_head.weight", "language"),
    # Qwen2-VL
    ("model.visual.blocks.5.attn.qkv.weight", "vision"),
    ("model.visual.merger.mlp.0.weight", "vision"),
    ("model.layers.7.self_attn.k_proj.weight", "language"),
])
def test_default_patterns_cover_the_supported_architectures(name, group):
    from stages.support.grades import DEFAULT_PATTERNS, group_of

    assert group_of(name, DEFAULT_PATTERNS) == group


def test_per_component_learning_rates_and_freezing():
    from types import SimpleNamespace

    from runtime.config import load_config
    from stages.support.training import component_optimizer, freeze_components

    class Composed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = torch.nn.Linear(4, 4)
            self.connector = torch.nn.Linear(4, 4)
            self.text_model = torch.nn.Linear(4, 4)

    cfg = load_config(None, ["sft.components.vision.freeze=true", "sft.components.connector.lr=1e-2",
                             "sft.learning_rate=1e-4"]).sft
    model = Composed()
    counts = freeze_components(model, cfg.components)
    assert counts == {"connector": 20, "language": 20} and not model.vision_model.weight.requires_grad
    opt = component_optimizer(SimpleNamespace(model=model), cfg)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"connector": 1e-2, "language": 1e-4}
    assert component_optimizer(SimpleNamespace(model=model), load_config(None, []).sft) is None
