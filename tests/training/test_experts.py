"""Expert trajectory buffers: training against a plain loop, lazy reads, resume, keying."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from distill_jax.data import augment
from distill_jax.methods.base import RealData
from distill_jax.training import experts

# Momentum and weight decay on, so the optimiser state is stored and resumed too; two cheap DSA
# ops keep the compile short while exercising augmentation inside the vmapped program.
SPEC_FIELDS = dict(num_epochs=3, batch_size=16, lr=0.05, momentum=0.5, weight_decay=1e-3,
                   dsa_strategy="flip_crop", experts_per_shard=2, seed=3,
                   model_kwargs={"width": 4, "depth": 2, "norm": "instance"})


def toy_data(n=40, seed=0):
  rng = np.random.default_rng(seed)
  y = (np.arange(n) % 3).astype(np.int32)
  x = (rng.normal(size=(n, 8, 8, 1)) + y[:, None, None, None]).astype(np.float32)
  return RealData("toy", 3, (8, 8, 1), ("a", "b", "c"), x, y, x[:12], y[:12], None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-expert buffer grown in two calls (2 experts, then 4), with the files of the first shard."""
  data = toy_data()
  spec = experts.ExpertSpec.create(data, preprocessing="none", **SPEC_FIELDS)
  path = str(tmp_path_factory.mktemp("buffer"))
  experts.train_experts(spec, data, path, num_experts=2)
  first_shard = sorted(os.listdir(os.path.join(path, "shard_0000")))
  mtimes = {n: os.path.getmtime(os.path.join(path, "shard_0000", n)) for n in first_shard}
  buffer = experts.train_experts(spec, data, path, num_experts=4)
  return data, spec, path, buffer, mtimes


def reference_trajectory(spec, data, shard, local):
  """One expert trained by an obvious Python loop: PyTorch SGD by hand, one step at a time."""
  model = spec.make_model()
  params = jax.tree.map(lambda a: np.asarray(a[local]), experts.init_shard(spec, shard)[0])
  momentum = jax.tree.map(np.zeros_like, params)
  n, batch = data.x_train.shape[0], spec.batch_size
  steps = -(-n // batch)

  @jax.jit
  def grad_fn(params, x, y, weight, key):
    def loss(p):
      xa = augment.dsa(key, x, strategy=spec.dsa_strategy, mode="single")
      logits = model.apply({"params": p}, xa, train=True)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return jnp.sum(ce * weight) / jnp.sum(weight)
    return jax.grad(loss)(params)

  trajectory = [params]
  for epoch in range(1, spec.num_epochs + 1):
    order_key, aug_key = jax.random.split(experts.epoch_keys(spec, shard, epoch)[local])
    order = np.asarray(jax.random.permutation(order_key, n))
    step_keys = jax.random.split(aug_key, steps)
    for i in range(steps):
      idx = order[i * batch:(i + 1) * batch]  # The last batch is partial.
      # DSA draws per-image parameters for a full batch, so the partial last batch is padded
      # (with images that get weight 0) to meet the same draws as in the vmapped program.
      padded = np.concatenate([idx, order[:batch - len(idx)]])
      weight = (np.arange(batch) < len(idx)).astype(np.float32)
      grads = jax.tree.map(np.asarray, grad_fn(params, data.x_train[padded],
                                               data.y_train[padded], weight, step_keys[i]))
      # torch.optim.SGD: d = g + wd * p; buf = m * buf + d; p -= lr * buf.
      momentum = jax.tree.map(lambda b, g, p: spec.momentum * b + g + spec.weight_decay * p,
                              momentum, grads, params)
      params = jax.tree.map(lambda p, b: p - spec.lr * b, params, momentum)
    trajectory.append(params)
  return trajectory


def test_vmapped_training_matches_a_plain_loop_per_expert(trained):
  data, spec, _, buffer, _ = trained
  assert (buffer.num_experts, buffer.num_epochs) == (4, 3)
  for expert in (0, 3):  # One expert of each shard.
    shard, local = divmod(expert, spec.experts_per_shard)
    reference = reference_trajectory(spec, data, shard, local)
    for epoch, ref in enumerate(reference):
      got = buffer.params(expert, epoch)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, ref)
  # Experts differ from each other (own init, data order and augmentation).
  a, b = buffer.params(0, 3), buffer.params(1, 3)
  assert not np.allclose(a["Conv_0"]["kernel"], b["Conv_0"]["kernel"])


def test_reads_are_lazy_one_expert_one_epoch(trained):
  _, spec, path, _, _ = trained
  lazy_copy = path + "_lazy"
  shutil.copytree(path, lazy_copy)
  buffer = experts.TrajectoryBuffer(lazy_copy, num_experts=4)
  assert buffer.reads == 0 and buffer.bytes_read == 0  # Opening reads no parameters.
  # Only shard 1, epoch 2 stays on disk: a read touching anything else would fail.
  shutil.rmtree(os.path.join(lazy_copy, "shard_0000"))
  for name in os.listdir(os.path.join(lazy_copy, "shard_0001")):
    if name.startswith("epoch_") and name != "epoch_002":
      shutil.rmtree(os.path.join(lazy_copy, "shard_0001", name))
  params = buffer.params(3, 2)
  one_expert = sum(np.prod(s.shape) * 4 for s in jax.tree.leaves(buffer.template()))
  assert buffer.reads == 1 and buffer.bytes_read == one_expert
  reference = experts.TrajectoryBuffer(path).params(3, 2)
  jax.tree.map(np.testing.assert_array_equal, params, reference)
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
  for name, mtime in mtimes.items():
    assert os.path.getmtime(os.path.join(path, "shard_0000", name)) == mtime
  assert experts.TrajectoryBuffer(path).num_experts == 4
  assert experts.TrajectoryBuffer(path, num_experts=2).num_experts == 2
  with pytest.raises(experts.BufferError, match="has 4 complete experts but 6"):
    experts.TrajectoryBuffer(path, num_experts=6)
  metrics = buffer.metrics()
  assert metrics["test_accuracy"].shape == (4, 4) and metrics["train_loss"].shape == (4, 4)
  assert np.all(np.isnan(metrics["train_loss"][:, 0])) and np.all(np.isfinite(metrics["train_loss"][:, 1:]))
  assert np.all((metrics["test_accuracy"] >= 0) & (metrics["test_accuracy"] <= 1))


def test_interrupted_shard_resumes_to_the_same_trajectory(trained):
  data, spec, path, buffer, _ = trained
  resumed = path + "_resume"
  shutil.copytree(path, resumed)
  shard_dir = os.path.join(resumed, "shard_0001")
  # A kill after epoch 1 of shard 1: later epochs and the completion marker are missing, and a
  # half-written save is left behind.
  os.remove(os.path.join(shard_dir, "shard.json"))
  for epoch in (2, 3):
    shutil.rmtree(os.path.join(shard_dir, f"epoch_{epoch:03d}"))
  os.makedirs(os.path.join(shard_dir, "epoch_002.orbax-checkpoint-tmp-1234"))
  with pytest.raises(experts.BufferError, match="has 2 complete experts"):
    experts.TrajectoryBuffer(resumed, num_experts=4)
  again = experts.train_experts(spec, data, resumed, num_experts=4)
  assert not any("tmp" in n for n in os.listdir(shard_dir))
  for epoch in range(4):
    jax.tree.map(np.testing.assert_array_equal, again.params(3, epoch), buffer.params(3, epoch))
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
  # Other data or preprocessing gives another buffer.
  assert experts.ExpertSpec.create(toy_data(seed=1), preprocessing="none", **SPEC_FIELDS).digest() != spec.digest()
  assert experts.ExpertSpec.create(data, preprocessing="standardize", **SPEC_FIELDS).digest() != spec.digest()
  other = experts.ExpertSpec.create(data, preprocessing="none", **{**SPEC_FIELDS, "lr": 0.1})
  with pytest.raises(experts.BufferError, match="lr: stored 0.05, wanted 0.1"):
    experts.train_experts(other, data, path, num_experts=2)
  with pytest.raises(ValueError, match="not a multiple of experts.experts_per_shard=2"):
    experts.train_experts(spec, data, path, num_experts=3)
  with pytest.raises(experts.BufferError, match="no trajectory buffer"):
    experts.TrajectoryBuffer(str(tmp_path))
  with pytest.raises(ValueError, match="momentum must be in"):
    experts.ExpertSpec.create(data, preprocessing="none", momentum=1.0)


def test_spec_keys_on_the_raw_data_digest_when_the_loader_records_it():
  """The same raw data and preprocessing name give one buffer even if the float bits differ."""
  import dataclasses
  import hashlib

  data = toy_data()
  raw = dataclasses.replace(data, source_fingerprint="0123456789abcdef")
  jittered = dataclasses.replace(raw, x_train=np.nextafter(raw.x_train, np.inf))
  spec = experts.ExpertSpec.create(raw, preprocessing="zca_kornia", **SPEC_FIELDS)
  assert spec.data_fingerprint == "0123456789abcdef"
  assert experts.ExpertSpec.create(jittered, preprocessing="zca_kornia", **SPEC_FIELDS) == spec
  # Without a recorded digest the arrays themselves are hashed, so the jitter shows.
  plain = experts.ExpertSpec.create(data, preprocessing="zca_kornia", **SPEC_FIELDS)
  bare = dataclasses.replace(jittered, source_fingerprint=None)
  assert experts.ExpertSpec.create(bare, preprocessing="zca_kornia", **SPEC_FIELDS) != plain
  # `fingerprint` against an independent sha256 of the same bytes.
  h = hashlib.sha256()
  for a in (data.x_train, data.y_train):
    h.update(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
  assert plain.data_fingerprint == h.hexdigest()[:16]


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
  buffer = experts.ensure_buffer(config, data)
  assert buffer.path == cached and buffer.num_experts == 2
  config.experts.buffer_dir = path  # An explicit directory wins over the cache.
  assert experts.ensure_buffer(config, data).path == path
