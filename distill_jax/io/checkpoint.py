"""Resumable Orbax checkpoints of arbitrary training-state pytrees, typed PRNG keys included.

Each step is an Orbax composite checkpoint `<directory>/<step>/` with two items: `state` (the
arrays, Orbax's PyTree handler) and `keys` (JSON: which leaves were typed PRNG keys and their
implementation). `save` copies the arrays to host memory before it returns and writes them in a
background thread, so the caller may donate or overwrite the saved device buffers right away
(one rule for every loop: no wait before the next donating step). `restore(..., partial=True)`
reads only the subtree a template names (one expert of a trajectory shard). Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete, so a process killed mid-save leaves the previous step as the latest restorable one;
the leftover temporary folder is ignored and deleted by the next `Checkpointer` on the folder.
"""

import atexit
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored (missing, incomplete, corrupt or of another state)."""


def _is_key(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_impl(leaf: Any) -> str:
  """The PRNG implementation name of a key array or of a key `ShapeDtypeStruct`."""
  names = []
  # Tracing also works for abstract keys, which `jax.random.key_impl` refuses.
  jax.eval_shape(lambda k: names.append(str(jax.random.key_impl(k))), leaf)
  return names[0]


def _split_keys(state: Any) -> tuple[Any, dict[str, str]]:
  """Replaces typed PRNG keys by their uint32 data (Orbax stores plain arrays only)."""
  impls = {}

  def convert(path, leaf):
    if _is_key(leaf):
      impls[jax.tree_util.keystr(path)] = _key_impl(leaf)
      return jax.random.key_data(leaf)
    if isinstance(leaf, (bool, int, float, np.generic)):
      return np.asarray(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(convert, state), impls


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(template: Any) -> tuple[Any, Any, dict[str, str]]:
  """The restore target of `template` (shapes, dtypes and shardings, keys as key data), its
  Orbax restore arguments, and the PRNG implementation of every key leaf."""
  impls = {}

  def convert(path, leaf):
    if _is_key(leaf):
      impls[jax.tree_util.keystr(path)] = _key_impl(leaf)
      data = jax.eval_shape(jax.random.key_data, leaf)
      sharding = getattr(leaf, "sharding", None) or _default_sharding()
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(
          leaf.shape, leaf.dtype, sharding=leaf.sharding or _default_sharding()
      )
    if isinstance(leaf, (np.ndarray, np.generic, bool, int, float)):
      array = np.asarray(leaf)
      return np.empty(array.shape, array.dtype)  # A numpy target restores numpy.
    raise ValueError(
        f"checkpoint template leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}; "
        "use jax/numpy arrays, jax.ShapeDtypeStruct or Python scalars"
    )

  abstract = jax.tree_util.tree_map_with_path(convert, template)

  def restore_args(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                  dtype=leaf.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)

  return abstract, jax.tree.map(restore_args, abstract), impls


def _to_host(tree: Any) -> Any:
  """Fully addressable jax arrays copied to numpy (what makes `save` safe against donation)."""

  def copy(leaf):
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
      return np.asarray(jax.device_get(leaf))
    return leaf

  return jax.tree.map(copy, tree)


def _path_name(path: tuple) -> str:
  """`opt/0/mu/w` for any key path: Orbax stores namedtuple and dataclass fields as dict keys."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  return {
      _path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _mismatches(saved: dict, expected: dict) -> list[str]:
  out = [f"{name} missing from the checkpoint" for name in expected if name not in saved]
  out += [f"{name} not in the template" for name in saved if name not in expected]
  for name, (shape, dtype) in expected.items():
    if name in saved and saved[name] != (shape, dtype):
      out.append(
          f"{name} saved as {saved[name][1]}{list(saved[name][0])}, template {dtype}{list(shape)}"
      )
  return out


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}"


class Checkpointer:
  """Numbered, pre-emption-safe checkpoints of a training state in one folder.

  Saves are asynchronous (Orbax writes in a background thread after copying the arrays off the
  device); `wait()` blocks until they are on disk and runs automatically at interpreter exit.

  >>> import tempfile
  >>> ckpt = Checkpointer(tempfile.mkdtemp())
  >>> ckpt.save(3, {"w": jnp.ones(2), "key": jax.random.key(0)})
  >>> ckpt.latest_step()
  3
  >>> state = ckpt.restore(3, {"w": jnp.zeros(2), "key": jax.random.key(1)})
  >>> bool((jax.random.key_data(state["key"]) == jax.random.key_data(jax.random.key(0))).all())
  True
  >>> ckpt.close()

  Args:
    directory: folder of the checkpoints, e.g. `workdir.checkpoint_dir`; created if missing.
    max_to_keep: number of most recent steps kept (older ones are deleted after each save), or
      None to keep every step (a trajectory store).
    async_save: save in a background thread (Orbax async checkpointing).
  """

  def __init__(
      self, directory: str | os.PathLike, *, max_to_keep: int | None = 2, async_save: bool = True
  ):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        # Removes `*.orbax-checkpoint-tmp-*` folders left by a process killed mid-save.
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "keys": ocp.JsonCheckpointHandler(),
        },
    )
    atexit.register(self.wait)

  def __repr__(self) -> str:
    return f"Checkpointer({os.fspath(self.directory)!r})"

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    """The steps with a complete checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete step, or None when the folder holds no checkpoint."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts saving `state` as `step` (returns before it is on disk; see `wait`).

    The arrays are copied to host memory before this returns, so the caller may donate them to
    the next step at once.

    Args:
      step: a step number larger than every saved step.
      state: a pytree of jax/numpy arrays, Python scalars and typed PRNG keys
        (`jax.random.key`); sharded jax arrays are saved shard by shard.
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(
          f"checkpoint step {step} is not after the latest saved step {latest} in "
          f"{self.directory}; "
          "save increasing steps (restore the latest step to resume)"
      )
    arrays, impls = _split_keys(state)
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(_to_host(arrays)),
            keys=ocp.args.JsonSave({"version": FORMAT_VERSION, "prng_keys": impls}),
        ),
    )

  def restore(self, step: int, template: Any, *, partial: bool = False) -> Any:
    """Restores `step` into the structure, dtypes and shardings of `template`.

    Args:
      step: a saved step, e.g. `latest_step()`.
      template: a pytree like the saved state (concrete arrays or `jax.ShapeDtypeStruct`); jax
        leaves come back as jax arrays with the template's sharding, numpy leaves as numpy,
        Python scalars as Python scalars, typed PRNG keys as typed keys of the saved impl.
      partial: `template` names a subtree of the saved state (nested dicts); only its arrays
        are read.

    Raises:
      CheckpointError: no complete checkpoint for `step`, or it is corrupt or does not match
        `template`.
    """
    self.wait()
    self._manager.reload()  # Another process may have written or removed steps.
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory} (saved steps: {steps or 'none'}); "
          "restore one of the saved steps, or use a new workdir to start afresh"
      )
    abstract, restore_args, template_impls = _abstract(template)
    fix = (
        f"delete {self.directory / str(step)} to resume from an earlier step, or use a new workdir"
    )
    try:
      saved_tree = self._manager.item_metadata(step)["state"]
    except Exception as e:  # Unreadable Orbax metadata files.
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is corrupt ({_first_line(e)}); {fix}"
      ) from e
    if saved_tree is None:  # Orbax reports a missing `_METADATA` file as no metadata.
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is corrupt (its array metadata is "
          f"missing); {fix}"
      )
    saved_specs = _leaf_specs(saved_tree)
    mismatches = _mismatches(saved_specs, _leaf_specs(abstract))
    if partial:
      mismatches = [m for m in mismatches if not m.endswith("not in the template")]
    if mismatches:
      shown = "; ".join(mismatches[:3]) + (
          f"; ... ({len(mismatches)} in all)" if len(mismatches) > 3 else ""
      )
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} holds a different state than the template "
          f"({shown}); restore with the config of the run that saved it, or use a new workdir"
      )
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.PyTreeRestore(abstract, restore_args=restore_args,
                                           partial_restore=partial),
              keys=ocp.args.JsonRestore(),
          ),
      )
    except Exception as e:  # Orbax/tensorstore raise assorted types; all mean "not restorable".
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is corrupt ({_first_line(e)}); {fix}"
      ) from e
    saved_impls = restored["keys"]["prng_keys"]
    if partial:
      saved_impls = {k: v for k, v in saved_impls.items() if k in template_impls}
    if saved_impls != template_impls:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} holds PRNG keys {saved_impls} but the "
          f"template expects {template_impls}; restore with the template of the saving run, "
          "or use a new workdir"
      )

    def convert(path, saved, leaf):
      if _is_key(leaf):
        return jax.random.wrap_key_data(saved, impl=template_impls[jax.tree_util.keystr(path)])
      if isinstance(leaf, (bool, int, float)):
        return type(leaf)(saved.item())
      if isinstance(leaf, np.generic):
        return leaf.dtype.type(saved.item())
      return saved

    return jax.tree_util.tree_map_with_path(convert, restored["state"], template)

  def wait(self) -> None:
    """Blocks until every started save is on disk (committed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.close()
    atexit.unregister(self.wait)
