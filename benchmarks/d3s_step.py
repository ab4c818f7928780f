"""Time and memory of one D3S synthesis iteration, beside a plain CE input-gradient baseline.

  python benchmarks/d3s_step.py              # both shapes below
  python benchmarks/d3s_step.py --only=cpu   # the CPU preset's shape only (seconds)
  python benchmarks/d3s_step.py --no_time    # compile and memory analysis only

Shapes:
  tiny: the paper's Tiny-ImageNet setting (Appendix D.6: 7729 MiB on an RTX 6000 Ada, 155 s per
        1000 iterations): ResNet-18 (3x3 stem, batch norm, 17 conv layers), 64x64x3 images, a
        batch of B = 200, M = 5 teachers, 200 classes;
  cpu:  `configs/d3s.py:fashion_mnist,cpu`: ConvNet width 16 / depth 3 / batch norm, 28x28x1,
        B = 10, M = 5, 10 classes.

For each shape: the compiled iteration's memory (`compiled.memory_analysis()`: arguments +
outputs + temporaries - donated aliases, XLA's static estimate; the peak a device would need),
and the median wall-clock ms per iteration over `--repeats` after one warm-up; and the same for
the baseline, one step of `alpha * CE` on the augmented batch through the same teacher (the
SRe2L/CDA recover loop without its statistic loss), so the ratio is D3S's cost of per-layer
statistics, ISU and the Gaussian KL. Teachers are random networks and the real statistics come
from random images: time and memory do not depend on the values.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import d3s as d3s_config  # noqa: E402
from distill_jax import data as data_lib  # noqa: E402
from distill_jax.methods import d3s as d3s_lib  # noqa: E402

SHAPES = {
    "tiny": dict(arg="tiny_imagenet,ipc=1", image_shape=(64, 64, 3), num_classes=200),
    "cpu": dict(arg="fashion_mnist,ipc=1,cpu", image_shape=(28, 28, 1), num_classes=10),
}


def build(name: str):
  """The D3S method at a shape, with random teachers and statistics on the device."""
  shape = SHAPES[name]
  config = d3s_config.get_config(shape["arg"])
  n, image_shape, classes = 4 * shape["num_classes"], shape["image_shape"], shape["num_classes"]
  rng = np.random.default_rng(0)
  x = rng.random((n, *image_shape), np.float32)
  y = (np.arange(n) % classes).astype(np.int32)
  data = data_lib.RealData("random", classes, image_shape, tuple(map(str, range(classes))),
                           x, y, x[:10], y[:10])
  method = d3s_lib.D3S(config, data)
  model, teachers = method.model, config.teachers.num_teachers
  keys = jax.random.split(jax.random.key(0), teachers)
  variables = [model.init(k, jnp.asarray(x[:1]), train=False) for k in keys]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *variables)
  blocks = model.apply(variables[0], jnp.asarray(x[:32]), train=False,
                       return_features=True)[1]["blocks"]
  real = []
  for block in blocks:
    flat = np.asarray(block, np.float64).reshape(-1, block.shape[-1])
    cov = np.cov(flat, rowvar=False, bias=True) + 1e-3 * np.eye(flat.shape[1])
    real.append((jnp.asarray(np.stack([flat.mean(0)] * teachers), jnp.float32),
                 jnp.asarray(np.stack([cov] * teachers), jnp.float32)))
  method.__dict__["device_inputs"] = (stacked, real)  # Instead of training teachers.
  return method, len(blocks)


def baseline_step(method):
  """One Adam step of `alpha * CE` on the augmented batch (no statistics): SRe2L's CE term."""

  def step(state, inputs):
    teachers, _ = inputs
    variables = jax.tree.map(lambda a: a[0], teachers)
    x_b = state.x_syn[:method.batch_size]
    y_b = jnp.arange(method.batch_size) % method.data.num_classes
    key, aug_key = jax.random.split(state.key)

    def loss(x):
      logits = method.model.apply(variables, method.augment(aug_key, x, 0.5), train=False)
      return method.config.outer.alpha * jnp.mean(
          jax.nn.logsumexp(logits, axis=1) - logits[jnp.arange(len(y_b)), y_b])

    value, grad = jax.value_and_grad(loss)(x_b)
    direction, opt_state = method.adam.update(grad, state.opt_state)
    x_syn = state.x_syn.at[:method.batch_size].set(x_b - 0.1 * direction)
    return state.replace(x_syn=x_syn, opt_state=opt_state, key=key), {"loss": value}

  return step


def measure(step_fn, state, inputs, *, repeats: int, run: bool) -> tuple[float, float]:
  """(peak GiB estimate, median ms per iteration or NaN)."""
  jitted = jax.jit(step_fn, donate_argnums=0)
  compiled = jitted.lower(state, inputs).compile()
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**30
  if not run:
    return peak, float("nan")
  state, _ = compiled(state, inputs)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    begin = time.perf_counter()
    state, metrics = compiled(state, inputs)
    jax.block_until_ready(metrics)
    times.append(1000 * (time.perf_counter() - begin))
  return peak, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", choices=sorted(SHAPES), default=None)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_time", action="store_true")
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, devices {jax.devices()}")
  print("| shape | layers | B | D3S GiB | D3S ms/iter | CE-only GiB | CE-only ms/iter | time ratio |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name in ([args.only] if args.only else list(SHAPES)):
    method, layers = build(name)
    inputs = method.device_inputs
    state = jax.jit(method.init)(jax.random.key(0))
    d3s_gib, d3s_ms = measure(method.step, state, inputs, repeats=args.repeats,
                              run=not args.no_time)
    state = jax.jit(method.init)(jax.random.key(0))
    ce_gib, ce_ms = measure(baseline_step(method), state, inputs, repeats=args.repeats,
                            run=not args.no_time)
    print(f"| {name} | {layers} | {method.batch_size} | {d3s_gib:.3f} | {d3s_ms:.1f} | "
          f"{ce_gib:.3f} | {ce_ms:.1f} | {d3s_ms / ce_ms:.2f} |", flush=True)


if __name__ == "__main__":
  main()
