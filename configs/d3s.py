"""D3S (Loo et al., paper 001): Gaussian-KL statistics matching with ISU, ENS and ENL.

  python -m launch.distill --config=configs/d3s.py:fashion_mnist,ipc=10,cpu --workdir=runs/d3s
  python -m launch.distill --config=configs/d3s.py:tiny_imagenet,ipc=50 --workdir=runs/d3s_tiny

Sources named in the comments: "Table 8/9/10" and "Section"/"Appendix" are the D3S paper's; the
authors' code (yolky/d3s_distillation) is not public here, so gaps are filled from SRe2L/CDA
(VILA-Lab/SRe2L): "recover" is CDA's `recover_cda_tiny.py` / SRe2L's recover scripts, "relabel"
SRe2L's relabel and train_FKD scripts. Values neither fixes are marked "ours". The defaults are
Tiny-ImageNet's column (ResNet-18 teachers); the `imagenet_1k` and `imagenet_21k` presets switch
the synthesis and validation columns.

Switches (the ablations of Figure 3 and Table 4): `ens` (teacher b mod M per batch, else teacher
0), `relabel.enl` (the teachers' mean logits, else teacher 0's), `isu` (Eq. 2, else each batch
matched alone), `full_covariance` and `statistic_loss` ("kl": Eq. 1; "bn": SRe2L's BatchNorm
loss). Blocks: `outer` (synthesis), `teachers` (the pool, `training/teachers.py`), `relabel`,
`eval`.
"""

from typing import Any

import ml_collections

from configs import common

# 28/32 px datasets jitter by 2 pixels instead of CDA's 4 at 64 px (ours: the same fraction).
_SMALL = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn_cropped", "digits")


def dataset_preset(name: str) -> dict[str, Any]:
  preset: dict[str, Any] = {"dataset": name}
  if name in _SMALL:
    preset["outer"] = {"jitter": 2 if name != "digits" else 1}
  return preset


PRESETS = {
    **{name: dataset_preset(name) for name in common.DATASETS},
    # Table 9/10's ImageNet-1K columns: Adam 0.25 x 1000 iterations; validation AdamW 1e-3,
    # batch 128, 300 epochs, 300 labelled epochs (Section 7).
    "imagenet_1k": {
        "num_steps": 1000,
        "outer": {"lr": 0.25},
        "relabel": {"epochs": 300},
        "eval": {"overrides": {"d3s": {"optimizer": "adamw", "lr": 1e-3, "batch_size": 128,
                                       "epochs": 300}}},
    },
    # Table 9/10's ImageNet-21K columns: Adam 0.05 x 1000; AdamW 2e-3, batch 128, 300 epochs.
    "imagenet_21k": {
        "num_steps": 1000,
        "outer": {"lr": 0.05},
        "relabel": {"epochs": 300},
        "eval": {"overrides": {"d3s": {"optimizer": "adamw", "lr": 2e-3, "batch_size": 128,
                                       "epochs": 300}}},
    },
    # The whole path in about a minute: digits, 2 width-8 teachers of 10 epochs without
    # augmentation (random crops of 8x8 digits cost them 16 points), 20 iterations per batch, 3
    # labelled epochs, short evaluations.
    "smoke": common.merge(dataset_preset("digits"), {
        "ipc": 2,
        "num_steps": 20,
        "log_every": 10,
        "checkpoint_every": 15,
        "outer": {"batch_size": 10},
        "teachers": {"model": "convnet", "num_teachers": 2, "epochs": 10, "warmup_epochs": 0,
                     "lr": 0.1, "batch_size": 128, "augmentation": "none",
                     "model_kwargs": {"width": 8, "depth": 2, "norm": "batch"}},
        "relabel": {"epochs": 3},
        "eval": {
            "num_models": 2,
            "overrides": {"d3s": {"model": "convnet", "width": 8, "depth": 2, "epochs": 30},
                          "mtt": {"width": 8, "depth": 2, "epochs": 30}},
        },
    }),
    # The CPU acceptance run (Fashion-MNIST IPC 10 within 45 minutes on 2 cores from an empty
    # teacher cache; figures in docs/results.md). Ours, set by the time budget: 5 ConvNet
    # teachers of width 16 with batch norm trained 3 epochs (Table 8: ResNet-18, 50 epochs; the
    # warm-up shrinks to 1 epoch), ImageNet-1K's synthesis column (Adam 0.25 x 1000 iterations,
    # the shorter K), E_L = 25 labelled epochs (Section 7's smallest), and the Tiny validation
    # recipe on a width-16 ConvNet instead of a ResNet-18. Two values were chosen on a validation
    # split (`validation_split=10000`: 10000 training images held out, teachers trained on the
    # rest; docs/results.md has the sweep), never on the test split: alpha = 2 (the paper's 20
    # was calibrated for ResNet-18's 17 layers of up to 512 channels; 3 layers of 16 channels
    # give a far smaller KL, and 20 * CE then drowns it: 60.4 vs 66.2 on validation) and E_T =
    # 1000 training epochs of the d3s protocol (Section 7: longer training helps; 100 -> 300 ->
    # 1000 epochs gave 66.2 -> 71.2 -> 74.7). The `mtt` protocol (width 16, 300 epochs like every
    # CPU preset) trains the hard-label random subset beside it.
    "cpu": {
        "num_steps": 1000,
        "log_every": 100,
        "checkpoint_every": 1000,
        "outer": {"lr": 0.25, "alpha": 2.0},
        "teachers": {"model": "convnet", "epochs": 3, "warmup_epochs": 1,
                     "model_kwargs": {"width": 16, "depth": 3, "norm": "batch"}},
        "relabel": {"epochs": 25},
        "eval": {"overrides": {"d3s": {"model": "convnet", "width": 16, "epochs": 1000},
                               "mtt": {"width": 16, "epochs": 300}}},
    },
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """D3S's config: the shared fields of `common.base_config` plus D3S's blocks."""
  config = common.base_config("d3s")
  config.dataset = "tiny_imagenet"
  # recover: images live in the teachers' normalised space (transforms.Normalize by the
  # dataset's channel mean and std) and are clipped to [0, 1] pixels there.
  config.preprocessing = "standardize"
  config.num_steps = 4000  # K, iterations per batch: Table 9, Tiny-ImageNet.
  config.log_every = 100
  config.checkpoint_every = 1000
  config.init = "noise"  # recover: torch.randn images.
  # Training images held out as the evaluation split (0: evaluate on the test split). Presets
  # are chosen with it set (e.g. 10000 on Fashion-MNIST), never on the test split.
  config.validation_split = 0

  config.ens = True  # Section 4.4: ensemble synthesis, teacher b mod M for batch b.
  config.isu = True  # Section 4.2: incremental statistic updating.
  config.full_covariance = True  # Section 4.1: full C_l x C_l covariances (Table 4: diagonal).
  config.statistic_loss = "kl"  # Eq. 1 (Table 4: "bn", SRe2L's BatchNorm statistic loss).

  config.outer = ml_collections.ConfigDict()
  config.outer.lr = 0.4  # Table 9, Tiny-ImageNet (cosine-annealed to 0 over K, recover).
  config.outer.adam_b1 = 0.5  # Table 9: Adam betas 0.5 / 0.9.
  config.outer.adam_b2 = 0.9
  config.outer.batch_size = 200  # Table 9: |B| = 200 (recover: consecutive classes, one slot).
  config.outer.alpha = 20.0  # Section 4.1: alpha fixed at 20.
  config.outer.jitter = 4  # recover_cda_tiny.py --jitter 4 (random roll of 0..4 pixels).
  # Appendix D.3: CDA's curriculum, the RandomResizedCrop minimum scale falling "linearly" from
  # 1 to 0.08 over the first `milestone` of the K iterations. CDA's released commands (its
  # README) use --easy2hard-mode cosine --milestone 1: "cosine" is supported; linear is the
  # D3S paper's word and the default.
  config.outer.curriculum = "linear"
  config.outer.milestone = 1.0  # CDA README: --milestone 1.
  config.outer.min_crop_scale = 0.08  # Appendix D.3: "min scale 0.08" (torchvision's default).

  # The teacher pool (Table 8, Tiny-ImageNet; Appendix D.2: M = 5).
  config.teachers = ml_collections.ConfigDict()
  config.teachers.num_teachers = 5
  config.teachers.model = "resnet18"
  # Appendix D.2: Tiny-ImageNet ResNet-18s with a 3x3 first conv and no max-pool: the defaults
  # of `models.ResNet18` (stem "cifar", batch norm). Free-form: the keys of the chosen model.
  config.teachers.model_kwargs = ml_collections.ConfigDict()
  config.teachers.optimizer = "sgd"
  config.teachers.lr = 0.2
  config.teachers.momentum = 0.9
  config.teachers.weight_decay = 1e-4
  config.teachers.schedule = "warmup_cosine"  # Table 8: cosine annealing, linear warm-up 5.
  config.teachers.warmup_epochs = 5
  config.teachers.epochs = 50
  config.teachers.batch_size = 256
  config.teachers.augmentation = "rrc"  # Table 8: RandomResizedCrop + horizontal flip.
  config.teachers.seed = 0
  config.teachers.checkpoint_every = 1  # Epochs between resumable checkpoints (ours).
  config.teachers.dir = ""  # Empty: $DISTILL_JAX_CACHE/teachers/<digest of the settings>.

  config.relabel = ml_collections.ConfigDict()
  config.relabel.enl = True  # Section 4.4: ensemble labelling (mean logits of the M teachers).
  config.relabel.epochs = 100  # E_L = E_T: Table 10's Tiny-ImageNet epochs (Appendix D.7).

  # `d3s`: KD replay of the recorded epochs (Algorithm 4); `mtt` trains the hard-label random
  # subset (and the relabelled sets with soft cross-entropy) beside it.
  config.eval.protocols = "d3s,mtt"
  return common.apply_arg(config, arg, PRESETS)
