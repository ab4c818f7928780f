"""KRR evaluation (FRePo's bracketed numbers) against a float64 NumPy KRR."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.distilled import PixelSet, SetMeta
from distill_jax.evaluation import krr_accuracy, krr_evaluate
from distill_jax.training import Recipe, Trainer
from tests.references import numpy_krr


class Linear(nn.Module):
  """A linear classifier on flattened pixels, following the models' call convention."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    features = x.reshape((x.shape[0], -1))
    logits = nn.Dense(self.num_classes)(features)
    return (logits, {"penultimate": features, "blocks": ()}) if return_features else logits


def flat(x):
  return x.reshape(len(x), -1).astype(np.float64)


@pytest.mark.parametrize("use_flip", [True, False])
def test_krr_accuracy_matches_numpy(use_flip):
  rng = np.random.default_rng(2)
  model = Linear(3)
  x_support = rng.normal(size=(9, 2, 3, 1)).astype(np.float32)
  y_support = (np.eye(3)[rng.integers(0, 3, 9)] - 1 / 3).astype(np.float32)
  x_test = rng.normal(size=(25, 2, 3, 1)).astype(np.float32)
  y_test = rng.integers(0, 3, 25).astype(np.int32)
  variables = model.init(jax.random.key(0), x_test[:1])
  accuracy = krr_accuracy(model, variables, x_support, y_support, x_test, y_test,
                          kernel_reg=1e-3, use_flip=use_flip,
                          batch_size=10)  # 25 = 2 full batches + a padded one.
  x_all, y_all = x_support, y_support
  if use_flip:  # The mirrored support images with the same labels.
    x_all = np.concatenate([x_support, x_support[:, :, ::-1]])
    y_all = np.concatenate([y_support, y_support])
  pred = numpy_krr(flat(x_test), flat(x_all), y_all, 1e-3)
  assert accuracy == np.mean(pred.argmax(-1) == y_test)
  assert isinstance(accuracy, float)


def test_krr_accuracy_reg_floor_reaches_the_solve():
  """The ridge is max(kernel_reg, reg_floor * n * eps32); 20 support rows in 16 dimensions
  interpolate with the tiny reg and generalise better with a large floor."""
  rng = np.random.default_rng(3)
  model = Linear(4)
  x_support = rng.normal(size=(20, 4, 4, 1)).astype(np.float32)
  y_support = np.eye(4, dtype=np.float32)[np.arange(20) % 4]
  x_test = rng.normal(size=(200, 4, 4, 1)).astype(np.float32)
  w = rng.normal(size=(16, 4))
  y_test = (flat(x_test) @ w).argmax(1).astype(np.int32)
  y_support = np.eye(4, dtype=np.float32)[(flat(x_support) @ w).argmax(1)]
  variables = model.init(jax.random.key(0), x_test[:1])
  accuracies = []
  for floor in (0.0, 1.0, 1e6):
    accuracies.append(krr_accuracy(model, variables, x_support, y_support, x_test, y_test,
                                   kernel_reg=1e-6, reg_floor=floor, use_flip=False))
    ridge = max(1e-6, floor * 20 * np.finfo(np.float32).eps)
    pred = numpy_krr(flat(x_test), flat(x_support), y_support, ridge)
    assert accuracies[-1] == np.mean(pred.argmax(-1) == y_test), floor
  assert accuracies[0] != accuracies[-1]  # The floor changed the predictions.


def test_krr_evaluate_trains_networks_and_reads_their_features(tmp_path):
  rng = np.random.default_rng(4)
  meta = SetMeta(method="test", dataset="toy", ipc=3, num_classes=3, image_shape=(8, 8, 1))
  y = (np.arange(9) % 3).astype(np.int32)
  x = (rng.normal(size=(9, 8, 8, 1)) + y[:, None, None, None]).astype(np.float32)
  train_set = PixelSet(x, y, meta=meta)
  x_test = (rng.normal(size=(30, 8, 8, 1)) + (np.arange(30) % 3)[:, None, None, None])
  x_test, y_test = x_test.astype(np.float32), (np.arange(30) % 3).astype(np.int32)
  # FRePo's KRR recipe, shrunk: Adam, MSE on the centred one-hot, no augmentation.
  recipe = Recipe(model="convnet", model_kwargs={"width": 4, "depth": 1, "norm": "none"},
                  optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", steps=3,
                  batch_size=9, loss="mse", augmentation="none")
  result = krr_evaluate(train_set, recipe, x_test, y_test, kernel_reg=1e-4, use_flip=True,
                        seed=5, num_models=2)
  assert set(result) == {"mean", "std", "n", "accuracies", "train_steps"}
  assert result["n"] == 2 and result["train_steps"] == 3
  # The same networks trained by hand; KRR on their penultimate features in float64 NumPy.
  trainer = Trainer.for_set(recipe, train_set)
  state = trainer.train(jax.random.split(jax.random.key(5), 2), train_set).state
  model = recipe.make_model(3)
  support = np.concatenate([x, x[:, :, ::-1]])
  y_support = np.concatenate([np.eye(3)[y] - 1 / 3] * 2)
  want = []
  for i in range(2):
    variables = {"params": jax.tree.map(lambda a: a[i], state.params)}
    features = lambda images: np.asarray(model.apply(
        variables, jnp.asarray(images), train=False, return_features=True)[1]["penultimate"],
        np.float64)
    pred = numpy_krr(features(x_test), features(support), y_support, 1e-4)
    want.append(np.mean(pred.argmax(-1) == y_test))
  np.testing.assert_allclose(result["accuracies"], want)
  assert result["mean"] == pytest.approx(np.mean(want))
  assert result["std"] == pytest.approx(np.std(want))
  with pytest.raises(ValueError, match="preprocess both the same way"):
    krr_evaluate(train_set, recipe, x_test[:, :4], y_test, kernel_reg=1e-4, use_flip=False,
                 seed=0, num_models=1)
