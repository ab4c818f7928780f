"""D3: the decoders, the distribution set, the two loss terms, subtasks and the federated run
(its smoke run is killed and resumed in test_resume.py)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import d3 as d3_config
from configs import mtt as mtt_config
from distill_jax import data as data_lib
from distill_jax import distilled, federated, models, pipeline
from distill_jax.distilled import DistributionSet, SetMeta
from distill_jax.methods import d3
from distill_jax.models import decoders
from distill_jax.training import experts as experts_lib
from tests import references


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("DISTILL_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def _parameters(spec, z_dim):
  module = decoders.build(spec)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((2, z_dim))))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def _authors_count(z, linear_out, deconvs, last_deconv, out_in, channels):
  """Table 8 arithmetic: Linear, transposed convs (k*k*in*out + out) each with a BatchNorm
  (2 * out), the output conv (9 * in * channels + channels)."""
  total = z * linear_out + linear_out if linear_out else 0
  for k, c_in, c_out in deconvs + last_deconv:
    total += k * k * c_in * c_out + c_out + 2 * c_out
  return total + 9 * out_in * channels + channels


def test_decoder_parameter_counts_equal_the_authors():
  s = _authors_count(64, 4 * 256, [(4, 256, 128), (4, 128, 64), (4, 64, 32), (4, 32, 32)], [],
                     32, 3)
  assert s == 772_707  # The figure for TinyVAE(k 256, z 64) at 32x32x3.
  m = _authors_count(2048, 4 * 512, [(3, 512, 256), (3, 256, 128), (3, 128, 64), (3, 64, 32)],
                     [(3, 32, 32)], 32, 3)
  big = _authors_count(0, 0, [(3, 1024, 512), (3, 512, 256), (3, 256, 128), (3, 128, 64)],
                       [(3, 64, 64)], 64, 3)
  assert (round(m / 1e6, 1), round(big / 1e6, 1)) == (5.8, 6.3)  # Table 8: 5.7M (sic), 6.3M.
  assert _parameters(decoders.decoder_spec("s", (32, 32, 3), output="preprocessed"), 64) == s
  assert _parameters(decoders.decoder_spec("m", (64, 64, 3), output="preprocessed"), 2048) == m
  assert _parameters(decoders.decoder_spec("l", (64, 64, 3), output="preprocessed"), 4096) == big


def _transposed_conv_numpy(x, w, b, padding):
  """PyTorch's ConvTranspose2d(stride 2) by its definition: scatter every input pixel."""
  batch, height, width, _ = x.shape
  k = w.shape[0]
  full = np.zeros((batch, 2 * height + k, 2 * width + k, w.shape[3]))
  for i in range(height):
    for j in range(width):
      for a in range(k):
        for c in range(k):
          full[:, 2 * i + a, 2 * j + c] += x[:, i, j] @ w[a, c]
  return full[:, padding:padding + 2 * height, padding:padding + 2 * width] + b


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_the_sub_pixel_form_is_the_transposed_convolution(kernel_size):
  rng = np.random.default_rng(kernel_size)
  x = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
  w = rng.normal(size=(kernel_size, kernel_size, 4, 6)).astype(np.float32)
  b = rng.normal(size=6).astype(np.float32)
  got = jax.jit(lambda *a: decoders.conv_transpose_x2(*a, padding=1))(x, w, b)
  np.testing.assert_allclose(got, _transposed_conv_numpy(x, w, b, 1), rtol=1e-4, atol=1e-4)


def test_batch_norm_uses_the_statistics_of_the_marked_rows():
  x = np.random.default_rng(0).normal(size=(6, 2, 3, 4)).astype(np.float32)
  mask = np.array([1, 0, 1, 1, 0, 0], np.float32)
  norm = decoders.BatchStatNorm()
  variables = norm.init(jax.random.key(0), x)
  got = jax.jit(lambda x, m: norm.apply(variables, x, m))(x, mask)
  rows = x[mask == 1]
  mean, var = rows.mean(axis=(0, 1, 2)), rows.var(axis=(0, 1, 2))
  np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
  full = norm.apply(variables, x)
  np.testing.assert_allclose(full, (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5),
                             rtol=1e-4, atol=1e-5)


def _meta(num_classes=2, lpc=3, image_shape=(8, 8, 1), output="preprocessed"):
  spec = decoders.decoder_spec("xs", image_shape, output=output, kernel_num=8)
  return SetMeta(method="d3", dataset="digits", ipc=lpc, num_classes=num_classes,
                 image_shape=image_shape, decoder=json.dumps(spec, sort_keys=True)), spec


def _set(seed=0, num_classes=2, lpc=3, z=6, lr=0.02):
  meta, spec = _meta(num_classes, lpc)
  key_p, key_d = jax.random.split(jax.random.key(seed))
  n = num_classes * lpc
  params = decoders.build(spec).init(key_d, jnp.zeros((2, z)))["params"]
  return DistributionSet(priors=np.asarray(jax.random.normal(key_p, (n, z, 2))),
                         y=np.repeat(np.arange(num_classes, dtype=np.int32), lpc),
                         decoders={"0": jax.device_get(params)}, part=np.zeros(n, np.int32),
                         lr=lr, meta=meta)


def test_sampling_is_reproducible_for_a_key_and_follows_the_priors():
  s = _set()
  draw = jax.jit(lambda i, k: s.draw(i, key=k))
  index = np.arange(s.num_examples)
  x1, y1 = draw(index, jax.random.key(3))
  x2, _ = draw(index, jax.random.key(3))
  x3, _ = draw(index, jax.random.key(4))
  np.testing.assert_array_equal(x1, x2)
  assert not np.allclose(x1, x3)
  np.testing.assert_array_equal(y1, s.y)
  many = np.stack([np.asarray(s.sample(np.zeros(2000, np.int32), k))
                   for k in jax.random.split(jax.random.key(5), 2)]).reshape(-1, 6)
  mean, logvar = np.asarray(s.priors[0, :, 0]), np.asarray(s.priors[0, :, 1])
  np.testing.assert_allclose(many.mean(0), mean, atol=4 * np.exp(logvar / 2).max() / 60)
  np.testing.assert_allclose(many.std(0), np.exp(logvar / 2), rtol=0.1)
  assert s.training_lr() == pytest.approx(0.02 + 1e-4)  # relu(lr) + 1e-4, as released.
  assert s.replace(lr=np.float32(-1.0)).training_lr() == pytest.approx(1e-4)


def test_a_distribution_set_round_trips_with_its_storage(tmp_path):
  s = _set()
  distilled.save(tmp_path / "set", s)
  back = distilled.load(tmp_path / "set")
  assert isinstance(back, DistributionSet) and back.meta == s.meta
  for name, array in s.arrays().items():
    np.testing.assert_array_equal(back.arrays()[name], array)
  decoder_values = sum(a.size for name, a in s.arrays().items() if name.startswith("decoders/"))
  assert distilled.storage_bytes(back) == 4 * (decoder_values + 6 * 6 * 2 + 6 + 1)
  per_ipc = 4 * 2 * (64 + 1)
  assert back.baseline_ipc() == math.ceil(distilled.storage_bytes(back) / per_ipc)
  np.testing.assert_array_equal(back.mean_images(), s.mean_images())


def test_merging_subtasks_maps_labels_back_and_decodes_each_part_with_its_own_decoder():
  parts = [_set(seed=1), _set(seed=2, lr=0.04)]
  full_meta, _ = _meta(num_classes=4)
  merged = distilled.merge_subtasks(parts, full_meta)
  np.testing.assert_array_equal(merged.y, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(merged.part, [0] * 6 + [1] * 6)
  assert merged.num_decoders == 2 and merged.meta.num_classes == 4
  assert float(merged.lr) == pytest.approx(0.03)
  assert distilled.storage_bytes(merged) == (
      distilled.storage_bytes(parts[0]) + distilled.storage_bytes(parts[1]) - 4)  # One lr.
  z = jax.random.normal(jax.random.key(0), (12, 6))
  images = merged.decode(z, jnp.asarray(merged.part))
  for j, part in enumerate(parts):
    rows = slice(6 * j, 6 * j + 6)  # Batch-norm statistics of each decoder: its own rows.
    np.testing.assert_allclose(images[rows], part.decode(z[rows], jnp.zeros(6, jnp.int32)),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="do not make the task's 6 classes"):
    distilled.merge_subtasks(parts, _meta(num_classes=6)[0])


def test_soft_labels_are_the_softmax_of_the_logits_on_the_mean_decodes(tmp_path):
  merged = distilled.merge_subtasks([_set(seed=1), _set(seed=2)], _meta(num_classes=4)[0])
  w = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
  labelled = merged.with_soft_labels(lambda x: x.reshape(len(x), -1) @ w)
  logits = merged.mean_images().reshape(12, -1) @ w
  expected = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(labelled.y, expected / expected.sum(1, keepdims=True), rtol=1e-4,
                             atol=1e-6)
  assert labelled.meta.label_kind == "probabilities"
  np.testing.assert_array_equal(labelled.class_ids(), np.asarray(labelled.y).argmax(1))
  assert distilled.storage_bytes(labelled) == distilled.storage_bytes(merged) + 4 * 12 * 3
  distilled.save(tmp_path / "set", labelled)
  np.testing.assert_array_equal(distilled.load(tmp_path / "set").y, labelled.y)
  with pytest.raises(ValueError, match=r"need \(12, 4\) logits"):
    merged.with_soft_labels(lambda x: x.reshape(len(x), -1)[:, :3])


def test_a_subtask_is_a_contiguous_class_range_relabelled_from_zero():
  x = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1)
  y = np.repeat(np.arange(6, dtype=np.int32), 2)
  data = data_lib.RealData("toy", 6, (1, 1, 1), tuple("abcdef"), x, y, x, y)
  sub = data.subtask(1, 3)
  assert sub.num_classes == 2 and sub.class_names == ("c", "d")
  np.testing.assert_array_equal(sub.y_train, [0, 0, 1, 1])
  np.testing.assert_array_equal(sub.x_train.ravel(), [4, 5, 6, 7])
  assert sub.fingerprint != data.subtask(0, 3).fingerprint != data.fingerprint
  with pytest.raises(ValueError, match="must divide the 6 classes"):
    data.subtask(0, 4)


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_real("digits", "standardize")


def test_the_mmd_term_is_eq5_in_numpy_and_vanishes_for_the_same_distribution(digits):
  config = d3_config.get_config("smoke")
  method = d3.D3(config, digits)
  state = jax.jit(method.init)(jax.random.key(0))
  params = method.model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))["params"]
  samples = config.outer.mmd_samples // config.ipc
  per_class = samples * config.ipc
  x_real = np.asarray(jax.random.normal(jax.random.key(2), (10, per_class, 8, 8, 1)))
  key = jax.random.key(3)
  got = jax.jit(method.mmd_loss)(state.priors, state.decoder, params, x_real, key)
  # The same fresh decodes, then Eq. 4-5 in NumPy on the expert's penultimate features.
  synthetic = method.distribution(state.priors, state.decoder)
  everything = np.arange(len(method.y_syn))
  x_syn = np.stack([np.asarray(synthetic.draw(everything, key=k)[0])
                    for k in jax.random.split(key, samples)], axis=1)
  x_syn = x_syn.reshape(10, per_class, 8, 8, 1)

  def features(x):
    return np.asarray(method.model.apply({"params": params}, jnp.asarray(x), train=True,
                                         return_features=True)[1]["penultimate"], np.float64)

  expected = sum(references.numpy_mmd2(features(x_syn[c]), features(x_real[c]),
                                          (1., 2., 4., 8., 16.)) for c in range(10))
  np.testing.assert_allclose(float(got), expected, rtol=1e-4, atol=1e-6)
  # Two independent draws of one set: the unbiased MMD averages to 0 (and is far from the MMD
  # against real images).
  a, b = (np.concatenate([np.asarray(synthetic.draw(everything, key=k)[0]) for k in keys])
          for keys in jax.random.split(jax.random.key(4), (2, 20)))
  same = references.numpy_mmd2(features(a), features(b), (1., 2., 4., 8., 16.))
  assert abs(same) < 0.05 * abs(expected / 10)


def test_bad_settings_fail_with_one_line(digits):
  for override, message in [
      ("outer.mmd_samples=1", "under the 2 samples per class"),
      ("outer.mmd_params='best'", "unknown config.outer.mmd_params"),
      ("decoder.size='xxl'", "unknown decoder size"),
      ("outer.mtt_weight=0.0,outer.mmd_weight=0.0", "both 0"),
      ("outer.lr_latent=0.0", "outer.lr_latent must be a positive"),
  ]:
    with pytest.raises(ValueError, match=message):
      d3.D3(d3_config.get_config(f"smoke,ipc=2,{override}"), digits)


def test_the_cpu_preset_reuses_mtts_cpu_expert_buffer():
  mine, theirs = d3_config.get_config("fashion_mnist,cpu"), mtt_config.get_config(
      "fashion_mnist,cpu")
  assert mine.experts.to_dict() == theirs.experts.to_dict()
  assert (mine.dataset, mine.preprocessing) == (theirs.dataset, theirs.preprocessing)


def test_a_federated_run_merges_its_subtasks_and_a_rerun_redoes_only_the_unfinished(
    tmp_path, cache):
  config = d3_config.get_config(
      "smoke,subtask.count=2,federated.executor='debug',num_steps=2,checkpoint_every=1,"
      "inner.steps=1,inner.max_start_epoch=1,experts.num_experts=1,experts.experts_per_shard=1,"
      "experts.num_epochs=1,eval.num_models=1,eval.overrides.mtt.epochs=5,"
      "federated.soft_labels=True")
  workdir = str(tmp_path / "fed")
  report = federated.run(config, workdir)
  merged = distilled.load(os.path.join(workdir, "distilled"))
  assert merged.num_decoders == 2 and merged.meta.num_classes == 10
  # Soft labels: the whole task's expert (1 expert, epoch M = 1) on the mean decodes.
  full = federated.full_task_config(config)
  data = pipeline.load_data(full)
  variables = experts_lib.ensure_buffer(full, data).variables(0, 1)
  model = models.get_model(full.experts.model, num_classes=10, **dict(full.experts.model_kwargs))
  logits = np.asarray(model.apply(variables, merged.mean_images(), train=False), np.float64)
  expected = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(merged.y, expected / expected.sum(1, keepdims=True), atol=1e-5)
  assert merged.meta.label_kind == "probabilities"
  assert report["random_subset"]["ipc"] == merged.baseline_ipc()
  assert len(report["federated"]["subtask_distill_seconds"]) == 2
  # Subtask 1 "killed" before it saved its set: only it runs again, from its checkpoint.
  first = os.path.join(workdir, "subtask_0", "distilled")
  stamp = os.path.getmtime(first)
  os.remove(os.path.join(workdir, "subtask_1", "distill_time.json"))
  for name in os.listdir(os.path.join(workdir, "subtask_1", "distilled")):
    path = os.path.join(workdir, "subtask_1", "distilled", name)
    (os.remove if os.path.isfile(path) else __import__("shutil").rmtree)(path)
  assert not pipeline.is_distilled(os.path.join(workdir, "subtask_1"))
  federated.run(config, workdir)
  assert os.path.getmtime(first) == stamp
  assert pipeline.is_distilled(os.path.join(workdir, "subtask_1"))
  again = distilled.load(os.path.join(workdir, "subtask_1", "distilled"))
  np.testing.assert_array_equal(again.priors, merged.priors[merged.part == 1])
  with pytest.raises(ValueError, match="subtask.count >= 2"):
    federated.run(d3_config.get_config("smoke"), str(tmp_path / "one"))


def test_a_failed_job_is_named_by_its_error_and_a_killed_one_as_ended_without_a_result():
  import submitit

  killed = submitit.core.utils.UncompletedJobError("... submitit INFO - Loading pickle: x.pkl")
  raised = submitit.core.utils.FailedJobError("Traceback ...\n  line\nValueError: ipc too large")
  assert "ended without a result (killed" in federated._why(killed)
  assert federated._why(raised) == "ValueError: ipc too large"
