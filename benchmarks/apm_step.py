"""Memory and time of APM's image update for S = 1, 4, 10 segments (paper 003 Section 4.3).

  python benchmarks/apm_step.py                  # CIFAR-10 IPC 50 shape (B = 500, ConvNet-128)
  python benchmarks/apm_step.py --shape=cpu      # the CPU preset's shape (B = 100, width 16)
  python benchmarks/apm_step.py --no_time        # compile and memory analysis only

The minibatch's image gradient (Eq. 4 through the teacher and K = 5 student checkpoints,
accumulated over S segments of B / S images, then the SGD step; what every iteration runs) is
compiled for each S in one run: XLA's static memory estimate of the compiled program
(`memory_analysis()`: arguments + outputs + temporaries - donated aliases; the paper's figure is
6.5 GB for ImageNet-1K IPC 50 at segment size 100) and the median wall-clock ms over `--repeats`
after a warm-up. The student training of a refresh iteration does not depend on S; its time is
printed once beside it (`refresh ms`: one student of E = 250 epochs' worth of steps is
`--refresh_epochs` epochs here, scaled to E). Teachers and students are random networks: time
and memory do not depend on the values.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.d3s_step import measure  # noqa: E402  (compiled memory, median ms)
from configs import apm as apm_config  # noqa: E402
from distill_jax import data as data_lib  # noqa: E402
from distill_jax.methods import apm as apm_lib  # noqa: E402

SHAPES = {
    "cifar10": dict(arg="cifar10,ipc=50", image_shape=(32, 32, 3), num_classes=10),
    "cpu": dict(arg="fashion_mnist,ipc=10,cpu", image_shape=(28, 28, 1), num_classes=10),
}


def build(shape_name: str, segments: int, refresh_epochs: int):
  shape = SHAPES[shape_name]
  config = apm_config.get_config(
      f"{shape['arg']},outer.segments={segments},inner.epochs={refresh_epochs},"
      "inner.checkpoints=5")
  classes, image_shape = shape["num_classes"], shape["image_shape"]
  rng = np.random.default_rng(0)
  n = config.ipc * classes
  x = rng.random((n, *image_shape), np.float32)
  y = (np.arange(n) % classes).astype(np.int32)
  data = data_lib.RealData("random", classes, image_shape, tuple(map(str, range(classes))),
                           x, y, x[:10], y[:10])
  method = apm_lib.APM(config, data)
  keys = jax.random.split(jax.random.key(0), config.teachers.num_teachers)
  variables = [method.model.init(k, jnp.asarray(x[:1]), train=False) for k in keys]
  method.__dict__["device_teachers"] = jax.tree.map(lambda *a: jnp.stack(a), *variables)
  return method


def image_update(method):
  """One iteration without a refresh: the minibatch gradient over S segments + SGD."""

  def update(state, teachers):
    teacher = jax.tree.map(lambda a: a[0], teachers)
    y = jnp.asarray(method.labels)
    grad, metrics = method.minibatch_gradient(state.x_syn, y, teacher, state.checkpoints)
    direction, opt_state = method.optimizer.update(grad, state.opt_state)
    return state.replace(x_syn=state.x_syn - direction, opt_state=opt_state), metrics

  return update


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), default="cifar10")
  parser.add_argument("--segments", default="1,4,10")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--refresh_epochs", type=int, default=5,
                      help="student epochs timed for the refresh (scaled to E = 250)")
  parser.add_argument("--no_time", action="store_true")
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, devices {jax.devices()}, shape {args.shape}")
  print("| segments S | images per segment | GiB | ms/iteration | time vs S=1 | GiB vs S=1 |")
  print("| --- | --- | --- | --- | --- | --- |")
  base = None
  for segments in (int(s) for s in args.segments.split(",")):
    method = build(args.shape, segments, args.refresh_epochs)
    state = jax.jit(method.init)(jax.random.key(0))
    gib, ms = measure(image_update(method), state, method.device_teachers,
                      repeats=args.repeats, run=not args.no_time)
    base = base or (gib, ms)
    print(f"| {segments} | {method.batch_size // segments} | {gib:.3f} | {ms:.1f} | "
          f"{ms / base[1]:.2f} | {gib / base[0]:.2f} |", flush=True)
  if not args.no_time:
    method = build(args.shape, 1, args.refresh_epochs)
    state = jax.jit(method.init)(jax.random.key(0))
    refresh = jax.jit(lambda s: method.train_student(s.key, s.x_syn, jnp.zeros(
        (method.batch_size, method.data.num_classes))))
    jax.block_until_ready(refresh(state))
    begin = time.perf_counter()
    jax.block_until_ready(refresh(state))
    seconds = (time.perf_counter() - begin) * 250 / args.refresh_epochs
    print(f"refresh (one student, E = 250 epochs on B = {method.batch_size}): {seconds:.1f} s; "
          f"every {method.config.inner.refresh_every} iterations")


if __name__ == "__main__":
  main()
