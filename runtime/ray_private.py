"""The one place vlmlab touches Ray's private API, written against Ray 2.60.0 (pyproject pins it).

Each use below has no public equivalent that works where vlmlab runs; tests/test_ray_private.py imports every name
used here and checks its signature, so a Ray upgrade that moves one fails there, loudly, before any run does.

* ``dead_actor_pids``: ``ray._private.state.actors``. The public ``ray.util.state.list_actors`` asks the dashboard's
  State API, which a local Ray started without the dashboard (vlmlab's default: nine fewer processes on the
  training cores) does not serve.
* ``free_per_node``: ``ray._private.state.available_resources_per_node`` (a DeveloperAPI; Ray's own TPU helpers use
  it). The public ``ray.available_resources()`` sums over nodes, and a worker must fit one node; the State API's
  ``list_nodes`` needs the dashboard.
* ``trainer_class``: ``TorchTrainer._create_default_callbacks`` and two of Ray Train V2's internal callbacks. Ray
  Train offers no switch to leave its default callbacks out; these two start actors vlmlab never uses.
"""
from __future__ import annotations

from collections.abc import Iterable

WRITTEN_FOR = "2.60.0"


def dead_actor_pids() -> Iterable[int]:
    """PIDs of the actors the GCS counts as dead (their processes may still run: `raytrain.reap_hung_actors`)."""
    import ray

    return [actor["Pid"] for actor in ray._private.state.actors(actor_state_name="DEAD").values()]


def free_per_node() -> list[dict[str, float]]:
    """What each live node has free right now (a resource none of it is free of is left out)."""
    from ray._private.state import available_resources_per_node

    return list(available_resources_per_node().values())


def trainer_class(no_state_api: bool):
    """TorchTrainer, less two default callbacks that start actors this harness never uses.

    * ``DatasetsCallback`` starts a DatasetManager actor (a process) for Ray Data inputs; the stages read their
      data themselves and pass no ``datasets``.
    * ``PlacementGroupCleanerCallback``, on a local Ray without the dashboard (``no_state_api``): a detached actor
      that asks the State API (served by the dashboard) every second whether the Train controller is still alive, to
      free the placement group of a controller that crashed. Without a dashboard each query fails with a warning (one
      a second in the user's console), and the placement groups of a local Ray go away with the process anyway.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class HarnessTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            unused = (() if self.datasets else (DatasetsCallback,)) + (
                (PlacementGroupCleanerCallback,) if no_state_api else ())
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    return HarnessTorchTrainer
