"""FRePo's model pool: networks trained online on the current synthetic set (Zhou et al. 2022).

FRePo (Section 2.2, "Model Pool", and Algorithm 1) keeps `m` networks at different stages of
training. Every outer step picks one member, uses its feature extractor for the meta-gradient and
trains it for one step on the current synthetic set; a member that has been updated more than
`K` times is re-initialised from scratch. The members start at staggered step counters
`(K // m) * i` (the authors' released code, `lib/datadistillation/frepo.py`), so the pool holds
networks at every stage of training from the first step on.

Everything here is a pure function of explicit state and keys, jittable with a traced member
index, so one jitted program can choose, use, train and reset a member.

>>> import jax, jax.numpy as jnp
>>> from distill_jax.models import get_model
>>> model = get_model("convnet", num_classes=3, width=4, depth=2, norm="batch")
>>> pool = ModelPool(model, input_shape=(8, 8, 1), num_models=4, max_online_updates=10)
>>> state = jax.jit(pool.init)(jax.random.key(0))
>>> state.step.tolist()  # Staggered start: (10 // 4) * i.
[0, 2, 4, 6]
>>> member = pool.member(state, jnp.asarray(1))
>>> jax.jit(pool.features)(member, jnp.zeros((5, 8, 8, 1))).shape
(5, 36)
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from distill_jax.training.trainer import loss_and_grads

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class MemberState:
  """One network of the pool, or the whole pool with a leading `(num_models,)` axis on every leaf.

  Attributes:
    params: the network's "params" collection.
    batch_stats: its "batch_stats" collection (running batch-norm statistics); `{}` without
      batch norm.
    opt_state: the optax state of its online optimiser.
    step: int32 online updates since the last (re-)initialisation; shape `()` for a member,
      `(num_models,)` for the pool.
  """

  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  step: Array


@dataclasses.dataclass(frozen=True)
class ModelPool:
  """A pool of `num_models` networks of one architecture, trained online and reset after K steps.

  Attributes:
    model: a Flax module following the `distill_jax.models` call convention
      (`apply(variables, x, train=..., return_features=..., mutable=...)`).
    input_shape: `(H, W, C)` of one input image.
    num_models: pool size m (FRePo: 10).
    max_online_updates: K; a member whose step counter exceeds K is re-initialised instead of
      trained (FRePo: 100; the released code resets when `step > K`).
    optimizer: the members' online optimiser (FRePo: Adam, constant lr 3e-4, no weight decay).
    loss_fn: `loss_fn(logits (B, C), targets (B, C)) -> (B,)` per-example training loss,
      averaged over the batch (FRePo: MSE, `0.5 * sum_c (logits - targets)^2`,
      `Recipe(loss="mse").per_example_loss`).
  """

  model: nn.Module
  input_shape: tuple[int, int, int]
  num_models: int = 10
  max_online_updates: int = 100
  optimizer: optax.GradientTransformation = dataclasses.field(
      default_factory=lambda: optax.adam(3e-4)
  )
  loss_fn: Callable[[Array, Array], Array] = lambda logits, y: 0.5 * jnp.sum((logits - y) ** 2, -1)

  def __post_init__(self) -> None:
    if not isinstance(self.num_models, int) or self.num_models < 1:
      raise ValueError(f"num_models must be a positive int, got {self.num_models!r}")
    if not isinstance(self.max_online_updates, int) or self.max_online_updates < 0:
      raise ValueError(
          f"max_online_updates must be a non-negative int, got {self.max_online_updates!r}"
      )
    if len(self.input_shape) != 3:
      raise ValueError(f"input_shape must be (H, W, C), got {self.input_shape!r}")

  def init_member(self, key: Array) -> MemberState:
    """A freshly initialised member with step counter 0 (FRePo's `theta ~ P_theta`)."""
    variables = self.model.init(key, jnp.zeros((1, *self.input_shape), jnp.float32), train=False)
    params = variables["params"]
    return MemberState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=self.optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
    )

  def init(self, key: Array) -> MemberState:
    """The initial pool: `num_models` independent members at staggered step counters.

    Member i starts with step counter `(K // m) * i` (released code), so members reach their
    reset at different outer steps.

    Returns:
      a `MemberState` whose leaves have a leading `(num_models,)` axis.
    """
    pool = jax.vmap(self.init_member)(jax.random.split(key, self.num_models))
    offsets = (self.max_online_updates // self.num_models) * jnp.arange(
        self.num_models, dtype=jnp.int32
    )
    return pool.replace(step=offsets)

  def member(self, pool: MemberState, index: Array) -> MemberState:
    """Member `index` (a traced int scalar is fine) of a stacked pool."""
    return jax.tree.map(lambda leaf: leaf[index], pool)

  def set_member(self, pool: MemberState, index: Array, member: MemberState) -> MemberState:
    """The pool with member `index` replaced by `member`."""
    return jax.tree.map(lambda leaf, new: leaf.at[index].set(new), pool, member)

  def variables(self, member: MemberState) -> dict[str, PyTree]:
    """The Flax variables of a member, for `model.apply`."""
    if member.batch_stats:
      return {"params": member.params, "batch_stats": member.batch_stats}
    return {"params": member.params}

  def features(self, member: MemberState, x: Array) -> Array:
    """FRePo's feature map f(x, theta): the flattened input of the final Dense layer.

    Evaluated in inference mode (batch norm uses the member's running statistics), as the
    released code's `nn_feat_fn` does.

    Args:
      member: one member (no leading pool axis).
      x: (B, H, W, C) images.

    Returns:
      (B, D) features.
    """
    _, features = self.model.apply(
        self.variables(member), x, train=False, return_features=True
    )
    return features["penultimate"]

  def train_step(self, member: MemberState, x: Array, y: Array) -> tuple[MemberState, Array]:
    """One online optimiser step of a member on `(x, y)` (Algorithm 1, line 6).

    Batch norm runs in training mode (batch statistics) and updates the running statistics.

    Args:
      member: one member.
      x: (B, H, W, C) training images (gradients do not flow into them).
      y: (B, C) float targets.

    Returns:
      the updated member (step counter + 1) and the loss before the step (scalar).
    """
    x, y = jax.lax.stop_gradient(x), jax.lax.stop_gradient(y)
    model_state = {"batch_stats": member.batch_stats} if member.batch_stats else {}
    # The shared trainer's forward/backward (a weighted mean; all weights 1 here).
    (loss, updates), grads = loss_and_grads(self.model, member.params, model_state, x, y,
                                            jnp.ones(x.shape[0]), self.loss_fn, rngs=None)
    param_updates, opt_state = self.optimizer.update(grads, member.opt_state, member.params)
    new_member = MemberState(
        params=optax.apply_updates(member.params, param_updates),
        batch_stats=updates.get("batch_stats", member.batch_stats),
        opt_state=opt_state,
        step=member.step + 1,
    )
    return new_member, loss

  def online_update(
      self, member: MemberState, x: Array, y: Array, key: Array
  ) -> tuple[MemberState, Array, Array]:
    """Trains a member one step on `(x, y)`, or re-initialises it from `key` after K updates.

    Algorithm 1, lines 6-7, in the released code's form: a member whose step counter exceeds
    `max_online_updates` is replaced by a fresh one (step 0) and not trained this time.

    Args:
      member: one member.
      x: (B, H, W, C) training images.
      y: (B, C) float targets.
      key: PRNG key of the re-initialisation.

    Returns:
      `(member, online_loss, was_reset)`: the new member, the training loss before the step
      (0 when reset) and a bool scalar.
    """
    was_reset = member.step > self.max_online_updates
    # The training step runs unconditionally and is discarded on a reset: XLA:CPU runs the
    # convolutions of a backward pass inside a `cond` branch or loop body about 30x slower
    # (measured; jax-ml/jax#12868), so only the re-initialisation sits in the `cond`.
    trained, loss = self.train_step(member, x, y)
    fresh = jax.lax.cond(was_reset, self.init_member, lambda _: member, key)
    new_member = jax.tree.map(lambda a, b: jnp.where(was_reset, a, b), fresh, trained)
    loss = jnp.where(was_reset, 0.0, loss).astype(jnp.float32)
    return new_member, loss, was_reset
