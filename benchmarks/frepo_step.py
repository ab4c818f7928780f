"""Milliseconds and FLOP/s of FRePo's jitted outer step, next to a matmul timed in the same run.

  python benchmarks/frepo_step.py                       # both shapes, 5 timed steps each
  python benchmarks/frepo_step.py --shapes=cpu --steps=20
  python benchmarks/frepo_step.py --shapes=cifar10_ipc10 --steps=2

Shapes:
  cifar10_ipc10  the paper's CIFAR-10 IPC 10 step: 32x32x3 images, 100 distilled images and
                 their flipped copies in the kernel, ConvNet width 128 (128/256/512) with batch
                 norm, 1024 real images per step, a pool of 10 (configs/frepo.py:cifar10,ipc=10).
  cpu            the CPU preset on Fashion-MNIST IPC 10 (configs/frepo.py:fashion_mnist,ipc=10,
                 cpu): 28x28x1, width 32, 256 real images.
  cpu_width64    the same at the width of the authors' CPU run (64).

The real images are random (the step's cost does not depend on their values), so no dataset is
needed. FLOPs are XLA's `cost_analysis()` of the compiled step; it counts both branches of the
pool member's train-or-reset `cond`, so the achieved FLOP/s is an upper estimate. The matmul
(float32, n x n times n x n, 2 n^3 FLOPs) shows what the same device reaches on dense algebra.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

# Run as a script from anywhere: the repository root holds `configs`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import frepo as frepo_config  # noqa: E402
from distill_jax import data as data_lib  # noqa: E402
from distill_jax.methods import frepo  # noqa: E402

SHAPES = {
    "cifar10_ipc10": ("cifar10,ipc=10", (32, 32, 3), 10),
    "cpu": ("fashion_mnist,ipc=10,cpu", (28, 28, 1), 10),
    "cpu_width64": ("fashion_mnist,ipc=10,cpu,pool.width=64", (28, 28, 1), 10),
}

_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to time, from {sorted(SHAPES)}.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per shape (after one warm-up step).")
_NUM_REAL = flags.DEFINE_integer("num_real", 4096, "Random real images to sample batches from.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "n of the n x n float32 matmul.")


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax returned one dict per program.
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def time_matmul(n: int, repeats: int = 5) -> tuple[float, float]:
  """Seconds per `n x n @ n x n` float32 matmul and its FLOP/s."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a, b)
  out.block_until_ready()
  seconds = (time.perf_counter() - start) / repeats
  return seconds, 2 * n**3 / seconds


def time_step(arg: str, image_shape: tuple[int, int, int], num_classes: int, *, steps: int,
              num_real: int) -> dict[str, float]:
  """Compiles and times `steps` FRePo steps of config `configs/frepo.py:<arg>`."""
  config = frepo_config.get_config(arg)
  rng = np.random.default_rng(0)
  x_train = rng.normal(size=(num_real, *image_shape)).astype(np.float32)
  y_train = (np.arange(num_real) % num_classes).astype(np.int32)
  data = data_lib.RealData("random", num_classes, image_shape,
                           tuple(str(c) for c in range(num_classes)), x_train, y_train,
                           x_train[:num_classes], y_train[:num_classes])
  method = frepo.FRePo(config, data)
  num_syn = config.ipc * num_classes
  state = jax.jit(method.init)(jax.random.key(0))
  inputs = method.inputs(1)
  start = time.perf_counter()
  # As the run loop compiles it: ahead of time, the state donated.
  compiled = jax.jit(method.step, donate_argnums=0).lower(state, inputs).compile()
  compile_seconds = time.perf_counter() - start
  flops = _flops(compiled)
  state, metrics = compiled(state, inputs)  # Warm-up (and a check that it runs).
  jax.block_until_ready((state, metrics))
  start = time.perf_counter()
  for step in range(steps):
    state, metrics = compiled(state, method.inputs(step + 2))
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - start) / steps
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"{arg}: the loss is not finite; the benchmark state is broken")
  return {
      "ms_per_step": 1e3 * seconds,
      "gflop_per_step": flops / 1e9,
      "gflop_per_second": flops / seconds / 1e9,
      "compile_seconds": compile_seconds,
      "real_batch": config.outer.real_batch_size,
      "num_syn": num_syn,
      "width": config.pool.width,
  }


def main(argv):
  del argv
  unknown = sorted(set(_SHAPES.value) - set(SHAPES))
  if unknown:
    raise app.UsageError(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
  device = jax.devices()[0]
  print(f"device: {device.platform} {device.device_kind} ({jax.device_count()} device(s))")
  matmul_seconds, matmul_flops = time_matmul(_MATMUL.value)
  print(f"matmul {_MATMUL.value}x{_MATMUL.value} f32: {1e3 * matmul_seconds:.2f} ms, "
        f"{matmul_flops / 1e9:.1f} GFLOP/s")
  for name in _SHAPES.value:
    arg, image_shape, num_classes = SHAPES[name]
    result = time_step(arg, image_shape, num_classes, steps=_STEPS.value, num_real=_NUM_REAL.value)
    print(
        f"{name} ({arg}; width {result['width']}, {result['num_syn']} distilled, real batch "
        f"{result['real_batch']}): {result['ms_per_step']:.1f} ms/step, "
        f"{result['gflop_per_step']:.1f} GFLOP/step, {result['gflop_per_second']:.1f} GFLOP/s "
        f"({100 * result['gflop_per_second'] * 1e9 / matmul_flops:.0f}% of the matmul), "
        f"compiled in {result['compile_seconds']:.1f} s"
    )


if __name__ == "__main__":
  app.run(main)
