"""D3S's ablations on the CPU preset (paper 001, Figure 3 and Table 4) and two diagnostics.

  python scripts/d3s_ablation.py --root=runs/d3s_ablation                  # every variant
  python scripts/d3s_ablation.py --root=runs/d3s_ablation --variants=no_isu,no_ens
  python scripts/d3s_ablation.py --root=runs/d3s_ablation --report_only    # table + diagnostics

Each variant is `python -m launch.distill --config=configs/d3s.py:fashion_mnist,ipc=10,cpu,
<switches>,eval.protocols=d3s,eval.random_subset=False` in `<root>/<variant>` (rerunning resumes;
finished runs are read, not rerun), evaluated with the `d3s` protocol (5 networks) beside the
random subset relabelled by the same teachers (variants that do not change the relabelling reuse
the full run's evaluation of it: the same computation). The teacher pool is the preset's (cached).

Diagnostics (deterministic functions of the saved sets): for every set, the summed per-layer
`KL(N(mu^S_l, Sigma^S_l) || N(mu^T_l, Sigma^T_l))` of the WHOLE set's conv outputs to the real
set's, in float64, (a) averaged over the five synthesis teachers (ISU should lower it: it makes
the batches fill in what earlier batches lack), and (b) under a sixth teacher that no variant
synthesised or labelled with (ENS should lower it: the images fit no single teacher). The sixth
teacher is trained into the same pool (same recipe, key `fold_in(key(seed), 5)`).

Prints a Markdown table for docs/results.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASE = "configs/d3s.py:fashion_mnist,ipc=10,cpu"
VARIANTS = {
    "full": "",
    "no_ens": "ens=False",
    "no_enl": "relabel.enl=False",
    "no_isu": "isu=False",
    "diagonal_kl": "full_covariance=False",
    "bn_diagonal": "statistic_loss=bn,full_covariance=False",
    "bn_full": "statistic_loss=bn",
}


# Variants whose random baseline is the same computation as the full run's (same random subset,
# teachers, crops and ENL): they reuse its evaluation file instead of training 5 networks again.
_SAME_BASELINE = ("no_ens", "no_isu", "diagonal_kl", "bn_diagonal", "bn_full")


def run_variant(root: str, name: str) -> None:
  baseline = os.path.join(root, "full", "eval", "d3s_random_relabelled.json")
  if name in _SAME_BASELINE and os.path.exists(baseline):
    os.makedirs(os.path.join(root, name, "eval"), exist_ok=True)
    target = os.path.join(root, name, "eval", "d3s_random_relabelled.json")
    if not os.path.exists(target):
      shutil.copy(baseline, target)
  switches = ",".join(s for s in (VARIANTS[name], "eval.protocols=d3s",
                                  "eval.random_subset=False") if s)
  command = [sys.executable, "-m", "launch.distill", f"--config={BASE},{switches}",
             f"--workdir={os.path.join(root, name)}"]
  print(" ".join(command), flush=True)
  subprocess.run(command, cwd=ROOT, check=True)


def numpy_kl(mean_p, cov_p, mean_q, cov_q) -> float:
  diff = mean_q - mean_p
  return 0.5 * float(np.linalg.slogdet(cov_q)[1] - np.linalg.slogdet(cov_p)[1]
                     + np.trace(np.linalg.solve(cov_q, cov_p))
                     + diff @ np.linalg.solve(cov_q, diff) - len(mean_p))


def whole_set_kl(pool, teacher: int, x: np.ndarray, real) -> float:
  """Summed per-layer KL of the whole set's conv-output Gaussians to the real ones (float64)."""
  variables = pool.variables(teacher)
  blocks = pool.model.apply(variables, x, train=False, return_features=True)[1]["blocks"]
  total = 0.0
  for block, (mean_t, cov_t) in zip(blocks, real):
    flat = np.asarray(block, np.float64).reshape(-1, block.shape[-1])
    total += numpy_kl(flat.mean(0), np.cov(flat, rowvar=False, bias=True), mean_t, cov_t)
  return total


def report(root: str) -> None:
  from configs import d3s as d3s_config
  from distill_jax import data as data_lib
  from distill_jax import distilled
  from distill_jax.training import teachers

  config = d3s_config.get_config(BASE.split(":", 1)[1])
  data = data_lib.load_real(config.dataset, config.preprocessing,
                            validation=config.get("validation_split", 0))
  spec = teachers.teacher_spec(config, data)
  path = config.teachers.dir or teachers.default_teachers_dir(spec)
  pool = teachers.train_teachers(spec, data, path, num_teachers=6)  # Trains the sixth.
  real = [pool.statistics(m, data) for m in range(6)]
  print(f"teachers' test accuracy: {np.round(100 * pool.test_accuracy(), 2).tolist()}")
  print("| variant | switches | D3S (d3s protocol) | random, relabelled alike | "
        "whole-set KL, teachers 0-4 (mean) | whole-set KL, held-out teacher 5 |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, switches in VARIANTS.items():
    workdir = os.path.join(root, name)
    if not os.path.exists(os.path.join(workdir, "report.json")):
      print(f"| {name} | {switches or '(preset)'} | not run | | | |")
      continue
    with open(os.path.join(workdir, "report.json")) as f:
      result = json.load(f)
    x = np.asarray(distilled.load(os.path.join(workdir, "distilled")).x)
    seen = np.mean([whole_set_kl(pool, m, x, real[m]) for m in range(5)])
    held_out = whole_set_kl(pool, 5, x, real[5])
    acc, base = result["accuracy"], result["random_relabelled"]
    print(f"| {name} | {switches or '(preset)'} | {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} "
          f"| {100 * base['mean']:.2f} ± {100 * base['std']:.2f} | {seen:.3f} | {held_out:.3f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--report_only", action="store_true")
  args = parser.parse_args()
  if not args.report_only:
    for name in args.variants.split(","):
      if name not in VARIANTS:
        parser.error(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
      run_variant(args.root, name)
  report(args.root)


if __name__ == "__main__":
  main()
