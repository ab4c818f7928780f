"""The one run loop (distill_jax.methods.loop) driving a tiny hand-written method."""

import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from distill_jax import io as io_lib
from distill_jax.methods import base, loop


class Tiny(base.DistillMethod):
  """`x <- 0.5 x + u_s + 0.01 noise`: a 4-vector driven by host inputs and the state's key.

  `inputs(s)` is `u_s = s / 10`, or NaN at `config.nan_at`; the metric "loss" is `sum(x)` of the
  state before the update (as the real methods report the loss the gradient came from), so a NaN
  input first shows in the state and only one step later in the watched metric. Every call of
  `inputs` is recorded. Not registered: the loop needs no registry.
  """

  name = "tiny"

  def __init__(self, config):
    super().__init__(config, data=None)
    self.calls = []
    self._lock = threading.Lock()

  def init(self, key):
    init_key, key = jax.random.split(key)
    return {"x": jax.random.normal(init_key, (4,)), "key": key}

  def inputs(self, step):
    with self._lock:
      self.calls.append(step)
    if step == self.config.kill_at:
      raise KeyboardInterrupt(f"killed while reading the inputs of step {step}")
    return np.float32(np.nan if step == self.config.nan_at else step / 10)

  def step(self, state, inputs):
    key, noise_key = jax.random.split(state["key"])
    x = 0.5 * state["x"] + inputs + 0.01 * jax.random.normal(noise_key, (4,))
    return {"x": x, "key": key}, {"loss": jnp.sum(state["x"]), "x_max": jnp.max(x)}

  def result(self, state):
    return np.asarray(state["x"])

  def divergence_hint(self):
    return "lower tiny.rate"


def tiny_config(**overrides):
  config = ml_collections.ConfigDict(
      {"seed": 3, "num_steps": 10, "log_every": 1, "checkpoint_every": 4, "nan_at": 0,
       "kill_at": 0}
  )
  config.update(overrides)
  return config


def saved(workdir, step=None):
  """The checkpoint `step` (default: the latest) as `{"state", "seconds"}`."""
  template = {"state": jax.jit(Tiny(tiny_config()).init)(jax.random.key(0)),
              "seconds": np.zeros((), np.float64)}
  with io_lib.Checkpointer(workdir.checkpoint_dir) as checkpointer:
    step = step or checkpointer.latest_step()
    return step, checkpointer.restore(step, template)


class FakeClock:
  """`perf_counter` advancing by `tick` per call: run seconds without measuring anything."""

  def __init__(self, tick):
    self.now, self.tick = 0.0, tick

  def perf_counter(self):
    self.now += self.tick
    return self.now


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 10-step run."""
  workdir = io_lib.Workdir(tmp_path_factory.mktemp("straight"))
  method = Tiny(tiny_config())
  return method, workdir, loop.run(method, workdir)


def test_uninterrupted_run_reads_inputs_in_order_and_traces_once(straight):
  method, workdir, result = straight
  assert method.calls == list(range(1, 11))
  assert result.steps == 10 and result.distilled_set.shape == (4,)
  records = io_lib.read_metrics(workdir.metrics_path)
  assert [r["step"] for r in records] == list(range(1, 11))
  assert all(r["step_traces"] == 1 for r in records)
  with io_lib.Checkpointer(workdir.checkpoint_dir) as checkpointer:
    assert checkpointer.all_steps() == [8, 10]  # Every 4 steps and at the end; 2 kept.
  step, checkpoint = saved(workdir)
  assert step == 10 and set(checkpoint) == {"state", "seconds"}
  np.testing.assert_array_equal(checkpoint["state"]["x"], result.distilled_set)
  # The logged loss of step s is sum(x) before step s: the step's own computation.
  x = np.asarray(jax.jit(method.init)(jax.random.key(3))["x"])
  assert records[0]["loss"] == pytest.approx(float(x.sum()), rel=1e-6)


def test_a_shorter_run_continued_equals_the_uninterrupted_run(straight, tmp_path):
  _, _, expected = straight
  workdir = io_lib.Workdir(tmp_path)
  first = Tiny(tiny_config(num_steps=6))
  loop.run(first, workdir)
  assert first.calls == list(range(1, 7))
  second = Tiny(tiny_config())
  result = loop.run(second, workdir)
  # Restored from the step-6 checkpoint: only steps 7..10 ran, their inputs read in order.
  assert second.calls == list(range(7, 11))
  np.testing.assert_array_equal(result.distilled_set, expected.distilled_set)
  records = io_lib.read_metrics(workdir.metrics_path)
  assert [r["step"] for r in records] == list(range(1, 11))
  assert all(r["step_traces"] == 1 for r in records)


def test_a_killed_run_resumes_bit_for_bit_and_its_late_metric_lines_go(straight, tmp_path):
  _, _, expected = straight
  workdir = io_lib.Workdir(tmp_path)
  # Killed while reading the inputs of step 7 (prefetched during step 6): steps 5 and 6 were
  # logged after the last checkpoint (4) and must not stay in metrics.jsonl.
  with pytest.raises(KeyboardInterrupt):
    loop.run(Tiny(tiny_config(kill_at=7)), workdir)
  assert [r["step"] for r in io_lib.read_metrics(workdir.metrics_path)] == list(range(1, 7))
  assert saved(workdir)[0] == 4
  resumed = Tiny(tiny_config())
  result = loop.run(resumed, workdir)
  assert resumed.calls == list(range(5, 11))
  np.testing.assert_array_equal(result.distilled_set, expected.distilled_set)
  records = io_lib.read_metrics(workdir.metrics_path)
  assert [r["step"] for r in records] == list(range(1, 11))


def test_metric_lines_after_the_restored_checkpoint_are_truncated(tmp_path):
  workdir = io_lib.Workdir(tmp_path)
  loop.run(Tiny(tiny_config(num_steps=4)), workdir)
  # Lines a killed run wrote after its last checkpoint (and a torn last line).
  with open(workdir.metrics_path, "a") as f:
    f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": 2.0}\n{"step": 7, "lo')
  loop.run(Tiny(tiny_config(num_steps=8)), workdir)
  records = io_lib.read_metrics(workdir.metrics_path)
  assert [r["step"] for r in records] == list(range(1, 9))
  assert records[4]["loss"] != 1.0


def test_seconds_of_a_resumed_run_include_the_earlier_segments(tmp_path, monkeypatch):
  workdir = io_lib.Workdir(tmp_path)
  # A slow first segment (1000 s per clock reading), a fast second one (1 s per reading).
  monkeypatch.setattr(loop, "time", FakeClock(1000.0))
  first = loop.run(Tiny(tiny_config(num_steps=4)), workdir)
  _, checkpoint = saved(workdir)
  earlier = float(checkpoint["seconds"])  # The first segment's time up to its checkpoint.
  assert 1000.0 <= earlier <= first.seconds
  monkeypatch.setattr(loop, "time", FakeClock(1.0))
  second = loop.run(Tiny(tiny_config()), workdir)
  # The second segment alone read its clock far fewer than 1000 times.
  assert earlier < second.seconds < earlier + 1000.0
  # A rerun of the finished run reports the recorded seconds and runs no step.
  monkeypatch.setattr(loop, "time", FakeClock(1.0))
  again_method = Tiny(tiny_config())
  again = loop.run(again_method, workdir)
  assert again_method.calls == [] and again.compile_seconds == 0.0
  assert again.seconds == float(saved(workdir)[1]["seconds"])
  np.testing.assert_array_equal(again.distilled_set, second.distilled_set)


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(leaf.dtype, jnp.floating))


def test_divergence_names_the_step_and_the_fix_and_keeps_a_finite_checkpoint(tmp_path):
  workdir = io_lib.Workdir(tmp_path)
  # NaN enters the state at step 6; the loss of step 7 (computed from that state) is NaN. No
  # step is logged before the end, so the one-step-lagged check finds it.
  with pytest.raises(base.DivergenceError,
                     match=r"tiny diverged at step 7 \(loss=nan\); lower tiny\.rate; the "
                           r"checkpoint of step 4 holds the last finite state"):
    loop.run(Tiny(tiny_config(nan_at=6, log_every=100)), workdir)
  step, checkpoint = saved(workdir)
  assert step == 4 and _all_finite(checkpoint["state"])


def test_a_state_that_diverges_on_a_checkpoint_step_is_never_saved(tmp_path):
  workdir = io_lib.Workdir(tmp_path)
  # NaN enters the state at step 8, a checkpoint step whose own loss (from step 7's state) is
  # still finite: saving it would leave a diverged state as the "last good" checkpoint.
  with pytest.raises(base.DivergenceError, match=r"tiny diverged at step 8 .*lower tiny\.rate"):
    loop.run(Tiny(tiny_config(nan_at=8, log_every=100)), workdir)
  step, checkpoint = saved(workdir)
  assert step == 4 and _all_finite(checkpoint["state"])


def test_divergence_before_any_checkpoint_says_so(tmp_path):
  workdir = io_lib.Workdir(tmp_path)
  with pytest.raises(base.DivergenceError,
                     match=r"diverged at step 2 .*no checkpoint was written yet"):
    loop.run(Tiny(tiny_config(nan_at=1)), workdir)


def test_a_checkpoint_beyond_the_run_is_refused(tmp_path):
  workdir = io_lib.Workdir(tmp_path)
  loop.run(Tiny(tiny_config(num_steps=8)), workdir)
  with pytest.raises(ValueError, match="holds step 8, beyond the run's 6 steps"):
    loop.run(Tiny(tiny_config(num_steps=6)), workdir)


def test_check_finite_returns_floats_and_ignores_unwatched_values():
  method = Tiny(tiny_config())
  host = loop.check_finite(method, 3, {"loss": jnp.float32(0.25), "x_max": jnp.float32(np.nan)},
                           None)
  assert host["loss"] == 0.25 and type(host["loss"]) is float and np.isnan(host["x_max"])
  for bad in (np.inf, -np.inf, np.nan):
    with pytest.raises(base.DivergenceError, match="diverged at step 3"):
      loop.check_finite(method, 3, {"loss": jnp.float32(bad)}, None)
