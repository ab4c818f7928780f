"""Teacher pools (training, resume, reads, ensembles, the MTT-buffer adapter) and the streamed
real-set statistics."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from distill_jax.distilled import PixelSet
from distill_jax.training import Trainer, experts, statistics, teachers
from tests.training.test_experts import toy_data


def teacher_config(**changes):
  config = ml_collections.ConfigDict({
      "preprocessing": "none",
      "teachers": {"num_teachers": 3, "model": "convnet",
                   "model_kwargs": {"width": 4, "depth": 2, "norm": "batch"},
                   "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
                   "schedule": "warmup_cosine", "warmup_epochs": 1, "epochs": 3,
                   "batch_size": 16, "augmentation": "rrc", "seed": 2, "checkpoint_every": 1,
                   "dir": ""},
  })
  config.update_from_flattened_dict(changes)
  return config


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
  data = toy_data()
  config = teacher_config()
  spec = teachers.teacher_spec(config, data)
  path = str(tmp_path_factory.mktemp("teachers"))
  return data, spec, path, teachers.train_teachers(spec, data, path, num_teachers=3)


def test_a_teacher_is_the_trainer_run_from_its_key(pool):
  """Teacher i's weights are the shared trainer's network from `fold_in(key(seed), i)`, batch
  norm statistics included, and its recorded test accuracy is that network's."""
  data, spec, _, trained = pool
  real = PixelSet(data.x_train, data.y_train, meta=data.set_meta("real", 1))
  trainer = Trainer.for_set(spec.recipe, real)
  direct = trainer.train(spec.key(1)[None], real)
  expected = jax.tree.map(lambda a: np.asarray(a[0]),
                          {"params": direct.state.params, **direct.state.model_state})
  got = trained.variables(1)
  assert set(got) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  accuracy = trainer.accuracy(direct.state, data.x_test, data.y_test)[0]
  assert trained.test_accuracy()[1] == pytest.approx(accuracy)
  np.testing.assert_allclose(trained.test_accuracy(data), trained.test_accuracy(), atol=1e-12)
  summary = trained.summary()
  assert summary["test_accuracy"] == pytest.approx(list(trained.test_accuracy()))
  assert summary["mean_test_accuracy"] == pytest.approx(float(np.mean(trained.test_accuracy())))


def test_logits_and_the_ensemble_are_inference_mode_forward_passes(pool):
  data, spec, _, trained = pool
  x = data.x_test[:7]
  model = spec.make_model()
  for i in range(3):
    expected = model.apply(trained.variables(i), x, train=False)
    np.testing.assert_allclose(trained.logits(i, x, batch_size=3), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(trained.ensemble_logits(x),
                             np.mean([trained.logits(i, x) for i in range(3)], axis=0), atol=1e-6)
  np.testing.assert_allclose(trained.ensemble_logits(x, members=[2]), trained.logits(2, x))
  stacked = trained.stacked_variables([0, 2])
  np.testing.assert_array_equal(stacked["params"]["Conv_0"]["kernel"][1],
                                trained.variables(2)["params"]["Conv_0"]["kernel"])


def test_a_killed_teacher_resumes_to_the_same_weights(pool, tmp_path):
  """A pool whose teacher 1 stopped after epoch 2 (the last epoch and the completion mark
  deleted; the pool keeps the last two points) is finished to the same weights; finished
  teachers are not retrained."""
  data, spec, path, trained = pool
  copy = tmp_path / "pool"
  shutil.copytree(path, copy)
  shard = copy / "shard_0001"
  assert sorted(int(n) for n in os.listdir(shard) if n.isdigit()) == [2, 3]
  os.remove(shard / "shard.json")
  shutil.rmtree(shard / "3")
  before = os.path.getmtime(copy / "shard_0000" / "shard.json")
  resumed = teachers.train_teachers(spec, data, str(copy), num_teachers=3)
  jax.tree.map(np.testing.assert_array_equal, resumed.variables(1), trained.variables(1))
  assert os.path.getmtime(copy / "shard_0000" / "shard.json") == before


def test_other_settings_are_refused_and_missing_teachers_named(pool):
  data, _, path, _ = pool
  other = teachers.teacher_spec(teacher_config(**{"teachers.lr": 0.1}), data)
  with pytest.raises(teachers.TeacherError, match="other settings"):
    teachers.train_teachers(other, data, path, num_teachers=1)
  with pytest.raises(teachers.TeacherError, match="3 finished teachers but 4"):
    teachers.TeacherPool.open(path, num_teachers=4)
  with pytest.raises(teachers.TeacherError, match="no teacher pool"):
    teachers.TeacherPool.open(os.path.join(path, "nowhere"))
  with open(os.path.join(path, "teachers.json")) as f:
    assert json.load(f)["digest"] == teachers.teacher_spec(teacher_config(), data).digest()


def test_streamed_statistics_equal_one_shot_numpy_moments(pool):
  """Chunked float32 moments merged with Chan's formula in float64 equal NumPy's mean and
  population covariance of all N * H * W conv outputs of each layer."""
  data, spec, _, trained = pool
  model, variables = spec.make_model(), trained.variables(0)
  blocks = model.apply(variables, data.x_train, train=False, return_features=True)[1]["blocks"]
  streamed = trained.statistics(0, data, chunk_size=7)  # 40 images: chunks of 7, last of 5.
  assert len(streamed) == len(blocks) == 2
  for (mean, cov), block in zip(streamed, blocks):
    flat = np.asarray(block, np.float64).reshape(-1, block.shape[-1])
    assert mean.dtype == cov.dtype == np.float64
    np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(flat, rowvar=False, bias=True), rtol=1e-4, atol=1e-6)
  cached = trained.statistics(0, data, chunk_size=11)  # Read from the cache file.
  for (m1, c1), (m2, c2) in zip(streamed, cached):
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(c1, c2)


def test_chan_merge_is_associative_with_one_shot_moments():
  rng = np.random.default_rng(0)
  samples = rng.normal(size=(50, 3)) * [1.0, 5.0, 0.1] + 1e3
  parts = [samples[:7], samples[7:30], samples[30:]]
  moments = [(len(p), p.mean(0), (p - p.mean(0)).T @ (p - p.mean(0))) for p in parts]
  n, mean, m2 = statistics.merge_moments(statistics.merge_moments(moments[0], moments[1]),
                                         moments[2])
  assert n == 50
  np.testing.assert_allclose(mean, samples.mean(0), rtol=1e-12)
  np.testing.assert_allclose(m2 / n, np.cov(samples, rowvar=False, bias=True), rtol=1e-9)


def test_an_expert_buffer_serves_as_a_teacher_pool(tmp_path):
  data = toy_data()
  spec = experts.ExpertSpec.create(data, preprocessing="none", num_epochs=2, batch_size=16,
                                   dsa_strategy="", experts_per_shard=2,
                                   model_kwargs={"width": 4, "depth": 2})
  buffer = experts.train_experts(spec, data, str(tmp_path / "buffer"), num_experts=2)
  pool = teachers.TeacherPool.from_buffer(buffer)
  assert pool.num_teachers == 2
  jax.tree.map(np.testing.assert_array_equal, pool.variables(1), buffer.variables(1, 2))
  np.testing.assert_allclose(pool.test_accuracy(), buffer.metrics()["test_accuracy"][:, 2])
  x = data.x_test[:5]
  np.testing.assert_allclose(pool.logits(0, x), spec.make_model().apply(
      buffer.variables(0, 2), x, train=False), rtol=1e-6, atol=1e-6)
  assert len(pool.statistics(0, data)) == 2
  with pytest.raises(teachers.TeacherError, match="ask for 1 to 2"):
    teachers.TeacherPool.from_buffer(buffer, num_teachers=3)
