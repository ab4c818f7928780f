"""Runs on 4 simulated CPU devices (`tests/parallel/test_devices.py` starts it in a subprocess
with `XLA_FLAGS=--xla_force_host_platform_device_count=4`): FRePo steps, MTT iterations, DM
steps and an evaluation on a 4x1 and a 2x2 mesh equal the same computations on one device to float
tolerance, and the arrays live where the methods say (checked through `.sharding`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import dm as dm_config
from configs import frepo as frepo_config
from configs import mtt as mtt_config
from distill_jax import data as data_lib
from distill_jax import parallel
from distill_jax.evaluation import get_protocol
from distill_jax.methods import dm, frepo, mtt
from distill_jax.training import Trainer
from tests import digits_sets

MESHES = {"4x1": (4, 1), "2x2": (2, 2)}

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_real("digits", "standardize")


def _close(a, b, rtol=2e-4, atol=2e-5):
  for x, y in zip(jax.tree.leaves(parallel.to_host(a)), jax.tree.leaves(parallel.to_host(b))):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def _steps(method, num_steps: int):
  """`num_steps` steps as the run loop compiles them (state shardings from the method, inputs
  replicated); returns the final state and the last step's metrics."""
  key = jax.random.key(method.config.seed)
  mesh = parallel.current_mesh()
  if mesh is None:
    init, step = jax.jit(method.init), jax.jit(method.step)
  else:
    shardings = method.state_shardings(jax.eval_shape(method.init, key))
    init = jax.jit(method.init, out_shardings=shardings)
    step = jax.jit(method.step, out_shardings=(shardings, parallel.replicated()))
  state = init(key)
  metrics = None
  for t in range(1, num_steps + 1):
    state, metrics = step(state, parallel.place(method.inputs(t), parallel.replicated()))
  return state, metrics


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_frepo_steps_equal_one_device(digits, mesh_name):
  config = frepo_config.get_config("smoke,pool.width=4,pool.size=4,outer.real_batch_size=64")
  reference, ref_metrics = _steps(frepo.FRePo(config, digits), 3)
  with parallel.use_mesh(parallel.make_mesh(MESHES[mesh_name])):
    method = frepo.FRePo(config, digits)
    state, metrics = _steps(method, 3)
    x_train, _ = method.device_train_set
  _close(state.x_syn, reference.x_syn)
  _close(state.y_syn, reference.y_syn)
  _close(state.pool.params, reference.pool.params)
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-4)
  # Where the arrays live: the pool split over `model` (size 4 divides both axes' sizes), the
  # set and the real data replicated.
  model_axis = MESHES[mesh_name][1]
  for leaf in jax.tree.leaves(state.pool):
    assert leaf.sharding.spec == (P("model") if model_axis > 1 else P()), leaf.sharding
    assert len(leaf.sharding.device_set) == 4
  assert state.x_syn.sharding.is_fully_replicated and len(state.x_syn.sharding.device_set) == 4
  assert x_train.sharding.is_fully_replicated and len(x_train.sharding.device_set) == 4


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_mtt_iterations_equal_one_device(digits, mesh_name):
  config = mtt_config.get_config(
      "smoke,experts.model_kwargs.width=8,inner.steps=3,inner.batch_size=8,"
      "inner.max_start_epoch=2")
  method = mtt.MTT(config, digits)
  model = method.model

  def params(seed, scale):
    p = model.init(jax.random.key(seed), jnp.zeros((1, *digits.image_shape)))["params"]
    leaves, tree = jax.tree.flatten(p)
    noise = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.map(np.asarray, jax.tree.unflatten(
        tree, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, noise)]))

  inputs = {"start": params(1, 0.0), "target": params(1, 0.05), "expert": np.int32(0),
            "start_epoch": np.int32(0)}
  method.inputs = lambda step: inputs  # The expert buffer is not what is tested here.
  reference, ref_metrics = _steps(method, 2)
  with parallel.use_mesh(parallel.make_mesh(MESHES[mesh_name])):
    state, metrics = _steps(method, 2)
  _close(state.x_syn, reference.x_syn)
  _close(state.lr, reference.lr)
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-4)
  assert state.x_syn.sharding.is_fully_replicated and len(state.x_syn.sharding.device_set) == 4


@pytest.mark.parametrize("mesh_name", ["4x1"])
def test_dm_steps_equal_one_device(digits, mesh_name):
  # Each class's real batch (16 images) is split over `data` (`_pixels.real_class_batches`).
  config = dm_config.get_config("smoke,outer.real_batch_size=16")
  reference, ref_metrics = _steps(dm.DM(config, digits), 3)
  with parallel.use_mesh(parallel.make_mesh(MESHES[mesh_name])):
    state, metrics = _steps(dm.DM(config, digits), 3)
  _close(state.x_syn, reference.x_syn)
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-4)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_evaluation_networks_equal_one_device(mesh_name):
  x, y = digits_sets.subset(digits_sets.digits_arrays(), per_class=8)
  training_set = digits_sets.pixel_set(x, y, ipc=8)
  protocol = get_protocol("standard", epochs=6, width=8, depth=2)
  trainer = Trainer.for_set(protocol, training_set)
  keys = jax.random.split(jax.random.key(0), 4)
  x_test, y_test = digits_sets.subset(digits_sets.digits_arrays(), per_class=30, offset=100)
  reference = trainer.train(keys, training_set, vectorize=True)
  ref_accuracy = trainer.accuracy(reference.state, x_test, y_test, vectorize=True)
  with parallel.use_mesh(parallel.make_mesh(MESHES[mesh_name])):
    trained = trainer.train(keys, training_set)  # vmapped by default on a mesh.
    accuracy = trainer.accuracy(trained.state, x_test, y_test)
  _close(trained.state.params, reference.state.params)
  np.testing.assert_allclose(trained.losses, reference.losses, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(accuracy, ref_accuracy, atol=1.5 / len(y_test))
  model_axis = MESHES[mesh_name][1]
  for leaf in jax.tree.leaves(trained.state.params):
    assert leaf.sharding.spec == (P("model") if model_axis > 1 else P()), leaf.sharding
    assert len(leaf.sharding.device_set) == 4
