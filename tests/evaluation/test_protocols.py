"""Tests of the named evaluation protocols and their overrides."""

import dataclasses

import pytest

from distill_jax.evaluation import PROTOCOLS, Protocol, get_protocol
from distill_jax.evaluation.protocols import FREPO_STEPS_BY_SET_SIZE
from distill_jax.registry import UnknownNameError
from distill_jax.training import Recipe


def test_registry_names():
  assert PROTOCOLS.names() == ["apm", "d3s", "dc", "dsa", "frepo", "kd", "mtt", "standard"]
  for name in PROTOCOLS.names():
    protocol = get_protocol(name)
    assert protocol.name == name
    assert protocol.source  # Every protocol says where it comes from.
    assert protocol.test_batch_size > 0


def test_mtt_matches_released_code():
  p = get_protocol("mtt")
  assert (p.model, p.optimizer, p.lr, p.momentum, p.weight_decay) == (
      "convnet", "sgd", 0.01, 0.9, 5e-4)
  assert p.use_learned_lr and not any(
      get_protocol(name).use_learned_lr for name in ("dc", "dsa", "frepo", "kd", "standard"))
  assert p.model_kwargs == {
      "depth": 3, "width": 128, "norm": "instance", "pooling": "avg", "init_scheme": "pytorch"}
  assert (p.schedule, p.epochs, p.steps, p.batch_size, p.loss) == ("step", 1000, None, 256, "ce")
  assert (p.augmentation, p.aug_strategy, p.aug_mode) == (
      "dsa", "color_crop_cutout_flip_scale_rotate", "single")
  # IPC 10 on 10 classes: one full-set batch per epoch; IPC 50: 256 + 244.
  assert p.num_steps(100) == 1000
  assert p.num_steps(500) == 2000


def test_apm_is_the_dsa_recipe_with_l1_to_teacher_logits():
  """DD_APM distill.py evaluate_synset_mc: SGD lr_net (0.02) / 0.9, wd 5e-4, x0.1 at E/2, DSA,
  batch 256, F.l1_loss on the stored logits; hard labels cannot train under it."""
  p, dsa = get_protocol("apm"), get_protocol("dsa")
  assert (p.loss, p.lr, p.use_learned_lr) == ("l1", 0.02, False)
  for field in ("model", "model_kwargs", "optimizer", "momentum", "weight_decay", "schedule",
                "epochs", "batch_size", "augmentation", "aug_strategy", "aug_mode"):
    assert getattr(p, field) == getattr(dsa, field), field
  assert p.can_train("logits") and not p.can_train("class_ids")


def test_frepo_matches_released_code():
  p = get_protocol("frepo")
  assert p.model_kwargs["width_doubling"] is True and p.model_kwargs["norm"] == "none"
  assert (p.optimizer, p.lr, p.weight_decay, p.loss) == ("adam", 3e-4, 0.0, "mse")
  assert (p.schedule, p.warmup_steps, p.final_lr_fraction) == ("warmup_cosine", 500, 0.01)
  assert p.epochs is None and p.steps is None
  for size, steps in FREPO_STEPS_BY_SET_SIZE:
    assert p.num_steps(size) == steps
  assert p.num_steps(50) == 2000  # Between 10 and 100: the larger entry.
  assert p.num_steps(60000) == 40000  # Above the table: its largest entry.
  assert p.effective_batch_size(100) == 100 and p.effective_batch_size(1000) == 500
  assert p.augmentation == "frepo"
  assert p.strategy_for(1) == "color_crop_rotate_translate_cutout"
  assert p.strategy_for(3) == "flip_color_crop_rotate_translate_cutout"


def test_dsa_and_dc_are_mtts_recipe_at_a_fixed_lr():
  mtt, dsa, dc = get_protocol("mtt"), get_protocol("dsa"), get_protocol("dc")
  # DatasetCondensation's evaluate_synset, which MTT copied: the same recipe, lr_net = 0.01.
  differs = {f.name for f in dataclasses.fields(Protocol)
             if getattr(mtt, f.name) != getattr(dsa, f.name)}
  assert differs == {"name", "use_learned_lr", "source"}
  assert (dsa.lr, dsa.use_learned_lr) == (0.01, False)
  # DC: no augmentation (every dataset but MNIST) and 300 epochs.
  differs = {f.name for f in dataclasses.fields(Protocol)
             if getattr(dsa, f.name) != getattr(dc, f.name)}
  assert differs == {"name", "augmentation", "epochs", "source"}
  assert (dc.augmentation, dc.epochs, dc.num_steps(100)) == ("none", 300, 300)


def test_a_protocol_is_a_recipe():
  p = get_protocol("frepo")
  assert isinstance(p, Recipe)
  recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
  assert {f.name for f in dataclasses.fields(Protocol)} - recipe_fields == {
      "name", "use_learned_lr", "test_batch_size", "source"}
  # Hashable and equal by value (equal protocols share compiled programs).
  assert hash(p) == hash(get_protocol("frepo")) and p == get_protocol("frepo")
  assert p != get_protocol("frepo", lr=1e-3)
  with pytest.raises(ValueError, match="test_batch_size must be a positive int"):
    get_protocol("mtt", test_batch_size=0)


def test_kd_and_standard():
  kd = get_protocol("kd")
  assert (kd.loss, kd.temperature, kd.optimizer, kd.augmentation) == ("kd", 20.0, "adamw", "none")
  standard = get_protocol("standard")
  assert (standard.loss, standard.schedule, standard.epochs) == ("ce", "cosine", 300)
  assert get_protocol("mtt").strategy_for(1) == get_protocol("mtt").aug_strategy


def test_overrides_and_shorthands():
  p = get_protocol("mtt", epochs=20, width=16)
  assert p.epochs == 20 and p.model_kwargs["width"] == 16 and p.model_kwargs["norm"] == "instance"
  p = get_protocol("mtt", steps=50)
  assert (p.steps, p.epochs, p.num_steps(100)) == (50, None, 50)
  p = get_protocol("frepo", epochs=3)
  assert p.num_steps(1200) == 3 * 3  # ceil(1200 / 500) = 3 steps per epoch.
  p = get_protocol("standard", model_kwargs={"depth": 2})
  assert p.model_kwargs["depth"] == 2 and p.model_kwargs["width"] == 128
  p = get_protocol("standard", model="resnet18", model_kwargs={"norm": "batch"})
  assert p.model == "resnet18" and p.model_kwargs == {"norm": "batch"}
  assert get_protocol("standard", model="vgg11").model_kwargs == {}
  assert get_protocol("mtt", pad_grayscale=False).model_kwargs["pad_grayscale"] is False
  # The registry hands out fresh protocols: overrides never leak into the defaults.
  assert get_protocol("mtt").epochs == 1000 and get_protocol("mtt").model_kwargs["width"] == 128


def test_frozen_and_private_kwargs():
  kwargs = {"width": 8}
  p = Protocol(name="x", model_kwargs=kwargs, epochs=1)
  kwargs["width"] = 99
  assert p.model_kwargs["width"] == 8
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.lr = 1.0  # type: ignore[misc]
  assert p.to_dict()["model_kwargs"] == {"width": 8}


def test_unknown_names_and_fields():
  with pytest.raises(UnknownNameError, match="valid names: apm, d3s, dc, dsa, frepo, kd, mtt, standard"):
    get_protocol("nope")
  with pytest.raises(ValueError, match=r"unknown override 'epoch'.*arguments: .*epochs"):
    get_protocol("mtt", epoch=3)
  with pytest.raises(ValueError, match=r"unknown override 'depth'.*resnet18 arguments"):
    get_protocol("mtt", model="resnet18", depth=3)
  with pytest.raises(UnknownNameError, match="unknown model"):
    get_protocol("mtt", model="lenet")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optimizer": "lamb"}, "unknown optimizer 'lamb'"),
        ({"schedule": "poly"}, "unknown schedule"),
        ({"loss": "l2"}, "unknown loss"),
        ({"augmentation": "autoaugment"}, "unknown augmentation"),
        ({"epochs": 3, "steps": 4}, "set only one"),
        ({"epochs": 0}, "epochs must be a positive int"),
        ({"lr": -1.0}, "lr must be a positive finite number"),
        ({"batch_size": 2.5}, "batch_size must be a positive int"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"augmentation": "dsa", "aug_strategy": ""}, "non-empty aug_strategy"),
        ({"augmentation": "frepo", "aug_strategy": ""}, "non-empty aug_strategy"),
    ],
)
def test_bad_values(overrides, message):
  with pytest.raises(ValueError, match=message):
    get_protocol("mtt", **overrides)


def test_empty_training_set_is_an_error():
  with pytest.raises(ValueError, match="training set is empty"):
    get_protocol("mtt").num_steps(0)
