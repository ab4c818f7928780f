"""Per-step time and per-device memory of FRePo, MTT and evaluation on 1, 2, 4, ... devices.

  python benchmarks/scaling.py                                   # CPU: 4 simulated devices
  python benchmarks/scaling.py --devices=1,2,4,8 --preset=paper  # an accelerator host

One process, every device count in the same run: each count n builds a mesh over the first n
devices (`distill_jax.parallel`) and compiles each workload as the library runs it (the run
loop's state shardings, replicated inputs; the trainer's vmapped networks), then times `--steps`
calls after a warm-up, waiting for each (`block_until_ready`). FLOPs are XLA's
`cost_analysis()` of the per-device program, shown as a fraction of a 2048x2048 float32 matmul's
FLOP/s measured on one device in the same run. Memory is XLA's per-device
estimate of the compiled program (`memory_analysis()`: arguments + outputs + temporaries) and,
on accelerators, the peak of `device.memory_stats()`. The ratio column is the 1-device time over
the n-device time (> 1: faster).

Workloads (random images; the cost does not depend on their values):
  frepo  FRePo's outer step, real batch over `data` and the pool over `model`
  mtt    one MTT iteration (student unroll, meta-gradient), synthetic minibatch over `data`
  eval   one training step of M evaluation networks vmapped, networks over `model`, their batch
         over `data`
On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices on the same
cores: the table then shows the cost of splitting (collectives, smaller kernels), not a
speed-up; real scaling needs real devices.
"""

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and (
    os.environ.get("JAX_PLATFORMS", "cpu") == "cpu"):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4")

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

# Run as a script from anywhere: the repository root holds `configs`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import frepo as frepo_config  # noqa: E402
from configs import mtt as mtt_config  # noqa: E402
from distill_jax import data as data_lib  # noqa: E402
from distill_jax import parallel  # noqa: E402
from distill_jax.evaluation import get_protocol  # noqa: E402
from distill_jax.methods import frepo, mtt  # noqa: E402
from distill_jax.training import Trainer  # noqa: E402
from distill_jax.training import trainer as trainer_lib  # noqa: E402

# (FRePo config arg, MTT config arg, evaluation protocol kwargs, image shape, networks)
PRESETS = {
    # Small enough for 2 CPU cores: Fashion-MNIST shapes at the CPU presets' widths.
    "cpu": ("fashion_mnist,ipc=10,cpu", "fashion_mnist,ipc=2,cpu,inner.batch_size=20",
            {"width": 32, "depth": 3}, (28, 28, 1), 4),
    # The papers' CIFAR-10 IPC 10 shapes (FRePo: width 128, batch 1024; MTT: N 30, width 128,
    # remat): for an accelerator host.
    "paper": ("cifar10,ipc=10", "cifar10,ipc=10,inner.remat=True",
              {"width": 128, "depth": 3}, (32, 32, 3), 8),
}

_DEVICES = flags.DEFINE_list("devices", None, "Device counts (default 1, 2, 4, ..., all).")
_PRESET = flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Workload shapes.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed calls per workload and device count.")
_WORKLOADS = flags.DEFINE_list("workloads", ["frepo", "mtt", "eval"], "Workloads to time.")


def _random_data(image_shape, num_classes=10, num_real=2048) -> data_lib.RealData:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(num_real, *image_shape)).astype(np.float32)
  y = (np.arange(num_real) % num_classes).astype(np.int32)
  return data_lib.RealData("random", num_classes, image_shape,
                           tuple(str(c) for c in range(num_classes)), x, y, x[:10], y[:10])


def _time(fn, carry, args, steps: int):
  """Seconds per call of `carry, out = fn(carry, *args)` after one warm-up call."""
  carry, out = fn(carry, *args)
  jax.block_until_ready((carry, out))
  start = time.perf_counter()
  for _ in range(steps):
    carry, out = fn(carry, *args)
    jax.block_until_ready((carry, out))
  return (time.perf_counter() - start) / steps


def _method_program(method):
  """The method's step compiled as the run loop compiles it on the current mesh."""
  key = jax.random.key(0)
  options = {}
  if parallel.current_mesh() is not None:
    shardings = method.state_shardings(jax.eval_shape(method.init, key))
    options = {"out_shardings": (shardings, parallel.replicated())}
  state = jax.jit(method.init, **({"out_shardings": options["out_shardings"][0]}
                                  if options else {}))(key)
  inputs = parallel.place(method.inputs(1), parallel.replicated())
  compiled = jax.jit(method.step, donate_argnums=0, **options).lower(state, inputs).compile()
  return compiled, state, (inputs,)


def frepo_workload(preset):
  arg, _, _, shape, _ = PRESETS[preset]
  return _method_program(frepo.FRePo(frepo_config.get_config(arg), _random_data(shape)))


def mtt_workload(preset):
  _, arg, _, shape, _ = PRESETS[preset]
  method = mtt.MTT(mtt_config.get_config(arg), _random_data(shape))
  params = jax.tree.map(np.asarray, method.model.init(jax.random.key(1),
                                                      jnp.zeros((1, *shape)))["params"])
  target = jax.tree.map(lambda a: a + np.float32(0.01), params)
  inputs = {"start": params, "target": target, "expert": np.int32(0),
            "start_epoch": np.int32(0)}
  method.inputs = lambda step: inputs  # No expert buffer: the step's cost is what is timed.
  return _method_program(method)


def eval_workload(preset):
  _, _, kwargs, shape, networks = PRESETS[preset]
  data = _random_data(shape)
  from distill_jax import distilled  # pylint: disable=g-import-not-at-top

  training_set = distilled.PixelSet(data.x_train[:100], data.y_train[:100],
                                    meta=data.set_meta("random", 10))
  trainer = Trainer.for_set(get_protocol("standard", **kwargs), training_set)
  keys = jax.random.split(jax.random.key(0), networks)
  stack = trainer.initial_state(keys, shape, vectorize=True)
  state = parallel.place(stack, parallel.stack_shardings(stack, "model"))
  view = parallel.place(trainer_lib._training_view(training_set), parallel.replicated())
  args = (np.int32(0), np.int32(1), view, np.float32(0.01))
  # The trainer's own vmapped program (networks over `model`), one step per call.
  compiled = trainer_lib._run_program.lower(trainer, True, state, *args).compile()
  return compiled, state, args


WORKLOADS = {"frepo": frepo_workload, "mtt": mtt_workload, "eval": eval_workload}


def _memory_mb(compiled) -> float:
  try:
    analysis = compiled.memory_analysis()
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes)
    return total / 2**20
  except Exception:  # pylint: disable=broad-except  # Not every backend reports it.
    return float("nan")


def _gflop(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float((analysis or {}).get("flops", float("nan"))) / 1e9


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """GFLOP/s of an n x n float32 matmul on the first device (the same run's yardstick)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _peak_device_mb(devices) -> float:
  stats = [d.memory_stats() or {} for d in devices]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s.get("peak_bytes_in_use")]
  return max(peaks) / 2**20 if peaks else float("nan")


def main(argv):
  del argv
  devices = jax.devices()
  counts = ([int(c) for c in _DEVICES.value] if _DEVICES.value else
            [n for n in (1, 2, 4, 8, 16, 32, 64) if n < len(devices)] + [len(devices)])
  counts = sorted(set(c for c in counts if c <= len(devices)))
  matmul = matmul_gflops()
  print(f"device: {devices[0].platform} {devices[0].device_kind}, {len(devices)} device(s); "
        f"preset {_PRESET.value}; {_STEPS.value} timed calls each; 2048x2048 f32 matmul "
        f"{matmul:.1f} GFLOP/s on one device")
  print("| workload | devices | mesh (data x model) | ms/step | ratio to 1 device | "
        "per-device MB (XLA estimate) | peak device MB | % of matmul FLOP/s per device |")
  print("|---|---|---|---|---|---|---|---|")
  for name in _WORKLOADS.value:
    base = None
    for n in counts:
      shape = (n, 1) if name != "eval" else (max(1, n // 2), min(2, n))
      with parallel.use_mesh(parallel.make_mesh(shape, devices=devices[:n])):
        compiled, state, args = WORKLOADS[name](_PRESET.value)
        memory, gflop = _memory_mb(compiled), _gflop(compiled)  # Per device (SPMD program).
        seconds = _time(compiled, state, args, _STEPS.value)
      base = base or seconds
      print(f"| {name} | {n} | {shape[0]} x {shape[1]} | {1e3 * seconds:.1f} | "
            f"{base / seconds:.2f} | {memory:.1f} | {_peak_device_mb(devices[:n]):.1f} | "
            f"{100 * gflop / seconds / matmul:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
