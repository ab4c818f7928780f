"""Convolution gradients inside `lax.scan` / `lax.cond`: XLA's transpose rules vs the explicit,
canonical-layout gradients of `distill_jax.models.convolution` (what every model uses).

  python benchmarks/conv_backward.py                 # ConvNet width 16, Fashion-MNIST shape
  python benchmarks/conv_backward.py --width=128 --repeats=3

One training step of a ConvNet (DSA, SGD, the shared `training.Trainer` step) on a batch of
`--batch` 28x28x1 images, compiled three ways: at the top level of the program, as the body of a
`lax.scan` (per step, over `--scan` steps) and inside a taken `lax.cond` branch. Each is timed
with the convolution of the model zoo ("canonical") and with plain `lax.conv_general_dilated`
("lax", the Flax default), in the same run; the median ms over `--repeats` after one warm-up.
XLA:CPU runs the weight gradient of the "lax" form as a naive loop inside nested computations.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill_jax.distilled import PixelSet, SetMeta  # noqa: E402
from distill_jax.models import convolution  # noqa: E402
from distill_jax.training import Recipe, Trainer  # noqa: E402


def _median_ms(fn, args, repeats: int, per_call: int = 1) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    begin = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1000 * (time.perf_counter() - begin) / per_call)
  return statistics.median(times)


def measure(width: int, batch: int, scan: int, repeats: int) -> dict[str, float]:
  recipe = Recipe(model="convnet", model_kwargs={"width": width}, lr=0.01, epochs=1,
                  batch_size=256, loss="l1", augmentation="dsa")
  trainer = Trainer(recipe=recipe, num_classes=10, num_train=batch, channels=1,
                    label_kind="logits")
  meta = SetMeta(method="bench", dataset="fashion_mnist", ipc=1, num_classes=10,
                 image_shape=(28, 28, 1), label_kind="logits")
  x = jax.random.normal(jax.random.key(0), (batch, 28, 28, 1))
  y = jax.random.normal(jax.random.key(1), (batch, 10))
  state = trainer.init(jax.random.key(2), x[:1])
  lr = jnp.float32(0.01)

  def one(s, t, x, y):
    return trainer.step(s, t, PixelSet(x, y, meta=meta), lr)[0]

  top = jax.jit(lambda s, x, y: one(s, jnp.int32(0), x, y))
  scanned = jax.jit(lambda s, x, y: lax.scan(lambda c, t: (one(c, t, x, y), None), s,
                                             jnp.arange(scan))[0])
  cond = jax.jit(lambda s, x, y, p: lax.cond(p, lambda c: one(c, jnp.int32(0), x, y),
                                             lambda c: c, s))
  return {"top": _median_ms(top, (state, x, y), repeats),
          "scan": _median_ms(scanned, (state, x, y), repeats, per_call=scan),
          "cond": _median_ms(cond, (state, x, y, True), repeats)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--scan", type=int, default=20, help="steps per scanned program")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, ConvNet width {args.width}, batch {args.batch}")
  canonical = convolution.conv_general_dilated
  results = {}
  for name, conv in (("canonical", canonical), ("lax", lax.conv_general_dilated)):
    convolution.conv_general_dilated = conv  # `models.common.conv` looks it up per call.
    results[name] = measure(args.width, args.batch, args.scan, args.repeats)
  convolution.conv_general_dilated = canonical
  print("| where | lax ms/step | canonical ms/step | lax / canonical |")
  print("| --- | --- | --- | --- |")
  for where in ("top", "scan", "cond"):
    slow, fast = results["lax"][where], results["canonical"][where]
    print(f"| {where} | {slow:.1f} | {fast:.1f} | {slow / fast:.2f} |")


if __name__ == "__main__":
  main()
