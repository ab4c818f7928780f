"""Time and memory of one MTT outer iteration, with and without rematerialisation.

  python benchmarks/mtt_step.py            # CIFAR-10 IPC 10 shape, ConvNet width 128
  python benchmarks/mtt_step.py --small    # the same sweep at toy size
  python benchmarks/mtt_step.py --no_time  # full size, memory analysis only
  python benchmarks/mtt_step.py --parts=2  # only the Fashion-MNIST timings (minutes on a CPU)

Part 1: the CIFAR-10 IPC 10 shape (100 synthetic 32x32x3 images, the whole set per student step,
ConvNet width 128 / depth 3 / instance norm, DSA on) for N = 10, 20, 40, 80 student steps, with
`remat` off and on, both with the `lax.scan` student loop by default (`--student_loop`; remat
always uses the scan, the only form in which it bounds memory). For each: the compiled step's
memory (`compiled.memory_analysis()`: the peak is estimated as arguments + outputs +
temporaries - donated aliases) and, where that fits in `--max_run_gb`, the wall-clock time per
iteration (median of `--repeats` after one warm-up).
It checks that with remat the peak at N = 80 is at most 1.5x the peak at N = 10: without remat
the backward pass keeps every student step's activations (O(N x activations)); with remat only
the per-step parameters (O(N x parameters)) and one step's activations.

Part 2: our iteration at the Fashion-MNIST IPC 1 and IPC 10 shapes (10 and 100 28x28x1 images,
width 128, N = 10, remat off) with the student loop MTT uses by default ("auto": straight-line
on CPU, where XLA runs convolution gradients inside loops 10-25x slower; scan elsewhere).

`--no_time` skips the runs (compile and memory analysis only, minutes instead of hours on a
2-core CPU at full size).

Exit status 1 when the remat memory check fails.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mtt as mtt_config  # noqa: E402
from distill_jax import data as data_lib  # noqa: E402
from distill_jax.methods import _pixels, mtt  # noqa: E402


def make_config(*, width: int, syn_steps: int, remat: bool, ipc: int, student_loop: str = "auto"):
  config = mtt_config.get_config(f"ipc={ipc}")
  config.inner.steps = syn_steps
  config.inner.remat = remat
  config.inner.loop = student_loop
  config.inner.batch_size = 0  # The whole set per student step (MTT's default).
  config.experts.model_kwargs.width = width
  return config


def build(config, image_shape, num_classes):
  """The MTT method, its state and step inputs (random images, expert-like parameters)."""
  n = num_classes * config.ipc
  x = jax.random.normal(jax.random.key(0), (n, *image_shape), jnp.float32)
  y = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), config.ipc)
  data = data_lib.RealData("random", num_classes, image_shape,
                           tuple(str(c) for c in range(num_classes)), x, y, x, y)
  method = mtt.MTT(config, data)  # No prepare(): the inputs below stand in for the buffer.
  start = method.model.init(jax.random.key(1), x[:1])["params"]
  target = jax.tree.map(lambda p: p + 0.01 * jnp.ones_like(p), start)
  inputs = {"start": start, "target": target, "expert": jnp.int32(0),
            "start_epoch": jnp.int32(0)}
  return method, jax.jit(method.init)(jax.random.key(2)), inputs


def memory_bytes(compiled) -> tuple[int, int]:
  """(estimated peak, temporaries) in bytes from XLA's buffer assignment."""
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return int(peak), int(m.temp_size_in_bytes)


def time_step(compiled, state, inputs, repeats: int) -> float:
  """Median milliseconds per iteration after one warm-up call."""
  state, metrics = compiled(state, inputs)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, inputs)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  return 1000 * statistics.median(times)


def measure(config, image_shape, num_classes, *, repeats, max_run_bytes, run=True):
  method, state, inputs = build(config, image_shape, num_classes)
  t0 = time.perf_counter()
  # As the run loop compiles it: ahead of time, the state donated.
  compiled = jax.jit(method.step, donate_argnums=0).lower(state, inputs).compile()
  compile_s = time.perf_counter() - t0
  peak, temp = memory_bytes(compiled)
  ms = None
  if run and peak <= max_run_bytes:
    ms = time_step(compiled, state, inputs, repeats)
  return {"peak": peak, "temp": temp, "ms": ms, "compile_s": compile_s}


def gib(n: int) -> str:
  return f"{n / 2**30:8.3f}"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="toy sizes: width 16, ipc 2")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--no_time", action="store_true", help="memory analysis only (compile, no run)")
  parser.add_argument("--student_loop", default="scan", choices=_pixels.LOOPS,
                      help="student loop of the N sweep ([1]); [2] always uses 'auto'")
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  parser.add_argument("--max_run_gb", type=float, default=0.5 * total / 2**30,
                      help="time only configurations whose estimated peak fits (default: half the RAM)")
  parser.add_argument("--parts", default="1,2", help="which parts to run: 1, 2 or 1,2")
  args = parser.parse_args()
  parts = {int(p) for p in args.parts.split(",")}
  if not parts or parts - {1, 2}:
    parser.error(f"--parts takes 1, 2 or 1,2, got {args.parts!r}")
  max_run = int(args.max_run_gb * 2**30)
  width, ipc = (16, 2) if args.small else (128, 10)
  print(f"devices: {jax.devices()}  (small={args.small})")
  ok = True
  if 1 in parts:
    ok = sweep_remat(args, width=width, ipc=ipc, max_run=max_run)
  if 2 in parts:
    time_fashion_mnist(args, width=width, max_run=max_run)
  return 0 if ok else 1


def sweep_remat(args, *, width: int, ipc: int, max_run: int) -> bool:
  """Part [1]: memory and time for N = 10..80 with and without remat; True if the check passes."""
  print(f"\n[1] CIFAR-10 IPC {ipc} shape: {10 * ipc} x 32x32x3, ConvNet width {width}, "
        f"batch = whole set, DSA on, student_loop={args.student_loop}")
  print(f"{'N':>4} {'remat':>6} {'loop':>9} {'peak GiB':>9} {'temp GiB':>9} {'ms/iter':>10} "
        f"{'compile s':>10}")
  peaks = {}
  for syn_steps in (10, 20, 40, 80):
    for remat in (False, True):
      loop = "scan" if remat and args.student_loop == "unrolled" else args.student_loop
      config = make_config(width=width, syn_steps=syn_steps, remat=remat, ipc=ipc,
                           student_loop=loop)
      r = measure(config, (32, 32, 3), 10, repeats=args.repeats, max_run_bytes=max_run,
                  run=not args.no_time)
      peaks[(syn_steps, remat)] = r["peak"]
      ms = f"{r['ms']:10.1f}" if r["ms"] is not None else "   skipped"
      resolved = _pixels.resolve_loop(loop, remat=remat)
      print(f"{syn_steps:>4} {str(remat):>6} {resolved:>9} {gib(r['peak'])} {gib(r['temp'])} {ms} "
            f"{r['compile_s']:10.1f}", flush=True)
  ratio = peaks[(80, True)] / peaks[(10, True)]
  ok = ratio <= 1.5
  print(f"remat peak N=80 / N=10 = {ratio:.3f} (must be <= 1.5): {'PASS' if ok else 'FAIL'}; "
        f"without remat: {peaks[(80, False)] / peaks[(10, False)]:.2f}")
  return ok


def time_fashion_mnist(args, *, width: int, max_run: int) -> None:
  """Part [2]: our iteration at the Fashion-MNIST IPC 1 and IPC 10 shapes."""
  print(f"\n[2] Fashion-MNIST shapes: 28x28x1, ConvNet width {width}, N = 10, no remat, "
        "student_loop=auto")
  print(f"{'ipc':>4} {'images':>7} {'loop':>9} {'peak GiB':>9} {'ms/iter':>10} {'compile s':>10}")
  for fm_ipc in (1, 10):
    config = make_config(width=width, syn_steps=10, remat=False, ipc=fm_ipc)
    r = measure(config, (28, 28, 1), 10, repeats=args.repeats, max_run_bytes=max_run,
                run=not args.no_time)
    ms = f"{r['ms']:10.1f}" if r["ms"] is not None else "   skipped"
    resolved = _pixels.resolve_loop("auto", remat=False)
    print(f"{fm_ipc:>4} {10 * fm_ipc:>7} {resolved:>9} {gib(r['peak'])} {ms} "
          f"{r['compile_s']:10.1f}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
