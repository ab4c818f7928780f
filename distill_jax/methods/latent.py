"""LatentDD: DC, DM and MTT on autoencoder latent codes (Duan, Zhang & Zhang; paper 002).

LatentDD runs the pixel-space algorithms unchanged on the codes `l = E(x)` of an autoencoder
(section 3.2, Eq. 3): the real set becomes `L_T = {(E(x_i), y_i)}` (encoded once and cached),
the synthetic set `L_S` starts from randomly chosen real codes, and the networks operate on
codes, with `depth = pixel depth - log2 f` (section 3.3.1; Table 6: ConvNetD4 on 64x64 codes of
256x256 images). This module is that composition and nothing more:

  prepare   train (or open) the autoencoder, encode the splits, build the latent `RealData`
            (`data.replace(x_train=codes, ...)`, a fingerprint of its own, so MTT's expert buffer
            on codes is cached apart from the pixel one), then the algorithm's own `prepare`
            (LatentMTT: the expert buffer trained on codes, Algorithm 3);
  init/step/inputs  the algorithm's (`methods.dc`, `methods.dm`, `methods.mtt`) on the codes;
  result    the codes with their labels and the decoder, as a `latents` set.

What changes against the pixel algorithm is its config (`derived_config`): the codes' lr is
`outer.lr_base * LPC` (Eq. 10), no DSA anywhere in latent space (section 3.3.1), the network
depth as above; LatentDC trains its network on real codes between matches with an MSE matching
distance (IDC, section 3.3.1; `configs/latent.py`). LPC, the codes per class, is `lpc` or, when
0, the most codes per class that fit in the storage of `ipc` real images per class, decoder
included when it is counted (section 3.2: `n * 3 f^2 / C` codes for n images, without a decoder).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from distill_jax import data as data_lib
from distill_jax.distilled.latents import LatentSet
from distill_jax.methods.base import DistillMethod, get_method, register_method
from distill_jax.models import autoencoder as autoencoder_lib
from distill_jax.training import autoencoder as autoencoder_training

ALGORITHMS = ("dc", "dm", "mtt")
# The field of each algorithm's config that holds the codes' learning rate (Eq. 10 sets it).
_LR_FIELD = {"dc": "lr", "dm": "lr", "mtt": "lr_img"}


def latent_depth(config: ml_collections.ConfigDict) -> int:
  """`pixel_depth - log2 f` (section 3.3.1), a one-line error when it is below 1."""
  factor = config.autoencoder.factor
  levels = round(math.log2(factor)) if isinstance(factor, int) and factor > 0 else 0
  depth = config.pixel_depth - levels
  if depth < 1:
    raise ValueError(f"pixel_depth={config.pixel_depth} minus log2(autoencoder.factor="
                     f"{factor}) leaves a network of depth {depth} on the codes; raise "
                     "pixel_depth or lower the factor")
  return depth


def decoder_parameter_count(config: ml_collections.ConfigDict, image_shape) -> int:
  """Parameters of the decoder `config.autoencoder` describes (shapes only, nothing trained);
  0 for a pretrained one (public: not counted in storage)."""
  a = config.autoencoder
  if a.pretrained_dir:
    return 0
  shape = autoencoder_lib.latent_shape(image_shape, a.factor, a.latent_channels)
  decoder = autoencoder_lib.Decoder(a.factor, image_shape[-1], a.width)
  params = jax.eval_shape(lambda: decoder.init(jax.random.key(0), jnp.zeros((1, *shape))))
  return autoencoder_lib.num_parameters(params)


def latents_per_class(config: ml_collections.ConfigDict, data) -> int:
  """LPC: `config.lpc`, or (0) the most codes per class whose storage (codes, labels and the
  counted decoder, 4 bytes a value) fits in that of `config.ipc` real images per class with
  their labels (one-line errors when none fits)."""
  if config.lpc:
    return config.lpc
  shape = autoencoder_lib.latent_shape(data.image_shape, config.autoencoder.factor,
                                       config.autoencoder.latent_channels)
  classes = data.num_classes
  budget = config.ipc * classes * (math.prod(data.image_shape) + 1)
  decoder = decoder_parameter_count(config, data.image_shape)
  lpc = (budget - decoder) // (classes * (math.prod(shape) + 1))
  if lpc < 1:
    raise ValueError(
        f"the decoder's {decoder} parameters exceed the storage of ipc={config.ipc} images per "
        f"class ({budget} values); raise ipc, shrink autoencoder.width or set lpc explicitly")
  return int(lpc)


def derived_config(config: ml_collections.ConfigDict, lpc: int) -> ml_collections.ConfigDict:
  """The algorithm's own config for running on codes (see the module docstring)."""
  inner = copy.deepcopy(config)
  with inner.unlocked():
    inner.method = config.algorithm
    inner.ipc = lpc
    inner.outer[_LR_FIELD[config.algorithm]] = float(config.outer.lr_base) * lpc  # Eq. 10.
    del inner.outer["lr_base"]
    for block in ("pool", "experts"):
      if block in inner:
        inner[block].model_kwargs.depth = latent_depth(config)
    for name in ("algorithm", "lpc", "autoencoder", "pixel_depth"):
      del inner[name]
  return inner


def _stand_in(data, shape: tuple[int, int, int]):
  """Data of the codes' shape without codes: what the algorithm's constructor checks (class
  counts, shapes) before the autoencoder exists."""
  def zeros(n):
    return np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (n, *shape))

  return data_lib.RealData(data.name, data.num_classes, shape, data.class_names,
                           zeros(len(data.x_train)), data.y_train, zeros(len(data.x_test)),
                           data.y_test, preprocessor=None, fingerprint="stand-in")


@register_method("latent")
class LatentDD(DistillMethod):
  """LatentDC / LatentDM / LatentMTT (`config.algorithm`) on the codes of an autoencoder.

  Args:
    config: a LatentDD config (`configs/latent.py`).
    data: the (pixel) `RealData` to distil.
  """

  def __init__(self, config: ml_collections.ConfigDict, data):
    super().__init__(config, data)
    if config.algorithm not in ALGORITHMS:
      raise ValueError(f"unknown config.algorithm {config.algorithm!r}; use one of "
                       f"{', '.join(ALGORITHMS)}")
    if config.autoencoder.pretrained_dir:  # Validates the block before any work.
      autoencoder_training.check_pretrained(config)
    else:
      autoencoder_training.autoencoder_spec(config, data)
    self.code_shape = autoencoder_lib.latent_shape(data.image_shape, config.autoencoder.factor,
                                                   config.autoencoder.latent_channels)
    self.lpc = latents_per_class(config, data)
    smallest = int(data.class_counts().min())
    if self.lpc > smallest:
      raise ValueError(f"{self.lpc} codes per class (lpc) exceed the {smallest} training images "
                       f"of the smallest class of {data.name}; lower lpc (or ipc when lpc=0)")
    self.algorithm_config = derived_config(config, self.lpc)
    self.algorithm_class = get_method(config.algorithm)
    self.watched = self.algorithm_class.watched
    # Built on a stand-in now (its checks fail before any work), on the codes in `prepare`.
    self.algorithm = self.algorithm_class(self.algorithm_config, _stand_in(data, self.code_shape))
    self.autoencoder = None

  @property
  def num_steps(self) -> int:
    return self.algorithm.num_steps

  def ready(self) -> None:
    """Trains or opens the autoencoder and moves the algorithm onto the encoded data."""
    if self.autoencoder is not None:
      return
    self.autoencoder = autoencoder_training.ensure_autoencoder(self.config, self.data)
    train, test = self.autoencoder.encode_splits(self.data)
    self.latent_data = self.data.replace(x_train=train, x_test=test, image_shape=self.code_shape,
                                         preprocessor=None)
    self.algorithm = self.algorithm_class(self.algorithm_config, self.latent_data)

  def prepare(self) -> None:
    self.ready()
    self.algorithm.prepare()

  def init(self, key):
    return self.algorithm.init(key)

  def inputs(self, step: int):
    return self.algorithm.inputs(step)

  def step(self, state, inputs):
    return self.algorithm.step(state, inputs)

  def latent_set(self, codes: Any, method: str) -> LatentSet:
    """Codes `(C * LPC, h, w, c)`, sorted by class, as a latent set with the decoder."""
    self.ready()
    meta = dataclasses.replace(self.data.set_meta(method, self.lpc),
                               decoder=json.dumps(self.autoencoder.decoder_spec(), sort_keys=True))
    labels = np.repeat(np.arange(self.data.num_classes, dtype=np.int32), self.lpc)
    return LatentSet(z=np.asarray(codes, np.float32), y=labels,
                     decoder=jax.tree.map(np.asarray, self.autoencoder.decoder_params()),
                     meta=meta)

  def result(self, state) -> LatentSet:
    """The distilled codes (the algorithm's images) with the decoder; MTT's learned lr is not
    kept: the paper evaluates at lr 0.01 (Appendix A.2)."""
    return self.latent_set(self.algorithm.result(state).x, f"latent_{self.config.algorithm}")

  def divergence_hint(self) -> str:
    return f"lower outer.lr_base (now {self.config.outer.lr_base}); " + \
        self.algorithm.divergence_hint()

  def baselines(self) -> dict[str, Any]:
    """The same autoencoder's random real codes at the same LPC, decoded (the initialisation;
    the paper's Table 7 "Initial")."""
    self.ready()
    codes, _ = data_lib.random_subset(self.latent_data.x_train, self.latent_data.y_train,
                                      ipc=self.lpc, num_classes=self.data.num_classes,
                                      seed=self.config.seed)
    return {"random_latents": self.latent_set(codes, "random_latents")}

  def report_extras(self, distilled_set, workdir) -> dict[str, Any]:
    """The algorithm's extras (LatentMTT: its expert buffer on codes) and the autoencoder,
    LPC, budget and storage without the decoder."""
    self.ready()
    return {**self.algorithm.report_extras(distilled_set, workdir), "latent": {
        "algorithm": self.config.algorithm,
        "lpc": self.lpc,
        "ipc_budget": self.config.ipc,
        "code_shape": list(self.code_shape),
        "autoencoder_dir": self.autoencoder.path,
        "reconstruction_mse": self.autoencoder.reconstruction_mse,
        "decoder_parameters": autoencoder_lib.num_parameters(distilled_set.decoder),
        "decoder_counted": not distilled_set.decoder_is_public,
        "storage_mb_without_decoder": distilled_set.storage_without_decoder() / 2**20,
    }}
