"""runtime/ray_private.py is vlmlab's only use of Ray's private API: every name it uses must still be there, with the
signature it calls, in the Ray installed. A Ray upgrade that moves one fails here, by name, not in a run."""
from __future__ import annotations

import inspect

import ray

from runtime import ray_private


def test_ray_is_the_version_the_adapter_was_written_for():
    assert ray.__version__ == ray_private.WRITTEN_FOR, (
        f"Ray {ray.__version__} is installed; runtime/ray_private.py was written against {ray_private.WRITTEN_FOR}: "
        "check each private name it uses (this module's other tests), then update WRITTEN_FOR")


def test_the_private_names_it_uses_are_there():
    from ray._private import state

    assert "actor_state_name" in inspect.signature(state.actors).parameters
    assert list(inspect.signature(state.available_resources_per_node).parameters) == []
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    assert callable(getattr(TorchTrainer, "_create_default_callbacks", None))
    assert list(inspect.signature(TorchTrainer._create_default_callbacks).parameters) == ["self"]
    assert inspect.isclass(DatasetsCallback) and inspect.isclass(PlacementGroupCleanerCallback)
    trainer = ray_private.trainer_class(no_state_api=True)
    assert issubclass(trainer, TorchTrainer) and trainer._create_default_callbacks is not \
        TorchTrainer._create_default_callbacks


def test_the_trainer_leaves_out_exactly_the_two_callbacks():
    """Built for real (no Ray started: building a trainer and its callbacks does not need one)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    def loop(config):
        return None

    kept = ray_private.trainer_class(no_state_api=True)(loop, scaling_config=ScalingConfig(num_workers=1))
    full = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1))
    unused = (DatasetsCallback, PlacementGroupCleanerCallback)
    before = [type(c) for c in full._create_default_callbacks()]
    after = [type(c) for c in kept._create_default_callbacks()]
    assert after == [c for c in before if c not in unused]
    assert set(before) - set(after) == set(unused) & set(before) and DatasetsCallback in before
