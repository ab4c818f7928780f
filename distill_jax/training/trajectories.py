"""A trajectory store: save points of stacked networks in training, through `io.Checkpointer`.

Expert trajectories (MTT, D3, LatentMTT) and, later, teacher pools and student checkpoints are
networks recorded at chosen points of their training. The store keeps them as one
`io.Checkpointer` folder per shard of networks trained together, with one checkpoint per save
point (every point kept), each holding every network's variables as its own subtree (parameters
and, for batch-norm models, their statistics) next to the shard's optimiser state, keys and
metrics. So `read(network, point)` restores exactly one network at one point, a store of 100
experts x 50 epochs never has to fit in memory, and the latest point of an unfinished shard is
where a killed run resumes. A shard is complete once `mark_complete` wrote its summary.

Layout::

  <path>/shard_0000/<point>/   io.Checkpointer step: {"networks": {"net_00": variables, ...},
                                 "train": stacked optimiser state and keys, "metrics": {...}}
  <path>/shard_0000/shard.json written once the shard's last point is saved: it is complete
"""

import json
import os
from typing import Any

import jax
import numpy as np

from distill_jax.io import Checkpointer
from distill_jax.io._atomic import atomic_write_text
from distill_jax.training.trainer import TrainState

PyTree = Any

_SUMMARY_FILE = "shard.json"


def _network_name(local: int) -> str:
  return f"net_{local:02d}"


def _variables(state: TrainState, index: int) -> dict[str, PyTree]:
  """One network's Flax variables from a stacked state (host arrays)."""
  return jax.tree.map(lambda a: np.asarray(a[index]),
                      {"params": state.params, **state.model_state})


class TrajectoryStore:
  """Save points of networks trained in shards of `networks_per_shard`.

  Args:
    path: the store's folder (created on the first write).
    networks_per_shard: networks per shard; network `i` is `net_{i % n}` of shard `i // n`.
    keep: points kept per shard (older ones are deleted after each write), or None for every
      point (trajectories; a teacher pool keeps only its latest points).
  """

  def __init__(self, path: str, *, networks_per_shard: int, keep: int | None = None):
    self.path = path
    self.networks_per_shard = int(networks_per_shard)
    self.keep = keep
    self._checkpointers: dict[int, Checkpointer] = {}

  def __repr__(self) -> str:
    return f"TrajectoryStore({self.path!r})"

  def shard_dir(self, shard: int) -> str:
    return os.path.join(self.path, f"shard_{shard:04d}")

  def _checkpointer(self, shard: int) -> Checkpointer:
    if shard not in self._checkpointers:
      self._checkpointers[shard] = Checkpointer(self.shard_dir(shard), max_to_keep=self.keep)
    return self._checkpointers[shard]

  def points(self, shard: int) -> list[int]:
    """The save points of `shard` on disk, ascending."""
    if not os.path.isdir(self.shard_dir(shard)):
      return []
    return self._checkpointer(shard).all_steps()

  def write(self, shard: int, point: int, state: TrainState, metrics: dict[str, Any]) -> None:
    """Saves the stacked `state` of `shard`'s networks at `point` (in the background).

    Args:
      shard: the shard index.
      point: the save point (e.g. an epoch), larger than every saved point of the shard.
      state: a `TrainState` stacked over the shard's networks.
      metrics: `{name: (networks,) values}` recorded with the point.
    """
    tree = {
        "networks": {_network_name(i): _variables(state, i)
                     for i in range(self.networks_per_shard)},
        "train": {"opt_state": state.opt_state, "shuffle_key": state.shuffle_key,
                  "aug_key": state.aug_key, "dropout_key": state.dropout_key},
        "metrics": {name: np.asarray(value, np.float32) for name, value in metrics.items()},
    }
    self._checkpointer(shard).save(point, tree)

  def restore_shard(self, shard: int, point: int, template: TrainState) -> TrainState:
    """The stacked `TrainState` of `shard` at `point` (to resume training), like `template`."""
    tree = self._checkpointer(shard).restore(point, {
        "networks": {_network_name(i): _variables(template, i)
                     for i in range(self.networks_per_shard)},
        "train": {"opt_state": template.opt_state, "shuffle_key": template.shuffle_key,
                  "aug_key": template.aug_key, "dropout_key": template.dropout_key},
    }, partial=True)
    networks = [tree["networks"][_network_name(i)] for i in range(self.networks_per_shard)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *networks)
    return template.replace(
        params=stacked.pop("params"), model_state=stacked, **tree["train"]
    )

  def read(self, network: int, point: int, template: dict[str, PyTree]) -> dict[str, PyTree]:
    """The variables of `network` at `point` as numpy arrays (only those arrays are read).

    Args:
      network: global network index.
      point: a save point.
      template: one network's variables (any arrays of the right shapes and dtypes).
    """
    shard, local = divmod(network, self.networks_per_shard)
    host = jax.tree.map(lambda a: np.zeros(np.shape(a), np.asarray(a).dtype), template)
    tree = self._checkpointer(shard).restore(
        point, {"networks": {_network_name(local): host}}, partial=True)
    return tree["networks"][_network_name(local)]

  def metrics(self, shard: int, point: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The metrics saved with `point` of `shard`: `{name: (networks,) float32}`."""
    template = {name: np.zeros(self.networks_per_shard, np.float32) for name in names}
    return self._checkpointer(shard).restore(point, {"metrics": template}, partial=True)["metrics"]

  def wait(self) -> None:
    """Blocks until every started write is on disk."""
    for checkpointer in self._checkpointers.values():
      checkpointer.wait()

  def mark_complete(self, shard: int, summary: dict[str, Any]) -> None:
    """Records that `shard` has all its points, with a JSON summary (after waiting for writes)."""
    self.wait()
    atomic_write_text(os.path.join(self.shard_dir(shard), _SUMMARY_FILE),
                      json.dumps(summary, indent=1))

  def is_complete(self, shard: int) -> bool:
    return os.path.exists(os.path.join(self.shard_dir(shard), _SUMMARY_FILE))

  def summary(self, shard: int) -> dict[str, Any]:
    """The summary `mark_complete` wrote for `shard`."""
    with open(os.path.join(self.shard_dir(shard), _SUMMARY_FILE)) as f:
      return json.load(f)

  def close(self) -> None:
    for checkpointer in self._checkpointers.values():
      checkpointer.close()
    self._checkpointers.clear()
