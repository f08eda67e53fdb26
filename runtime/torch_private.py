"""The one place vlmlab touches torch's private API, written against torch 2.13 (scripts/setup installs it).

* ``StepMemoryTracker``: torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which attributes every
  tensor storage a step allocates to a category (parameters, buffers, gradients, activations, temporaries, optimizer
  state) and keeps the peak. torch has no public equivalent that works on CPU (``torch.cuda.memory`` needs a GPU).
  Subclassed for two cases it refuses: a root module called twice in one step (TRL's DPO runs the model once for
  the policy and once, adapters disabled, for the reference: the module statistics of the first call are dropped
  there, the categories and the peak are kept), and frozen parameters (LoRA, frozen towers: no gradient hook is
  put on a parameter that gets no gradient).

tests/test_torch_private.py imports what this module uses and checks it, so a torch upgrade that moves it fails
there, by name, before any run does.
"""
from __future__ import annotations

from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

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
            if again and set(self._mod_tracker.parents) - {name} == {"Global"}:
                self.reset_mod_stats()  # per-module stats only: categories and the peak are kept
            super()._pre_fw_hook(module, inputs)

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
