"""The one place vlmlab touches torch's private API, written against torch 2.13 (scripts/setup installs it).

* ``StepMemoryTracker``: torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which attributes every
  tensor storage a step allocates to a category (parameters, buffers, gradients, activations, temporaries, optimizer
  state) and keeps the peak. torch has no public equivalent that works on CPU (``torch.cuda.memory`` needs a GPU).
  Subclassed for two cases it refuses: a root module called twice in one step (TRL's DPO runs the model once for
  the policy and once, adapters disabled, for the reference: the second call is recorded as MemTracker records a
  submodule's second call), and frozen parameters (LoRA, frozen towers: no gradient hook is
  put on a parameter that gets no gradient).

tests/test_torch_private.py imports what this module uses and checks it, so a torch upgrade that moves it fails
there, by name, before any run does.
"""
from __future__ import annotations

from copy import deepcopy

from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _ModState

WRITTEN_FOR = "2.13"


def step_memory_tracker():
    """A fresh ``StepMemoryTracker`` (torch's ``MemTracker`` that allows a second root forward in one step)."""
    class StepMemoryTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                        def grad_hook(grad):
                            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(grad_hook),
                            param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)))
            return memory

        def _pre_fw_hook(self, module, inputs):
            name = self._mod_tracker.get_known_fqn(module)
            again = module in self.memory_tracking and not self._mod_tracker.is_bw
            if not (again and set(self._mod_tracker.parents) - {name} == {"Global"}):
                return super()._pre_fw_hook(module, inputs)
            # what MemTracker does for a submodule called twice in one step, for the root: its stats go on
            stats = self.memory_tracking[module]
            stats.input_mem = self._track_inputs_or_outputs(inputs)
            snapshot = self.get_tracker_snapshot()
            stats.local_peak = {device: snap[_TOTAL_KEY] for device, snap in snapshot.items()}
            stats.snapshots.setdefault(_ModState.PEAK_FW, []).append(snapshot)
            stats.snapshots.setdefault(_ModState.PRE_FW, []).append(deepcopy(snapshot))

    return StepMemoryTracker()


def peak_by_category(tracker) -> dict[str, int]:
    """The tracker's peak snapshot: bytes by category (Parameter, Buffer, Gradient, Activation, Temp, Optstate,
    Other) and Total, summed over devices."""
    out: dict[str, int] = {}
    for snapshot in tracker.get_tracker_snapshot("peak").values():
        for key, value in snapshot.items():
            name = getattr(key, "value", key)
            out[name] = out.get(name, 0) + int(value)
    return out
