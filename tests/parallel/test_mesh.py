"""`distill_jax.parallel` on the test process's one device: mesh shapes and their errors, the
config blocks, helpers that are the identity without a mesh, and the distributed settings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import frepo as frepo_config
from distill_jax import parallel
from distill_jax.parallel import distributed


def test_mesh_shapes_and_errors():
  devices = [object()] * 4  # `make_mesh` only arranges them; no computation runs here.
  with pytest.raises(ValueError, match=r"mesh.shape \(3, -1\) does not divide the 4 devices"):
    parallel.make_mesh((3, -1), devices=devices)
  with pytest.raises(ValueError, match=r"needs 8 devices but 4 are available"):
    parallel.make_mesh((4, 2), devices=devices)
  with pytest.raises(ValueError, match="at most one -1"):
    parallel.make_mesh((-1, -1), devices=devices)
  with pytest.raises(ValueError, match="one entry per axis"):
    parallel.make_mesh((4,), devices=devices)
  mesh = parallel.make_mesh((-1, 1))
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}


def test_mesh_from_config():
  config = frepo_config.get_config("smoke")
  assert config.mesh.to_dict() == {"data": -1, "model": 1}  # Every device on `data`.
  assert dict(parallel.mesh_from_config(config).shape) == {"data": jax.device_count(),
                                                           "model": 1}
  assert parallel.mesh_from_config(ml_collections.ConfigDict({})).size == jax.device_count()
  bad = ml_collections.ConfigDict({"mesh": {"data": -1, "modle": 1}})
  with pytest.raises(ValueError, match="unknown mesh axis 'modle' in config.mesh"):
    parallel.mesh_from_config(bad)
  with pytest.raises(ValueError, match="config.mesh.model must be an int"):
    parallel.mesh_from_config(ml_collections.ConfigDict({"mesh": {"data": -1, "model": "2"}}))


def test_helpers_are_the_identity_without_a_mesh_of_several_devices():
  x = jnp.arange(8.0).reshape(4, 2)
  for mesh in (None, parallel.make_mesh((1, 1), devices=jax.devices()[:1])):
    with parallel.use_mesh(mesh):
      assert parallel.current_mesh() is None  # A 1-device mesh counts as none.
      assert parallel.place(x, parallel.replicated()) is x
      assert parallel.replicated() is None and parallel.stack_sharding((4,), "model") is None
      assert parallel.axis_size("data") == 1 and not parallel.one_call_in_flight()
      # Inside jit too: the program is the one without a mesh.
      np.testing.assert_array_equal(
          jax.jit(lambda a: parallel.constrain_leading(a, "data") * 2)(x), 2 * x)
  assert parallel.is_writer()  # The only process writes.
  parallel.barrier("nothing to wait for")


def test_to_host_copies_arrays_and_keeps_keys():
  key = jax.random.key(3)
  host = parallel.to_host({"a": jnp.ones((2, 3)), "b": np.zeros(2), "k": key, "n": 5})
  assert isinstance(host["a"], np.ndarray) and host["a"].shape == (2, 3)
  assert host["k"] is key and host["n"] == 5


def test_distributed_settings_from_config_and_environment(monkeypatch):
  for name in distributed._ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.delenv("SLURM_JOB_ID", raising=False)
  config = frepo_config.get_config("smoke")
  assert distributed._settings(config) is None
  assert not parallel.initialize(config)  # One process: nothing to connect.
  config.distributed.coordinator_address = "10.0.0.1:1234"
  config.distributed.num_processes = 4
  config.distributed.process_id = 2
  assert distributed._settings(config) == ("10.0.0.1:1234", 4, 2)
  config.distributed.process_id = 4
  with pytest.raises(ValueError, match="gives 4 processes and process id 4"):
    distributed._settings(config)
  config.distributed.coordinator_address = ""
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:9")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(ValueError, match="must be ints, got '2' and 'one'"):
    distributed._settings(config)
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert distributed._settings(config) == ("127.0.0.1:9", 2, 1)
  # A one-task SLURM job (submitit's federated jobs) stays one process.
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not parallel.initialize(config)
