"""Recipe: label targets per label kind, per-example losses and lr schedules against NumPy."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import objectives
from distill_jax.evaluation import get_protocol
from distill_jax.training import Recipe

C = 5
KINDS = ("class_ids", "learned", "probabilities", "logits")
# KD needs teacher outputs: class ids are an error (test_kd_on_class_ids_is_an_error); L1
# regresses logits (test_l1_needs_logits).
TRAINABLE = [(loss, kind) for loss, kind in itertools.product(("ce", "mse", "kd", "l1"), KINDS)
             if Recipe(epochs=1, loss=loss).can_train(kind)]


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _labels(kind, rng, n=6):
  if kind == "class_ids":
    return rng.integers(0, C, n).astype(np.int32)
  if kind == "probabilities":
    return _softmax(rng.normal(size=(n, C))).astype(np.float32)
  return (3 * rng.normal(size=(n, C))).astype(np.float32)  # "learned" or "logits".


def _numpy_targets(loss, kind, y, temperature):
  """What each loss trains towards, written out case by case (float64)."""
  if kind == "class_ids":
    one_hot = np.eye(C)[y]
    return one_hot - 1.0 / C if loss == "mse" else one_hot  # FRePo's centred one-hot.
  y = np.asarray(y, np.float64)
  if loss == "ce":
    return y if kind == "probabilities" else _softmax(y / temperature)  # FRePo's softxent.
  if loss == "kd" and kind == "probabilities":
    return np.log(y)  # Logits whose softmax is the given distribution.
  return y


def _numpy_loss(loss, logits, targets, temperature):
  logits = np.asarray(logits, np.float64)
  if loss == "ce":
    return -np.sum(targets * _log_softmax(logits), axis=-1)
  if loss == "mse":
    return 0.5 * np.sum((logits - targets) ** 2, axis=-1)
  if loss == "l1":  # torch.nn.functional.l1_loss(reduction="none").mean(-1).
    return np.mean(np.abs(logits - targets), axis=-1)
  teacher = _softmax(targets / temperature)
  return temperature**2 * np.sum(
      teacher * (np.log(teacher) - _log_softmax(logits / temperature)), axis=-1)


@pytest.mark.parametrize("loss, kind", TRAINABLE)
def test_targets_and_per_example_loss_match_numpy(loss, kind):
  temperature = 2.5
  recipe = Recipe(epochs=1, loss=loss, temperature=temperature)
  rng = np.random.default_rng(TRAINABLE.index((loss, kind)))
  y = _labels(kind, rng)
  logits = (2 * rng.normal(size=(6, C))).astype(np.float32)

  @jax.jit
  def run(y, logits):
    targets = recipe.targets_fn(kind, C)(y)
    return targets, recipe.per_example_loss(logits, targets)

  targets, losses = run(y, logits)
  want_targets = _numpy_targets(loss, kind, y, temperature)
  assert targets.dtype == jnp.float32 and targets.shape == (6, C)
  np.testing.assert_allclose(targets, want_targets, rtol=1e-5, atol=1e-6)
  assert losses.shape == (6,)
  np.testing.assert_allclose(losses, _numpy_loss(loss, logits, want_targets, temperature),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss, kind", TRAINABLE)
def test_mean_loss_equals_the_objectives(loss, kind):
  """The batch mean of the per-example loss is the objective each loss names."""
  temperature = 3.0
  recipe = Recipe(epochs=1, loss=loss, temperature=temperature)
  rng = np.random.default_rng(100 + TRAINABLE.index((loss, kind)))
  y = _labels(kind, rng)
  logits = (2 * rng.normal(size=(6, C))).astype(np.float32)

  @jax.jit
  def both(y, logits):
    mean = jnp.mean(recipe.per_example_loss(logits, recipe.targets_fn(kind, C)(y)))
    if loss == "ce":  # Soft cross-entropy on the targets each kind stands for.
      if kind == "class_ids":
        reference = objectives.soft_cross_entropy(logits, jax.nn.one_hot(y, C))
      elif kind == "probabilities":
        reference = objectives.soft_cross_entropy(logits, y)
      else:
        reference = objectives.soft_cross_entropy(logits, jax.nn.softmax(y / temperature))
    elif loss == "mse":
      y_float = jax.nn.one_hot(y, C) - 1 / C if kind == "class_ids" else y
      reference = objectives.mse_loss(logits, y_float)
    elif loss == "l1":  # APM's student loss: F.l1_loss, the mean over the batch and classes.
      reference = jnp.mean(jnp.abs(logits - y))
    else:  # KD from the teacher's logits; probabilities are logits up to a constant.
      teacher = jnp.log(y) if kind == "probabilities" else y
      reference = objectives.kd_loss(logits, teacher, temperature=temperature)
    return mean, reference

  mean, reference = both(y, logits)
  np.testing.assert_allclose(mean, reference, rtol=1e-5, atol=1e-6)


def test_kd_on_probabilities_trains_towards_the_tempered_distribution():
  """KD on probability labels p: the teacher at temperature T is softmax(log p / T)."""
  recipe = Recipe(epochs=1, loss="kd", temperature=4.0)
  p = _softmax(np.random.default_rng(3).normal(size=(4, C))).astype(np.float32)
  targets = recipe.targets_fn("probabilities", C)(jnp.asarray(p))
  tempered = p ** 0.25 / np.sum(p ** 0.25, axis=-1, keepdims=True)
  logits_at_teacher = 4.0 * np.log(tempered)  # softmax(logits / T) == tempered.
  np.testing.assert_allclose(
      jax.jit(recipe.per_example_loss)(jnp.asarray(logits_at_teacher, jnp.float32), targets),
      0.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["class_ids", "probabilities"])
def test_l1_needs_logits(kind):
  assert not Recipe(epochs=1, loss="l1").can_train(kind)
  with pytest.raises(ValueError, match="l1 loss regresses teacher logits"):
    Recipe(epochs=1, loss="l1").targets_fn(kind, C)


def test_kd_on_class_ids_is_an_error():
  with pytest.raises(ValueError, match="kd loss needs teacher logits or probabilities"):
    Recipe(epochs=1, loss="kd").targets_fn("class_ids", C)


@pytest.mark.parametrize(
    "name, num_steps",
    [("mtt", 10), ("standard", 7), ("frepo", 12), ("frepo", 600), ("mtt", 1), ("kd", 5)],
)
def test_lr_multiplier_matches_numpy(name, num_steps):
  recipe = get_protocol(name, steps=num_steps)
  multiplier = jax.jit(jax.vmap(recipe.lr_multiplier(num_steps)))
  t = np.arange(num_steps)
  got = np.asarray(multiplier(t))
  alpha = recipe.final_lr_fraction
  if recipe.schedule == "step":
    expected = np.where(t < max(num_steps // 2, 1), 1.0, 0.1)
  elif recipe.schedule == "cosine":
    expected = (1 - alpha) * 0.5 * (1 + np.cos(np.pi * t / num_steps)) + alpha
  else:
    warmup = recipe.warmup_steps
    decay = max(num_steps - warmup, 1)
    progress = np.clip(t - warmup, 0, decay) / decay
    cosine = (1 - alpha) * 0.5 * (1 + np.cos(np.pi * progress)) + alpha
    expected = np.where(t < warmup, t / max(warmup, 1), cosine)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert math.isclose(float(got[0]), 0.0 if recipe.schedule == "warmup_cosine" else 1.0)
  constant = Recipe(steps=num_steps, schedule="constant").lr_multiplier(num_steps)
  np.testing.assert_array_equal(jax.jit(jax.vmap(constant))(t), np.ones(num_steps))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_direction_matches_numpy(optimizer):
  """Three updates of `direction()`: PyTorch SGD / Adam (L2 in the gradient) / AdamW."""
  recipe = Recipe(epochs=1, optimizer=optimizer, momentum=0.7, weight_decay=0.05)
  rng = np.random.default_rng(4)
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  grads = [{"w": rng.normal(size=(3, 2)).astype(np.float32)} for _ in range(3)]
  update = jax.jit(recipe.direction().update)
  state = recipe.direction().init(params)
  p = params["w"].astype(np.float64)
  m, v = np.zeros_like(p), np.zeros_like(p)
  for t, g in enumerate(grads):
    d, state = update(g, state, params)
    g = g["w"].astype(np.float64)
    if optimizer == "sgd":
      m = 0.7 * m + g + 0.05 * p
      want = m
    else:
      gi = g + 0.05 * p if optimizer == "adam" else g
      m = 0.9 * m + 0.1 * gi
      v = 0.999 * v + 0.001 * gi**2
      want = (m / (1 - 0.9 ** (t + 1))) / (np.sqrt(v / (1 - 0.999 ** (t + 1))) + 1e-8)
      if optimizer == "adamw":
        want = want + 0.05 * p
    np.testing.assert_allclose(d["w"], want, rtol=1e-5, atol=1e-6)
  assert isinstance(recipe.direction(), optax.GradientTransformation)


def test_recipe_is_hashable_and_private():
  kwargs = {"width": 8}
  a = Recipe(epochs=2, model_kwargs=kwargs)
  kwargs["width"] = 16
  assert a.model_kwargs == {"width": 8}
  b = Recipe(epochs=2, model_kwargs={"width": 8})
  assert a == b and hash(a) == hash(b)
  assert Recipe(epochs=3, model_kwargs={"width": 8}) != a
  assert a.to_dict()["model_kwargs"] == {"width": 8}
  with pytest.raises(ValueError, match="needs epochs, steps or steps_by_set_size"):
    Recipe()
