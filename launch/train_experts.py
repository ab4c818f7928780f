"""Train (or finish) the expert trajectory buffer a trajectory-matching config asks for.

  python -m launch.train_experts --config=configs/mtt.py:cifar10,ipc=10
  python -m launch.train_experts --config=configs/mtt.py:fashion_mnist,cpu --buffer_dir=/data/buf

Without `--buffer_dir` the buffer goes to the shared cache directory keyed by the expert settings
(`$DISTILL_JAX_CACHE/buffers/<hash>`), where `launch.distill` with the same config finds it.
Rerunning the command after a kill resumes; on a complete buffer it only prints where it is.
"""

import json

from absl import flags, logging

from distill_jax import pipeline
from distill_jax.training import experts
from launch import common

_BUFFER_DIR = flags.DEFINE_string(
    "buffer_dir", None, "Buffer directory; default: the cache directory of the expert settings."
)
flags.adopt_module_key_flags(common)


def train(config, buffer_dir: str | None) -> experts.TrajectoryBuffer:
  """Loads the config's data (with its validation split or subtask, as `launch.distill` does)
  and trains its buffer into `buffer_dir` (or the cache)."""
  if "experts" not in config:
    raise ValueError(
        f"config for method {config.method!r} has no `experts` block; use a trajectory-matching "
        "config such as configs/mtt.py"
    )
  data = pipeline.load_data(config)
  spec = experts.expert_spec(config, data)
  path = buffer_dir or config.experts.buffer_dir or experts.default_buffer_dir(spec)
  logging.info("Expert buffer %s (digest %s): %s", path, spec.digest(), json.dumps(spec.to_dict()))
  buffer = experts.train_experts(spec, data, path, num_experts=config.experts.num_experts)
  accuracy = buffer.metrics()["test_accuracy"][:, -1]
  logging.info(
      "%s complete: final test accuracy %.2f%% +- %.2f over %d experts.", buffer,
      100 * accuracy.mean(), 100 * accuracy.std(), buffer.num_experts,
  )
  return buffer


if __name__ == "__main__":
  common.run(lambda config: print(train(config, _BUFFER_DIR.value).path), __doc__)
