"""Evaluate a saved distilled set (`source=<run>/distilled`) or a random real subset.

  python -m launch.evaluate --config=configs/evaluate.py:fashion_mnist,ipc=10,cpu --workdir=runs/r10
  python -m launch.evaluate --config=configs/evaluate.py:fashion_mnist,source=runs/x/distilled \
      --workdir=runs/x_eval

Rerunning the same command resumes; `report.json` in the workdir holds the result.
"""

from absl import flags

from distill_jax import pipeline
from launch import common

WORKDIR = common.define_workdir()
flags.adopt_module_key_flags(common)

if __name__ == "__main__":
  common.run(lambda config: pipeline.evaluate_baseline(config, WORKDIR.value), __doc__)
