"""Expert trajectory buffers: the trainer's trajectories, lazy reads, growth, resume, keying."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from distill_jax.data import RealData
from distill_jax.distilled import PixelSet
from distill_jax.training import Trainer
from distill_jax.training import experts

# Momentum and weight decay on, so the optimiser state is stored and resumed too; two cheap DSA
# ops exercise augmentation keys across a resume.
SPEC_FIELDS = dict(num_epochs=3, batch_size=16, lr=0.05, momentum=0.5, weight_decay=1e-3,
                   dsa_strategy="flip_crop", experts_per_shard=2, seed=3,
                   model_kwargs={"width": 4, "depth": 2, "norm": "instance"})


def toy_data(n=40, seed=0):
  rng = np.random.default_rng(seed)
  y = (np.arange(n) % 3).astype(np.int32)
  x = (rng.normal(size=(n, 8, 8, 1)) + y[:, None, None, None]).astype(np.float32)
  return RealData("toy", 3, (8, 8, 1), ("a", "b", "c"), x, y, x[:12], y[:12])


def file_mtimes(folder):
  return {os.path.relpath(os.path.join(root, name), folder): os.path.getmtime(
      os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-expert buffer grown in two calls (2 experts, then 4), with the files of the first shard."""
  data = toy_data()
  spec = experts.ExpertSpec.create(data, preprocessing="none", **SPEC_FIELDS)
  path = str(tmp_path_factory.mktemp("buffer"))
  experts.train_experts(spec, data, path, num_experts=2)
  mtimes = file_mtimes(os.path.join(path, "shard_0000"))
  buffer = experts.train_experts(spec, data, path, num_experts=4)
  return data, spec, path, buffer, mtimes


def direct_run(spec, data, expert):
  """Expert `expert` trained by the trainer alone from `fold_in(key(seed), expert)`, with its
  variables, mean losses and test accuracy after every epoch."""
  real = PixelSet(data.x_train, data.y_train, meta=data.set_meta("real", 1))
  trainer = Trainer.for_set(spec.recipe(), real)
  per_epoch = trainer.steps_per_epoch
  key = jax.random.fold_in(jax.random.key(spec.seed), expert)[None]
  state = trainer.initial_state(key, spec.image_shape)
  records = [(jax.tree.map(np.asarray, {"params": state.params, **state.model_state}),
              np.nan, trainer.accuracy(state, data.x_test, data.y_test)[0])]

  def on_save(step, state, losses):
    variables = jax.tree.map(np.asarray, {"params": state.params, **state.model_state})
    records.append((variables, losses[0], trainer.accuracy(state, data.x_test, data.y_test)[0]))

  trainer.train(key, real, state=state, save_at=range(per_epoch, trainer.num_steps + 1, per_epoch),
                on_save=on_save)
  assert len(records) == spec.num_epochs + 1
  return [jax.tree.map(lambda a: a[0], v) for v, _, _ in records], [r[1:] for r in records]


def test_experts_are_the_trainers_networks_at_every_epoch(trained):
  data, spec, _, buffer, _ = trained
  assert (buffer.num_experts, buffer.num_epochs) == (4, 3)
  metrics = buffer.metrics()
  for expert in (0, 3):  # One expert of each shard.
    trajectory, curves = direct_run(spec, data, expert)
    for epoch, reference in enumerate(trajectory):
      jax.tree.map(np.testing.assert_array_equal, buffer.variables(expert, epoch), reference)
      jax.tree.map(np.testing.assert_array_equal, buffer.params(expert, epoch),
                   reference["params"])
    losses, accuracies = zip(*curves)
    np.testing.assert_allclose(metrics["train_loss"][expert], losses, rtol=1e-6)
    np.testing.assert_allclose(metrics["test_accuracy"][expert], accuracies, rtol=1e-6)
  # Experts differ from each other (own init, data order and augmentation).
  a, b = buffer.params(0, 3), buffer.params(1, 3)
  assert not np.allclose(a["Conv_0"]["kernel"], b["Conv_0"]["kernel"])


def test_an_experts_trajectory_does_not_depend_on_the_shard_size(trained, tmp_path):
  data, spec, _, buffer, _ = trained
  one_per_shard = experts.ExpertSpec.create(data, preprocessing="none",
                                            **{**SPEC_FIELDS, "experts_per_shard": 1})
  assert one_per_shard.digest() != spec.digest()
  alone = experts.train_experts(one_per_shard, data, str(tmp_path), num_experts=2)
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith("shard")) == [
      "shard_0000", "shard_0001"]
  for epoch in range(spec.num_epochs + 1):
    jax.tree.map(np.testing.assert_array_equal, alone.variables(1, epoch),
                 buffer.variables(1, epoch))


def test_reads_are_lazy_one_expert_one_epoch(trained, tmp_path):
  _, _, path, _, _ = trained
  lazy_copy = str(tmp_path / "lazy")
  shutil.copytree(path, lazy_copy)
  buffer = experts.TrajectoryBuffer(lazy_copy, num_experts=4)
  assert buffer.reads == 0 and buffer.bytes_read == 0  # Opening reads no parameters.
  # Only shard 1, epoch 2 stays on disk: a read touching anything else would fail.
  shutil.rmtree(os.path.join(lazy_copy, "shard_0000"))
  for name in os.listdir(os.path.join(lazy_copy, "shard_0001")):
    if name.isdigit() and name != "2":
      shutil.rmtree(os.path.join(lazy_copy, "shard_0001", name))
  params = buffer.params(3, 2)
  one_expert = sum(a.nbytes for a in jax.tree.leaves(buffer.template()))
  assert buffer.reads == 1 and buffer.bytes_read == one_expert
  jax.tree.map(np.testing.assert_array_equal, params, experts.TrajectoryBuffer(path).params(3, 2))
  buffer.params(3, 2)  # Served from the cache.
  assert buffer.reads == 1
  with pytest.raises(Exception):
    buffer.params(3, 1)
  with pytest.raises(ValueError, match="expert 4 out of range"):
    buffer.params(4, 0)
  with pytest.raises(ValueError, match="epoch 4 out of range"):
    buffer.params(0, 4)


def test_growing_a_buffer_keeps_its_shards(trained):
  _, _, path, buffer, mtimes = trained
  assert file_mtimes(os.path.join(path, "shard_0000")) == mtimes
  assert experts.TrajectoryBuffer(path).num_experts == 4
  assert experts.TrajectoryBuffer(path, num_experts=2).num_experts == 2
  with pytest.raises(experts.BufferError, match="has 4 complete experts but 6"):
    experts.TrajectoryBuffer(path, num_experts=6)
  metrics = buffer.metrics()
  assert metrics["test_accuracy"].shape == (4, 4) and metrics["train_loss"].shape == (4, 4)
  assert np.all(np.isnan(metrics["train_loss"][:, 0]))
  assert np.all(np.isfinite(metrics["train_loss"][:, 1:]))
  assert np.all((metrics["test_accuracy"] >= 0) & (metrics["test_accuracy"] <= 1))


def test_interrupted_shard_resumes_to_the_same_trajectory(trained, tmp_path):
  data, spec, path, buffer, _ = trained
  resumed = str(tmp_path / "resumed")
  shutil.copytree(path, resumed)
  shard_dir = os.path.join(resumed, "shard_0001")
  # A kill after epoch 1 of shard 1: later epochs and the completion marker are missing, and a
  # half-written save is left behind.
  os.remove(os.path.join(shard_dir, "shard.json"))
  for epoch in (2, 3):
    shutil.rmtree(os.path.join(shard_dir, str(epoch)))
  os.makedirs(os.path.join(shard_dir, "2.orbax-checkpoint-tmp-1234"))
  with pytest.raises(experts.BufferError, match="has 2 complete experts"):
    experts.TrajectoryBuffer(resumed, num_experts=4)
  again = experts.train_experts(spec, data, resumed, num_experts=4)
  assert not any("tmp" in n for n in os.listdir(shard_dir))
  for expert in (2, 3):
    for epoch in range(4):
      jax.tree.map(np.testing.assert_array_equal, again.variables(expert, epoch),
                   buffer.variables(expert, epoch))
  np.testing.assert_array_equal(again.metrics()["train_loss"], buffer.metrics()["train_loss"])
  with open(os.path.join(shard_dir, "shard.json")) as f:
    assert len(json.load(f)["test_accuracy"]) == 4


def test_spec_digest_and_mismatch(trained, tmp_path):
  data, spec, path, _, _ = trained
  same = experts.ExpertSpec.create(data, preprocessing="none", **SPEC_FIELDS)
  assert same.digest() == spec.digest() and len(spec.digest()) == 16
  assert experts.ExpertSpec.from_dict(spec.to_dict()) == spec
  for change in ({"lr": 0.1}, {"num_epochs": 4}, {"seed": 4}, {"dsa_strategy": ""},
                 {"model_kwargs": {**SPEC_FIELDS["model_kwargs"], "width": 8}}):
    other = experts.ExpertSpec.create(data, preprocessing="none", **{**SPEC_FIELDS, **change})
    assert other.digest() != spec.digest(), change
  assert experts.ExpertSpec.create(
      data, preprocessing="standardize", **SPEC_FIELDS).digest() != spec.digest()
  other = experts.ExpertSpec.create(data, preprocessing="none", **{**SPEC_FIELDS, "lr": 0.1})
  with pytest.raises(experts.BufferError, match="lr: stored 0.05, wanted 0.1"):
    experts.train_experts(other, data, path, num_experts=2)
  with pytest.raises(ValueError, match="not a multiple of experts.experts_per_shard=2"):
    experts.train_experts(spec, data, path, num_experts=3)
  with pytest.raises(experts.BufferError, match="no trajectory buffer"):
    experts.TrajectoryBuffer(str(tmp_path))
  with pytest.raises(ValueError, match="momentum must be in"):
    experts.ExpertSpec.create(data, preprocessing="none", momentum=1.0)
  # A buffer of the first format (written before the shared trainer) is refused, not misread.
  old = tmp_path / "old"
  old.mkdir()
  (old / "buffer.json").write_text(json.dumps({"format": 1, "spec": spec.to_dict()}))
  with pytest.raises(experts.BufferError, match="has format 1, this version reads 2"):
    experts.TrajectoryBuffer(str(old))
  with pytest.raises(experts.BufferError, match="format: stored 1, wanted 2"):
    experts.train_experts(spec, data, str(old), num_experts=2)


def test_the_buffer_is_keyed_by_the_training_data_fingerprint(trained):
  data, spec, _, _, _ = trained
  assert spec.data_fingerprint == data.fingerprint
  # Other training arrays (a subset, another order) give another buffer ...
  subset = data.replace(x_train=data.x_train[:30], y_train=data.y_train[:30])
  reordered = data.replace(x_train=data.x_train[::-1], y_train=data.y_train[::-1])
  for other in (subset, reordered, toy_data(seed=1)):
    other_spec = experts.ExpertSpec.create(other, preprocessing="none", **SPEC_FIELDS)
    assert other_spec.data_fingerprint == other.fingerprint != data.fingerprint
    assert experts.default_buffer_dir(other_spec) != experts.default_buffer_dir(spec)
  # ... the test split and the class names do not.
  relabelled = data.replace(x_test=data.x_test[:6], y_test=data.y_test[:6],
                            class_names=("x", "y", "z"))
  assert experts.ExpertSpec.create(relabelled, preprocessing="none", **SPEC_FIELDS) == spec
  # The same arrays derived again give the same buffer.
  again = data.replace(x_train=data.x_train[:30].copy(), y_train=data.y_train[:30].copy())
  assert again.fingerprint == subset.fingerprint


def test_ensure_buffer_uses_the_cache_directory(trained, tmp_path, monkeypatch):
  data, spec, path, _, _ = trained
  config = ml_collections.ConfigDict({
      "preprocessing": "none",
      "experts": {
          "num_experts": 2, "num_epochs": 3, "lr": 0.05, "momentum": 0.5, "weight_decay": 1e-3,
          "batch_size": 16, "dsa_strategy": "flip_crop", "experts_per_shard": 2, "seed": 3,
          "model": "convnet", "model_kwargs": {"width": 4, "depth": 2, "norm": "instance"},
          "buffer_dir": "",
      },
  })
  assert experts.expert_spec(config, data) == spec
  monkeypatch.setenv(experts.CACHE_ENV, str(tmp_path))
  cached = os.path.join(str(tmp_path), "buffers", spec.digest())
  assert experts.default_buffer_dir(spec) == cached
  shutil.copytree(path, cached)  # As if another run had trained it: nothing is retrained.
  before = file_mtimes(cached)
  buffer = experts.ensure_buffer(config, data)
  assert buffer.path == cached and buffer.num_experts == 2
  assert file_mtimes(cached) == before
  config.experts.buffer_dir = path  # An explicit directory wins over the cache.
  assert experts.ensure_buffer(config, data).path == path
