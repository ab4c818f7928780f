"""The embedded autoencoder of LatentDD: trained once per recipe and data, cached, resumable.

`ensure_autoencoder(config, data)` returns a `TrainedAutoencoder` for the `autoencoder` block of a
LatentDD config: it trains `models.autoencoder.ConvAutoencoder` on the (preprocessed) training
split with Adam on the mean squared reconstruction error

  L(theta) = mean_{i, h, w, ch} (decode(encode(x_i)) - x_i)^2

(ours: the paper uses SD's pretrained autoencoder, section 4.1), saving an Orbax checkpoint after
every epoch into `$DISTILL_JAX_CACHE/autoencoders/<digest>/`, where the digest covers the recipe,
the architecture and `RealData.fingerprint`; a killed training resumes from its last epoch and a
finished one is opened without training. The codes of the whole training and evaluation splits
(`encode_splits`) are computed once and cached beside the checkpoints ("L_T is precomputed and
stored", section 3.2).
"""

import abc
import dataclasses
import hashlib
import io
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from distill_jax.io import checkpoint as checkpoint_lib
from distill_jax.io._atomic import atomic_write, atomic_write_text
from distill_jax.models import autoencoder as autoencoder_lib
from distill_jax.training import experts

FORMAT_VERSION = 1
_SPEC_FILE = "autoencoder.json"


@dataclasses.dataclass(frozen=True)
class AutoencoderSpec:
  """Everything that decides the autoencoder's weights; its digest names the cache folder.

  Attributes:
    data_fingerprint: `RealData.fingerprint` of the training split.
    image_shape: `(H, W, ch)`.
    factor, latent_channels, width: the `ConvAutoencoder` architecture.
    epochs, batch_size, lr, seed: Adam on the reconstruction MSE, shuffled by `seed`.
  """

  data_fingerprint: str
  image_shape: tuple[int, int, int]
  factor: int
  latent_channels: int
  width: int
  epochs: int
  batch_size: int
  lr: float
  seed: int

  def digest(self) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["image_shape"] = list(self.image_shape)
    return out

  def make_model(self) -> autoencoder_lib.ConvAutoencoder:
    return autoencoder_lib.ConvAutoencoder(
        factor=self.factor, latent_channels=self.latent_channels,
        out_channels=self.image_shape[-1], width=self.width)


def autoencoder_spec(config: ml_collections.ConfigDict, data) -> AutoencoderSpec:
  """The spec of `config.autoencoder.{factor, latent_channels, width, epochs, batch_size, lr,
  seed}` for `data`, after one-line checks of the values."""
  a = config.autoencoder
  for name in ("factor", "latent_channels", "width", "epochs", "batch_size"):
    value = a[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.autoencoder.{name} must be a positive int, got {value!r}")
  autoencoder_lib.latent_shape(data.image_shape, a.factor, a.latent_channels)
  return AutoencoderSpec(
      data_fingerprint=data.fingerprint, image_shape=tuple(data.image_shape), factor=a.factor,
      latent_channels=a.latent_channels, width=a.width, epochs=a.epochs,
      batch_size=a.batch_size, lr=float(a.lr), seed=int(a.seed))


class _CachedCodes(abc.ABC):
  """`encode_splits`: the codes of both splits, computed once and cached in `self.path`."""

  path: str

  @abc.abstractmethod
  def encode(self, x: Any, *, batch_size: int = 1000) -> np.ndarray:
    """`(N, H, W, ch)` preprocessed images -> `(N, h, w, c)` float32 codes."""

  def encode_splits(self, data) -> tuple[np.ndarray, np.ndarray]:
    """Codes of `data.x_train` and `data.x_test`, cached in the folder (`latents-<fp>.npz`)."""
    path = os.path.join(self.path, f"latents-{data.fingerprint}.npz")
    if os.path.exists(path):
      try:
        with np.load(path) as cached:
          return cached["train"], cached["test"]
      except (OSError, ValueError, KeyError) as e:  # A damaged cache: encode again.
        logging.warning("re-encoding: cannot read %s (%s)", path, e)
    train, test = self.encode(data.x_train), self.encode(data.x_test)
    buffer = io.BytesIO()
    np.savez(buffer, train=train, test=test)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return train, test


def _batched(apply, x: Any, batch_size: int) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return np.concatenate([np.asarray(apply(x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)])


@dataclasses.dataclass(frozen=True)
class TrainedAutoencoder(_CachedCodes):
  """A trained autoencoder: its module, parameters and cache folder.

  Attributes:
    model: the `ConvAutoencoder`.
    params: its "params" collection (`{"encoder": ..., "decoder": ...}`).
    path: the cache folder.
    reconstruction_mse: final-epoch mean training reconstruction error (preprocessed units).
  """

  model: autoencoder_lib.ConvAutoencoder
  params: Any
  path: str
  reconstruction_mse: float

  def encode(self, x: Any, *, batch_size: int = 1000) -> np.ndarray:
    """`(N, H, W, ch)` images -> `(N, h, w, c)` float32 codes, in batches."""
    apply = jax.jit(lambda b: self.model.apply({"params": self.params}, b, method="encode"))
    return _batched(apply, x, batch_size)

  def decoder_params(self) -> Any:
    return self.params["decoder"]

  def decoder_spec(self) -> dict[str, Any]:
    return self.model.decoder_spec()


@dataclasses.dataclass(frozen=True)
class PretrainedAutoencoder(_CachedCodes):
  """A user's local Stable Diffusion autoencoder (`autoencoder.pretrained_dir`), used as the
  paper does: [0, 1] images upsampled by `upsample`, encoded to `mean * scaling_factor`; the
  decoder's output average-pooled back (`models.autoencoder_kl`). Its decoder is public: the
  set names it by folder and weights digest and storage does not count it.

  Attributes:
    module, params: the `AutoencoderKL` and its parameters.
    folder: the diffusers folder the weights came from; `digest`: their sha256 (16 hex).
    upsample: KL factor / the config's `autoencoder.factor`.
    preprocessor: the data's (codes are made from its inverse, decodes preprocessed again).
    channels: the data's image channels.
    path: the cache folder of the codes.
    reconstruction_mse: mean squared error of decode(encode(x)) over up to 256 training
      images, in preprocessed units.
  """

  module: Any
  params: Any
  folder: str
  digest: str
  upsample: int
  preprocessor: Any
  channels: int
  path: str
  reconstruction_mse: float = float("nan")

  def encode(self, x: Any, *, batch_size: int = 100) -> np.ndarray:
    from distill_jax.models import autoencoder_kl

    def apply(b):
      unit = self.preprocessor.invert(b) if self.preprocessor is not None else b
      inputs = autoencoder_kl.from_unit_pixels(unit, upsample=self.upsample,
                                               in_channels=self.module.config.in_channels)
      return self.module.apply({"params": self.params}, inputs, method="encode")

    return _batched(jax.jit(apply), x, batch_size)

  def decoder_params(self) -> Any:
    return {"decoder": self.params["decoder"], "post_quant_conv": self.params["post_quant_conv"]}

  def decoder_spec(self) -> dict[str, Any]:
    from distill_jax.models import autoencoder_kl

    return autoencoder_kl.decoder_spec(
        self.module.config, downsample=self.upsample, channels=self.channels,
        public=f"{os.path.basename(os.path.normpath(self.folder))} sha256:{self.digest}")


def check_pretrained(config: ml_collections.ConfigDict) -> None:
  """One-line errors, before any work, when `autoencoder.pretrained_dir` holds no diffusers
  AutoencoderKL or one whose factor or channels do not fit `autoencoder.factor` and
  `latent_channels` (reads config.json and checks that a weights file exists)."""
  from distill_jax.models import autoencoder_kl

  folder = config.autoencoder.pretrained_dir
  kl_config = autoencoder_kl.read_config(folder)
  if not any(os.path.exists(os.path.join(folder, n))
             for n in (autoencoder_kl.FLAX_WEIGHTS, autoencoder_kl.SAFETENSORS_WEIGHTS)):
    raise autoencoder_kl.AutoencoderKLError(
        f"no {autoencoder_kl.FLAX_WEIGHTS} or {autoencoder_kl.SAFETENSORS_WEIGHTS} in {folder}")
  kl_factor, factor = kl_config.factor, config.autoencoder.factor
  if not isinstance(factor, int) or factor < 1 or factor > kl_factor or kl_factor % factor:
    raise ValueError(f"config.autoencoder.factor={factor} must divide the autoencoder's factor "
                     f"{kl_factor} (the images are upsampled by the quotient); set it to "
                     f"{max(kl_factor // 2, 1)} (the paper's f = 4 for SD's 8)")
  if config.autoencoder.latent_channels != kl_config.latent_channels:
    raise ValueError(f"config.autoencoder.latent_channels={config.autoencoder.latent_channels} "
                     f"but {folder} makes {kl_config.latent_channels}-channel codes; set it to "
                     f"{kl_config.latent_channels}")


def pretrained_autoencoder(config: ml_collections.ConfigDict, data) -> PretrainedAutoencoder:
  """The AutoencoderKL in `config.autoencoder.pretrained_dir` for `data` (one-line errors when
  its factor and the config's `autoencoder.factor` do not fit)."""
  from distill_jax.distilled import LatentSet, SetMeta
  from distill_jax.models import autoencoder_kl

  folder = config.autoencoder.pretrained_dir
  check_pretrained(config)
  module, params = autoencoder_kl.load_autoencoder_kl(folder)
  kl_factor, factor = module.config.factor, config.autoencoder.factor
  digest = autoencoder_kl.weights_digest(folder)
  path = os.path.join(experts.cache_root("autoencoders"), f"kl-{digest}-u{kl_factor // factor}")
  os.makedirs(path, exist_ok=True)
  auto = PretrainedAutoencoder(module=module, params=params, folder=folder, digest=digest,
                               upsample=kl_factor // factor, preprocessor=data.preprocessor,
                               channels=data.image_shape[-1], path=path)
  sample = np.asarray(data.x_train[:256], np.float32)
  codes = auto.encode(sample)
  meta = dataclasses.replace(data.set_meta("probe", 1),
                             decoder=json.dumps(auto.decoder_spec(), sort_keys=True))
  probe = LatentSet(z=codes, y=np.zeros(len(codes), np.int32), decoder=auto.decoder_params(),
                    meta=meta)
  mse = float(np.mean((np.asarray(probe.decode(codes)) - sample) ** 2))
  return dataclasses.replace(auto, reconstruction_mse=mse)


def ensure_autoencoder(config: ml_collections.ConfigDict, data
                       ) -> TrainedAutoencoder | PretrainedAutoencoder:
  """The autoencoder `config.autoencoder` asks for: the user's pretrained one when
  `pretrained_dir` is set, else the embedded one, trained first where the cache lacks it."""
  if config.autoencoder.pretrained_dir:
    return pretrained_autoencoder(config, data)
  spec = autoencoder_spec(config, data)
  path = os.path.join(experts.cache_root("autoencoders"), spec.digest())
  os.makedirs(path, exist_ok=True)
  with experts.file_lock(path):
    spec_path = os.path.join(path, _SPEC_FILE)
    if not os.path.exists(spec_path):
      atomic_write_text(spec_path, json.dumps({"format": FORMAT_VERSION, "spec": spec.to_dict()},
                                              indent=1))
    return _train(spec, data, path)


def _loss(model, params, x):
  return jnp.mean((model.apply({"params": params}, x) - x) ** 2)


def _train(spec: AutoencoderSpec, data, path: str) -> TrainedAutoencoder:
  model = spec.make_model()
  tx = optax.adam(spec.lr)
  x_train = np.asarray(data.x_train, np.float32)
  n = len(x_train)
  batch = min(spec.batch_size, n)
  steps = n // batch  # Full batches only (drop_last): every step has the same shape.
  params = model.init(jax.random.key(spec.seed), x_train[:1])["params"]
  state = {"params": params, "opt_state": tx.init(params), "mse": jnp.zeros((), jnp.float32)}
  ckpt = checkpoint_lib.Checkpointer(os.path.join(path, "checkpoints"), max_to_keep=1)
  try:
    done = ckpt.latest_step() or 0
    if done:
      state = ckpt.restore(done, state)
    if done < spec.epochs:
      logging.info("autoencoder: training epochs %d..%d into %s", done + 1, spec.epochs, path)

    @jax.jit
    def train_step(state, x):
      loss, grads = jax.value_and_grad(lambda p: _loss(model, p, x))(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
              "mse": loss}, loss

    x_device = jnp.asarray(x_train)
    for epoch in range(done + 1, spec.epochs + 1):
      order = np.random.default_rng((spec.seed, epoch)).permutation(n)
      losses = []
      for s in range(steps):
        state, loss = train_step(state, x_device[order[s * batch:(s + 1) * batch]])
        losses.append(loss)
      state["mse"] = jnp.mean(jnp.stack(losses))
      logging.info("autoencoder: epoch %d/%d reconstruction mse %.5f", epoch, spec.epochs,
                   float(state["mse"]))
      ckpt.save(epoch, state)
    ckpt.wait()
  finally:
    ckpt.close()
  return TrainedAutoencoder(model=model, params=state["params"], path=path,
                            reconstruction_mse=float(state["mse"]))
