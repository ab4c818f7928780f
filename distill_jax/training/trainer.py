"""The one network trainer: fresh networks trained under a `Recipe` on any distilled-set kind.

Evaluation (networks trained from scratch on a distilled set), expert trajectories (networks on
the real set, saved every epoch) and teacher pools all train through `Trainer.train`. The
training set is a `distill_jax.distilled.DistilledSet` (real data is a `PixelSet`): each step
draws its batch with `set.draw(indices, key=, epoch=)` and turns the labels into targets by the
set's `label_kind`, so decoded, sampled or replayed kinds train without special cases.

On an accelerator all networks train in ONE jitted program: the per-network step is
`jax.vmap`-ed over parameters, optimiser states, model state (batch norm) and keys, and
`lax.scan` runs a chunk of steps per call. On CPU the default steps the networks one after the
other from Python with one compiled per-network step: XLA:CPU runs vmapped convolutions with
per-network kernels (grouped convolutions) and convolutions inside `scan` loops many times
slower than plain ones (benchmarks/eval_throughput.py). Both give the same networks for the
same keys (`vectorize=True` forces the vmapped program on CPU too).

On a mesh of several devices (`distill_jax.parallel`, set by the pipeline from `config.mesh`)
the networks are vmapped by default, their stack is split over the mesh axis `model` and each
network's batch over `data` (`jax.vmap(spmd_axis_name="model")`); the set is replicated.

Batching follows PyTorch's `DataLoader(shuffle=True, drop_last=False)`: every epoch is a new
permutation of the set (one per network), cut into `ceil(N / B)` batches; the last batch of an
epoch is filled up with wrapped-around examples of weight zero and the loss is the weighted mean,
so the gradient equals PyTorch's mean over the real examples (batch norm would see the filler in
its batch statistics). A set smaller than the batch size is used whole in every step.

Keys (threefry, the default implementation): network i splits its key into initialisation,
dropout-initialisation, shuffling, augmentation and dropout keys; step `t` augments with
`fold_in(aug_key, t)`, draws from sampling set kinds with `fold_in(aug_key, t + num_steps)`,
epoch `e` shuffles with `fold_in(shuffle_key, e)`, and kinds that fix an order for a whole run
(D3S's replayed epochs) get `fold_in(shuffle_key, 2**31 - 1)`, so results depend neither on the
chunk length nor on where a run was interrupted and resumed. `train` donates the states it steps: copy a
state handed to `on_save` before keeping it past the callback.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from distill_jax import parallel
from distill_jax.data import augment
from distill_jax.data import crops
from distill_jax.training.recipe import Recipe

Array = jax.Array
PyTree = Any

# `fold_in` data of a network's run key (see the module docstring): no epoch reaches it.
_RUN_KEY_DATA = 2**31 - 1


@flax.struct.dataclass
class TrainState:
  """One network in training (or a stack of them, with a leading network axis on every leaf).

  Attributes:
    params: the "params" collection.
    model_state: the other collections (e.g. "batch_stats"); {} for models without state.
    opt_state: the state of `recipe.direction()`.
    shuffle_key, aug_key, dropout_key: the network's typed PRNG keys.
  """

  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  shuffle_key: Array
  aug_key: Array
  dropout_key: Array


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """Networks trained by `Trainer.train`.

  Attributes:
    state: the final `TrainState`s stacked over networks (leading axis M).
    losses: (M, steps run) float32 training loss of every step.
    seconds: wall-clock seconds of the training loop, excluding compilation.
    compile_seconds: seconds spent compiling.
    steps: the step count of the whole run (`Trainer.num_steps`).
  """

  state: TrainState
  losses: np.ndarray
  seconds: float
  compile_seconds: float
  steps: int


def epoch_batch(
    shuffle_key: Array, t: Array, *, num_train: int, batch_size: int, steps_per_epoch: int
) -> tuple[Array, Array]:
  """Indices and weights of training step `t`'s batch (PyTorch `DataLoader(shuffle=True)`).

  Epoch `e = t // steps_per_epoch` visits `permutation(fold_in(shuffle_key, e), num_train)` in
  `steps_per_epoch` consecutive slices of `batch_size`; the last slice of an epoch is filled up
  with the epoch's first examples at weight 0 when `batch_size` does not divide `num_train`.

  Args:
    shuffle_key: a typed key, one network's shuffling key.
    t: int scalar, the global step.
    num_train: N.
    batch_size: B <= N.
    steps_per_epoch: ceil(N / B).

  Returns:
    indices (B,) int32 into the training set and weights (B,) float32 in {0, 1}.
  """
  epoch, position = t // steps_per_epoch, t % steps_per_epoch
  order = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_train)
  filler = steps_per_epoch * batch_size - num_train
  if filler:
    order = jnp.concatenate([order, order[:filler]])
  start = position * batch_size
  indices = jax.lax.dynamic_slice(order, (start,), (batch_size,))
  weights = (start + jnp.arange(batch_size) < num_train).astype(jnp.float32)
  return indices, weights


def loss_and_grads(model, params, model_state, x, targets, weights, per_example_loss, rngs):
  """Weighted mean loss of a training-mode forward pass and its parameter gradient.

  `loss = sum_i w_i l(model(x_i), t_i) / sum_i w_i`; batch-norm statistics update when the
  model has them.

  Returns:
    `((loss, new_model_state), grads)`.
  """

  def loss_fn(p):
    variables = {"params": p, **model_state}
    if model_state:
      logits, new_state = model.apply(variables, x, train=True, mutable=list(model_state),
                                      rngs=rngs)
    else:
      logits, new_state = model.apply(variables, x, train=True, rngs=rngs), {}
    loss = jnp.sum(per_example_loss(logits, targets) * weights) / jnp.sum(weights)
    return loss, new_state

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Trains fresh networks under `recipe` on sets of `num_train` examples (hashable: equal
  trainers share compiled programs).

  Args:
    recipe: the training recipe.
    num_classes: C.
    num_train: N, the examples of the training set.
    channels: image channels (the augmentation strategy may depend on them).
    label_kind: the training set's `label_kind`.
    chunk: steps per compiled call on accelerators (`lax.scan`); 1 on CPU.
  """

  recipe: Recipe
  num_classes: int
  num_train: int
  channels: int
  label_kind: str
  chunk: int = 1

  @classmethod
  def for_set(cls, recipe: Recipe, training_set, *, chunk: int = 100) -> "Trainer":
    """The trainer of `recipe` for a `DistilledSet` (chunk 1 on CPU, see the module docstring)."""
    num_train = training_set.num_examples
    steps = recipe.num_steps(num_train)
    if jax.default_backend() == "cpu":
      chunk = 1
    recipe.targets_fn(training_set.label_kind, training_set.meta.num_classes)  # Fails early.
    return cls(recipe=recipe, num_classes=training_set.meta.num_classes, num_train=num_train,
               channels=training_set.meta.image_shape[-1], label_kind=training_set.label_kind,
               chunk=max(1, min(chunk, steps)))

  @functools.cached_property
  def model(self):
    return self.recipe.make_model(self.num_classes)

  @property
  def num_steps(self) -> int:
    return self.recipe.num_steps(self.num_train)

  @property
  def batch_size(self) -> int:
    return self.recipe.effective_batch_size(self.num_train)

  @property
  def steps_per_epoch(self) -> int:
    return self.recipe.steps_per_epoch(self.num_train)

  def init(self, key: Array, x_example: Array) -> TrainState:
    """One network's training state from its key."""
    init_key, dropout_init_key, shuffle_key, aug_key, dropout_key = jax.random.split(key, 5)
    variables = self.model.init(
        {"params": init_key, "dropout": dropout_init_key}, x_example, train=False
    )
    params = variables["params"]
    return TrainState(
        params=params,
        model_state={k: v for k, v in variables.items() if k != "params"},
        opt_state=self.recipe.direction().init(params),
        shuffle_key=shuffle_key,
        aug_key=aug_key,
        dropout_key=dropout_key,
    )

  def augment(self, key: Array, x: Array) -> Array:
    """The recipe's augmentation of a batch `(B, H, W, C)` under `key`."""
    strategy = self.recipe.strategy_for(self.channels)
    if self.recipe.augmentation == "dsa":
      return augment.dsa(key, x, strategy=strategy, mode=self.recipe.aug_mode)
    if self.recipe.augmentation == "frepo":
      return augment.frepo_augment(key, x, strategy=strategy)
    if self.recipe.augmentation == "rrc":
      params = crops.rrc_params(key, x.shape[0], image_shape=x.shape[1:])
      return crops.rrc_apply(x, params, size=x.shape[1:3])
    return x

  def step(self, state: TrainState, t: Array, training_set, lr: Array) -> tuple[TrainState, Array]:
    """One optimiser step of one network at global step `t`; returns `(state, loss)`."""
    indices, weights = epoch_batch(
        state.shuffle_key, t, num_train=self.num_train, batch_size=self.batch_size,
        steps_per_epoch=self.steps_per_epoch,
    )
    aug_key = jax.random.fold_in(state.aug_key, t)
    # Kinds that sample (decoders, distributions) draw with a key of their own: folding in
    # `t + num_steps` keeps it apart from every step's augmentation key.
    x, y = training_set.draw(indices, key=jax.random.fold_in(state.aug_key, t + self.num_steps),
                             epoch=t // self.steps_per_epoch,
                             run_key=jax.random.fold_in(state.shuffle_key, _RUN_KEY_DATA))
    x, y, weights = parallel.constrain_leading((x, y, weights), "data")  # On a mesh.
    x = self.augment(aug_key, x)
    targets = self.recipe.targets_fn(self.label_kind, self.num_classes)(y)
    rngs = {"dropout": jax.random.fold_in(state.dropout_key, t)}
    (loss, model_state), grads = loss_and_grads(
        self.model, state.params, state.model_state, x, targets, weights,
        self.recipe.per_example_loss, rngs,
    )
    direction, opt_state = self.recipe.direction().update(grads, state.opt_state, state.params)
    step_size = lr * self.recipe.lr_multiplier(self.num_steps)(t)
    params = jax.tree.map(lambda p, d: p - step_size * d, state.params, direction)
    return state.replace(params=params, model_state=model_state, opt_state=opt_state), loss

  def run(self, state: TrainState, start: Array, stop: Array, training_set,
          lr: Array) -> tuple[TrainState, Array]:
    """Steps `start .. min(start + chunk, stop) - 1`; returns `(state, (chunk,) losses)`.

    Steps at or beyond `stop` are skipped (NaN loss), so a traced `stop` ends a chunk at a save
    point without recompiling. A chunk of one step is the plain step (see the module docstring).
    """
    if self.chunk == 1:
      state, loss = self.step(state, start, training_set, lr)
      return state, loss[None]

    def body(carry, i):
      t = start + i
      # `t` is the same for every network, so under vmap this stays a real branch.
      return jax.lax.cond(
          t < stop,
          lambda s: self.step(s, t, training_set, lr),
          lambda s: (s, jnp.full((), jnp.nan, jnp.float32)),
          carry,
      )

    return jax.lax.scan(body, state, jnp.arange(self.chunk))

  def initial_state(self, keys: Array, image_shape: tuple[int, ...], *,
                    vectorize: bool | None = None) -> TrainState:
    """Fresh networks from `keys (M,)`, stacked over a leading network axis."""
    x_example = jnp.zeros((1, *image_shape), jnp.float32)
    if _vectorized(vectorize):
      return _init_program(self, True, keys, x_example)
    return _stack([_init_program(self, False, key, x_example) for key in keys], False)

  def accuracy(self, state: TrainState, x_test: Any, y_test: Any, *,
               vectorize: bool | None = None, batch_size: int = 500) -> np.ndarray:
    """`(M,)` test accuracy of stacked networks (inference mode), see `classification_accuracy`."""
    if _vectorized(vectorize):
      networks = [(state.params, state.model_state)]
    else:
      count = len(jax.tree.leaves(state.params)[0])
      networks = [jax.tree.map(lambda a, i=i: a[i], (state.params, state.model_state))
                  for i in range(count)]
    vectorized = _vectorized(vectorize)
    return np.concatenate([
        np.atleast_1d(classification_accuracy(
            functools.partial(_logits, self, vectorized, params, model_state), x_test, y_test,
            batch_size=batch_size))
        for params, model_state in networks
    ])

  def train(
      self,
      keys: Array,
      training_set,
      *,
      lr: Any = None,
      vectorize: bool | None = None,
      state: TrainState | None = None,
      start_step: int = 0,
      save_at: Iterable[int] = (),
      on_save: Callable[[int, TrainState, np.ndarray], None] | None = None,
      label: str = "train",
      log_every: int = 100,
  ) -> TrainResult:
    """Trains one network per key on `training_set` from step `start_step` to `num_steps`.

    Args:
      keys: (M,) typed PRNG keys, one per network.
      training_set: a `DistilledSet` with `num_train` examples (real data: a `PixelSet`).
      lr: replaces `recipe.lr` (a learned lr), a float or 0-d array.
      vectorize: vmap the M networks in one program (None: on accelerators only).
      state: stacked states to resume from (with `start_step`); None initialises from `keys`.
      start_step: the step `state` was saved after.
      save_at: steps after which `on_save(step, stacked_state, mean_losses)` is called, with
        each network's mean training loss since the previous save point (expert epochs,
        student checkpoints).
      on_save: the save callback.
      label: name in the progress log.
      log_every: steps between progress log lines.

    Returns:
      A `TrainResult` with the states stacked over the M networks.
    """
    if training_set.num_examples != self.num_train:
      raise ValueError(
          f"the trainer was built for {self.num_train} examples but the set has "
          f"{training_set.num_examples}; build it with Trainer.for_set(recipe, set)"
      )
    vectorize = _vectorized(vectorize)
    training_set = _training_view(training_set)
    training_set = (jax.device_put(training_set) if parallel.current_mesh() is None
                    else parallel.place(training_set, parallel.replicated()))
    lr_device = np.float32(parallel.to_host(self.recipe.lr if lr is None else lr))
    begin = time.perf_counter()
    if state is None:
      state = self.initial_state(keys, training_set.meta.image_shape, vectorize=vectorize)
    state = parallel.place(state, parallel.stack_shardings(state, "model") if vectorize
                           else parallel.replicated())  # On a mesh; see the module docstring.
    states = [state] if vectorize else [jax.tree.map(lambda a, i=i: a[i], state)
                                        for i in range(len(keys))]
    compile_seconds = time.perf_counter() - begin
    save_points = sorted(s for s in set(save_at) if start_step < s <= self.num_steps)
    logging.info("%s: %d network(s)%s, steps %d..%d of batch %d on %d examples, lr %.6g",
                 label, len(keys), " vmapped" if vectorize else " one by one", start_step,
                 self.num_steps, self.batch_size, self.num_train, float(lr_device))
    rows, pending, since_save = [], [], []
    t, next_log, loop_begin, timed_from = start_step, start_step + log_every, None, start_step
    while t < self.num_steps:
      stop = min([t + self.chunk, self.num_steps] + [s for s in save_points if s > t])
      call_begin = time.perf_counter()
      outputs = [_run_program(self, vectorize, s, np.int32(t), np.int32(stop), training_set,
                              lr_device) for s in states]
      states = [s for s, _ in outputs]
      if parallel.one_call_in_flight():
        jax.block_until_ready(states)
      pending.append(([losses for _, losses in outputs], stop - t))
      if loop_begin is None:  # The first call compiles: its time is compile time.
        jax.block_until_ready(states)
        compile_seconds += time.perf_counter() - call_begin
        loop_begin, timed_from = time.perf_counter(), stop
      t = stop
      if t in save_points or t >= next_log or t == self.num_steps:
        # Reading the losses waits for the device, so the timing below is real.
        window = np.concatenate([_loss_rows(l, n) for l, n in pending], axis=1)
        rows.append(window)
        since_save.append(window)
        pending = []
      if t in save_points and on_save is not None:
        on_save(t, _stack(states, vectorize), np.mean(np.concatenate(since_save, axis=1), axis=1))
        since_save = []
      if t >= next_log or t == self.num_steps:
        next_log = t + log_every
        elapsed = time.perf_counter() - loop_begin
        rate = (t - timed_from) / elapsed if elapsed > 0 and t > timed_from else float("nan")
        logging.info("%s: step %d/%d loss %.4f, %.2f steps/s, ETA %.0fs", label, t,
                     self.num_steps, float(np.nanmean(rows[-1])), rate,
                     (self.num_steps - t) / rate if rate > 0 else float("nan"))
    seconds = time.perf_counter() - loop_begin if loop_begin is not None else 0.0
    losses = np.concatenate(rows, axis=1) if rows else np.zeros((len(keys), 0), np.float32)
    return TrainResult(state=_stack(states, vectorize), losses=losses, seconds=seconds,
                       compile_seconds=compile_seconds, steps=self.num_steps)


def _vectorized(vectorize: bool | None) -> bool:
  if vectorize is not None:
    return bool(vectorize)
  return jax.default_backend() != "cpu" or parallel.current_mesh() is not None


def _training_view(training_set):
  """The set under a neutral method name, so that sets that differ only in where they came from
  (a distilled set and a random subset of the same size) share compiled programs."""
  training_set = training_set.for_training()
  return training_set.replace(meta=dataclasses.replace(training_set.meta, method="train"))


def _loss_rows(losses: list[Array], steps: int) -> np.ndarray:
  """`(M, steps)` host losses from one call's per-program losses (`(M, chunk)` or `(chunk,)`)."""
  return np.concatenate([np.asarray(l).reshape(-1, np.shape(l)[-1])[:, :steps] for l in losses])


def _stack(states: list[TrainState], vectorized: bool) -> TrainState:
  if vectorized:
    return states[0]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_program(trainer: Trainer, vectorized: bool, keys: Array, x_example: Array) -> TrainState:
  if vectorized:
    return jax.vmap(trainer.init, in_axes=(0, None))(keys, x_example)
  return trainer.init(keys, x_example)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _run_program(trainer: Trainer, vectorized: bool, state: TrainState, start: Array,
                 stop: Array, training_set, lr: Array) -> tuple[TrainState, Array]:
  if vectorized:
    return jax.vmap(trainer.run, in_axes=(0, None, None, None, None),
                    spmd_axis_name=_network_axis(state))(state, start, stop, training_set, lr)
  return trainer.run(state, start, stop, training_set, lr)


def _network_axis(stack) -> str | None:
  """`"model"` when a stack of networks is split over that mesh axis (so that the batch
  constraints inside the vmapped step keep it split), else None."""
  leaf = jax.tree.leaves(stack)[0]
  sharding = parallel.stack_sharding(np.shape(leaf), "model")
  return "model" if sharding is not None and sharding.spec else None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(trainer: Trainer, vectorized: bool, params, model_state, x):
  def apply(p, s):
    return trainer.model.apply({"params": p, **s}, x, train=False)

  return jax.vmap(apply)(params, model_state) if vectorized else apply(params, model_state)


def classification_accuracy(predict: Callable[[Array], Array], x_test: Any, y_test: Any, *,
                  batch_size: int = 500) -> np.ndarray:
  """Fraction of test images whose argmax prediction is their label, in padded batches.

  Args:
    predict: jitted `x (B, H, W, C) -> logits (..., B, C)` (leading axes: stacked networks).
    x_test: (N_test, H, W, C) float images.
    y_test: (N_test,) int class ids.
    batch_size: images per call (the last batch is padded so one program serves all).

  Returns:
    float64 accuracies of shape `(...)` (one per stacked network), the final networks' (no max
    over time).
  """
  x_test = np.asarray(x_test, np.float32)
  y_test = np.asarray(y_test, np.int32)
  batch = min(batch_size, len(x_test))
  correct = 0.0
  for start in range(0, len(x_test), batch):
    x, y = x_test[start:start + batch], y_test[start:start + batch]
    valid = len(x)
    if valid < batch:  # Padded rows get label -1, which no prediction matches.
      x = np.concatenate([x, np.zeros((batch - valid, *x.shape[1:]), np.float32)])
      y = np.concatenate([y, np.full(batch - valid, -1, np.int32)])
    hits = parallel.to_host(jnp.argmax(predict(x), axis=-1)) == y
    correct = correct + hits.sum(axis=-1, dtype=np.float64)
  return np.asarray(correct / len(x_test), np.float64)
