"""evaluate(): fresh networks on any set kind under a protocol, against the trainer and NumPy."""

import dataclasses

import jax
import numpy as np
import pytest

from distill_jax.evaluation import EvalResult, check_set, evaluate, get_protocol
from distill_jax.models import get_model
from distill_jax.registry import UnknownNameError
from distill_jax.training import Trainer
from tests.digits_sets import NUM_CLASSES, digits_arrays, pixel_set, subset

# Tiny networks and two cheap DSA ops: each evaluation compiles in seconds.
PROTOCOL = get_protocol("mtt", steps=8, batch_size=16, width=4, depth=1, test_batch_size=7,
                        aug_strategy="flip_crop")


@pytest.fixture(scope="module")
def digits():
  return digits_arrays()


def numpy_accuracies(protocol, state, x_test, y_test):
  model = get_model(protocol.model, num_classes=NUM_CLASSES, **protocol.model_kwargs)
  accuracies = []
  for i in range(len(jax.tree.leaves(state.params)[0])):
    params = jax.tree.map(lambda a: a[i], state.params)
    logits = np.asarray(model.apply({"params": params}, x_test, train=False))
    accuracies.append(np.mean(logits.argmax(axis=1) == y_test))
  return np.array(accuracies)


def test_result_is_the_final_networks_of_the_seed(digits):
  train_set = pixel_set(*subset(digits, 2))
  x_test, y_test = subset(digits, 3, offset=10)
  first = evaluate(train_set, PROTOCOL, x_test, y_test, seed=0, num_models=2)
  second = evaluate(train_set, PROTOCOL, x_test, y_test, seed=0, num_models=2)
  other = evaluate(train_set, PROTOCOL, x_test, y_test, seed=1, num_models=2)
  assert isinstance(first, EvalResult)
  np.testing.assert_array_equal(first.accuracies, second.accuracies)
  assert first.final_loss == second.final_loss and first.final_loss != other.final_loss
  # The same networks trained by hand from split(key(seed), M), tested in NumPy.
  trainer = Trainer.for_set(PROTOCOL, train_set)
  trained = trainer.train(jax.random.split(jax.random.key(0), 2), train_set)
  np.testing.assert_array_equal(first.accuracies,
                                numpy_accuracies(PROTOCOL, trained.state, x_test, y_test))
  assert first.final_loss == pytest.approx(float(np.mean(trained.losses)), rel=1e-6)
  assert first.n == 2 and first.steps == 8 and first.seconds >= 0
  assert first.accuracies.shape == (2,)
  assert first.mean == pytest.approx(np.mean(first.accuracies))
  assert first.std == pytest.approx(np.std(first.accuracies))
  record = first.to_dict()
  assert record["accuracies"] == [float(a) for a in first.accuracies]
  assert {k: record[k] for k in ("n", "steps")} == {"n": 2, "steps": 8}
  # One vmapped program gives the same networks.
  vmapped = evaluate(train_set, PROTOCOL, x_test, y_test, seed=0, num_models=2, vectorize=True)
  np.testing.assert_allclose(vmapped.final_loss, first.final_loss, rtol=1e-5)


def test_the_final_loss_averages_the_last_100_steps(digits):
  train_set = pixel_set(*subset(digits, 1))
  x_test, y_test = subset(digits, 1, offset=20)
  protocol = dataclasses.replace(PROTOCOL, steps=103, batch_size=10, augmentation="none")
  result = evaluate(train_set, protocol, x_test, y_test, seed=3, num_models=1)
  losses = Trainer.for_set(protocol, train_set).train(
      jax.random.split(jax.random.key(3), 1), train_set).losses
  assert result.final_loss == pytest.approx(float(np.mean(losses[:, 3:])), rel=1e-6)
  assert result.final_loss != pytest.approx(float(np.mean(losses)), rel=1e-3)


def test_the_sets_learned_lr_only_with_use_learned_lr(digits):
  x, y = subset(digits, 2)
  x_test, y_test = subset(digits, 3, offset=10)
  with_lr = pixel_set(x, y, lr=0.05)
  learned = evaluate(with_lr, PROTOCOL, x_test, y_test, seed=0, num_models=2)
  fixed_protocol = dataclasses.replace(PROTOCOL, use_learned_lr=False)
  fixed = evaluate(with_lr, fixed_protocol, x_test, y_test, seed=0, num_models=2)
  trainer = Trainer.for_set(PROTOCOL, with_lr)
  network_keys = jax.random.split(jax.random.key(0), 2)
  at_set_lr = trainer.train(network_keys, with_lr, lr=0.05)
  at_protocol_lr = trainer.train(network_keys, with_lr)
  assert with_lr.training_lr() == pytest.approx(0.05) != PROTOCOL.lr
  np.testing.assert_array_equal(
      learned.accuracies, numpy_accuracies(PROTOCOL, at_set_lr.state, x_test, y_test))
  assert learned.final_loss == pytest.approx(float(np.mean(at_set_lr.losses)), rel=1e-6)
  assert fixed.final_loss == pytest.approx(float(np.mean(at_protocol_lr.losses)), rel=1e-5)
  assert learned.final_loss != pytest.approx(fixed.final_loss, rel=1e-3)
  with pytest.raises(ValueError, match="learned lr is -0.0099999"):
    evaluate(pixel_set(x, y, lr=-0.01), PROTOCOL, x_test, y_test, seed=0, num_models=1)
  # A protocol with a fixed lr ignores even a bad learned lr.
  ignored = evaluate(pixel_set(x, y, lr=-0.01), fixed_protocol, x_test, y_test, seed=0,
                     num_models=2)
  assert ignored.final_loss == fixed.final_loss


def test_digits_ipc10_is_well_above_chance(digits):
  train_set = pixel_set(*subset(digits, 10))
  x_test, y_test = subset(digits, 60, offset=10)
  protocol = get_protocol("mtt", steps=100, width=8, depth=1, augmentation="none")
  result = evaluate(train_set, protocol, x_test, y_test, seed=0, num_models=2)
  assert result.mean > 0.6, result  # Chance is 0.1.


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, y: pixel_set(x, np.where(y == 9, 10, y)),
         r"class ids lie in \[0, 10\] but it has 10 classes"),
        (lambda x, y: pixel_set(x, y - 1), r"class ids lie in \[-1, 8\]"),
        (lambda x, y: pixel_set(np.where(x > 0.9, np.nan, x), y), "'x' holds NaN or inf"),
        (lambda x, y: pixel_set(x, np.where(np.eye(10)[y] > 0, np.inf, 0.0).astype(np.float32),
                                "logits"), "'y' holds NaN or inf"),
        (lambda x, y: pixel_set(x, y, lr=np.float32(np.nan)), "'lr' holds NaN or inf"),
    ],
)
def test_check_set_errors(digits, make, message):
  x, y = subset(digits, 1)
  check_set(pixel_set(x, y))  # A valid set passes.
  bad = make(x, y)
  with pytest.raises(ValueError, match=message):
    check_set(bad)
  with pytest.raises(ValueError, match=message):  # evaluate checks before training.
    evaluate(bad, PROTOCOL, x[:4], y[:4], seed=0, num_models=1)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"protocol": "nope"}, UnknownNameError, "valid names: apm, d3s, dc, dsa, frepo, kd, mtt, standard"),
        ({"x_test": np.zeros((4, 9, 9, 1), np.float32)}, ValueError, "preprocess both the same"),
        ({"x_test": np.zeros((4, 8, 8), np.float32)}, ValueError, "preprocess both the same"),
        ({"x_test": np.zeros((4, 8, 8, 1), np.uint8)}, ValueError, "floating images"),
        ({"y_test": np.zeros(3, np.int32)}, ValueError, r"y_test must be \(N_test,\) = \(4,\)"),
        ({"y_test": np.zeros(4, np.float32)}, ValueError, "int class ids"),
        ({"y_test": np.array([0, 1, 2, 10])}, ValueError, r"y_test ids must lie in \[0, 10\)"),
        ({"num_models": 0}, ValueError, "num_models must be a positive int"),
        ({"num_models": True}, ValueError, "num_models must be a positive int"),
        ({"protocol": get_protocol("kd", steps=1, width=4, depth=1)}, ValueError,
         "kd loss needs teacher logits"),
    ],
)
def test_bad_input(change, error, message):
  args = {
      "training_set": pixel_set(np.zeros((20, 8, 8, 1), np.float32),
                                np.arange(20, dtype=np.int32) % 10),
      "x_test": np.zeros((4, 8, 8, 1), np.float32),
      "y_test": np.arange(4, dtype=np.int32),
      "protocol": PROTOCOL,
      "num_models": 1,
  }
  args.update(change)
  with pytest.raises(error, match=message):
    evaluate(**args, seed=0)
