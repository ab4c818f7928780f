"""The child process of the smoke runs in tests/methods/conftest.py (run as a script).

  python tests/methods/smoke_child.py reference ROOT
      every method's smoke preset straight through in ROOT/<method> (the set in
      ROOT/<method>.npz), then FRePo's and MTT's report extras and FRePo's KRR accuracy of its
      initial set (ROOT/<method>_extras.json);
  python tests/methods/smoke_child.py resume ROOT RESUME STALL
      runs method RESUME (or "-") to its end in ROOT/RESUME (the set in ROOT/RESUME.npz), then
      starts method STALL (or "-") in ROOT/STALL and, once its first checkpoint is on disk, writes
      ROOT/STALL.saved and sleeps until the parent kills it with SIGKILL.
"""

import importlib
import json
import os
import sys
import time

METHODS = ("frepo", "mtt", "dc", "dm", "d3s", "apm", "latent", "d3")


def run(name, root):
  from distill_jax import data as data_lib
  from distill_jax import io as io_lib
  from distill_jax import methods

  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  data = data_lib.load_real(config.dataset, config.preprocessing)
  method = methods.get_method(name)(config, data)
  workdir = io_lib.Workdir(os.path.join(root, name))
  return method, workdir, methods.run(method, workdir)


def save_set(root, name, distilled_set):
  import numpy as np

  np.savez(os.path.join(root, f"{name}.npz"), **distilled_set.arrays())


def reference(root):
  import jax

  from distill_jax import evaluation

  for name in METHODS:
    method, workdir, result = run(name, root)
    save_set(root, name, result.distilled_set)
    extras = method.report_extras(result.distilled_set, workdir)
    if name == "frepo":
      config = method.config
      start = method.result(jax.jit(method.init)(jax.random.key(config.seed)))
      extras["krr_accuracy_of_the_initial_set"] = evaluation.krr_evaluate(
          start, method.krr_recipe(), method.data.x_test, method.data.y_test,
          kernel_reg=config.outer.kernel_reg, reg_floor=config.outer.kernel_reg_floor,
          use_flip=config.outer.use_flip, seed=config.seed,
          num_models=config.eval.krr.num_models,
      )
    with open(os.path.join(root, f"{name}_extras.json"), "w") as f:
      json.dump(extras, f)


def resume(root, resume_name, stall_name):
  from distill_jax import io as io_lib

  if resume_name != "-":
    _, _, result = run(resume_name, root)
    save_set(root, resume_name, result.distilled_set)
  if stall_name == "-":
    return
  target = os.path.join(os.path.abspath(root), stall_name, "")
  save = io_lib.Checkpointer.save

  def save_then_stall(self, step, state):
    save(self, step, state)
    if os.path.join(str(self.directory), "").startswith(target):  # Not an expert buffer's.
      self.wait()
      with open(os.path.join(root, f"{stall_name}.saved"), "w") as f:
        f.write(str(step))
      time.sleep(600)  # Killed here, after the first checkpoint is on disk.

  io_lib.Checkpointer.save = save_then_stall
  run(stall_name, root)
  sys.exit(f"{stall_name} finished without stalling")


if __name__ == "__main__":
  if sys.argv[1] == "reference":
    reference(sys.argv[2])
  else:
    resume(*sys.argv[2:5])
