"""DM: dataset condensation with distribution matching (Zhao & Bilen, WACV 2023).

Every iteration (VICO-UoE/DatasetCondensation `main_DM.py`, the ConvNet branch):

  1. initialise a fresh random network (no training; its parameters get no gradient);
  2. for every class c: draw `real_batch_size` real images of c, augment them and the class's
     synthetic images with one shared DSA draw (Siamese augmentation), and embed both with the
     network (the features before its classifier, `embed`);
  3. `loss = sum_c ||mean(embed(x_real_c)) - mean(embed(x_syn_c))||^2`
     (`objectives.mean_embedding_loss` per class; LatentDD Eq. 6-7 writes the same);
  4. one SGD step with momentum 0.5 on the synthetic images.

The whole iteration is one jitted program of the state (images, optimiser state, key); the
random network and the real batches come from the key, so a killed run resumes exactly.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill_jax import distilled as distilled_lib
from distill_jax.methods import _pixels
from distill_jax.methods.base import DistillMethod, register_method
from distill_jax.objectives import mean_embedding_loss

Array = jax.Array


@flax.struct.dataclass
class DMState:
  """A DM run's state (what the checkpoints hold).

  Attributes:
    x_syn: (C * ipc, H, W, channels) synthetic images, sorted by class.
    opt_state: SGD-momentum state of `x_syn`.
    key: typed PRNG key of the next iteration.
  """

  x_syn: Array
  opt_state: Any
  key: Array


@register_method("dm")
class DM(DistillMethod):
  """Distribution matching with random networks (see the module docstring).

  Args:
    config: a DM config (`configs/dm.py`).
    data: the `RealData` to distil.
  """

  def __init__(self, config: ml_collections.ConfigDict, data):
    super().__init__(config, data)
    self.model, self.tx = _pixels.random_network(config, data)

  def init(self, key: Array) -> DMState:
    init_key, run_key = jax.random.split(key)
    x_syn = _pixels.initial_images(self.data, ipc=self.config.ipc, seed=self.config.seed,
                                   init=self.config.init, key=init_key)
    return DMState(x_syn=x_syn, opt_state=self.tx.init(x_syn), key=run_key)

  def inputs(self, step: int) -> tuple[Array, Array]:
    """The real training set on the device (the step draws its class batches from it)."""
    del step
    return self.device_train_set

  def loss(self, x_syn: Array, x_real: Array, params, key: Array) -> Array:
    """`sum_c ||mean embed(x_real_c) - mean embed(x_syn_c)||^2` under Siamese DSA per class.

    Args:
      x_syn: (C * ipc, H, W, ch) synthetic images, sorted by class.
      x_real: (C, B, H, W, ch) real images by class.
      params: the random network's parameters.
      key: the DSA key of this iteration.
    """
    num_classes, ipc = x_real.shape[0], self.config.ipc
    x_syn = x_syn.reshape(num_classes, ipc, *x_syn.shape[1:])
    keys = jax.random.split(key, num_classes)
    # One DSA draw per class (a Python loop: each class's op is its own `lax.switch`, which
    # vmap would turn into evaluating every op), then one forward pass for all classes.
    pairs = [_pixels.siamese_dsa(keys[c], x_real[c], x_syn[c],
                                 strategy=self.config.outer.dsa_strategy)
             for c in range(num_classes)]
    real = jnp.concatenate([r for r, _ in pairs])
    syn = jnp.concatenate([s for _, s in pairs])

    def embed(x):
      return self.model.apply({"params": params}, x, train=True,
                              return_features=True)[1]["penultimate"]

    feat_real = jax.lax.stop_gradient(embed(real)).reshape(num_classes, x_real.shape[1], -1)
    feat_syn = embed(syn).reshape(num_classes, ipc, -1)
    return sum(mean_embedding_loss(feat_real[c], feat_syn[c]) for c in range(num_classes))

  def step(self, state: DMState, inputs: tuple[Array, Array]) -> tuple[DMState, dict[str, Array]]:
    x_train, y_train = inputs
    key, net_key, real_key, aug_key = jax.random.split(state.key, 4)
    params = self.model.init(net_key, state.x_syn[:1], train=False)["params"]
    x_real = _pixels.real_class_batches(real_key, x_train, y_train,
                                        per_class=self.config.outer.real_batch_size,
                                        num_classes=self.data.num_classes)
    loss, grad = jax.value_and_grad(self.loss)(state.x_syn, x_real, params, aug_key)
    updates, opt_state = self.tx.update(grad, state.opt_state, state.x_syn)
    new_state = DMState(x_syn=optax.apply_updates(state.x_syn, updates), opt_state=opt_state,
                        key=key)
    return new_state, {"loss": loss, "grad_norm_x": jnp.linalg.norm(grad)}

  def result(self, state: DMState) -> distilled_lib.PixelSet:
    return distilled_lib.PixelSet(
        x=np.asarray(state.x_syn),
        y=_pixels.initial_labels(self.data.num_classes, self.config.ipc),
        meta=self.data.set_meta("dm", self.config.ipc),
    )

  def divergence_hint(self) -> str:
    return f"lower outer.lr (now {self.config.outer.lr})"
