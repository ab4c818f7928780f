"""What every distillation method receives and registers."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from distill_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class RealData:
  """The real dataset a method distils, already preprocessed.

  Attributes:
    name: dataset name in `distill_jax.data.DATASETS`.
    num_classes: number of classes C.
    image_shape: `(H, W, channels)`.
    class_names: one name per class.
    x_train: `(N, H, W, channels)` float32, preprocessed (standardised or whitened).
    y_train: `(N,)` int32 class ids.
    x_test: `(M, H, W, channels)` float32, preprocessed the same way.
    y_test: `(M,)` int32.
    preprocessor: the fitted `distill_jax.data.Preprocessor` (its `invert` turns sets back into images).
    source_fingerprint: a digest of the raw (unpreprocessed) training arrays, or None. Caches keyed
      on the data (the expert buffers) use it with the preprocessing name instead of hashing
      `x_train`, whose last bits depend on the XLA thread count that fitted e.g. a ZCA matrix.
      Code that swaps in other training arrays (a subset, latent codes) must reset it to None.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  preprocessor: Any
  source_fingerprint: str | None = None

  def set_meta(self, method: str, ipc: int):
    """The `distilled.SetMeta` of a set made from this data by `method` at `ipc` images per class."""
    from distill_jax import distilled  # Imported here: distilled sets depend on nothing in methods.

    return distilled.SetMeta(
        method=method,
        dataset=self.name,
        ipc=ipc,
        num_classes=self.num_classes,
        image_shape=self.image_shape,
        preprocessing=self.preprocessor.to_arrays(),
    )


# distill(config, data, workdir) -> distilled set. The method checkpoints into
# `workdir.checkpoint_dir` and resumes from it when the same command is run again.
DistillFn = Callable[[ml_collections.ConfigDict, RealData, Any], Any]
# report_extras(config, data, distilled_set, workdir) -> dict merged into report.json
# (e.g. FRePo's KRR accuracy), and free to write extra images into workdir.images_dir.
ExtrasFn = Callable[[ml_collections.ConfigDict, RealData, Any, Any], dict]


class DivergenceError(ValueError):
  """A distillation loss became NaN or infinite; the message names the likely fix."""


def finite_host_metrics(
    metrics: dict[str, Any], watched: tuple[str, ...], message: Callable[[dict[str, float]], str]
) -> dict[str, float]:
  """Fetches a step's metrics to the host as floats and stops a diverged run.

  Args:
    metrics: scalar metrics of one step (device arrays).
    watched: names whose value must be finite.
    message: builds the error text from the host metrics (it should name the fix).

  Returns:
    The metrics as Python floats.

  Raises:
    DivergenceError: when a watched metric is NaN or infinite.
  """
  host = {name: float(value) for name, value in jax.device_get(metrics).items()}
  if not all(np.isfinite(host[name]) for name in watched):
    raise DivergenceError(message(host))
  return host


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  distill: DistillFn
  report_extras: ExtrasFn | None = None


METHODS: Registry[Method] = Registry("method")
