"""Devices and hosts: the run's mesh (`mesh.py`) and several processes (`distributed.py`).

`configs/common.py` gives every config two blocks: `mesh` (`shape`, `axes`) and `distributed`
(coordinator, process count and id). `distill_jax.pipeline` activates the mesh around its work;
methods, the run loop and the trainer place and constrain arrays through the helpers here.
"""

from distill_jax.parallel.distributed import barrier, initialize, is_writer
from distill_jax.parallel.mesh import (
    AXES, axis_size, constrain_leading, current_mesh, make_mesh, mesh_from_config, one_call_in_flight, place,
    replicated, replicated_shardings, stack_sharding, stack_shardings, to_host, use_mesh,
)

__all__ = [
    "AXES",
    "axis_size",
    "barrier",
    "constrain_leading",
    "current_mesh",
    "initialize",
    "is_writer",
    "make_mesh",
    "mesh_from_config",
    "one_call_in_flight",
    "place",
    "replicated",
    "replicated_shardings",
    "stack_sharding",
    "stack_shardings",
    "to_host",
    "use_mesh",
]
