"""Several processes (hosts) running one job through `jax.distributed`.

Every process runs the same command; `initialize(config)` connects them before JAX starts its
backend, from (first match wins):

  1. the config: `distributed.coordinator_address` ("host:port"), `distributed.num_processes`,
     `distributed.process_id` (one command line per process);
  2. the environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (the
     same command on every host, each with its own id);
  3. a SLURM job step with more than one task (`srun`): `jax.distributed.initialize()` finds
     the coordinator, process count and id itself, as it does on Cloud TPU pods.

Otherwise the run is one process and nothing happens. After it, `jax.devices()` lists the
devices of every process and the run's mesh spans them all; every process computes the same
program on its own devices (SPMD), Orbax checkpoints are written and restored by all processes
together, and only process 0 (`is_writer()`) writes reports, metrics, images and sets.
"""

import os

import jax
from absl import logging

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _settings(config) -> tuple[str, int, int] | None:
  """`(coordinator, num_processes, process_id)` from the config or the environment, or None."""
  block = config.get("distributed") if config is not None and hasattr(config, "get") else None
  if block is not None and block.get("coordinator_address"):
    address, count, index = (block.coordinator_address, block.get("num_processes", 0),
                             block.get("process_id", -1))
    source = "config.distributed"
  elif os.environ.get(_ENV[0]):
    address, count, index = (os.environ[_ENV[0]], os.environ.get(_ENV[1], "0"),
                             os.environ.get(_ENV[2], "-1"))
    source = "the environment (" + ", ".join(_ENV) + ")"
  else:
    return None
  try:
    count, index = int(count), int(index)
  except ValueError:
    raise ValueError(f"num_processes and process_id from {source} must be ints, got "
                     f"{count!r} and {index!r}") from None
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"{source} gives {count} processes and process id {index}; set the "
                     f"process count (>= 1) and this process's id in 0..count-1")
  return address, count, index


def _slurm_tasks() -> int:
  try:
    return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 1)
  except ValueError:
    return 1


def initialize(config=None) -> bool:
  """Connects this process to the others of its job (see the module docstring); returns
  whether it runs with several processes. Call it before any other JAX call; calling it again
  is harmless."""
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  settings = _settings(config)
  if settings is not None:
    address, count, index = settings
    if count == 1:
      return False
    logging.info("jax.distributed: process %d of %d, coordinator %s", index, count, address)
    jax.distributed.initialize(address, num_processes=count, process_id=index)
  elif "SLURM_JOB_ID" in os.environ and _slurm_tasks() > 1:
    logging.info("jax.distributed: a SLURM step of %d tasks", _slurm_tasks())
    jax.distributed.initialize()
  else:
    return False
  return True


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0; the only process of a 1-process
  run)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier `name` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)
