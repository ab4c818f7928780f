"""Federated (subtask) distillation: each subtask a submitit job, then the merged set evaluated.

  python -m launch.federated --config=configs/d3.py:fashion_mnist,cpu,subtask.count=2 \
      --workdir=runs/d3_fed
  python -m launch.federated --config=configs/d3.py:cifar100,subtask.count=5,\
federated.executor=slurm,federated.slurm_partition=gpu,federated.gpus_per_node=1 --workdir=runs/x

`subtask.count=k` splits the classes into k contiguous ranges; subtask j runs in
`<workdir>/subtask_<j>` as its own job (`federated.executor`: "local" subprocesses, all at
once; "slurm" a job array; "debug" in process). When all have finished their sets are merged
into `<workdir>/distilled` and evaluated on the whole task (`<workdir>/report.json`). Rerunning
the same command skips finished subtasks and resumes the others from their checkpoints.
"""

from absl import flags

from distill_jax import federated
from launch import common

WORKDIR = common.define_workdir()
flags.adopt_module_key_flags(common)

if __name__ == "__main__":
  common.run(lambda config: federated.run(config, WORKDIR.value), __doc__)
