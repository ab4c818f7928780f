"""Checkpointer: round trips with typed PRNG keys, errors, pre-emption safety, sharded arrays."""

import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.io import CheckpointError, Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# After a failed read, tensorstore completes the other pending reads into Orbax's already closed
# event loop ("RuntimeError: Event loop is closed", reported as unraisable); harmless.
ignore_orbax_stragglers = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


def run_python(code: str, **env_overrides) -> subprocess.CompletedProcess:
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
      **env_overrides,
  )
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )


def make_state(seed):
  return {
      "params": {"w": jnp.arange(6.0).reshape(2, 3) + seed, "b": jnp.ones(3, jnp.bfloat16)},
      "step_count": np.int32(seed),
      "counts": np.arange(4, dtype=np.int64) * seed,
      "epoch": seed,
      "lr": 0.5 * seed,
      "done": False,
      "key": jax.random.key(seed),
      "keys": (jax.random.split(jax.random.key(seed + 1, impl="rbg"), 3),),
      "absent": None,
  }


def assert_state_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert type(a) is type(e)
    if hasattr(e, "dtype") and jnp.issubdtype(e.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(a) == jax.random.key_impl(e)
      np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(e))
    else:
      assert getattr(a, "dtype", None) == getattr(e, "dtype", None)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_round_trip_with_typed_keys_and_mixed_leaves(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(10, make_state(1))
    restored = ckpt.restore(10, make_state(0))  # Restore waits for the async save.
  assert_state_equal(restored, make_state(1))
  # The restored keys keep producing the same stream as the saved ones, also under jit.
  draw = jax.jit(lambda k: jax.random.normal(k, (3,)))
  np.testing.assert_array_equal(draw(restored["key"]), draw(jax.random.key(1)))
  np.testing.assert_array_equal(draw(restored["keys"][0][2]), draw(make_state(1)["keys"][0][2]))


def test_abstract_template_and_max_to_keep(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, make_state(step))
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array) else a,
      make_state(0),
  )
  restored = ckpt.restore(3, abstract)
  assert_state_equal(restored, make_state(3))
  with pytest.raises(ValueError, match="not after the latest saved step 3"):
    ckpt.save(3, make_state(3))
  ckpt.close()
  # A new Checkpointer (a rerun) sees the same steps.
  with Checkpointer(tmp_path) as again:
    assert again.latest_step() == 3
    assert_state_equal(again.restore(2, make_state(0)), make_state(2))


def test_missing_step_and_mismatched_template(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(
        CheckpointError, match=r"no checkpoint for step 5 .*\(saved steps: none\).*new workdir"
    ):
      ckpt.restore(5, make_state(0))
    ckpt.save(1, make_state(1))
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 .*saved steps: \[1\]"):
      ckpt.restore(5, make_state(0))
    bigger = make_state(0)
    bigger["params"]["w"] = jnp.zeros((2, 4))
    with pytest.raises(
        CheckpointError, match=r"params/w saved as float32\[2, 3\], template float32\[2, 4\]"
    ):
      ckpt.restore(1, bigger)
    with pytest.raises(CheckpointError, match="extra missing from the checkpoint"):
      ckpt.restore(1, {**make_state(0), "extra": jnp.zeros(1)})
    other_impl = make_state(0)
    other_impl["key"] = jax.random.key(0, impl="rbg")  # Saved as threefry: (2,) key data, not (4,).
    with pytest.raises(CheckpointError, match="holds a different state"):
      ckpt.restore(1, other_impl)


@ignore_orbax_stragglers
@pytest.mark.parametrize("damage", ["truncate_data", "delete_data", "delete_metadata"])
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path, damage):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, make_state(1))
  step_dir = tmp_path / "1" / "state"
  data_files = [
      os.path.join(root, f)
      for root, _, files in os.walk(step_dir)
      for f in files
      if os.path.basename(root) == "d"
  ]  # OCDBT data files.
  assert data_files
  if damage == "truncate_data":
    for path in data_files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  elif damage == "delete_data":
    for path in data_files:
      os.remove(path)
  else:
    os.remove(step_dir / "_METADATA")
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(
        CheckpointError, match=r"checkpoint step 1 .* is corrupt .*delete .*1 to resume"
    ):
      ckpt.restore(1, make_state(0))
    time.sleep(0.3)  # Let tensorstore's stragglers of the failed read finish inside this test.


def test_killed_save_leaves_the_previous_step_restorable(tmp_path):
  result = run_python(f"""
      import os, signal
      import jax, jax.numpy as jnp
      from orbax.checkpoint._src.path import atomicity
      from distill_jax.io import Checkpointer
      ckpt = Checkpointer({str(tmp_path)!r})
      ckpt.save(1, {{"w": jnp.full(3, 1.0), "key": jax.random.key(1)}})
      ckpt.wait()
      async def killed_finalize(self):  # SIGKILL after the files are written, before the commit.
        os.kill(os.getpid(), signal.SIGKILL)
      atomicity.AtomicRenameTemporaryPath.finalize = killed_finalize
      ckpt.save(2, {{"w": jnp.full(3, 2.0), "key": jax.random.key(2)}})
      ckpt.wait()
  """)
  assert result.returncode == -9, result.stderr[-2000:]
  leftovers = [n for n in os.listdir(tmp_path) if n not in ("1",)]
  assert any(n.startswith("2.orbax-checkpoint-tmp") for n in leftovers), leftovers
  template = {"w": jnp.zeros(3), "key": jax.random.key(0)}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    restored = ckpt.restore(1, template)
    np.testing.assert_array_equal(restored["w"], np.full(3, 1.0))
    np.testing.assert_array_equal(
        jax.random.key_data(restored["key"]), jax.random.key_data(jax.random.key(1))
    )
    ckpt.save(2, {"w": jnp.full(3, 2.0), "key": jax.random.key(2)})  # The rerun saves step 2 again.
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
  assert not [n for n in os.listdir(tmp_path) if "orbax-checkpoint-tmp" in n]


def test_sharded_arrays_restore_with_the_template_sharding(tmp_path):
  result = run_python(
      f"""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from distill_jax.io import Checkpointer
      assert jax.device_count() == 4, jax.devices()
      mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
      x = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data", "model")))
      keys = jax.device_put(jax.random.split(jax.random.key(0), 8), NamedSharding(mesh, P("data")))
      with Checkpointer({str(tmp_path)!r}) as ckpt:
        ckpt.save(1, {{"x": x, "keys": keys}})
        # Restore onto another layout: rows over all 4 devices, keys replicated.
        rows = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d"))
        replicated = NamedSharding(mesh, P())
        template = {{"x": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=rows),
                    "keys": jax.device_put(jax.random.split(jax.random.key(1), 8), replicated)}}
        out = ckpt.restore(1, template)
      assert out["x"].sharding == rows, out["x"].sharding
      assert out["keys"].sharding.is_equivalent_to(replicated, 1), out["keys"].sharding
      np.testing.assert_array_equal(np.asarray(out["x"]), np.arange(32.0).reshape(8, 4))
      np.testing.assert_array_equal(jax.random.key_data(out["keys"]), jax.random.key_data(keys))
      print("OK")
  """,
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      JAX_PLATFORMS="cpu",
  )
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_checkpointer_validates_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep must be >= 1 or None"):
    Checkpointer(tmp_path, max_to_keep=0)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="template leaf \\['x'\\] is a str"):
      ckpt.save(1, {"x": jnp.zeros(1)})
      ckpt.restore(1, {"x": "zeros"})


def test_partial_restore_reads_the_subtree_a_template_names(tmp_path):
  rng = np.random.default_rng(0)
  saved = {
      "networks": {f"net_{i}": {"w": rng.normal(size=(3, 4)).astype(np.float32),
                                "b": jnp.asarray(rng.normal(size=4), jnp.bfloat16)}
                   for i in range(3)},
      "train": {"key": jax.random.key(5), "count": np.int64(7)},
      "metrics": {"loss": np.arange(3, dtype=np.float32)},
  }
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, saved)
    one = ckpt.restore(1, {"networks": {"net_1": {"w": np.zeros((3, 4), np.float32),
                                                  "b": jnp.zeros(4, jnp.bfloat16)}}},
                       partial=True)
    assert set(one) == {"networks"} and set(one["networks"]) == {"net_1"}
    assert isinstance(one["networks"]["net_1"]["w"], np.ndarray)
    assert_state_equal(one["networks"]["net_1"], saved["networks"]["net_1"])
    keys_only = ckpt.restore(1, {"train": {"key": jax.random.key(0)}}, partial=True)
    assert_state_equal(keys_only["train"]["key"], saved["train"]["key"])
    metrics = ckpt.restore(1, {"metrics": {"loss": np.zeros(3, np.float32)}}, partial=True)
    np.testing.assert_array_equal(metrics["metrics"]["loss"], np.arange(3))
    # Without `partial` a subtree is a mismatch; with it, a leaf the checkpoint lacks or of
    # another shape still is.
    with pytest.raises(CheckpointError, match="networks/net_0/w not in the template"):
      ckpt.restore(1, {"metrics": {"loss": np.zeros(3, np.float32)}})
    with pytest.raises(CheckpointError, match="networks/net_7/w missing from the checkpoint"):
      ckpt.restore(1, {"networks": {"net_7": {"w": np.zeros((3, 4), np.float32)}}},
                   partial=True)
    with pytest.raises(CheckpointError, match=r"metrics/loss saved as float32\[3\], template "
                       r"float32\[4\]"):
      ckpt.restore(1, {"metrics": {"loss": np.zeros(4, np.float32)}}, partial=True)
    with pytest.raises(CheckpointError, match="holds a different state"):
      ckpt.restore(1, {"train": {"key": jax.random.key(0, impl="rbg")}}, partial=True)


def test_donating_the_saved_arrays_right_after_save_is_safe(tmp_path):
  """A training loop saves its state and at once donates it to the next step, without waiting:
  every checkpoint holds the values at its save."""
  step = jax.jit(lambda s: jax.tree.map(lambda a: a * 2 + 1, s), donate_argnums=0)
  state = {"w": jnp.arange(1_000_000, dtype=jnp.float32) / 1e6,
           "c": jnp.arange(5000, dtype=jnp.int32)}
  expected = {}
  with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    for t in range(1, 5):
      expected[t] = jax.tree.map(lambda a: np.array(a, copy=True), state)
      ckpt.save(t, state)
      state = step(state)  # Donates the buffers just saved.
    jax.block_until_ready(state)
    ckpt.wait()
    template = jax.tree.map(jnp.zeros_like, state)
    for t, values in expected.items():
      restored = ckpt.restore(t, template)
      for name in values:
        np.testing.assert_array_equal(np.asarray(restored[name]), values[name])
  # The loop's values really changed between saves.
  assert not np.array_equal(expected[1]["w"], expected[4]["w"])


def test_max_to_keep_none_keeps_every_step(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    for step in (1, 2, 3, 5, 8):
      ckpt.save(step, make_state(step))
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3, 5, 8]
    assert_state_equal(ckpt.restore(1, make_state(0)), make_state(1))
  with Checkpointer(tmp_path, max_to_keep=None) as again:
    assert again.all_steps() == [1, 2, 3, 5, 8]
  with Checkpointer(tmp_path, max_to_keep=1) as ckpt:  # A count keeps the newest steps only.
    ckpt.save(9, make_state(9))
    ckpt.wait()
    assert ckpt.all_steps() == [9]
