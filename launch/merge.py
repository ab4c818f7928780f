"""Merge sets distilled apart (other seeds or class ranges) into one set (APM, paper 003 Fig. 4).

  python -m launch.merge --sets=runs/apm_s0/distilled,runs/apm_s1/distilled --out=runs/apm_merged
  python -m launch.evaluate --config=configs/evaluate.py:fashion_mnist,source=runs/apm_merged \
      --workdir=runs/apm_merged_eval

The merged set holds every example of the parts (storage: their sum); evaluate it like any saved
set. Rerunning replaces `--out` atomically.
"""

import sys

from absl import app, flags

from distill_jax import distilled

_SETS = flags.DEFINE_list("sets", None, "Comma-separated folders of saved sets (<run>/distilled).")
_OUT = flags.DEFINE_string("out", None, "Folder the merged set is saved to.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _SETS.value or not _OUT.value:
    sys.exit("error: pass --sets=<run>/distilled,<run>/distilled and --out=<folder>")
  try:
    merged = distilled.merge([distilled.load(path) for path in _SETS.value])
    distilled.save(_OUT.value, merged)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"{_OUT.value}: {merged.num_examples} examples, ipc {merged.meta.ipc}, "
        f"{distilled.storage_mb(merged):.4f} MB")


if __name__ == "__main__":
  sys.modules["__main__"].__doc__ = __doc__
  app.run(main)
