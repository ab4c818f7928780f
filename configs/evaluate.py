"""Evaluate a saved distilled set, or a random real subset (`source=random`), under the protocols.

  python -m launch.evaluate --config=configs/evaluate.py:fashion_mnist,ipc=10 --workdir=runs/random10
  python -m launch.evaluate --config=configs/evaluate.py:fashion_mnist,source=runs/x/distilled \
      --workdir=runs/x_eval
  python -m launch.evaluate --config=configs/evaluate.py:fashion_mnist,ipc=10,full_data=True,cpu \
      --workdir=runs/upper_bound
"""

from configs import common

PRESETS = {
    **{name: {"dataset": name} for name in common.DATASETS},
    # A short check of the whole path on a laptop.
    "smoke": {
        "dataset": "digits",
        "ipc": 2,
        "eval": {
            "num_models": 2,
            # Every protocol shrunk to seconds but still trained (20 epochs of 20 images left
            # networks near chance; the unshrunk `frepo` protocol took 3 minutes).
            "overrides": {
                "mtt": {"epochs": 300, "width": 16},
                "standard": {"epochs": 300, "width": 16},
                "frepo": {"steps": 500, "warmup_steps": 50, "width": 16},
            },
        },
    },
    # Protocols shrunk to fit 2 CPU cores (measured in docs/results.md): narrower networks and
    # fewer passes for every evaluated set, and fewer steps over the 60000 full-data images
    # (the `frepo` protocol keeps its 500 warm-up steps, so it needs more than 500 in all).
    "cpu": {
        "eval": {
            "overrides": {
                "mtt": {"width": 16, "epochs": 300},
                "frepo": {"width": 16, "steps": 1000},
                "standard": {"width": 16, "epochs": 100},
            },
        },
        "full_data_overrides": {
            "mtt": {"width": 16, "epochs": 2},
            "frepo": {"width": 16, "steps": 1000},
            "standard": {"width": 16, "epochs": 2},
        },
    },
}


def get_config(arg: str | None = None):
  config = common.base_config("random")
  config.source = "random"  # "random" or the folder of a saved distilled set.
  config.eval.protocols = "mtt,frepo"
  config.full_data = False  # Also evaluate the whole training set (the upper bound).
  # Per-protocol overrides used only for the full-data evaluation.
  config.full_data_overrides = common.ml_collections.ConfigDict()
  # Fields of base_config that evaluation does not use.
  for unused in ("num_steps", "log_every", "checkpoint_every"):
    del config[unused]
  return common.apply_arg(config, arg, PRESETS)
