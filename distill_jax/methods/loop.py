"""The one run loop every distillation method runs in (see `methods.base` for the contract).

`run(method, workdir)`:

1. `method.prepare()` (expert buffers, teacher pools), then the step-0 state from
   `jax.random.key(config.seed)`;
2. restore the latest checkpoint of `workdir.checkpoint_dir` when there is one, and drop the
   metric lines a killed run logged after it (`MetricWriter.truncate`);
3. compile `method.step` once, ahead of time, with the state donated (the compiled program cannot
   retrace: a step whose shapes change is an error, not a silent recompilation);
4. for every remaining step: take the inputs a reader thread prepared (`method.inputs(step)`,
   one step ahead), run the step, check the previous step's watched metrics (one step stays in
   flight while the host checks), log every `config.log_every` steps (metrics.jsonl,
   TensorBoard, a progress line with steps/s and ETA that leave the compilation out), and
   checkpoint every `config.checkpoint_every` steps and at the end. A checkpoint is only written
   after its step's watched metrics and the state itself were found finite (a step's metrics
   describe the state before its update, so they can be finite while the update is not), so a
   diverged run stops with `DivergenceError` and the last checkpoint holds the last good state.
   `Checkpointer.save` copies the state to host memory before it returns, so the next
   (donating) step needs no wait.
5. return the set (`method.result(state)`) with the run's seconds: the wall-clock time of every
   segment of the run (a killed run's time up to its last checkpoint, then the resumed one's),
   kept inside the checkpoints so that it is exact across restarts.

A killed run rerun with the same command restores the last checkpoint and, because every key
and every host input derives from the seed and the step, ends with the set an uninterrupted run
gives.
"""

import concurrent.futures
import contextlib
import dataclasses
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from distill_jax import io as io_lib
from distill_jax import parallel
from distill_jax.methods.base import DistillMethod, DivergenceError


def check_finite(method: DistillMethod, step: int, metrics: dict[str, Any],
                 last_checkpoint: int | None) -> dict[str, float]:
  """Fetches a step's metrics as floats; raises `DivergenceError` if a watched one is not finite.

  Args:
    method: the running method (its `watched` names and `divergence_hint`).
    step: the step the metrics belong to.
    metrics: scalar metrics (device arrays).
    last_checkpoint: the step of the newest checkpoint, named in the message.
  """
  host = {name: float(value) for name, value in parallel.to_host(metrics).items()}
  bad = {name: host[name] for name in method.watched if not np.isfinite(host[name])}
  if bad:
    shown = ", ".join(f"{name}={value}" for name, value in host.items() if name in method.watched)
    kept = ("no checkpoint was written yet" if last_checkpoint is None
            else f"the checkpoint of step {last_checkpoint} holds the last finite state")
    raise DivergenceError(
        f"{method.name} diverged at step {step} ({shown}); {method.divergence_hint()}; {kept}"
    )
  return host


@jax.jit
def _is_finite(state) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(state)
           if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def check_state_finite(method: DistillMethod, step: int, state, last_checkpoint: int | None
                       ) -> None:
  """Raises `DivergenceError` if a floating-point leaf of `state` holds NaN or inf.

  The metrics of step s (its loss) are computed from the state before the step, so a step whose
  update diverges still reports finite metrics; this check keeps such a state out of the
  checkpoints.
  """
  if not bool(parallel.to_host(_is_finite(state))):
    kept = ("no checkpoint was written yet" if last_checkpoint is None
            else f"the checkpoint of step {last_checkpoint} holds the last finite state")
    raise DivergenceError(
        f"{method.name} diverged at step {step} (its state holds NaN or inf values); "
        f"{method.divergence_hint()}; {kept}"
    )


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What `run` returns.

  Attributes:
    distilled_set: `method.result` of the final state.
    seconds: wall-clock seconds of the whole run, summed over every resumed segment.
    compile_seconds: seconds this segment spent compiling the step (0 if nothing was left).
    steps: `method.num_steps`.
    ms_per_step: wall-clock milliseconds per step of this segment after compilation (logging and
      checkpoints included; NaN if no step was left).
  """

  distilled_set: Any
  seconds: float
  compile_seconds: float
  steps: int
  ms_per_step: float = float("nan")


def run(method: DistillMethod, workdir: io_lib.Workdir) -> RunResult:
  """Runs `method` from its latest checkpoint in `workdir` to `method.num_steps`.

  Raises:
    DivergenceError: a watched metric became NaN or infinite (the message names the fix).
    ValueError: the workdir holds a checkpoint beyond `method.num_steps`.
  """
  begin = time.perf_counter()
  config = method.config
  num_steps = method.num_steps
  method.prepare()
  key = jax.random.key(config.seed)
  shardings = _state_shardings(method, key)
  # What a checkpoint holds: the method's state and the run's seconds up to it.
  init = jax.jit(method.init, **({} if shardings is None else {"out_shardings": shardings}))
  saved = {"state": init(key),
           "seconds": np.zeros((), np.float64)}
  checkpointer = io_lib.Checkpointer(workdir.checkpoint_dir)
  writer = io_lib.MetricWriter(workdir) if parallel.is_writer() else _NoMetrics()
  compile_seconds, ms_per_step = 0.0, float("nan")
  try:
    done = checkpointer.latest_step() or 0
    if done > num_steps:
      raise ValueError(
          f"{workdir.checkpoint_dir} holds step {done}, beyond the run's {num_steps} steps; use "
          "a fresh workdir or the num_steps of that run"
      )
    if done:
      saved = checkpointer.restore(done, saved)
      logging.info("%s: resumed from the checkpoint of step %d.", method.name, done)
    writer.truncate(done)  # Lines a killed run logged after its last checkpoint go.
    earlier = float(saved["seconds"])
    state = saved["state"]
    if done < num_steps:
      state, compile_seconds, ms_per_step = _run_steps(
          method, state, shardings, done, checkpointer, writer,
          seconds=lambda: earlier + time.perf_counter() - begin)
      checkpointer.wait()
      total = earlier + time.perf_counter() - begin
    else:
      total = earlier
  finally:
    writer.close()
    checkpointer.close()
  return RunResult(method.result(parallel.to_host(state)), total, compile_seconds, num_steps,
                   ms_per_step)


def _state_shardings(method: DistillMethod, key) -> Any:
  """Where the state lives on the current mesh (`method.state_shardings`), or None without
  one (jit's default placement: one device, today's programs)."""
  if parallel.current_mesh() is None:
    return None
  return method.state_shardings(jax.eval_shape(method.init, key))


class _NoMetrics:
  """The metric writer of processes other than 0 in a multi-process run: they log nothing."""

  def write(self, step, **scalars) -> None:
    del step, scalars

  def truncate(self, after_step: int) -> None:
    del after_step

  def close(self) -> None:
    pass


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during the steps; the message says where it stopped and what the checkpoints keep."""


@contextlib.contextmanager
def _ctrl_c_at_step_boundaries():
  """Within: a first Ctrl-C only sets the returned flag, which the loop checks after each step
  (so no library call, e.g. a checkpoint being written, can swallow it); a second interrupts
  at once. Outside the main thread (no signal handlers there) the flag stays empty."""
  flag: list[int] = []
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def first(signum, frame):
    del frame
    flag.append(signum)
    signal.signal(signal.SIGINT, previous)

  previous = signal.getsignal(signal.SIGINT)
  if previous is signal.SIG_IGN:  # Started with Ctrl-C ignored (a background job): keep it so.
    yield flag
    return
  previous = signal.signal(signal.SIGINT, first) or signal.default_int_handler
  try:
    yield flag
  finally:
    signal.signal(signal.SIGINT, previous)


def _run_steps(method: DistillMethod, state, shardings, done: int, checkpointer, writer, *,
               seconds):
  config = method.config
  num_steps = method.num_steps
  traces = []

  def traced_step(state, inputs):
    traces.append(None)
    return method.step(state, inputs)

  def read(step):  # On a mesh, host inputs go to every device (methods split them in `step`).
    return parallel.place(method.inputs(step), parallel.replicated())

  jit_options = {}
  if shardings is not None:
    jit_options["out_shardings"] = (shardings, parallel.replicated())
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
    inputs = read(done + 1)
    logging.info("%s: compiling the step ...", method.name)
    begin = time.perf_counter()
    step_fn = jax.jit(traced_step, donate_argnums=0, **jit_options).lower(state, inputs).compile()
    compile_seconds = time.perf_counter() - begin
    logging.info("%s: compiled the step in %.1f s.", method.name, compile_seconds)
    progress = io_lib.ProgressLogger(num_steps, every=config.log_every, start_step=done)
    steps_begin = time.perf_counter()
    last_checkpoint = done or None
    pending = None  # (step, metrics) of the step before the one in flight.
    step = done
    try:
      with _ctrl_c_at_step_boundaries() as ctrl_c:
        for step in range(done + 1, num_steps + 1):
          future = reader.submit(read, step + 1) if step < num_steps else None
          state, metrics = step_fn(state, inputs)
          if parallel.one_call_in_flight():
            jax.block_until_ready(metrics)
          if pending is not None:
            check_finite(method, *pending, last_checkpoint)
          pending = (step, metrics)
          is_last = step == num_steps
          if step % config.log_every == 0 or is_last:
            host = check_finite(method, step, metrics, last_checkpoint)
            writer.write(step, **host, step_traces=len(traces))
            progress.log(step, **{name: host[name] for name in method.watched})
          if step % config.checkpoint_every == 0 or is_last:
            check_finite(method, step, metrics, last_checkpoint)  # Never save a diverged state.
            check_state_finite(method, step, state, last_checkpoint)
            checkpointer.save(step, {"state": state, "seconds": np.asarray(seconds(), np.float64)})
            last_checkpoint = step
          if future is not None:
            inputs = future.result()
          if ctrl_c:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
      kept = (f"the checkpoint of step {last_checkpoint} is kept" if last_checkpoint
              else "no checkpoint was written yet")
      raise Interrupted(f"at step {step} of {num_steps}; {kept}") from None
    finally:
      progress.close()
  return state, compile_seconds, 1e3 * (time.perf_counter() - steps_begin) / (num_steps - done)
