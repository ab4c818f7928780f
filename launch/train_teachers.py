"""Train (or finish) the teacher pool a config's `teachers` block asks for (D3S, APM).

  python -m launch.train_teachers --config=configs/d3s.py:tiny_imagenet
  python -m launch.train_teachers --config=configs/d3s.py:fashion_mnist,cpu --teachers_dir=/data/t

Without `--teachers_dir` the pool goes to the shared cache folder keyed by the teacher settings
(`$DISTILL_JAX_CACHE/teachers/<hash>`), where `launch.distill` with the same config finds it.
Rerunning the command after a kill resumes the unfinished teacher from its last saved epoch; on a
finished pool it only prints where it is. Whatever else the method prepares from its teachers
before its first step is done too (`DistillMethod.prepare`: D3S's real-set statistics).
"""

import json

from absl import flags, logging

from distill_jax import data as data_lib
from distill_jax.methods import get_method
from distill_jax.training import teachers
from launch import common

_TEACHERS_DIR = flags.DEFINE_string(
    "teachers_dir", None, "Pool folder; default: the cache folder of the teacher settings.")
flags.adopt_module_key_flags(common)


def train(config, teachers_dir: str | None) -> teachers.TeacherPool:
  """Loads the config's dataset, trains its pool into `teachers_dir` (or the cache) and runs
  the method's `prepare` (D3S: every teacher's per-layer real-set statistics)."""
  if "teachers" not in config:
    raise ValueError(f"config for method {config.method!r} has no `teachers` block; use a config "
                     "with a teacher pool such as configs/d3s.py")
  data = data_lib.load_real(config.dataset, config.preprocessing,
                            validation=config.get("validation_split", 0))
  if teachers_dir:
    config.teachers.dir = teachers_dir
  spec = teachers.teacher_spec(config, data)
  logging.info("Teacher pool of digest %s: %s", spec.digest(), json.dumps(spec.to_dict()))
  method = get_method(config.method)(config, data)
  method.prepare()  # Trains the pool (`method.pool`) and what the method derives from it.
  pool = method.pool
  accuracy = pool.test_accuracy()
  logging.info("%s finished: test accuracy %.2f%% +- %.2f over %d teachers.", pool,
               100 * accuracy.mean(), 100 * accuracy.std(), pool.num_teachers)
  return pool


if __name__ == "__main__":
  common.run(lambda config: print(train(config, _TEACHERS_DIR.value).path), __doc__)
