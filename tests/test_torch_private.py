"""runtime/torch_private.py is vlmlab's only use of torch's private API: what it uses must be there, and do what the
memory plan relies on, in the torch installed. A torch upgrade that moves it fails here, by name."""
from __future__ import annotations

import inspect

import torch

from runtime import torch_private


def test_torch_is_the_version_the_adapter_was_written_for():
    assert torch.__version__.startswith(torch_private.WRITTEN_FOR), (
        f"torch {torch.__version__} is installed; runtime/torch_private.py was written against "
        f"{torch_private.WRITTEN_FOR}: check the MemTracker it subclasses (this module's other tests), then update "
        "WRITTEN_FOR")


def test_the_private_names_it_uses_are_there():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _ModMemStats, _ModState

    for name in ("_pre_fw_hook", "_track_module_params_and_buffers", "_update_and_maybe_create_winfos",
                 "reset_mod_stats", "get_tracker_snapshot", "track_external"):
        assert callable(getattr(MemTracker, name, None)), name
    assert list(inspect.signature(MemTracker._pre_fw_hook).parameters) == ["self", "module", "inputs"]
    assert list(inspect.signature(MemTracker._track_module_params_and_buffers).parameters) == [
        "self", "module", "install_grad_hooks"]
    assert _MemRefType.GRAD.value == "Gradient" and _TOTAL_KEY == "Total"
    assert {_ModState.PEAK_FW, _ModState.PRE_FW} <= set(_ModState)
    assert {"local_peak", "snapshots"} <= set(vars(_ModMemStats("m"))) and callable(MemTracker._track_inputs_or_outputs)
    assert "_param_to_grad_hook_handles" in vars(MemTracker())


def test_it_counts_a_step_and_a_second_root_forward():
    """A real step of a small model: parameters, AdamW's two states and the activations, in exact bytes; and a root
    module run twice in one step (as TRL's DPO does) is tracked instead of refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    model[0].bias.requires_grad_(False)  # a frozen parameter (LoRA freezes the base weights)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    batch = torch.randn(2048, 256)  # activations (2048 x 256 floats a layer) outweigh the parameters
    tracker = torch_private.step_memory_tracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(2):
            loss = model(batch).square().mean()
            with torch.no_grad():
                model(batch)  # the "reference" pass, after the policy's (as TRL's DPO runs them)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.reset_mod_stats()
    peak = torch_private.peak_by_category(tracker)
    params = sum(p.numel() * 4 for p in model.parameters())
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert peak["Parameter"] == params and peak["Optstate"] >= 2 * trained
    assert peak["Activation"] >= 2048 * 256 * 4  # at least the hidden layer's output
    assert peak["Total"] == sum(v for k, v in peak.items() if k != "Total")
