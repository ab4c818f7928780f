"""DC / DSA: dataset condensation with gradient matching (Zhao, Mopuri & Bilen, ICLR 2021), with
differentiable Siamese augmentation (Zhao & Bilen, ICML 2021) when `outer.dsa_strategy` is set.

Every iteration (VICO-UoE/DatasetCondensation `main.py`, `outer_loop, inner_loop = get_loops(ipc)`):

  a fresh random network; then `outer_loop` times:
    1. for every class c: the gradient of the cross-entropy of a real batch of c and of the
       class's synthetic images w.r.t. the network's parameters (both augmented with one shared
       DSA draw under DSA), matched with DC's layer-wise distance
       `sum over layers and output units (1 - cos)` (`objectives.gradient_matching_loss`,
       `distance="cosine"`, the released `dis_metric='ours'`); the loss is summed over classes;
    2. one SGD step with momentum 0.5 on the synthetic images;
    3. except after the last matching: `inner_loop` epochs of training the network on the
       synthetic set (SGD at `inner.lr`, batches of `inner.batch_size`, DSA per batch under DSA).
       The released code trains it on the synthetic images here (paper Algorithm 1, line 10:
       `opt-alg(L^S)`), not on real data. `inner.data="real"` trains it instead for
       `inner.epochs` SGD steps on random real batches of `inner.batch_size` (IDC, Kim et al.
       2022, which LatentDC follows: paper 002 section 3.3.1 and Algorithm 1, lines 12-13).

One loop step here is one matching update (1-3), so a run has `num_steps * outer_loop` steps; the
network, its optimiser state and the position in the outer loop are part of the state, and a new
network is drawn whenever the position is 0. The inner training loop is unrolled on CPU and a
`lax.scan` on accelerators (`_pixels.resolve_loop`).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill_jax import distilled as distilled_lib
from distill_jax.data import augment
from distill_jax.methods import _pixels
from distill_jax.methods.base import DistillMethod, register_method
from distill_jax.objectives import gradient_matching_loss
from distill_jax.training import epoch_batch

Array = jax.Array
PyTree = Any

# What the network trains on between matches: the released DC's synthetic set, or IDC's real data.
INNER_DATA = ("synthetic", "real")

# utils.py get_loops: (outer_loop, inner_loop) by ipc; the released code exits for other ipcs.
LOOPS_BY_IPC = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


@flax.struct.dataclass
class DCState:
  """A DC run's state (what the checkpoints hold).

  Attributes:
    x_syn: (C * ipc, H, W, channels) synthetic images, sorted by class.
    opt_state: SGD-momentum state of `x_syn`.
    net: the current network's parameters.
    net_opt_state: its SGD state.
    position: () int32, matching updates done with this network (0 = draw a new one).
    key: typed PRNG key of the next update.
  """

  x_syn: Array
  opt_state: Any
  net: PyTree
  net_opt_state: Any
  position: Array
  key: Array


def loops_for(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """`(outer_loop, inner_loop)`: `outer.loops`/`inner.epochs` when set (> 0), else the released
  table for `config.ipc`, else (ours) the row of the largest table ipc below it."""
  row = LOOPS_BY_IPC[max(i for i in LOOPS_BY_IPC if i <= config.ipc)]
  return (config.outer.loops or row[0], config.inner.epochs or row[1])


@register_method("dc")
class DC(DistillMethod):
  """Gradient matching with a network trained on the synthetic set between matches.

  Args:
    config: a DC config (`configs/dc.py`).
    data: the `RealData` to distil.
  """

  def __init__(self, config: ml_collections.ConfigDict, data):
    super().__init__(config, data)
    _pixels.positive_int(config, "inner.batch_size")
    for name in ("outer.loops", "inner.epochs"):
      _pixels.positive_int(config, name, zero_means="the released table")
    self.model, self.tx = _pixels.random_network(config, data)
    self.outer_loop, self.inner_loop = loops_for(config)
    self.net_tx = optax.sgd(config.inner.lr)  # main.py: SGD(net.parameters(), lr=args.lr_net).
    self.unroll = _pixels.resolve_loop(config.inner.loop) == "unrolled"
    self.y_syn = _pixels.initial_labels(data.num_classes, config.ipc)
    if config.inner.data not in INNER_DATA:
      raise ValueError(f"unknown config.inner.data {config.inner.data!r}; use one of "
                       f"{', '.join(INNER_DATA)}")

  @property
  def num_steps(self) -> int:
    """Matching updates: `num_steps` iterations x `outer_loop` updates each."""
    return self.config.num_steps * self.outer_loop

  def init(self, key: Array) -> DCState:
    init_key, net_key, run_key = jax.random.split(key, 3)
    x_syn = _pixels.initial_images(self.data, ipc=self.config.ipc, seed=self.config.seed,
                                   init=self.config.init, key=init_key)
    net = self.model.init(net_key, x_syn[:1], train=False)["params"]
    return DCState(x_syn=x_syn, opt_state=self.tx.init(x_syn), net=net,
                   net_opt_state=self.net_tx.init(net), position=jnp.zeros((), jnp.int32),
                   key=run_key)

  def inputs(self, step: int) -> tuple[Array, Array]:
    """The real training set on the device (the step draws its class batches from it)."""
    del step
    return self.device_train_set

  def cross_entropy(self, params: PyTree, x: Array, label: int | Array) -> Array:
    """Mean cross-entropy of the network on `x` (B, H, W, ch) against class id(s) `label`."""
    logits = self.model.apply({"params": params}, x, train=True)
    labels = jnp.broadcast_to(jnp.asarray(label, jnp.int32), logits.shape[:1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  def loss(self, x_syn: Array, x_real: Array, params: PyTree, key: Array) -> Array:
    """`sum_c D(grad L(real_c), grad L(syn_c))` with DC's layer-wise cosine distance.

    Args:
      x_syn: (C * ipc, H, W, ch) synthetic images, sorted by class.
      x_real: (C, B, H, W, ch) real images by class.
      params: the network's parameters.
      key: the DSA key of this update (one Siamese draw per class).
    """
    num_classes = x_real.shape[0]
    x_syn = x_syn.reshape(num_classes, self.config.ipc, *x_syn.shape[1:])
    keys = jax.random.split(key, num_classes)
    total = jnp.zeros((), jnp.float32)
    # A Python loop over classes: one gradient per class, as released (vmapping the weight
    # gradients over classes would become grouped convolutions, slow on XLA:CPU).
    for c in range(num_classes):
      real, syn = _pixels.siamese_dsa(keys[c], x_real[c], x_syn[c],
                                      strategy=self.config.outer.dsa_strategy)
      grad_real = jax.lax.stop_gradient(jax.grad(self.cross_entropy)(params, real, c))
      grad_syn = jax.grad(self.cross_entropy)(params, syn, c)
      total = total + gradient_matching_loss(grad_syn, grad_real,
                                             distance=self.config.outer.distance)
    return total

  def train_network(self, params: PyTree, opt_state: Any, x_syn: Array, key: Array,
                    real: tuple[Array, Array]):
    """`inner_loop` epochs of SGD on the synthetic set (main.py's `epoch('train', ...)`), or
    with `inner.data="real"` `inner_loop` SGD steps on uniformly drawn real batches `real`
    (`(x_train, y_train)`; IDC / LatentDC Algorithm 1)."""
    inner = self.config.inner
    on_real = inner.data == "real"
    x_pool, y_pool = real if on_real else (jax.lax.stop_gradient(x_syn), jnp.asarray(self.y_syn))
    num_train = x_pool.shape[0]
    batch = min(inner.batch_size, num_train)
    per_epoch = 1 if on_real else -(-num_train // batch)
    shuffle_key, aug_key = jax.random.split(key)

    def one_step(carry, t):
      params, opt_state = carry
      if on_real:
        index = jax.random.randint(jax.random.fold_in(shuffle_key, t), (batch,), 0, num_train)
        weights = jnp.ones((batch,), jnp.float32)
      else:
        index, weights = epoch_batch(shuffle_key, t, num_train=num_train, batch_size=batch,
                                     steps_per_epoch=per_epoch)
      x = x_pool[index]
      if self.config.outer.dsa_strategy:
        x = augment.dsa(jax.random.fold_in(aug_key, t), x,
                        strategy=self.config.outer.dsa_strategy, mode="single")

      def weighted_ce(p):
        logits = self.model.apply({"params": p}, x, train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_pool[index])
        return jnp.sum(ce * weights) / jnp.sum(weights)

      grads = jax.grad(weighted_ce)(params)
      updates, opt_state = self.net_tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    steps = self.inner_loop * per_epoch
    (params, opt_state), _ = jax.lax.scan(one_step, (params, opt_state), jnp.arange(steps),
                                          unroll=True if self.unroll else 1)
    return params, opt_state

  def step(self, state: DCState, inputs: tuple[Array, Array]) -> tuple[DCState, dict[str, Array]]:
    x_train, y_train = inputs
    key, net_key, real_key, aug_key, train_key = jax.random.split(state.key, 5)
    # A fresh network at the start of every iteration (main.py: get_network per iteration).
    fresh = state.position == 0
    new_net = self.model.init(net_key, state.x_syn[:1], train=False)["params"]
    net = jax.tree.map(lambda a, b: jnp.where(fresh, a, b), new_net, state.net)
    net_opt_state = jax.tree.map(lambda a, b: jnp.where(fresh, a, b), self.net_tx.init(new_net),
                                 state.net_opt_state)
    x_real = _pixels.real_class_batches(real_key, x_train, y_train,
                                        per_class=self.config.outer.real_batch_size,
                                        num_classes=self.data.num_classes)
    loss, grad = jax.value_and_grad(self.loss)(state.x_syn, x_real, net, aug_key)
    updates, opt_state = self.tx.update(grad, state.opt_state, state.x_syn)
    x_syn = optax.apply_updates(state.x_syn, updates)
    position = (state.position + 1) % self.outer_loop
    if self.outer_loop > 1:
      # Trained unconditionally and kept unless this was the iteration's last match: XLA:CPU
      # runs convolution gradients inside a `cond` branch many times slower.
      trained, trained_opt = self.train_network(net, net_opt_state, x_syn, train_key,
                                                (x_train, y_train))
      keep = position != 0
      net = jax.tree.map(lambda a, b: jnp.where(keep, a, b), trained, net)
      net_opt_state = jax.tree.map(lambda a, b: jnp.where(keep, a, b), trained_opt, net_opt_state)
    new_state = DCState(x_syn=x_syn, opt_state=opt_state, net=net, net_opt_state=net_opt_state,
                        position=position, key=key)
    return new_state, {"loss": loss, "grad_norm_x": jnp.linalg.norm(grad)}

  def result(self, state: DCState) -> distilled_lib.PixelSet:
    return distilled_lib.PixelSet(
        x=np.asarray(state.x_syn), y=self.y_syn,
        meta=self.data.set_meta("dc", self.config.ipc),
    )

  def divergence_hint(self) -> str:
    return f"lower outer.lr (now {self.config.outer.lr})"
