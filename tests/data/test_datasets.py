"""Dataset registry: IDX parsing, Fashion-MNIST, digits, tfds data sources, errors."""

import gzip
import os
import struct
import time

import numpy as np
import pytest
from PIL import Image

from distill_jax import data
from distill_jax.data import datasets, files
from distill_jax.registry import UnknownNameError

FASHION_DIR = datasets.DEBIAN_FASHION_MNIST_DIR


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
  header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
  return header + array.astype(dtype).tobytes()


def _write_idx(path: str, array: np.ndarray, *, gz: bool, type_code: int = 0x08) -> str:
  raw = _idx_bytes(array, type_code)
  path = path + (".gz" if gz else "")
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if gz else raw)
  return path


@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
  """Every data directory points into an empty tmp folder (and no network is ever needed)."""
  empty = tmp_path / "empty"
  empty.mkdir()
  monkeypatch.setenv("DISTILL_JAX_DATA_DIR", str(empty))
  monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
  monkeypatch.setenv("HOME", str(empty))
  return empty


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_types(tmp_path, gz):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
  path = _write_idx(str(tmp_path / "images"), images, gz=gz)
  np.testing.assert_array_equal(data.read_idx(path), images)
  shorts = rng.integers(-300, 300, (7,)).astype(np.int16)
  path = _write_idx(str(tmp_path / "shorts"), shorts, gz=gz, type_code=0x0B)
  np.testing.assert_array_equal(data.read_idx(path), shorts)
  floats = rng.normal(size=(2, 3)).astype(np.float32)
  path = _write_idx(str(tmp_path / "floats"), floats, gz=gz, type_code=0x0D)
  np.testing.assert_array_equal(data.read_idx(path), floats)


def test_read_idx_rejects_corrupt_files(tmp_path):
  images = np.zeros((4, 2, 2), np.uint8)
  raw = _idx_bytes(images)
  truncated = tmp_path / "truncated"
  truncated.write_bytes(raw[:-3])
  with pytest.raises(ValueError, match="truncated or corrupt IDX file.*fetch it again"):
    data.read_idx(str(truncated))
  bad_magic = tmp_path / "bad_magic"
  bad_magic.write_bytes(b"\x01\x02" + raw[2:])
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(str(bad_magic))
  bad_gzip = tmp_path / "bad.gz"
  bad_gzip.write_bytes(gzip.compress(raw)[:-10])
  with pytest.raises(ValueError, match="corrupt or truncated gzip"):
    data.read_idx(str(bad_gzip))


@pytest.mark.parametrize("layout", ["root_gz", "subfolder_raw"])
def test_fashion_mnist_from_data_dir(monkeypatch, tmp_path, layout):
  rng = np.random.default_rng(1)
  folder = tmp_path if layout == "root_gz" else tmp_path / "fashion_mnist"
  folder.mkdir(exist_ok=True)
  gz = layout == "root_gz"
  splits = {}
  for split, (images_stem, labels_stem) in files.IDX_FILES.items():
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (6,), dtype=np.uint8)
    _write_idx(str(folder / images_stem), images, gz=gz)
    _write_idx(str(folder / labels_stem), labels, gz=gz)
    splits[split] = images, labels
  monkeypatch.setenv("DISTILL_JAX_DATA_DIR", str(tmp_path))
  for split, (images, labels) in splits.items():
    x, y = data.load("fashion_mnist", split)
    assert x.shape == (6, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(y, labels)
    assert not x.flags.writeable and not y.flags.writeable


def test_fashion_mnist_labels_out_of_range_is_an_error(monkeypatch, tmp_path):
  for images_stem, labels_stem in files.IDX_FILES.values():
    _write_idx(str(tmp_path / images_stem), np.zeros((2, 28, 28), np.uint8), gz=False)
    _write_idx(str(tmp_path / labels_stem), np.array([3, 12], np.uint8), gz=False)
  monkeypatch.setenv("DISTILL_JAX_DATA_DIR", str(tmp_path))
  with pytest.raises(ValueError, match="labels outside 0..9"):
    data.load("fashion_mnist", "train")


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
  monkeypatch.delenv("DISTILL_JAX_DATA_DIR", raising=False)
  x_train, y_train = data.load("fashion_mnist", "train")
  x_test, y_test = data.load("fashion_mnist", "test")
  assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
  assert x_train.dtype == np.float32 and y_train.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
  assert x_train.min() == 0.0 and x_train.max() == 1.0
  assert x_test.min() >= 0.0 and x_test.max() <= 1.0
  # The published order starts with these labels (Zalando's README / every loader).
  assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
  # Cached: a second load is the same (read-only) array object.
  assert data.load("fashion_mnist", "train")[0] is x_train


def test_fashion_mnist_not_found_says_how_to_get_it(monkeypatch, no_data_env):
  monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", str(no_data_env / "missing"))
  expected = "apt-get install dataset-fashion-mnist.*DISTILL_JAX_DATA_DIR"
  with pytest.raises(data.DataNotFoundError, match=expected):
    data.load("fashion_mnist", "test")


def test_digits_split():
  from sklearn import datasets as sk_datasets

  x_train, y_train = data.load("digits", "train")
  x_test, y_test = data.load("digits", "test")
  assert x_train.shape == (1198, 8, 8, 1) and x_test.shape == (599, 8, 8, 1)
  assert y_train.dtype == np.int32 and x_train.dtype == np.float32
  levels = np.concatenate([x_train, x_test]) * 16
  np.testing.assert_array_equal(levels, np.round(levels))
  assert levels.min() == 0 and levels.max() == 16
  # Stratified: every class gives a third (rounded) of its images to the test split.
  full = sk_datasets.load_digits()
  full_counts = np.bincount(full.target)
  assert np.all(np.abs(np.bincount(y_test) - full_counts / 3) <= 1)
  # Together the splits are exactly sklearn's images, each once.
  ours = np.concatenate([x_train, x_test]).reshape(-1, 64) * 16
  ours = np.concatenate([ours, np.concatenate([y_train, y_test])[:, None]], axis=1)
  theirs = np.concatenate([full.data, full.target[:, None]], axis=1)
  np.testing.assert_array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])


def test_info_is_static_and_matches_registry():
  assert set(data.DATASETS.names()) >= {
      "fashion_mnist", "digits", "mnist", "cifar10", "cifar100", "svhn_cropped", "imagenette",
      "imagenet_resized/64x64", "tiny_imagenet",
  }
  cifar100 = data.info("cifar100")
  assert cifar100.num_classes == len(cifar100.class_names) == len(set(cifar100.class_names)) == 100
  assert list(cifar100.class_names) == sorted(cifar100.class_names)  # CIFAR's fine names are sorted
  assert data.info("imagenette").image_shape == (128, 128, 3)
  resized = data.info("imagenet_resized/64x64")
  assert resized.num_classes == 1000 and resized.class_names[0].startswith("n")
  assert data.info("fashion_mnist").class_names[9] == "Ankle boot"


def test_unknown_name_and_split():
  with pytest.raises(UnknownNameError, match="unknown dataset 'cifar11'; valid names: .*cifar10"):
    data.load("cifar11", "train")
  with pytest.raises(UnknownNameError, match="fashion_mnist"):
    data.info("nope")
  with pytest.raises(ValueError, match="unknown split 'val'.*train, test"):
    data.load("digits", "val")


@pytest.mark.parametrize("name", ["cifar10", "svhn_cropped", "imagenette", "mnist"])
def test_tfds_not_prepared_fails_fast_without_network(no_data_env, name):
  start = time.perf_counter()
  with pytest.raises(data.DataNotFoundError, match=f"{name}.*prepare"):
    data.load(name, "train")
  assert time.perf_counter() - start < 2.0


def test_prepare_needs_tensorflow_or_a_tfds_name(no_data_env):
  with pytest.raises(ValueError, match="not a tfds dataset"):
    data.prepare("digits")
  if not files.tensorflow_available():
    with pytest.raises(data.DataNotFoundError, match="needs TensorFlow"):
      data.prepare("cifar10")


def _make_array_record_dataset(data_dir: str, image_shape: tuple[int, int, int]) -> dict[int, int]:
  """Prepares a tiny array_record tfds dataset (no TensorFlow, no network); pixel -> label."""
  import tensorflow_datasets as tfds

  class DistillJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.2.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=image_shape, dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=3),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(7), "test": self._generate_examples(2)}

    def _generate_examples(self, count):
      for i in range(count):
        yield i, {"image": np.full(image_shape, 10 * i, np.uint8), "label": i % 3}

  builder = DistillJaxTinyImages(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return {10 * i: i % 3 for i in range(7)}


def test_read_prepared_tfds_array_record(tmp_path):
  expected = _make_array_record_dataset(str(tmp_path), (6, 8, 3))
  dirs = [str(tmp_path / "x"), str(tmp_path)]
  assert files.find_prepared_tfds("distill_jax_tiny_images", dirs) == (str(tmp_path), "1.2.0")
  assert files.find_prepared_tfds("cifar10", [str(tmp_path)]) is None
  x, y = files.read_prepared_tfds("distill_jax_tiny_images", "train", str(tmp_path), "1.2.0")
  assert x.shape == (7, 6, 8, 3) and x.dtype == np.float32 and y.dtype == np.int32
  pixels = np.round(x[:, 0, 0, 0] * 255).astype(int)
  assert {int(p): int(label) for p, label in zip(pixels, y)} == expected
  np.testing.assert_allclose(x, np.broadcast_to(x[:, :1, :1, :1], x.shape))
  # Resizing path (imagenette): shorter side to 4, centre crop, constant images stay constant.
  x_small, _ = files.read_prepared_tfds(
      "distill_jax_tiny_images", "test", str(tmp_path), "1.2.0", image_size=4
  )
  assert x_small.shape == (2, 4, 4, 3)
  corner = np.broadcast_to(x_small[:, :1, :1, :1], x_small.shape)
  np.testing.assert_allclose(x_small, corner, atol=1 / 255)


def test_resize_shorter_and_center_crop_matches_torchvision_rule():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
  out = files.resize_shorter_and_center_crop(image, 3)
  # torchvision: shorter side 6 -> 3, longer int(3 * 10 / 6) = 5, crop left round((5 - 3) / 2) = 1.
  resized = np.asarray(Image.fromarray(image).resize((5, 3), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(out, resized[:, 1:4])
  tall = files.resize_shorter_and_center_crop(rng.integers(0, 256, (9, 4, 1), dtype=np.uint8), 4)
  assert tall.shape == (4, 4, 1)


def _write_tiny_imagenet(root, rng):
  wnids = ["n02", "n01"]  # deliberately unsorted: class ids follow the sorted ids
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\n")
  images = {}
  for wnid in wnids:
    folder = root / "train" / wnid / "images"
    folder.mkdir(parents=True)
    for k in range(2):
      array = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
      Image.fromarray(array).save(folder / f"{wnid}_{k}.JPEG", format="PNG")
      images[(wnid, k)] = array
  (root / "val" / "images").mkdir(parents=True)
  grey = rng.integers(0, 256, (64, 64), dtype=np.uint8)
  Image.fromarray(grey).save(root / "val" / "images" / "val_0.JPEG", format="PNG")
  (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t63\t63\n")
  return images, grey


def test_tiny_imagenet_folder(monkeypatch, tmp_path):
  root = tmp_path / "tiny-imagenet-200"
  root.mkdir()
  images, grey = _write_tiny_imagenet(root, np.random.default_rng(3))
  monkeypatch.setenv("DISTILL_JAX_DATA_DIR", str(tmp_path))
  assert data.info("tiny_imagenet").class_names == ("goldfish", "salamander")
  x, y = data.load("tiny_imagenet", "train")
  assert x.shape == (4, 64, 64, 3) and y.tolist() == [0, 0, 1, 1]
  np.testing.assert_allclose(x[0], images[("n01", 0)] / 255.0, atol=1e-7)
  np.testing.assert_allclose(x[3], images[("n02", 1)] / 255.0, atol=1e-7)
  x_test, y_test = data.load("tiny_imagenet", "test")
  assert y_test.tolist() == [1]
  np.testing.assert_allclose(x_test[0], np.repeat(grey[..., None], 3, -1) / 255.0, atol=1e-7)


def test_tiny_imagenet_missing(no_data_env):
  with pytest.raises(data.DataNotFoundError, match="tiny-imagenet-200"):
    data.load("tiny_imagenet", "train")
