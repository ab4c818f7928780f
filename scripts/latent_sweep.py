"""The LatentDD CPU preset's learning-rate sweep on the validation split (docs/results.md).

  python scripts/latent_sweep.py --root=runs/latent_sweep --algorithm=dm --values=0.1,0.5,2.0
  python scripts/latent_sweep.py --root=runs/latent_sweep --algorithm=dm --baselines

Each value distils `configs/latent.py:fashion_mnist,algorithm=<a>,cpu,validation_split=10000,
outer.lr_base=<v>` (plus `--extra`) in `<root>/<a>_<extra>_<v>` through the one run loop (a
rerun resumes) and evaluates only the set, under the preset's protocol with `--num_models`
networks, on the 10000 held-out training images (never the test split); `--baselines` evaluates
the random real codes at the preset's LPC and the equal-storage random subset once. Results go
to `<root>/<name>.json`; the script prints one Markdown row per finished entry.
"""

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASE = "fashion_mnist,algorithm={algorithm},cpu,validation_split=10000"


def evaluate(config, data, training_set, num_models):
  from distill_jax import evaluation

  overrides = dict(config.eval.overrides.get("mtt", {}))
  result = evaluation.evaluate(training_set, evaluation.get_protocol("mtt", **overrides),
                               data.x_test, data.y_test, seed=config.seed, num_models=num_models)
  return {"mean": result.mean, "std": result.std, "n": result.n}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--root", required=True)
  parser.add_argument("--algorithm", default="dm")
  parser.add_argument("--values", default="")
  parser.add_argument("--extra", default="")
  parser.add_argument("--num_models", type=int, default=3)
  parser.add_argument("--baselines", action="store_true")
  args = parser.parse_args()

  from configs import latent as latent_config
  from distill_jax import distilled, io, methods, pipeline

  os.makedirs(args.root, exist_ok=True)
  tag = args.extra.replace(",", "_").replace("=", "")
  arg = BASE.format(algorithm=args.algorithm) + (f",{args.extra}" if args.extra else "")
  for value in [v for v in args.values.split(",") if v]:
    name = f"{args.algorithm}_{tag}_{value}"
    out = os.path.join(args.root, f"{name}.json")
    if os.path.exists(out):
      continue
    config = latent_config.get_config(f"{arg},outer.lr_base={value}")
    data = pipeline.load_data(config)
    method = methods.get_method("latent")(config, data)
    result = methods.run(method, io.Workdir(os.path.join(args.root, name)))
    record = {"lr_base": float(value), "lpc": method.lpc, "config": arg,
              "storage_mb": distilled.storage_mb(result.distilled_set),
              "accuracy": evaluate(config, data, result.distilled_set, args.num_models)}
    with open(out, "w") as f:
      json.dump(record, f, indent=1)
  if args.baselines:
    config = latent_config.get_config(arg)
    data = pipeline.load_data(config)
    method = methods.get_method("latent")(config, data)
    codes = method.baselines()["random_latents"]
    subset = pipeline.random_subset_set(data, codes.baseline_ipc(), seed=config.seed)
    for name, training_set in ((f"random_latents_{tag}", codes), (f"random_subset_{tag}", subset)):
      out = os.path.join(args.root, f"{args.algorithm}_{name}.json")
      if not os.path.exists(out):
        record = {"ipc": training_set.meta.ipc, "lpc": method.lpc, "config": arg,
                  "storage_mb": distilled.storage_mb(training_set),
                  "accuracy": evaluate(config, data, training_set, args.num_models)}
        with open(out, "w") as f:
          json.dump(record, f, indent=1)
  for path in sorted(glob.glob(os.path.join(args.root, "*.json"))):
    with open(path) as f:
      r = json.load(f)
    a = r["accuracy"]
    print(f"| {os.path.basename(path)[:-5]} | {r.get('lr_base', '-')} | {r.get('lpc', '-')} | "
          f"{r['storage_mb']:.4f} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} |")


if __name__ == "__main__":
  main()
