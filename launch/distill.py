"""Distil a dataset, evaluate the set beside a random real subset, write the report and images.

  python -m launch.distill --config=configs/frepo.py:fashion_mnist,ipc=10,cpu --workdir=runs/x
  python -m launch.distill --config=configs/dm.py:smoke --workdir=runs/dm_smoke

Rerunning the same command resumes a killed run; `report.json` in the workdir holds the result.
"""

from absl import flags

from distill_jax import pipeline
from launch import common

WORKDIR = common.define_workdir()
flags.adopt_module_key_flags(common)

if __name__ == "__main__":
  common.run(lambda config: pipeline.distill_and_evaluate(config, WORKDIR.value), __doc__)
