"""DC / DSA: the matching loss against a slow obvious computation, the network schedule between
matches, the released loop table and the images' SGD-momentum update (its smoke run is resumed
in test_resume.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dc as dc_config
from distill_jax import data as data_lib
from distill_jax import methods
from distill_jax.methods import _pixels, dc
from distill_jax.objectives import gradient_matching_loss
from tests.methods.toy_data import toy_data

# The smoke preset with a one-block, 4-wide network, for the 3-class toy data.
TINY = ("smoke,ipc=2,outer.real_batch_size=4,pool.model_kwargs.width=4,"
        "pool.model_kwargs.depth=1")


def tiny(extra=""):
  return dc.DC(dc_config.get_config(f"{TINY},{extra}" if extra else TINY), toy_data())


def slow_loss(method, x_syn, x_real, params):
  """Per class: the cross-entropy gradients of the real and the synthetic batch, matched with
  the layer-wise cosine distance, summed over classes (no augmentation)."""

  def cross_entropy(p, x, c):
    logits = method.model.apply({"params": p}, x, train=True)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.full((x.shape[0],), c)))

  ipc = method.config.ipc
  total = 0.0
  for c in range(x_real.shape[0]):
    grad_real = jax.grad(cross_entropy)(params, x_real[c], c)
    grad_syn = jax.grad(cross_entropy)(params, x_syn[c * ipc:(c + 1) * ipc], c)
    total = total + gradient_matching_loss(grad_syn, jax.lax.stop_gradient(grad_real),
                                           distance="cosine")
  return total


def test_dc_loss_equals_the_per_class_gradient_matching():
  method = tiny("outer.dsa_strategy=''")
  rng = np.random.default_rng(0)
  x_syn = jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32)
  x_real = jnp.asarray(rng.normal(size=(3, 4, 8, 8, 1)), jnp.float32)
  params = method.model.init(jax.random.key(0), x_syn[:1])["params"]
  loss = jax.jit(method.loss)
  value = loss(x_syn, x_real, params, jax.random.key(1))
  assert float(value) > 0
  np.testing.assert_allclose(float(value), float(slow_loss(method, x_syn, x_real, params)),
                             rtol=1e-5)
  # Without DSA the key plays no part.
  np.testing.assert_array_equal(loss(x_syn, x_real, params, jax.random.key(2)), value)


def _keys(state):
  """DC.step's split of the state's key: next key, network, real batches, DSA, training."""
  return jax.random.split(state.key, 5)


@pytest.fixture(scope="module")
def four_updates():
  """Four matching updates of a DSA run with 3 updates per network: the method, the states
  before and after each update, their losses, and what each update saw."""
  method = tiny("outer.loops=3,inner.epochs=2,inner.batch_size=4,"
                "outer.dsa_strategy=color_crop_cutout_flip_scale_rotate")
  inputs = method.inputs(1)
  x_train, y_train = inputs
  step = jax.jit(method.step)
  states, losses = [jax.jit(method.init)(jax.random.key(0))], []
  for _ in range(4):
    state, metrics = step(states[-1], inputs)
    states.append(state)
    losses.append(float(metrics["loss"]))
  real = [_pixels.real_class_batches(_keys(s)[2], x_train, y_train, per_class=4, num_classes=3)
          for s in states[:4]]
  fresh = [method.model.init(_keys(s)[1], s.x_syn[:1], train=False)["params"]
           for s in states[:4]]
  return method, states, losses, real, fresh, jax.jit(jax.value_and_grad(method.loss))


def _close(a, b):
  return all(np.allclose(x, y, rtol=1e-4, atol=1e-6)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_network_trains_between_matches_and_is_redrawn_every_iteration(four_updates):
  method, states, losses, real, fresh, value_and_grad = four_updates
  assert (method.outer_loop, method.inner_loop) == (3, 2)
  assert method.num_steps == 3 * method.config.num_steps
  s0, s1, s2, s3, _ = states
  assert [int(s.position) for s in states] == [0, 1, 2, 0, 1]

  def loss(i, net):  # The loss update i + 1 would have with `net`.
    return float(value_and_grad(states[i].x_syn, real[i], net, _keys(states[i])[3])[0])

  # Update 1 (position 0): a fresh network from the key, matched, then trained on the new set
  # (inner_loop epochs of SGD with DSA).
  np.testing.assert_allclose(losses[0], loss(0, fresh[0]), rtol=1e-4)
  trained, _ = method.train_network(fresh[0], method.net_tx.init(fresh[0]), s1.x_syn,
                                    _keys(s0)[4], method.device_train_set)
  assert _close(s1.net, trained) and not _close(s1.net, fresh[0])
  # Update 2 matches with the trained network, not a fresh one, and trains it again.
  np.testing.assert_allclose(losses[1], loss(1, s1.net), rtol=1e-4)
  assert not np.isclose(losses[1], loss(1, fresh[1]), rtol=1e-4)
  assert not _close(s2.net, s1.net)
  # Update 3 is the iteration's last: matched with the twice-trained network, which is then
  # left as it is (no training after the last match).
  np.testing.assert_allclose(losses[2], loss(2, s2.net), rtol=1e-4)
  for got, want in zip(jax.tree.leaves(s3.net), jax.tree.leaves(s2.net)):
    np.testing.assert_array_equal(got, want)
  # Update 4 (position 0 again): a new network from the key.
  np.testing.assert_allclose(losses[3], loss(3, fresh[3]), rtol=1e-4)
  assert not np.isclose(losses[3], loss(3, s3.net), rtol=1e-4)


def test_each_update_moves_the_images_against_the_gradient_with_momentum_one_half(four_updates):
  method, states, _, real, fresh, value_and_grad = four_updates
  networks = [fresh[0], states[1].net, states[2].net, fresh[3]]  # See the test above.
  lr = method.config.outer.lr
  x, buf = np.asarray(states[0].x_syn, np.float64), 0.0
  for i in range(4):
    _, g = value_and_grad(states[i].x_syn, real[i], networks[i], _keys(states[i])[3])
    buf = 0.5 * buf + np.asarray(g)  # torch.optim.SGD(momentum=0.5): buf = 0.5 buf + g.
    x = x - lr * buf
    np.testing.assert_allclose(np.asarray(states[i + 1].x_syn), x, rtol=1e-4, atol=1e-5)
  assert float(np.abs(x - np.asarray(states[0].x_syn)).max()) > 0


def test_idc_inner_training_takes_sgd_steps_on_uniform_real_batches():
  """`inner.data="real"` (IDC / LatentDC): `inner.epochs` plain SGD steps, each on
  `inner.batch_size` real images drawn uniformly with `fold_in(shuffle key, t)`, the synthetic
  set unused; checked against a Python loop of NumPy-indexed batches."""
  method = tiny("inner.data='real',inner.epochs=3,inner.batch_size=5")
  x_train, y_train = method.device_train_set
  params = method.model.init(jax.random.key(0), x_train[:1], train=False)["params"]
  key = jax.random.key(7)
  got, _ = jax.jit(method.train_network)(params, method.net_tx.init(params),
                                         jnp.zeros((6, 8, 8, 1)), key, (x_train, y_train))
  shuffle_key = jax.random.split(key)[0]
  want = params
  for t in range(3):
    index = np.asarray(jax.random.randint(jax.random.fold_in(shuffle_key, t), (5,), 0,
                                          len(y_train)))
    x, y = np.asarray(x_train)[index], np.asarray(y_train)[index]

    def ce(p, x=x, y=y):
      logits = method.model.apply({"params": p}, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    want = jax.tree.map(lambda w, g: w - method.config.inner.lr * g, want, jax.grad(ce)(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="unknown config.inner.data 'both'"):
    tiny("inner.data='both'")


def test_the_released_loop_table():
  # DatasetCondensation utils.py get_loops(ipc): (outer_loop, inner_loop).
  assert dc.LOOPS_BY_IPC == {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
                             50: (50, 10)}
  for ipc, loops in ((1, (1, 1)), (2, (1, 1)), (10, (10, 50)), (15, (10, 50)), (50, (50, 10)),
                     (100, (50, 10))):
    assert dc.loops_for(dc_config.get_config(f"ipc={ipc}")) == loops, ipc
  assert dc.loops_for(dc_config.get_config("ipc=10,outer.loops=3,inner.epochs=7")) == (3, 7)
  assert dc.loops_for(dc_config.get_config("ipc=10,outer.loops=3")) == (3, 50)
  # A run counts matching updates: num_steps iterations of outer_loop updates each.
  assert tiny("ipc=2,outer.loops=4,num_steps=5").num_steps == 20


def test_bad_settings_are_one_line_errors():
  for arg, message in [
      ("init=zeros", "unknown config.init 'zeros'"),
      ("inner.batch_size=0", "config.inner.batch_size must be a positive int"),
      ("outer.loops=-1", r"config.outer.loops must be 0 \(the released table\) or a positive int"),
      ("outer.real_batch_size=0", "config.outer.real_batch_size must be a positive int"),
      ("outer.real_batch_size=17",
       "config.outer.real_batch_size=17 exceeds the 16 training images of the smallest class"),
      ("pool.model_kwargs.norm=batch", "pool.model_kwargs.norm='batch' is not supported"),
  ]:
    with pytest.raises(ValueError, match=message):
      tiny(arg)
  assert methods.get_method("dc") is dc.DC
  # The result is the images with their class ids, sorted by class.
  method = tiny()
  result = method.result(jax.jit(method.init)(jax.random.key(0)))
  assert result.y.tolist() == [0, 0, 1, 1, 2, 2] and result.meta.method == "dc"
  np.testing.assert_array_equal(
      result.x, data_lib.random_subset(method.data.x_train, method.data.y_train, ipc=2,
                                       num_classes=3, seed=0)[0])
