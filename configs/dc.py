"""DC and DSA (Zhao, Mopuri & Bilen, ICLR 2021; Zhao & Bilen, ICML 2021): gradient matching.

  python -m launch.distill --config=configs/dc.py:fashion_mnist,ipc=1,cpu --workdir=runs/dc
  python -m launch.distill --config=configs/dc.py:cifar10,ipc=10,dsa --workdir=runs/dsa_c10_10

Sources named in the comments: "main.py" is VICO-UoE/DatasetCondensation `main.py` and its
argparse defaults, "README" the repository's commands (`--init real`), "utils.py" its network,
loop table and evaluation. DC is `--method DC` (no augmentation); the `dsa` preset is
`--method DSA` (Siamese DSA in the matching and in the inner training, DSA evaluation). Blocks:
`outer` (the images' optimisation and the matching), `inner` (training the network on the
synthetic set between matches), `pool` (the networks), `eval`.
"""

import ml_collections

from configs import common
from configs.dm import dataset_preset

_DSA = "color_crop_cutout_flip_scale_rotate"  # main.py README: --dsa_strategy for DSA.

PRESETS = {
    # The depth reaches both DC's protocol and DSA's (the `dsa` preset evaluates with `dsa`).
    **{name: dataset_preset(name, "dc", "dsa") for name in common.DATASETS},
    # DSA (main.py --method DSA --dsa_strategy color_crop_cutout_flip_scale_rotate): Siamese DSA
    # when matching, DSA when training the network, evaluation with DSA for 1000 epochs.
    "dsa": {
        "outer": {"dsa_strategy": _DSA},
        "eval": {"protocols": "dsa,standard"},
    },
    # The whole path in well under a minute on 2 CPU cores.
    "smoke": common.merge(dataset_preset("digits", "dc", "dsa"), {
        "ipc": 2,
        "num_steps": 20,
        "log_every": 10,
        "checkpoint_every": 10,
        "outer": {"real_batch_size": 32},
        "pool": {"model_kwargs": {"width": 8}},
        "eval": {
            "protocols": "dc",
            "num_models": 2,
            "overrides": {"dc": {"epochs": 100, "width": 8}},
        },
    }),
    # The CPU benchmark (Fashion-MNIST IPC 1 within 30 minutes on 2 cores; figures and the
    # command in docs/results.md). Ours, not the authors': a width-16 ConvNet (XLA:CPU
    # convolutions dominate) and, for the evaluation, the `dc` protocol at width 16 (300 epochs
    # as released), the same for the random subset beside it; the released 1000 iterations, lr,
    # momentum, real batch and loops otherwise.
    "cpu": {
        "log_every": 20,
        "checkpoint_every": 100,
        "pool": {"model_kwargs": {"width": 16}},
        "eval": {
            "protocols": "dc",
            "overrides": {"dc": {"width": 16}, "dsa": {"width": 16, "epochs": 300}},
        },
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """DC's config: the shared fields of `common.base_config` plus DC's blocks."""
  config = common.base_config("dc")
  config.dataset = "fashion_mnist"
  # utils.py get_dataset: transforms.Normalize with the per-channel mean and std.
  config.preprocessing = "standardize"
  config.num_steps = 1000  # main.py --Iteration=1000 (each: outer_loop matching updates).
  config.log_every = 10  # main.py prints the loss every 10 iterations.
  config.checkpoint_every = 200
  # README: --init real (main.py's argparse default is 'noise'; the paper's runs use real).
  config.init = "real"

  # The images' optimisation and the matching.
  config.outer = ml_collections.ConfigDict()
  config.outer.lr = 0.1  # main.py --lr_img=0.1.
  config.outer.momentum = 0.5  # main.py: torch.optim.SGD([image_syn], lr_img, momentum=0.5).
  config.outer.real_batch_size = 256  # main.py --batch_real=256, per class.
  # main.py --dis_metric='ours': the layer-wise cosine distance; "mse" is its 'mse'.
  config.outer.distance = "cosine"
  # Matching updates per iteration; 0 = utils.py get_loops(ipc) (1/10/20/30/40/50 for ipc
  # 1/10/20/30/40/50; ours: the row of the largest listed ipc below other ipcs).
  config.outer.loops = 0
  # Siamese DSA in the matching (main.py --method DSA); "" = DC, no augmentation.
  config.outer.dsa_strategy = ""

  # Training the network on the synthetic set between matches.
  config.inner = ml_collections.ConfigDict()
  config.inner.epochs = 0  # Epochs per training; 0 = utils.py get_loops(ipc)'s inner_loop.
  config.inner.lr = 0.01  # main.py --lr_net=0.01, plain SGD.
  config.inner.batch_size = 256  # main.py --batch_train=256.
  # What the network trains on between matches: "synthetic" (main.py) or "real" (IDC; then
  # inner.epochs counts SGD steps on random real batches, LatentDC Algorithm 1).
  config.inner.data = "synthetic"
  # How the inner training steps compile: "auto" unrolls them on CPU, scans on accelerators.
  config.inner.loop = "auto"

  # The networks: a fresh random one every iteration (main.py get_network).
  config.pool = ml_collections.ConfigDict()
  config.pool.model = "convnet"
  # utils.py get_default_convnet_setting: width 128, depth 3, relu, instancenorm, avgpooling,
  # PyTorch's default initialisation.
  config.pool.model_kwargs = ml_collections.ConfigDict(
      {"width": 128, "depth": 3, "norm": "instance", "pooling": "avg", "init_scheme": "pytorch"}
  )

  # DC evaluates with utils.py evaluate_synset without augmentation for 300 epochs (`dc`).
  config.eval.protocols = "dc,standard"
  return common.apply_arg(config, arg, PRESETS)
