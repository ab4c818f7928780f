"""Train (or finish) the teacher pool a config's `teachers` block asks for (D3S, APM).

  python -m launch.train_teachers --config=configs/d3s.py:tiny_imagenet
  python -m launch.train_teachers --config=configs/d3s.py:fashion_mnist,cpu --teachers_dir=/data/t

Without `--teachers_dir` the pool goes to the shared cache folder keyed by the teacher settings
(`$DISTILL_JAX_CACHE/teachers/<hash>`), where `launch.distill` with the same config finds it.
Rerunning the command after a kill resumes the unfinished teacher from its last saved epoch; on a
finished pool it only prints where it is. The real-set statistics D3S needs are measured too.
"""

import json

from absl import flags, logging

from distill_jax import data as data_lib
from distill_jax.training import teachers
from launch import common

_TEACHERS_DIR = flags.DEFINE_string(
    "teachers_dir", None, "Pool folder; default: the cache folder of the teacher settings.")
flags.adopt_module_key_flags(common)


def train(config, teachers_dir: str | None) -> teachers.TeacherPool:
  """Loads the config's dataset, trains its pool into `teachers_dir` (or the cache) and
  measures every teacher's per-layer real-set statistics."""
  if "teachers" not in config:
    raise ValueError(f"config for method {config.method!r} has no `teachers` block; use a config "
                     "with a teacher pool such as configs/d3s.py")
  data = data_lib.load_real(config.dataset, config.preprocessing,
                            validation=config.get("validation_split", 0))
  spec = teachers.teacher_spec(config, data)
  path = teachers_dir or config.teachers.dir or teachers.default_teachers_dir(spec)
  logging.info("Teacher pool %s (digest %s): %s", path, spec.digest(), json.dumps(spec.to_dict()))
  pool = teachers.train_teachers(spec, data, path, num_teachers=config.teachers.num_teachers,
                                 checkpoint_every=config.teachers.checkpoint_every)
  for teacher in range(pool.num_teachers):
    pool.statistics(teacher, data)
  accuracy = pool.test_accuracy()
  logging.info("%s finished: test accuracy %.2f%% +- %.2f over %d teachers.", pool,
               100 * accuracy.mean(), 100 * accuracy.std(), pool.num_teachers)
  return pool


if __name__ == "__main__":
  common.run(lambda config: print(train(config, _TEACHERS_DIR.value).path), __doc__)
