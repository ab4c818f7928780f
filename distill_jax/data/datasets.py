"""The dataset registry: `load(name, split)` gives NHWC float32 images in [0, 1] and int32 labels.

Sources, in the order they are tried (a missing source is a `DataNotFoundError` that says how to
get the data, never a silent fallback to other data):

* `fashion_mnist`, `mnist`: IDX files (gzipped or not) in `$DISTILL_JAX_DATA_DIR` or its
  `fashion_mnist/` (`mnist/`) subfolder; for Fashion-MNIST also Debian's `dataset-fashion-mnist`
  package (`/usr/share/datasets/fashion-mnist`). Debian recompresses the `.gz` files, so tfds'
  checksummed builder rejects them; `read_idx` parses IDX with numpy and validates the magic
  number and the sizes. Then a tfds copy prepared as below.
* `digits`: scikit-learn's bundled 8x8 digits (17 grey levels 0..16, divided by 16), split
  with a fixed stratified split (`DIGITS_TEST_FRACTION` of each class to the test split,
  `train_test_split(..., stratify=y, random_state=0)`): 1198 train / 599 test images.
* tfds catalog datasets (`mnist`, `cifar10`, `cifar100`, `svhn_cropped`, `imagenette`,
  `imagenet_resized/64x64`) from a copy already prepared under `$DISTILL_JAX_DATA_DIR`,
  `$TFDS_DATA_DIR` or `~/tensorflow_datasets`: `array_record` copies are read with
  `tfds.data_source` (no TensorFlow needed); `tfrecord` copies need TensorFlow and are read
  with `tfds.load(..., download=False)`. `load` never downloads: the prepared directory is
  checked before tfds is called, so an offline machine fails at once. `prepare(name)` downloads
  and prepares a dataset in `array_record` format (needs network and TensorFlow).
  `imagenette` is tfds' `imagenette/320px-v2` resized as MTT does (shorter side to 128 with
  antialiased bilinear resampling, then a 128x128 centre crop); its test split is tfds'
  `validation` split, as is `imagenet_resized/64x64`'s.
* `tiny_imagenet` (not in the tfds catalog): the standard `tiny-imagenet-200` folder (as MTT
  and FRePo use it) in `$DISTILL_JAX_DATA_DIR` (the folder itself, or its `tiny-imagenet-200/`
  or `tiny_imagenet/` subfolder); the test split is the labelled `val/` folder and class ids
  follow the sorted WordNet ids. `info("tiny_imagenet").class_names` come from the folder's
  `words.txt` when it is found, else they are `class_000`..`class_199`;
  `info("imagenet_resized/64x64").class_names` are the WordNet ids tfds ships.

Decoded arrays are cached in-process (`functools.lru_cache`, keyed by the files' paths, sizes
and modification times) and returned read-only, so several loads of one split cost one decode;
copy them before modifying them in place.
"""

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import struct
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from distill_jax.registry import Registry

SPLITS = ("train", "test")
DATA_DIR_ENV = "DISTILL_JAX_DATA_DIR"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS_TEST_FRACTION = 1 / 3
IMAGENETTE_SIZE = 128

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TFDS_IMAGE_BATCH = 2048


class DataNotFoundError(FileNotFoundError):
  """The dataset's files are not on this machine; the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset, known without loading it.

  Attributes:
    name: the registry name.
    num_classes: number of classes C; labels are `0..C-1`.
    image_shape: `(H, W, channels)` of the images `load` returns.
    class_names: C human-readable names, index = class id.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DatasetSource:
  """A registry entry: how to describe a dataset and how to read one split of it.

  Attributes:
    info_fn: returns the `DatasetInfo` (cheap; reads at most a small label file).
    load_fn: `load_fn(split) -> (x, y)` for `split` in `SPLITS`.
  """

  info_fn: Callable[[], DatasetInfo]
  load_fn: Callable[[str], tuple[np.ndarray, np.ndarray]]


DATASETS: Registry[DatasetSource] = Registry("dataset")


def info(name: str) -> DatasetInfo:
  """The `DatasetInfo` of dataset `name`, without loading any images.

  >>> info("fashion_mnist").image_shape
  (28, 28, 1)
  >>> info("digits").num_classes
  10

  Raises:
    UnknownNameError: `name` is not registered (the message lists the valid names).
  """
  return DATASETS.get(name).info_fn()


def load(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of dataset `name`.

  Args:
    name: a name in `DATASETS` (e.g. "fashion_mnist", "digits", "cifar10").
    split: "train" or "test".

  Returns:
    `(x, y)`: `x` float32 `(N, H, W, C)` in [0, 1] (read-only), `y` int32 `(N,)` (read-only).

  Raises:
    UnknownNameError: unknown dataset name (lists the valid names).
    DataNotFoundError: the files are not on this machine (says how to get them).
    ValueError: unknown split, or a corrupt / truncated file.

  >>> x, y = load("digits", "test")
  >>> x.shape, x.dtype, y.dtype, float(x.max()) <= 1.0
  ((599, 8, 8, 1), dtype('float32'), dtype('int32'), True)
  """
  source = DATASETS.get(name)
  if split not in SPLITS:
    raise ValueError(
        f"unknown split {split!r} for dataset {name!r}; use one of {', '.join(SPLITS)}"
    )
  x, y = source.load_fn(split)
  expected = source.info_fn()
  if x.shape[1:] != expected.image_shape or x.shape[0] != y.shape[0]:
    raise ValueError(
        f"{name} {split}: loaded images {x.shape} and labels {y.shape} do not match the expected "
        f"image shape {expected.image_shape}; the data files are not {name}, replace them"
    )
  return x, y


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST).


def read_idx(path: str) -> np.ndarray:
  """Parses an IDX file (gzipped or raw, detected from its first bytes) into a numpy array.

  The format is two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions,
  one big-endian uint32 per dimension, then the values in C order.

  Args:
    path: file path.

  Returns:
    The array with the file's shape, in native byte order.

  Raises:
    ValueError: bad magic number, unknown type code, truncated or oversized data, or a
      corrupt gzip stream.
  """
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(
          f"{path}: corrupt or truncated gzip data ({e}); delete the file and fetch it again"
      ) from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(
        f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}, expected "
        "00 00 <type> <ndim>); replace it with the original IDX file"
    )
  dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes); fetch the file again")
  dims = struct.unpack(f">{ndim}I", raw[4:header_size])
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header_size != expected:
    raise ValueError(
        f"{path}: truncated or corrupt IDX file: its header says shape {dims} "
        f"({expected} bytes of data) but it holds {len(raw) - header_size} bytes; fetch it again"
    )
  array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(dims)
  return array.astype(dtype.newbyteorder("="))


def _find_file(directory: str, stem: str) -> str | None:
  for candidate in (stem, stem + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def _idx_dirs(subfolder: str, extra: Sequence[str]) -> list[str]:
  dirs = []
  root = os.environ.get(DATA_DIR_ENV)
  if root:
    dirs += [root, os.path.join(root, subfolder)]
  return dirs + list(extra)


def _find_idx_pair(split: str, dirs: Sequence[str]) -> tuple[str, str] | None:
  images_stem, labels_stem = _IDX_FILES[split]
  for directory in dirs:
    images, labels = _find_file(directory, images_stem), _find_file(directory, labels_stem)
    if images and labels:
      return images, labels
  return None


def _file_key(path: str) -> tuple[str, int, int]:
  stat = os.stat(path)
  return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _decode_idx_pair(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  images, labels = read_idx(images_key[0]), read_idx(labels_key[0])
  if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise ValueError(
        f"{images_key[0]} {images.shape} and {labels_key[0]} {labels.shape} are not a matching "
        "(N, H, W) image file and (N,) label file; replace them with the original IDX files"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"{labels_key[0]}: labels outside 0..{num_classes - 1}; replace it with the original file"
    )
  x = (images.astype(np.float32) / np.float32(255.0))[..., None]
  return _read_only(x), _read_only(labels.astype(np.int32))


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False
  return array


def _load_idx_or_tfds(
    name: str, split: str, *, subfolder: str, extra_dirs: Sequence[str], num_classes: int,
    how_to_get: str,
) -> tuple[np.ndarray, np.ndarray]:
  dirs = _idx_dirs(subfolder, extra_dirs)
  pair = _find_idx_pair(split, dirs)
  if pair is not None:
    return _decode_idx_pair(_file_key(pair[0]), _file_key(pair[1]), num_classes)
  prepared = _find_prepared(name)
  if prepared is not None:
    return _load_prepared(name, split, prepared)
  stems = " and ".join(s + "[.gz]" for s in _IDX_FILES[split])
  searched = ", ".join(dirs) if dirs else f"nothing (${DATA_DIR_ENV} is not set)"
  raise DataNotFoundError(
      f"{name} {split} split not found: no {stems} in {searched}, and no prepared tfds copy; "
      f"{how_to_get}"
  )


# ----------------------------------------------------------------------------------------------
# tfds catalog datasets.

_TFDS_NAMES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "svhn_cropped": "svhn_cropped",
    "imagenette": "imagenette/320px-v2",
    "imagenet_resized/64x64": "imagenet_resized/64x64",
}
_TFDS_SPLITS = {
    "imagenette": {"train": "train", "test": "validation"},
    "imagenet_resized/64x64": {"train": "train", "test": "validation"},
}


def tfds_data_dirs() -> list[str]:
  """The directories searched for prepared tfds datasets, in order.

  `$DISTILL_JAX_DATA_DIR`, `$TFDS_DATA_DIR`, then `~/tensorflow_datasets` (tfds' default).
  """
  dirs = [os.environ.get(DATA_DIR_ENV), os.environ.get("TFDS_DATA_DIR")]
  dirs.append(os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))
  return [d for d in dirs if d]


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def find_prepared_tfds(tfds_name: str, data_dirs: Sequence[str]) -> tuple[str, str] | None:
  """Finds a prepared copy of `tfds_name` ("cifar10", "imagenette/320px-v2", ...).

  A prepared copy is `<data_dir>/<tfds_name>/<version>/dataset_info.json`; the newest version
  present wins. Only the file system is read, so this never touches the network.

  Returns:
    `(data_dir, version)` or None.
  """
  for data_dir in data_dirs:
    dataset_dir = os.path.join(data_dir, tfds_name)
    if not os.path.isdir(dataset_dir):
      continue
    versions = [
        v for v in os.listdir(dataset_dir)
        if os.path.isfile(os.path.join(dataset_dir, v, "dataset_info.json"))
    ]
    if versions:
      return data_dir, max(versions, key=_version_key)
  return None


def _find_prepared(name: str) -> tuple[str, str] | None:
  return find_prepared_tfds(_TFDS_NAMES[name], tfds_data_dirs())


def _tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


@functools.lru_cache(maxsize=4)
def read_prepared_tfds(
    tfds_name: str, split: str, data_dir: str, version: str, image_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Reads every `(image, label)` of a prepared tfds split into numpy arrays.

  Args:
    tfds_name: tfds name with config, e.g. "cifar10" or "imagenette/320px-v2".
    split: tfds split name ("train", "test", "validation").
    data_dir: the tfds data directory holding the prepared copy.
    version: the prepared version, e.g. "3.0.2".
    image_size: None keeps the stored size (all images must share it); an int resizes the
      shorter side to `image_size` (antialiased bilinear) and centre-crops a square.

  Returns:
    `(x, y)`: float32 `(N, H, W, C)` in [0, 1] and int32 `(N,)`, read-only, in the order the
    data source stores the records.

  Raises:
    DataNotFoundError: the copy is in tfrecord format and TensorFlow is not installed.
  """
  info_path = os.path.join(data_dir, tfds_name, version, "dataset_info.json")
  with open(info_path, encoding="utf-8") as f:
    file_format = json.load(f).get("fileFormat", "tfrecord")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if file_format == "array_record":
    source = tfds.data_source(
        f"{tfds_name}:{version}", split=split, data_dir=data_dir, download=False
    )
    num = len(source)
    x, y = None, np.empty((num,), np.int32)
    for start in range(0, num, _TFDS_IMAGE_BATCH):
      records = source.__getitems__(list(range(start, min(start + _TFDS_IMAGE_BATCH, num))))
      images = np.stack([_to_image(r["image"], image_size) for r in records])
      if x is None:
        # Filled chunk by chunk, so the peak memory is the float32 result itself.
        x = np.empty((num,) + images.shape[1:], np.float32)
      x[start:start + len(records)] = images.astype(np.float32) / np.float32(255.0)
      y[start:start + len(records)] = [int(r["label"]) for r in records]
  elif _tensorflow_available():
    dataset = tfds.load(
        f"{tfds_name}:{version}", split=split, data_dir=data_dir, download=False,
        as_supervised=True,
    )
    images, labels = [], []
    for image, label in tfds.as_numpy(dataset):
      images.append(_to_image(image, image_size))
      labels.append(int(label))
    x = np.stack(images).astype(np.float32) / np.float32(255.0)
    y = np.asarray(labels, np.int32)
  else:
    raise DataNotFoundError(
        f"{tfds_name} in {data_dir} is prepared in {file_format!r} format, which needs "
        "TensorFlow to read: `pip install tensorflow-cpu`, or prepare it again with "
        "distill_jax.data.prepare (array_record format, readable without TensorFlow)"
    )
  if x is None:
    raise ValueError(f"{tfds_name} {split} in {data_dir} is empty; prepare it again")
  return _read_only(x), _read_only(y)


def _to_image(image: np.ndarray, size: int | None) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if size is None:
    return image
  return resize_shorter_and_center_crop(image, size)


def resize_shorter_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` and crops the central `size x size` square.

  torchvision's `Resize(size)` + `CenterCrop(size)` on a PIL image (MTT's ImageNet subsets):
  antialiased bilinear resampling (PIL), the longer side rounded down as torchvision does
  (`int(size * long / short)`), and a crop offset of `round((long - size) / 2)`.

  Args:
    image: uint8 `(H, W, C)` with C in {1, 3}.
    size: output side length.

  Returns:
    uint8 `(size, size, C)`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  height, width, channels = image.shape
  if height <= width:
    new_h, new_w = size, int(size * width / height)
  else:
    new_h, new_w = int(size * height / width), size
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR))
  if resized.ndim == 2:
    resized = resized[..., None]
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return resized[top:top + size, left:left + size]


def _load_prepared(
    name: str, split: str, prepared: tuple[str, str]
) -> tuple[np.ndarray, np.ndarray]:
  tfds_split = _TFDS_SPLITS.get(name, {}).get(split, split)
  image_size = IMAGENETTE_SIZE if name == "imagenette" else None
  return read_prepared_tfds(_TFDS_NAMES[name], tfds_split, prepared[0], prepared[1], image_size)


def _not_prepared_message(name: str) -> str:
  return (
      f"{name} is not prepared in any of {', '.join(tfds_data_dirs())} (looked for "
      f"<dir>/{_TFDS_NAMES[name]}/<version>/dataset_info.json); prepare it once on a machine "
      f"with network access: `pip install tensorflow-cpu` then "
      f"`python -c \"import distill_jax.data as d; d.prepare('{name}')\"`, or set "
      f"{DATA_DIR_ENV} (or TFDS_DATA_DIR) to a directory where it is prepared"
  )


def _load_tfds(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  prepared = _find_prepared(name)
  if prepared is None:
    raise DataNotFoundError(_not_prepared_message(name))
  return _load_prepared(name, split, prepared)


def prepare(name: str, *, data_dir: str | None = None) -> str:
  """Downloads and prepares a tfds catalog dataset in `array_record` format (needs network).

  Preparing encodes images with TensorFlow, so TensorFlow must be installed; reading the result
  later (`load`) does not need it.

  Args:
    name: a registry name backed by tfds (e.g. "cifar10").
    data_dir: where to prepare; defaults to the first of `tfds_data_dirs()`.

  Returns:
    The data directory the dataset was prepared in.

  Raises:
    ValueError: `name` is not backed by tfds.
    DataNotFoundError: TensorFlow is not installed.
  """
  DATASETS.get(name)
  if name not in _TFDS_NAMES:
    raise ValueError(
        f"{name!r} is not a tfds dataset; prepare() handles {', '.join(sorted(_TFDS_NAMES))}"
    )
  if not _tensorflow_available():
    raise DataNotFoundError(
        f"preparing {name} needs TensorFlow: `pip install tensorflow-cpu` (or the extra "
        "`pip install distill_jax[tf]`), then call prepare again"
    )
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = data_dir or tfds_data_dirs()[0]
  builder = tfds.builder(_TFDS_NAMES[name], data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return data_dir


# ----------------------------------------------------------------------------------------------
# scikit-learn digits.


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  x = (digits.images.astype(np.float32) / np.float32(16.0))[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=0
  )
  return {
      "train": (_read_only(x_train), _read_only(y_train)),
      "test": (_read_only(x_test), _read_only(y_test)),
  }


# ----------------------------------------------------------------------------------------------
# Tiny-ImageNet folder.


def _tiny_imagenet_root() -> str | None:
  root = os.environ.get(DATA_DIR_ENV)
  if not root:
    return None
  for candidate in (
      root, os.path.join(root, "tiny-imagenet-200"), os.path.join(root, "tiny_imagenet")
  ):
    if os.path.isfile(os.path.join(candidate, "wnids.txt")):
      return candidate
  return None


def read_image_folder_tiny_imagenet(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a `tiny-imagenet-200` folder split into numpy arrays.

  Layout: `wnids.txt` (one WordNet id per class), `train/<wnid>/images/*.JPEG` and
  `val/images/*.JPEG` with `val/val_annotations.txt` (`file<TAB>wnid<TAB>...`). Class ids
  follow the sorted WordNet ids (torchvision `ImageFolder` order, as MTT uses); grey images are
  converted to RGB; files are read in sorted order.

  Args:
    root: the folder holding `wnids.txt`.
    split: "train" or "test" (the labelled `val/` images).

  Returns:
    `(x, y)`: float32 `(N, 64, 64, 3)` in [0, 1] and int32 `(N,)`, read-only.
  """
  return _read_tiny_imagenet(_file_key(os.path.join(root, "wnids.txt")), split)


@functools.lru_cache(maxsize=2)
def _read_tiny_imagenet(
    wnids_key: tuple[str, int, int], split: str
) -> tuple[np.ndarray, np.ndarray]:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(wnids_key[0])
  wnids = _read_wnids(root)
  class_ids = {w: i for i, w in enumerate(wnids)}
  paths, labels = [], []
  if split == "train":
    for wnid in wnids:
      image_dir = os.path.join(root, "train", wnid, "images")
      for fname in sorted(os.listdir(image_dir)):
        paths.append(os.path.join(image_dir, fname))
        labels.append(class_ids[wnid])
  else:
    with open(os.path.join(root, "val", "val_annotations.txt"), encoding="utf-8") as f:
      rows = sorted(line.split("\t")[:2] for line in f if line.strip())
    for fname, wnid in rows:
      if wnid not in class_ids:
        raise ValueError(
            f"{root}/val/val_annotations.txt names {wnid!r}, which is not in wnids.txt; "
            "the folder is not a complete tiny-imagenet-200"
        )
      paths.append(os.path.join(root, "val", "images", fname))
      labels.append(class_ids[wnid])
  x = np.empty((len(paths), 64, 64, 3), np.float32)
  for i, path in enumerate(paths):
    with Image.open(path) as image:
      array = np.asarray(image.convert("RGB"))
    if array.shape != (64, 64, 3):
      raise ValueError(f"{path} is {array.shape[:2]}, not 64x64; this is not Tiny-ImageNet")
    x[i] = array.astype(np.float32) / np.float32(255.0)
  return _read_only(x), _read_only(np.asarray(labels, np.int32))


def _read_wnids(root: str) -> list[str]:
  with open(os.path.join(root, "wnids.txt"), encoding="utf-8") as f:
    return sorted(line.strip() for line in f if line.strip())


def _tiny_imagenet_info() -> DatasetInfo:
  root = _tiny_imagenet_root()
  names = tuple(f"class_{i:03d}" for i in range(200))
  if root is not None:
    wnids = _read_wnids(root)
    words = {}
    words_path = os.path.join(root, "words.txt")
    if os.path.isfile(words_path):
      with open(words_path, encoding="utf-8") as f:
        for line in f:
          wnid, _, text = line.rstrip("\n").partition("\t")
          words[wnid] = text.split(",")[0].strip()
    names = tuple(words.get(w, w) for w in wnids)
  return DatasetInfo("tiny_imagenet", len(names), (64, 64, 3), names)


def _load_tiny_imagenet(split: str) -> tuple[np.ndarray, np.ndarray]:
  root = _tiny_imagenet_root()
  if root is None:
    where = os.environ.get(DATA_DIR_ENV) or f"nowhere (${DATA_DIR_ENV} is not set)"
    raise DataNotFoundError(
        f"tiny_imagenet not found in {where}: download "
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it and set "
        f"{DATA_DIR_ENV} to the folder holding tiny-imagenet-200/"
    )
  return read_image_folder_tiny_imagenet(root, split)


# ----------------------------------------------------------------------------------------------
# Registrations.

_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DIGIT_CLASSES = tuple(str(i) for i in range(10))
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
# tfds' imagenette labels are the sorted WordNet ids n01440764 ... n03888605.
_IMAGENETTE_CLASSES = (
    "tench", "English springer", "cassette player", "chain saw", "church", "French horn",
    "garbage truck", "gas pump", "golf ball", "parachute",
)


def _static(info_value: DatasetInfo) -> Callable[[], DatasetInfo]:
  return lambda: info_value


def _imagenet_resized_info() -> DatasetInfo:
  # The WordNet ids ship with tensorflow_datasets; read the file without importing tfds.
  spec = importlib.util.find_spec("tensorflow_datasets")
  names = tuple(f"class_{i:03d}" for i in range(1000))
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(
        list(spec.submodule_search_locations)[0], "image_classification",
        "imagenet_resized_labels.txt",
    )
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
  return DatasetInfo("imagenet_resized/64x64", len(names), (64, 64, 3), names)


DATASETS.register("fashion_mnist", DatasetSource(
    info_fn=_static(DatasetInfo("fashion_mnist", 10, (28, 28, 1), _FASHION_MNIST_CLASSES)),
    load_fn=lambda split: _load_idx_or_tfds(
        "fashion_mnist", split, subfolder="fashion_mnist",
        extra_dirs=(DEBIAN_FASHION_MNIST_DIR,), num_classes=10,
        how_to_get=(
            "install Debian's package (`apt-get install dataset-fashion-mnist`) or set "
            f"{DATA_DIR_ENV} to a folder holding the four Fashion-MNIST IDX files"
        ),
    ),
))
DATASETS.register("mnist", DatasetSource(
    info_fn=_static(DatasetInfo("mnist", 10, (28, 28, 1), _DIGIT_CLASSES)),
    load_fn=lambda split: _load_idx_or_tfds(
        "mnist", split, subfolder="mnist", extra_dirs=(), num_classes=10,
        how_to_get=(
            f"set {DATA_DIR_ENV} to a folder holding the four MNIST IDX files, or "
            + _not_prepared_message("mnist").split("; ", 1)[1]
        ),
    ),
))
DATASETS.register("digits", DatasetSource(
    info_fn=_static(DatasetInfo("digits", 10, (8, 8, 1), _DIGIT_CLASSES)),
    load_fn=lambda split: _digits_splits()[split],
))
DATASETS.register("cifar10", DatasetSource(
    info_fn=_static(DatasetInfo("cifar10", 10, (32, 32, 3), _CIFAR10_CLASSES)),
    load_fn=functools.partial(_load_tfds, "cifar10"),
))
DATASETS.register("cifar100", DatasetSource(
    info_fn=_static(DatasetInfo("cifar100", 100, (32, 32, 3), _CIFAR100_CLASSES)),
    load_fn=functools.partial(_load_tfds, "cifar100"),
))
DATASETS.register("svhn_cropped", DatasetSource(
    info_fn=_static(DatasetInfo("svhn_cropped", 10, (32, 32, 3), _DIGIT_CLASSES)),
    load_fn=functools.partial(_load_tfds, "svhn_cropped"),
))
DATASETS.register("imagenette", DatasetSource(
    info_fn=_static(DatasetInfo(
        "imagenette", 10, (IMAGENETTE_SIZE, IMAGENETTE_SIZE, 3), _IMAGENETTE_CLASSES
    )),
    load_fn=functools.partial(_load_tfds, "imagenette"),
))
DATASETS.register("imagenet_resized/64x64", DatasetSource(
    info_fn=_imagenet_resized_info,
    load_fn=functools.partial(_load_tfds, "imagenet_resized/64x64"),
))
DATASETS.register("tiny_imagenet", DatasetSource(
    info_fn=_tiny_imagenet_info,
    load_fn=_load_tiny_imagenet,
))


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
  """16 hex chars of sha256 over the shapes, dtypes and bytes of `x` and `y`."""
  h = hashlib.sha256()
  for a in (np.ascontiguousarray(x), np.ascontiguousarray(y)):
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()[:16]
