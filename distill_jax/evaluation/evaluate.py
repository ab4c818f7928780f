"""Train fresh networks on a distilled set under a protocol and report their final test accuracy.

`evaluate(training_set, protocol, x_test, y_test, seed=...)` works for every set kind: the
networks train through `distill_jax.training.Trainer`, which draws batches with the set's own
`draw` and reads its `label_kind`; a protocol with `use_learned_lr` trains with the set's
`training_lr()` when it has one. The same seed gives the same numbers; the networks are the
final ones (never a maximum over time).
"""

import dataclasses
from typing import Any

import jax
import numpy as np
from absl import logging

from distill_jax.evaluation.protocols import Protocol, get_protocol
from distill_jax.training import Trainer


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Test accuracy of `n` networks trained from scratch under one protocol.

  Attributes:
    accuracies: (n,) final test accuracy of each network, in [0, 1].
    mean: mean of `accuracies`.
    std: population standard deviation (ddof=0, as np.std in MTT/FRePo) of `accuracies`.
    n: number of networks.
    seconds: wall-clock seconds of training all `n` networks, excluding compilation and the
      test pass.
    steps: optimiser steps per network.
    final_loss: mean training loss of the networks over the last min(100, steps) steps.
  """

  accuracies: np.ndarray
  mean: float
  std: float
  n: int
  seconds: float
  steps: int
  final_loss: float = float("nan")

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict (what `eval/<name>.json` of a workdir holds)."""
    return {
        "mean": self.mean,
        "std": self.std,
        "n": self.n,
        "accuracies": [float(a) for a in self.accuracies],
        "seconds": self.seconds,
        "steps": self.steps,
        "final_loss": self.final_loss,
    }


def check_set(training_set) -> None:
  """One-line errors for a set no protocol can train on: bad class ids or non-finite values."""
  num_classes = training_set.meta.num_classes
  ids = training_set.class_ids()
  if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
    raise ValueError(
        f"the set's class ids lie in [{ids.min()}, {ids.max()}] but it has {num_classes} "
        "classes; check meta.num_classes"
    )
  for name, array in training_set.arrays().items():
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
      raise ValueError(f"the set's {name!r} holds NaN or inf; check the distilled set")


def evaluate(
    training_set,
    protocol: Protocol | str,
    x_test: Any,
    y_test: Any,
    *,
    seed: int,
    num_models: int = 5,
    vectorize: bool | None = None,
    log_every: int = 100,
) -> EvalResult:
  """Trains `num_models` fresh networks on `training_set` and reports their final test accuracy.

  Args:
    training_set: any `distill_jax.distilled.DistilledSet` (a distilled set, a random subset, or
      the whole training set as a `PixelSet`), preprocessed like `x_test`.
    protocol: a `Protocol` or protocol name ("mtt", "frepo", "dc", "dsa", "kd", "standard").
    x_test: (N_test, H, W, C) float test images.
    y_test: (N_test,) int test class ids.
    seed: seed of the networks' keys (`split(key(seed), num_models)`).
    num_models: number of networks M.
    vectorize: train the networks in one vmapped program (None: on accelerators and on a mesh
      of several devices, where the networks split over `model`; same results either way).
    log_every: steps between progress log lines.

  Returns:
    An `EvalResult`; `mean`/`std` over the M final test accuracies.

  Raises:
    UnknownNameError: for an unknown protocol name.
    ValueError: for bad labels, mismatched image shapes or other bad input.
  """
  if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
    raise ValueError(f"num_models must be a positive int, got {num_models!r}")
  protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
  x_test, y_test = _check_test_split(x_test, y_test, training_set.meta)
  check_set(training_set)
  lr = training_set.training_lr() if protocol.use_learned_lr else None
  if lr is not None and not (np.isfinite(lr) and lr > 0):
    raise ValueError(f"the set's learned lr is {lr}; it must be a positive finite number")
  trainer = Trainer.for_set(protocol, training_set, chunk=log_every)
  trained = trainer.train(jax.random.split(jax.random.key(seed), num_models), training_set,
                          lr=lr, vectorize=vectorize, label=f"eval[{protocol.name}]",
                          log_every=log_every)
  accuracies = trainer.accuracy(trained.state, x_test, y_test, vectorize=vectorize,
                                batch_size=protocol.test_batch_size)
  tail = trained.losses[:, -min(100, trained.losses.shape[1]):]
  result = EvalResult(
      accuracies=accuracies,
      mean=float(np.mean(accuracies)),
      std=float(np.std(accuracies)),
      n=num_models,
      seconds=trained.seconds,
      steps=trained.steps,
      final_loss=float(np.mean(tail)) if tail.size else float("nan"),
  )
  logging.info("eval[%s]: test accuracy %.4f +- %.4f over %d networks (%d steps, %.1fs training)",
               protocol.name, result.mean, result.std, result.n, result.steps, result.seconds)
  return result


def _check_test_split(x_test: Any, y_test: Any, meta) -> tuple[np.ndarray, np.ndarray]:
  x_test, y_test = np.asarray(x_test), np.asarray(y_test)
  if x_test.ndim != 4 or tuple(x_test.shape[1:]) != meta.image_shape:
    raise ValueError(
        f"x_test has shape {x_test.shape} but the set's images are {meta.image_shape}; "
        "preprocess both the same way"
    )
  if not np.issubdtype(x_test.dtype, np.floating):
    raise ValueError(f"x_test must be floating images, got dtype {x_test.dtype}; cast to float32")
  if y_test.shape != (len(x_test),) or not np.issubdtype(y_test.dtype, np.integer):
    raise ValueError(
        f"y_test must be (N_test,) = ({len(x_test)},) int class ids, got shape {y_test.shape} "
        f"and dtype {y_test.dtype}"
    )
  if y_test.size and (y_test.min() < 0 or y_test.max() >= meta.num_classes):
    raise ValueError(f"y_test ids must lie in [0, {meta.num_classes}); check num_classes")
  return x_test.astype(np.float32, copy=False), y_test
