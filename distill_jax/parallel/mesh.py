"""Device meshes and where arrays live on them: `jax.jit` with `NamedSharding`, no `pmap`.

A run's mesh has two named axes (`AXES`):

  data    batches are split along it (real batches, synthetic minibatches, evaluation batches);
  model   stacks of networks are split along it (evaluation networks, expert shards, FRePo's
          pool members).

`make_mesh((-1, 1))` (the default, `config.mesh = {"data": -1, "model": 1}`) puts every device
on `data`; `(2, 2)` (`mesh.data=2,mesh.model=2`) gives a 2x2 mesh. The mesh a run uses is set once with `use_mesh(mesh)` (the pipeline does it
from the config) and read by the run loop, the trainer and the methods through the helpers
below; the objectives never see it. On one device every helper is the identity, so a 1-device
mesh compiles exactly the programs of a run without one.

Methods say what is split along which axis:

  replicated(tree)                 every leaf whole on every device (the synthetic set)
  stack_sharding(shape, axis)      a leading axis split over a mesh axis (a stack of networks)
  place(tree, shardings)           host or device arrays placed as the shardings say; works
                                   across processes (`jax.make_array_from_callback`)
  constrain_leading(x, axis)       inside a jitted step: split `x`'s leading axis (or `dim`)
                                   over `axis` (`jax.lax.with_sharding_constraint`)

A leading axis that the mesh axis does not divide stays replicated (the run still runs, the
split is lost; `stack_sharding` logs it once).
"""

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "model")

_CURRENT: list[Mesh] = []
_WARNED: set[tuple[int, str, int]] = set()


def make_mesh(shape: Sequence[int] = (-1, 1), axes: Sequence[str] = AXES, *,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh of `devices` (default: every device of every process) with `shape` over `axes`.

  Args:
    shape: devices along each axis; one entry may be -1 (all the devices the others leave).
    axes: the axis names, `("data", "model")`.
    devices: the devices, in mesh order (default `jax.devices()`).

  Raises:
    ValueError: the shape does not fit the device count (the message names both).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [int(s) for s in shape]
  if len(shape) != len(axes):
    raise ValueError(f"mesh.shape {tuple(shape)} needs one entry per axis {tuple(axes)}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape {tuple(shape)} must hold positive sizes and at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh.shape {tuple(shape)} does not divide the {len(devices)} devices; "
                       f"use sizes whose product divides {len(devices)}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) > len(devices):
    raise ValueError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices but "
                     f"{len(devices)} are available; use e.g. mesh.shape=(-1, 1)")
  grid = np.asarray(devices[:math.prod(shape)], dtype=object).reshape(shape)
  return Mesh(grid, tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def mesh_from_config(config) -> Mesh:
  """The mesh of `config.mesh` (devices per axis: `{"data": -1, "model": 1}`); configs
  without the block get every device on `data`."""
  block = config.get("mesh") if hasattr(config, "get") else None
  sizes = {"data": -1, "model": 1}
  if block is not None:
    unknown = sorted(set(block) - set(AXES))
    if unknown:
      raise ValueError(f"unknown mesh axis {unknown[0]!r} in config.mesh; the axes are "
                       f"{', '.join(AXES)}")
    sizes.update(block)
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int):
      raise ValueError(f"config.mesh.{name} must be an int (devices, or -1 for the rest), got "
                       f"{size!r}")
  return make_mesh(tuple(sizes[a] for a in AXES), AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
  """Within: `current_mesh()` is `mesh` (None: no mesh, every helper is the identity)."""
  _CURRENT.append(mesh)
  try:
    yield mesh
  finally:
    _CURRENT.pop()


def current_mesh() -> Mesh | None:
  """The mesh set by the innermost `use_mesh`, or None; a 1-device mesh counts as None."""
  mesh = _CURRENT[-1] if _CURRENT else None
  return mesh if mesh is not None and mesh.size > 1 else None


def axis_size(axis: str) -> int:
  """Devices along `axis` of the current mesh (1 without one)."""
  mesh = current_mesh()
  return 1 if mesh is None else int(mesh.shape[axis])


def one_call_in_flight() -> bool:
  """Whether loops must wait for each call before dispatching the next: on a mesh of CPU
  devices (simulated ones), where XLA:CPU runs every device's program on one thread pool and
  several calls in flight deadlock in the rendezvous of their collectives (seen after a few
  hundred vmapped training steps on a 2x2 mesh of 2 cores)."""
  return current_mesh() is not None and jax.default_backend() == "cpu"


def replicated() -> NamedSharding | None:
  """Whole on every device of the current mesh (None without one)."""
  mesh = current_mesh()
  return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def stack_sharding(shape: Sequence[int], axis: str, *, dim: int = 0) -> NamedSharding | None:
  """Dimension `dim` (default the leading one) of an array of `shape` split over mesh axis
  `axis`; replicated when the axis size does not divide it (logged once per length), None
  without a mesh."""
  mesh = current_mesh()
  if mesh is None:
    return None
  size = int(mesh.shape[axis])
  if len(shape) <= dim or size == 1 or shape[dim] % size:
    if len(shape) > dim and size > 1 and (shape[dim], axis, size) not in _WARNED:
      _WARNED.add((shape[dim], axis, size))
      logging.warning("an axis of %d does not split over the %d devices of mesh axis %r; it "
                      "stays replicated (choose counts divisible by %d)", shape[dim], size, axis,
                      size)
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(*([None] * dim), axis))


def stack_shardings(tree: Any, axis: str) -> Any:
  """`stack_sharding` of every leaf's shape (`tree`: arrays or `ShapeDtypeStruct`s)."""
  return jax.tree.map(lambda leaf: stack_sharding(np.shape(leaf) or (), axis), tree)


def replicated_shardings(tree: Any) -> Any:
  """`replicated()` for every leaf of `tree`."""
  return jax.tree.map(lambda _: replicated(), tree)


def place(tree: Any, shardings: Any) -> Any:
  """`tree`'s leaves placed as `shardings` says (a tree of the same structure, or one sharding
  for every leaf); identity without a mesh. Host (numpy) leaves must hold the same values on
  every process; each process fills only its own devices."""
  if current_mesh() is None:
    return tree
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(leaf, sharding):
    if sharding is None:
      return leaf
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      data = put(jax.random.key_data(leaf), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
      return leaf
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable and jax.process_count() == 1:
      return jax.device_put(leaf, sharding)
    host = np.asarray(to_host(leaf))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def constrain_leading(x: Any, axis: str, *, dim: int = 0) -> Any:
  """Inside `jit`: every leaf of `x` with dimension `dim` (default the leading one) split over
  mesh axis `axis` (left to XLA where the axis size does not divide it); identity without a
  mesh."""
  if current_mesh() is None:
    return x

  def constrain(leaf):
    sharding = stack_sharding(np.shape(leaf) or (), axis, dim=dim)
    if sharding is None or not sharding.spec:
      return leaf
    return jax.lax.with_sharding_constraint(leaf, sharding)

  return jax.tree.map(constrain, x)


def to_host(tree: Any) -> Any:
  """Every array leaf as a numpy array on this process, whatever its sharding (sharded arrays
  that span processes are gathered; replicated ones read from a local copy)."""

  def fetch(leaf):
    if not isinstance(leaf, jax.Array):
      return leaf
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return leaf  # Keys stay keys (the checkpointer stores their data).
    if leaf.is_fully_addressable:
      return np.asarray(jax.device_get(leaf))
    if leaf.is_fully_replicated:
      return np.asarray(leaf.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

  return jax.tree.map(fetch, tree)
