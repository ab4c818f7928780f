"""Throughput of the evaluation protocol: M networks vmapped in one program vs a Python loop.

Trains `--num_models` fresh networks under a protocol (default `mtt`: ConvNet-128, instance
norm, DSA on every batch) on a Fashion-MNIST-shaped training set (28x28x1, 10 classes, IPC 10 =
100 images, random pixels: throughput does not depend on the values) for `--steps` steps, twice
in the same process:

  vmapped  `Trainer.train(vectorize=True)`: one jitted program, vmapped over the networks;
  loop     `Trainer.train(vectorize=False)`: the networks one after the other, each trained by
           the same un-vmapped jitted program (compiled once).

and prints training images per second (networks x steps x batch / wall-clock of the training
loop, compilation excluded) of both, their ratio, and the compile times.

    python benchmarks/eval_throughput.py            # mtt protocol, width 128, 200 steps
    python benchmarks/eval_throughput.py --small    # width 16, 30 steps: a quick smoke run

On a CPU the two are close (the convolutions already use every core); the vmapped program pays
off on an accelerator, where one small network leaves most of the device idle.
"""

import argparse
import pathlib
import sys

import jax
import numpy as np

try:
  from distill_jax import distilled, evaluation, training
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from distill_jax import distilled, evaluation, training


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--protocol", default="mtt", help="an evaluation protocol name")
  parser.add_argument("--num_models", type=int, default=5)
  parser.add_argument("--ipc", type=int, default=10, help="images per class of the set")
  parser.add_argument("--steps", type=int, default=None, help="default 200 (30 with --small)")
  parser.add_argument("--width", type=int, default=None, help="default 128 (16 with --small)")
  parser.add_argument("--small", action="store_true", help="a quick smoke run")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  steps = args.steps or (30 if args.small else 200)
  width = args.width or (16 if args.small else 128)

  num_classes, image_shape = 10, (28, 28, 1)  # Fashion-MNIST.
  rng = np.random.default_rng(args.seed)
  n = num_classes * args.ipc
  x_train = rng.uniform(size=(n,) + image_shape).astype(np.float32)
  y_train = np.repeat(np.arange(num_classes, dtype=np.int32), args.ipc)
  meta = distilled.SetMeta(method="random", dataset="fashion_mnist", ipc=args.ipc,
                           num_classes=num_classes, image_shape=image_shape)
  training_set = distilled.PixelSet(x_train, y_train, meta=meta)
  protocol = evaluation.get_protocol(args.protocol, steps=steps, width=width)
  batch = protocol.effective_batch_size(n)
  keys = jax.random.split(jax.random.key(args.seed), args.num_models)

  print(
      f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), protocol "
      f"{protocol.name}, model {protocol.model} {protocol.model_kwargs}, augmentation "
      f"{protocol.augmentation}, {args.num_models} networks x {steps} steps x batch {batch} "
      f"on {n} images of {image_shape}"
  )
  results = {}
  for name, vectorize in (("vmapped", True), ("loop", False)):
    # chunk=steps: one scanned program for the vmapped run on accelerators (1 on CPU).
    trainer = training.Trainer.for_set(protocol, training_set, chunk=steps)
    trained = trainer.train(keys, training_set, vectorize=vectorize, log_every=steps)
    images = args.num_models * trained.steps * batch
    results[name] = images / trained.seconds
    print(
        f"{name:8s} {results[name]:10.1f} images/s  ({trained.seconds:.2f}s training, "
        f"{trained.compile_seconds:.2f}s compiling, final loss "
        f"{np.nanmean(trained.losses[:, -1]):.4f})"
    )
  print(f"vmapped / loop throughput ratio: {results['vmapped'] / results['loop']:.2f}x")


if __name__ == "__main__":
  main()
