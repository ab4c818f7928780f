"""The one network trainer against NumPy and slow obvious JAX (tiny ConvNets, sklearn digits)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.distilled import DistilledSet, SetMeta, register_kind
from distill_jax.evaluation import get_protocol
from distill_jax.models import get_model
from distill_jax.training import Recipe, Trainer, classification_accuracy, epoch_batch
from tests.digits_sets import NUM_CLASSES, digits_arrays, pixel_set, subset

# A ConvNet small enough to compile and train in seconds on 8x8 digits.
TINY = {"width": 4, "depth": 1}
# The recipes most tests share (equal trainers share compiled programs): SGD with momentum, L2
# and a x0.1 step at step 3, batch 8 on 20 images (3 steps per epoch, the last one partial).
PLAIN = Recipe(model="convnet", model_kwargs=TINY, lr=0.05, steps=6, batch_size=8,
               augmentation="none")
AUGMENTED = dataclasses.replace(PLAIN, augmentation="dsa", aug_strategy="flip_crop")


@pytest.fixture(scope="module")
def digits():
  return digits_arrays()


def key(seed):
  # "rbg" keys compile the networks' initialisation faster on CPU than threefry; the trainer is
  # indifferent to the implementation.
  return jax.random.key(seed, impl="rbg")


def keys(seed, n):
  return jax.random.split(key(seed), n)


def threefry_keys(seed, n):
  """Keys for runs compared across vmap ("rbg" bits differ under vmap, threefry's do not), and
  for every run of AUGMENTED, so that those share their compiled programs."""
  return jax.random.split(jax.random.key(seed), n)


def leaves_close(a, b, **kw):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


def leaves_equal(a, b):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
      u, v = jax.random.key_data(u), jax.random.key_data(v)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def host_copy(state):
  """A copy that outlives the trainer (a vmapped run donates its state buffers)."""
  return jax.tree.map(jnp.copy, state)


def network(state, i):
  return jax.tree.map(lambda a: a[i], state)


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("num_train, batch_size", [(10, 4), (8, 4), (5, 5)])
def test_epoch_batch_visits_a_new_permutation_every_epoch(num_train, batch_size):
  steps_per_epoch = -(-num_train // batch_size)
  fn = jax.jit(lambda key, t: epoch_batch(
      key, t, num_train=num_train, batch_size=batch_size, steps_per_epoch=steps_per_epoch))
  shuffle_key = key(3)
  orders = []
  for epoch in range(3):
    parts = [fn(shuffle_key, epoch * steps_per_epoch + b) for b in range(steps_per_epoch)]
    indices = np.concatenate([np.asarray(i) for i, _ in parts])
    weights = np.concatenate([np.asarray(w) for _, w in parts])
    # Every example exactly once at weight 1 per epoch, the filler (if any) at weight 0 at the end.
    np.testing.assert_array_equal(weights, np.arange(len(weights)) < num_train)
    np.testing.assert_array_equal(np.sort(indices[weights == 1]), np.arange(num_train))
    assert np.all((indices >= 0) & (indices < num_train))
    orders.append(indices[weights == 1])
  assert any(not np.array_equal(orders[0], o) for o in orders[1:])  # Reshuffled each epoch.


def test_partial_batch_step_equals_mean_over_real_examples(digits):
  """The weighted filler of a partial batch changes neither loss nor gradient (PyTorch's mean)."""
  x, y = subset(digits, 2)  # 20 images; batch 8 -> batches of 8, 8, 4 (+4 filler).
  train_set = pixel_set(x, y)
  trainer = Trainer.for_set(PLAIN, train_set)
  state = trainer.init(key(0), jnp.zeros((1, 8, 8, 1)))
  t = jnp.int32(2)  # The epoch's last, partial batch.
  new_state, loss = jax.jit(trainer.step)(state, t, train_set, jnp.float32(0.05))
  indices, weights = epoch_batch(state.shuffle_key, t, num_train=20, batch_size=8,
                                 steps_per_epoch=3)
  real = np.asarray(indices)[np.asarray(weights) == 1]
  assert len(real) == 4
  model = get_model("convnet", num_classes=NUM_CLASSES, **TINY)

  def mean_ce(params):
    logits = model.apply({"params": params}, jnp.asarray(x[real]), train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y[real]])

  want_loss, grads = jax.jit(jax.value_and_grad(mean_ce))(state.params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  # First step: the momentum buffer is the gradient plus the L2 term.
  expected = jax.tree.map(lambda p, g: p - 0.05 * (g + PLAIN.weight_decay * p), state.params,
                          grads)
  leaves_close(new_state.params, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- optimisers


def reference_run(recipe, x, targets, init_key, loss_fn, num_steps, lr_at):
  """One network trained with NumPy optimiser arithmetic and jax.grad on the full set."""
  trainer = Trainer(recipe=recipe, num_classes=NUM_CLASSES, num_train=len(x), channels=1,
                    label_kind="class_ids")
  params = jax.jit(trainer.init)(init_key, jnp.zeros((1, 8, 8, 1))).params
  model = get_model(recipe.model, num_classes=NUM_CLASSES, **recipe.model_kwargs)
  grad_fn = jax.jit(jax.grad(lambda p: loss_fn(model.apply({"params": p}, x, train=True),
                                               targets)))
  leaves, treedef = jax.tree.flatten(params)
  p = [np.asarray(l, np.float64) for l in leaves]
  m = [np.zeros_like(l) for l in p]
  v = [np.zeros_like(l) for l in p]
  wd, b1, b2, eps = recipe.weight_decay, 0.9, 0.999, 1e-8
  for t in range(num_steps):
    g = [np.asarray(l, np.float64) for l in jax.tree.leaves(
        grad_fn(jax.tree.unflatten(treedef, [jnp.asarray(l, jnp.float32) for l in p])))]
    lr = lr_at(t)
    for i in range(len(p)):
      if recipe.optimizer == "sgd":  # torch.optim.SGD with momentum and weight decay.
        m[i] = recipe.momentum * m[i] + g[i] + wd * p[i]
        p[i] = p[i] - lr * m[i]
      else:  # torch.optim.Adam (L2 into the gradient) / AdamW (decoupled).
        gi = g[i] + wd * p[i] if recipe.optimizer == "adam" else g[i]
        m[i] = b1 * m[i] + (1 - b1) * gi
        v[i] = b2 * v[i] + (1 - b2) * gi**2
        step = (m[i] / (1 - b1 ** (t + 1))) / (np.sqrt(v[i] / (1 - b2 ** (t + 1))) + eps)
        if recipe.optimizer == "adamw":
          step = step + wd * p[i]
        p[i] = p[i] - lr * step
  return jax.tree.unflatten(treedef, p)


def soft_ce(logits, targets):
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


def mse(logits, targets):
  return jnp.mean(0.5 * jnp.sum((logits - targets) ** 2, axis=-1))


def kd(logits, teacher, temperature=20.0):
  p_t = jax.nn.softmax(teacher / temperature)
  return temperature**2 * jnp.mean(jnp.sum(
      p_t * (jnp.log(p_t) - jax.nn.log_softmax(logits / temperature)), axis=-1))


def softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name, label_kind", [("mtt", "probabilities"), ("frepo", "learned"),
                                              ("kd", "logits")])
def test_optimizer_schedule_and_label_kind_match_numpy(digits, name, label_kind):
  """The first steps of each protocol's optimiser, schedule and loss against NumPy, and the
  whole run decreasing the loss on that label kind."""
  x, y = subset(digits, 1)  # 10 images in one full batch: the batch order cannot matter.
  num_steps, checked = 40, 6
  rng = np.random.default_rng(0)
  one_hot = np.eye(NUM_CLASSES)[y]
  overrides = dict(steps=num_steps, augmentation="none", model_kwargs=TINY)
  if name == "mtt":  # SGD, momentum and L2, x0.1 at half time; soft cross-entropy.
    recipe = get_protocol(name, lr=0.05, **overrides)
    labels = softmax(4 * one_hot + rng.normal(size=(10, 10)))  # D3-style probabilities.
    targets, loss_fn = labels, soft_ce
    lr_at = lambda t: 0.05 * (1.0 if t < num_steps // 2 else 0.1)
  elif name == "frepo":  # Adam, warm-up + cosine; MSE on the labels as they are.
    recipe = get_protocol(name, lr=1e-2, warmup_steps=2, weight_decay=1e-3, **overrides)
    labels = one_hot - 0.1 + 0.05 * rng.normal(size=(10, 10))  # FRePo-style learned labels.
    targets, loss_fn = labels, mse

    def lr_at(t):
      if t < 2:
        return 1e-2 * t / 2
      progress = (t - 2) / (num_steps - 2)
      return 1e-2 * (0.99 * 0.5 * (1 + np.cos(np.pi * progress)) + 0.01)
  else:  # AdamW, cosine; KD from teacher logits at T = 20.
    # No norm: under instance norm the conv bias has an exactly-zero gradient, whose float
    # noise Adam would amplify into steps no two implementations agree on.
    overrides["model_kwargs"] = {**TINY, "norm": "none"}
    recipe = get_protocol(name, lr=1e-2, weight_decay=0.1, **overrides)
    labels = 5 * one_hot + rng.normal(size=(10, 10))
    targets, loss_fn = labels, kd
    lr_at = lambda t: 1e-2 * 0.5 * (1 + np.cos(np.pi * t / num_steps))
  labels = labels.astype(np.float32)
  train_set = pixel_set(x, labels, label_kind)
  network_key = key(7)
  saved = {}
  trained = Trainer.for_set(recipe, train_set).train(
      network_key[None], train_set, save_at=[checked],
      on_save=lambda t, state, _: saved.update({t: host_copy(state)}))
  expected = reference_run(recipe, jnp.asarray(x), jnp.asarray(targets, jnp.float32),
                           network_key, loss_fn, checked, lr_at)
  leaves_close(network(saved[checked].params, 0), expected, rtol=2e-4, atol=2e-6)
  assert trained.losses.shape == (1, num_steps) and trained.steps == num_steps
  assert np.all(np.isfinite(trained.losses))
  assert trained.losses[0, -5:].mean() < 0.7 * trained.losses[0, :5].mean()


# --------------------------------------------------------------------------- training runs


def test_vmapped_equals_one_by_one(digits):
  x, y = subset(digits, 2)  # Partial batches, DSA on every batch.
  train_set = pixel_set(x, y)
  trainer = Trainer.for_set(AUGMENTED, train_set)
  network_keys = threefry_keys(1, 2)
  vmapped = trainer.train(network_keys, train_set, vectorize=True, log_every=4)
  single = trainer.train(network_keys[1:2], train_set, vectorize=False)
  looped = trainer.train(network_keys, train_set, vectorize=False)
  np.testing.assert_allclose(vmapped.losses[1:2], single.losses, rtol=1e-5, atol=1e-6)
  leaves_close(jax.tree.map(lambda l: l[1:2], vmapped.state.params), single.state.params,
               rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(vmapped.losses, looped.losses, rtol=1e-5, atol=1e-6)
  leaves_close(vmapped.state.params, looped.state.params, rtol=1e-4, atol=1e-6)
  leaves_close(vmapped.state.opt_state, looped.state.opt_state, rtol=1e-4, atol=1e-6)
  # Different keys give different networks.
  assert not np.allclose(vmapped.losses[0], vmapped.losses[1])


def test_determinism(digits):
  train_set = pixel_set(*subset(digits, 2))
  trainer = Trainer.for_set(AUGMENTED, train_set)
  first = trainer.train(threefry_keys(0, 2), train_set)
  second = trainer.train(threefry_keys(0, 2), train_set)
  other = trainer.train(threefry_keys(1, 2), train_set)
  np.testing.assert_array_equal(first.losses, second.losses)
  leaves_equal(first.state, second.state)
  assert not np.allclose(first.losses, other.losses)
  assert first.steps == 6 and first.seconds >= 0 and first.compile_seconds >= 0


def test_scan_chunks_equal_single_steps(digits):
  """The accelerator path (lax.scan chunks, cut at save points and at the end) equals single
  steps."""
  train_set = pixel_set(*subset(digits, 2))
  stepping = Trainer.for_set(PLAIN, train_set)
  assert stepping.chunk == 1  # CPU.
  scanning = dataclasses.replace(stepping, chunk=4)
  network_keys = keys(5, 2)
  initial = stepping.initial_state(network_keys, (8, 8, 1))
  saved = {}

  def on_save(name):
    return lambda t, state, losses: saved.setdefault(name, []).append(
        (t, host_copy(state), losses))

  stepped = stepping.train(network_keys, train_set, state=host_copy(initial), save_at=[3],
                           on_save=on_save("stepped"))
  chunked = scanning.train(network_keys, train_set, state=host_copy(initial), save_at=[3],
                           on_save=on_save("chunked"))
  np.testing.assert_allclose(chunked.losses, stepped.losses, rtol=1e-5)
  leaves_close(chunked.state.params, stepped.state.params, rtol=1e-4, atol=1e-6)
  (t_a, state_a, losses_a), = saved["stepped"]
  (t_b, state_b, losses_b), = saved["chunked"]
  assert t_a == t_b == 3
  np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
  leaves_close(state_b.params, state_a.params, rtol=1e-4, atol=1e-6)
  # One chunk that stops early: the steps at or after `stop` are skipped with NaN losses.
  state = network(initial, 0)
  after, losses = jax.jit(scanning.run)(state, jnp.int32(0), jnp.int32(2), train_set,
                                        jnp.float32(0.05))
  assert losses.shape == (4,) and np.all(np.isfinite(losses[:2])) and np.all(np.isnan(losses[2:]))
  step = jax.jit(stepping.step)
  for t in range(2):
    state, _ = step(state, jnp.int32(t), train_set, jnp.float32(0.05))
  leaves_close(after.params, state.params, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("vectorize", [False, True])
def test_resume_from_a_saved_state_equals_an_uninterrupted_run(digits, vectorize):
  """Stopped after step 4 (mid-epoch, after the lr step) and resumed: the same losses and
  networks, augmentation, shuffling and momentum included."""
  train_set = pixel_set(*subset(digits, 2))
  trainer = Trainer.for_set(AUGMENTED, train_set)
  network_keys = threefry_keys(6, 2)
  saved = {}
  full = trainer.train(network_keys, train_set, vectorize=vectorize, save_at=[4],
                       on_save=lambda t, state, _: saved.update({t: host_copy(state)}))
  resumed = trainer.train(network_keys, train_set, vectorize=vectorize, state=saved[4],
                          start_step=4)
  assert resumed.losses.shape == (2, 2)
  np.testing.assert_array_equal(resumed.losses, full.losses[:, 4:])
  leaves_equal(resumed.state, full.state)


def test_save_points_get_the_state_and_mean_loss_since_the_last_one(digits):
  train_set = pixel_set(*subset(digits, 2))
  trainer = Trainer.for_set(PLAIN, train_set)
  network_keys = keys(8, 2)
  calls = []
  on_save = lambda t, state, losses: calls.append((t, host_copy(state), np.copy(losses)))
  # Points at or before the start, duplicates and points past the end are dropped.
  full = trainer.train(network_keys, train_set, save_at=[0, 2, 5, 5, 6, 99], on_save=on_save)
  assert [t for t, _, _ in calls] == [2, 5, 6]
  for (t, _, losses), previous in zip(calls, [0, 2, 5]):
    assert losses.shape == (2,)
    np.testing.assert_allclose(losses, full.losses[:, previous:t].mean(axis=1), rtol=1e-6)
  leaves_equal(calls[-1][1], full.state)
  # The state handed over at step 2 is two plain steps of each network.
  step = jax.jit(trainer.step)
  for i in range(2):
    state = jax.jit(trainer.init)(network_keys[i], jnp.zeros((1, 8, 8, 1)))
    for t in range(2):
      state, _ = step(state, jnp.int32(t), train_set, jnp.float32(PLAIN.lr))
    leaves_close(network(calls[0][1].params, i), state.params, rtol=1e-5, atol=1e-7)
  # A resumed run drops the points up to its start and averages from its start on.
  first = calls[0][1]
  calls.clear()
  trainer.train(network_keys, train_set, state=first, start_step=2, save_at=[2, 5],
                on_save=on_save)
  assert [t for t, _, _ in calls] == [5]
  np.testing.assert_allclose(calls[0][2], full.losses[:, 2:5].mean(axis=1), rtol=1e-5)


def test_lr_override(digits):
  """`train(lr=)` replaces the recipe's base lr in every step (a set's learned lr)."""
  train_set = pixel_set(*subset(digits, 2))
  trainer = Trainer.for_set(PLAIN, train_set)
  network_keys = keys(2, 2)
  default = trainer.train(network_keys, train_set)
  same = trainer.train(network_keys, train_set, lr=jnp.asarray(0.05))
  faster = trainer.train(network_keys, train_set, lr=0.2)
  np.testing.assert_array_equal(default.losses, same.losses)
  np.testing.assert_array_equal(default.losses[:, 0], faster.losses[:, 0])  # Same init.
  assert not np.allclose(default.losses[:, 1:], faster.losses[:, 1:])
  step = jax.jit(trainer.step)
  state = jax.jit(trainer.init)(network_keys[1], jnp.zeros((1, 8, 8, 1)))
  for t in range(PLAIN.steps):
    state, _ = step(state, jnp.int32(t), train_set, jnp.float32(0.2))
  leaves_close(network(faster.state.params, 1), state.params, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_accuracy_matches_numpy(digits, norm):
  x_test, y_test = subset(digits, 3, offset=10)  # 30 images, test batch 7: a padded last batch.
  recipe = PLAIN if norm == "instance" else dataclasses.replace(
      PLAIN, model_kwargs={**TINY, "norm": norm})
  train_set = pixel_set(*subset(digits, 2))
  trainer = Trainer.for_set(recipe, train_set)
  # Trained networks, so batch-norm statistics are not at their initial values.
  state = trainer.train(keys(4, 3), train_set).state
  if norm == "batch":
    assert not np.allclose(state.model_state["batch_stats"]["BatchNorm_0"]["var"], 1.0)
  got = trainer.accuracy(state, x_test, y_test, batch_size=7)
  vmapped = trainer.accuracy(state, x_test, y_test, batch_size=7, vectorize=True)
  np.testing.assert_array_equal(got, vmapped)
  assert got.shape == (3,) and got.dtype == np.float64
  model = get_model("convnet", num_classes=NUM_CLASSES, **recipe.model_kwargs)
  for i in range(3):
    variables = {"params": network(state.params, i), **network(state.model_state, i)}
    logits = np.asarray(model.apply(variables, x_test, train=False))
    assert got[i] == np.mean(logits.argmax(axis=1) == y_test)


def test_classification_accuracy_pads_the_last_batch():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  x = rng.normal(size=(11, 2, 2, 1)).astype(np.float32)
  y = rng.integers(0, 3, 11).astype(np.int32)
  predict = jax.jit(lambda images: jnp.stack([images.reshape(len(images), -1) @ w,
                                              -images.reshape(len(images), -1) @ w]))
  got = classification_accuracy(predict, x, y, batch_size=4)  # 4 + 4 + 3 (padded).
  flat = x.reshape(11, -1)
  want = [np.mean((flat @ w).argmax(1) == y), np.mean((-flat @ w).argmax(1) == y)]
  np.testing.assert_array_equal(got, want)
  assert got.shape == (2,)


def test_a_large_set_trains_partial_epochs_with_a_steps_override():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(300, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, 300).astype(np.int32)
  train_set = pixel_set(x, y)
  recipe = dataclasses.replace(PLAIN, batch_size=128, steps=2)
  trainer = Trainer.for_set(recipe, train_set)
  assert (trainer.batch_size, trainer.steps_per_epoch, trainer.num_steps) == (128, 3, 2)
  trained = trainer.train(keys(0, 1), train_set)
  assert trained.steps == 2 and trained.losses.shape == (1, 2)
  assert np.all(np.isfinite(trained.losses))


# --------------------------------------------------------------------------- any set kind


@register_kind("test_epoch_labels")
@dataclasses.dataclass(frozen=True)
class EpochLabelSet(DistilledSet):
  """Images with other class ids in every epoch (a stand-in for replayed per-epoch labels)."""

  x: Any
  y: Any  # (epochs, N) class ids.
  meta: SetMeta = dataclasses.field(kw_only=True)

  @property
  def num_examples(self):
    return int(self.x.shape[0])

  def draw(self, indices, *, key, epoch, run_key=None):
    del key, run_key
    return self.x[indices], self.y[epoch][indices]

  def class_ids(self):
    return np.asarray(self.y[0], np.int32)


def test_the_trainer_draws_batches_through_the_set(digits):
  """Epoch e's batches are drawn with `epoch=e`: epoch 0 trains like a PixelSet of y[0] and
  the first step of epoch 1 already sees y[1]."""
  x, y = subset(digits, 2)
  rolled = np.roll(y, 1)
  meta = pixel_set(x, y).meta
  replay = EpochLabelSet(jnp.asarray(x), jnp.asarray(np.stack([y, rolled])), meta=meta)
  trainer = Trainer.for_set(PLAIN, replay)
  assert trainer.steps_per_epoch == 3
  network_keys = keys(9, 1)
  replayed = trainer.train(network_keys, replay)
  fixed = trainer.train(network_keys, pixel_set(x, y))
  np.testing.assert_allclose(replayed.losses[:, :3], fixed.losses[:, :3], rtol=1e-6)
  assert not np.allclose(replayed.losses[:, 3], fixed.losses[:, 3], rtol=1e-3)
  # The same labels in every epoch train like the PixelSet.
  same = EpochLabelSet(jnp.asarray(x), jnp.asarray(np.stack([y, y])), meta=meta)
  np.testing.assert_allclose(trainer.train(network_keys, same).losses, fixed.losses, rtol=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_one_line_error(digits):
  x, y = subset(digits, 2)
  train_set = pixel_set(x, y)
  with pytest.raises(ValueError, match="kd loss needs teacher logits"):
    Trainer.for_set(get_protocol("kd", steps=1, **TINY), train_set)
  trainer = Trainer.for_set(PLAIN, train_set)
  with pytest.raises(ValueError, match="built for 20 examples but the set has 10"):
    trainer.train(keys(0, 1), pixel_set(*subset(digits, 1)))
  with pytest.raises(ValueError, match="training set is empty"):
    Trainer.for_set(PLAIN, pixel_set(x[:0], y[:0]))
