"""KRR evaluation (FRePo Table 1, numbers in brackets): test accuracy of kernel ridge regression
with a distilled set as support, on the features of networks trained on that set.

Each network trains from a fresh initialisation under a recipe (FRePo: Adam at the online lr,
MSE on the set's labels, FRePo's augmentation; the released `proto_evaluate(eval_krr=True)`),
then predicts every test image with `objectives.krr_predict` on its penultimate features, the
whole set (and its mirror images with `use_flip`) as support.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from distill_jax.evaluation.evaluate import _check_test_split, check_set
from distill_jax.objectives import krr_predict
from distill_jax.training import Recipe, Trainer, classification_accuracy


def krr_accuracy(model, variables: dict[str, Any], x_support: Any, y_support: Any, x_test: Any,
                 y_test: Any, *, kernel_reg: float, reg_floor: float = 1.0, use_flip: bool,
                 batch_size: int = 1000) -> float:
  """Test accuracy of `K_ts (K_ss + lam I)^-1 Y_s` (FRePo Eq. 2) on `model`'s features.

  Args:
    model: a Flax module of the `distill_jax.models` convention.
    variables: its variables (features come from inference mode).
    x_support: (N, H, W, C) support images.
    y_support: (N, C) float support targets.
    x_test: (M, H, W, C) test images.
    y_test: (M,) int test labels.
    kernel_reg: relative ridge lambda_0 (`krr_predict`'s `reg`).
    reg_floor: `krr_predict`'s `reg_floor`.
    use_flip: add the mirrored support images with the same labels.
    batch_size: test images per forward pass (does not change the result).

  Returns:
    accuracy in [0, 1].
  """
  x_support = jnp.asarray(x_support, jnp.float32)
  y_support = jnp.asarray(y_support, jnp.float32)
  if use_flip:
    x_support = jnp.concatenate([x_support, jnp.flip(x_support, axis=2)])
    y_support = jnp.concatenate([y_support, y_support])
  feat_support = _features(model, variables, x_support)
  predict = functools.partial(_predict, model, variables, feat_support, y_support,
                              jnp.float32(kernel_reg), jnp.float32(reg_floor))
  return float(classification_accuracy(predict, x_test, y_test, batch_size=batch_size))


@functools.partial(jax.jit, static_argnums=0)
def _features(model, variables, x):
  return model.apply(variables, x, train=False, return_features=True)[1]["penultimate"]


@functools.partial(jax.jit, static_argnums=0)
def _predict(model, variables, feat_support, y_support, kernel_reg, reg_floor, x):
  return krr_predict(_features(model, variables, x), feat_support, y_support, reg=kernel_reg,
                     reg_floor=reg_floor)


def krr_evaluate(training_set, recipe: Recipe, x_test: Any, y_test: Any, *, kernel_reg: float,
                 reg_floor: float = 1.0, use_flip: bool, seed: int,
                 num_models: int) -> dict[str, Any]:
  """KRR test accuracy of a set over `num_models` networks trained on it under `recipe`.

  The support labels are the set's labels as the recipe's loss targets (FRePo: learned labels
  as they are, class ids as the centred one-hot).

  Returns:
    `{"mean", "std", "n", "accuracies", "train_steps"}` (accuracies in [0, 1]).
  """
  x_test, y_test = _check_test_split(x_test, y_test, training_set.meta)
  check_set(training_set)
  trainer = Trainer.for_set(recipe, training_set)
  trained = trainer.train(jax.random.split(jax.random.key(seed), num_models), training_set,
                          vectorize=False, label="krr eval")
  x_support, y = training_set.draw(np.arange(training_set.num_examples), key=jax.random.key(0),
                                   epoch=0)
  y_support = recipe.targets_fn(training_set.label_kind, training_set.meta.num_classes)(
      jnp.asarray(y))
  accuracies = []
  for i in range(num_models):
    state = jax.tree.map(lambda a, i=i: a[i], trained.state)
    accuracies.append(krr_accuracy(
        trainer.model, {"params": state.params, **state.model_state}, x_support, y_support,
        x_test, y_test, kernel_reg=kernel_reg, reg_floor=reg_floor, use_flip=use_flip))
  logging.info("KRR test accuracy: %.2f%% +- %.2f over %d networks",
               100 * np.mean(accuracies), 100 * np.std(accuracies), num_models)
  return {
      "mean": float(np.mean(accuracies)),
      "std": float(np.std(accuracies)),
      "n": num_models,
      "accuracies": [float(a) for a in accuracies],
      "train_steps": trainer.num_steps,
  }
