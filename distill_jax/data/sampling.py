"""Sampling real images: class-balanced subsets (initialisation, baselines) and batch indices.

`random_subset` is host-side numpy (a fixed `seed` gives the same subset on every machine);
`balanced_indices` and `random_batch` are jittable and take a typed PRNG key.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array of class ids, got {y.dtype} {y.shape}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(
        f"labels must lie in 0..{num_classes - 1}, got values in {y.min()}..{y.max()}; "
        "check num_classes"
    )
  return y


def class_indices(y: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """The positions of each class in `y`.

  Args:
    y: `(N,)` integer class ids in `0..num_classes-1`.
    num_classes: C.

  Returns:
    A list of C int64 arrays; entry c holds the increasing positions `i` with `y[i] == c`.

  >>> [a.tolist() for a in class_indices(np.array([1, 0, 1, 2]), 3)]
  [[1], [0, 2], [3]]
  """
  y = _check_labels(y, num_classes)
  order = np.argsort(y, kind="stable")
  bounds = np.searchsorted(y[order], np.arange(num_classes + 1))
  return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


def random_subset(
    x: np.ndarray, y: np.ndarray, *, ipc: int, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """A class-balanced random subset: `ipc` distinct images of every class, sorted by class.

  Within a class the images come in the order drawn (a random permutation of the class,
  truncated), from `np.random.default_rng(seed)`; the same inputs and seed give the same subset.

  Args:
    x: `(N, ...)` images (numpy or jax array).
    y: `(N,)` integer class ids.
    ipc: images per class, `1 <= ipc <= smallest class size`.
    num_classes: C.
    seed: integer seed.

  Returns:
    `(x_sub, y_sub)`: `(C * ipc, ...)` images and `(C * ipc,)` int32 labels
    `[0]*ipc + [1]*ipc + ...`.

  Raises:
    ValueError: `ipc` out of range (the message names the largest possible ipc), bad labels.

  >>> x_sub, y_sub = random_subset(np.arange(6), np.array([0, 1, 0, 1, 0, 1]), ipc=2,
  ...                              num_classes=2, seed=0)
  >>> y_sub.tolist(), bool(np.all(x_sub % 2 == y_sub))
  ([0, 0, 1, 1], True)
  """
  y_np = _check_labels(y, num_classes)
  if len(x) != len(y_np):
    raise ValueError(f"x has {len(x)} images but y has {len(y_np)} labels; pass matching arrays")
  per_class = class_indices(y_np, num_classes)
  counts = [len(p) for p in per_class]
  max_ipc = min(counts)
  if isinstance(ipc, bool) or not isinstance(ipc, (int, np.integer)) or not 1 <= ipc <= max_ipc:
    raise ValueError(
        f"ipc={ipc!r} is impossible: every class must give ipc distinct images and the smallest "
        f"class (id {int(np.argmin(counts))}) has {max_ipc}; use 1 <= ipc <= {max_ipc}"
    )
  rng = np.random.default_rng(seed)
  picked = np.concatenate([rng.permutation(p)[:ipc] for p in per_class])
  return x[picked], y_np[picked].astype(np.int32)


def balanced_indices(
    key: jax.Array, y: jax.Array, *, per_class: int, num_classes: int
) -> jax.Array:
  """Jittable class-balanced sampling: `per_class` distinct positions of every class.

  Every class's positions are ranked by i.i.d. uniform scores; the `per_class` lowest-ranked
  ones are taken, which is uniform sampling without replacement within the class. Cost
  O(N log N) (one sort), memory O(N).

  Args:
    key: a PRNG key.
    y: `(N,)` integer class ids in `0..num_classes-1` (numpy or jax; may be traced).
    per_class: positions per class (static); must not exceed the smallest class size. This is
      checked when `y` is concrete; under `jit` a smaller class would silently borrow positions
      of the next class.
    num_classes: C (static).

  Returns:
    `(num_classes * per_class,)` int32 positions into `y`, grouped by class
    (`y[result] == repeat(arange(C), per_class)`).

  >>> idx = balanced_indices(jax.random.key(0), jnp.array([0, 1, 0, 1, 0, 1]), per_class=2,
  ...                        num_classes=2)
  >>> jnp.array([0, 1, 0, 1, 0, 1])[idx].tolist()
  [0, 0, 1, 1]
  """
  if per_class < 1:
    raise ValueError(f"per_class must be >= 1, got {per_class}")
  if not isinstance(y, jax.core.Tracer):
    counts = np.bincount(_check_labels(np.asarray(y), num_classes), minlength=num_classes)
    if counts.min() < per_class:
      raise ValueError(
          f"per_class={per_class} exceeds the smallest class (id {int(np.argmin(counts))}, "
          f"{int(counts.min())} examples); use per_class <= {int(counts.min())}"
      )
  return _balanced_indices_core(key, jnp.asarray(y), per_class, num_classes)


@functools.partial(jax.jit, static_argnames=("per_class", "num_classes"))
def _balanced_indices_core(
    key: jax.Array, y: jax.Array, per_class: int, num_classes: int
) -> jax.Array:
  scores = jax.random.uniform(key, y.shape)
  # Sort by class, then by random score: each class becomes a contiguous, shuffled block.
  order = jnp.lexsort((scores, y))
  starts = jnp.searchsorted(y[order], jnp.arange(num_classes), side="left")
  positions = starts[:, None] + jnp.arange(per_class)[None, :]
  return order[positions.reshape(-1)].astype(jnp.int32)


def random_batch(key: jax.Array, n: int, batch_size: int) -> jax.Array:
  """Jittable uniform batch: `batch_size` distinct positions in `0..n-1`.

  Args:
    key: a PRNG key.
    n: population size (static).
    batch_size: `1 <= batch_size <= n` (static).

  Returns:
    `(batch_size,)` int32 positions, sampled uniformly without replacement.

  >>> idx = random_batch(jax.random.key(0), 10, 4)
  >>> idx.shape, len(set(idx.tolist()))
  ((4,), 4)
  """
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size must be in 1..n={n}, got {batch_size}")
  return _random_batch_core(key, n, batch_size)


@functools.partial(jax.jit, static_argnames=("n", "batch_size"))
def _random_batch_core(key: jax.Array, n: int, batch_size: int) -> jax.Array:
  # The positions of the batch_size largest of n i.i.d. uniform scores: a uniformly random
  # subset in random order, with one threefry draw and a partial sort.
  _, positions = jax.lax.top_k(jax.random.uniform(key, (n,)), batch_size)
  return positions.astype(jnp.int32)
