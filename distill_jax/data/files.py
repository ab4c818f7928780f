"""Readers of on-disk dataset formats: IDX files (MNIST, Fashion-MNIST), the tiny-imagenet-200
image folder and prepared tfds copies. `datasets.py` finds the files and registers the datasets."""

import functools
import gzip
import importlib.util
import json
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np


class DataNotFoundError(FileNotFoundError):
  """The dataset's files are not on this machine; the message says how to get them."""

# IDX type codes (third magic byte) -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

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
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
    raise ValueError(
        f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}, expected "
        "00 00 <type> <ndim>); replace it with the original IDX file"
    )
  dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
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


def find_file(directory: str, stem: str) -> str | None:
  """`directory/stem` or `directory/stem.gz`, whichever is a file, else None."""
  for candidate in (stem, stem + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def find_idx_pair(split: str, dirs: Sequence[str]) -> tuple[str, str] | None:
  """The first `(images, labels)` IDX file pair of `split` found in `dirs`, else None."""
  images_stem, labels_stem = IDX_FILES[split]
  for directory in dirs:
    images, labels = find_file(directory, images_stem), find_file(directory, labels_stem)
    if images and labels:
      return images, labels
  return None


def file_key(path: str) -> tuple[str, int, int]:
  """`(absolute path, size, mtime)`: a cache key that changes when the file does."""
  stat = os.stat(path)
  return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def decode_idx_pair(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """NHWC float32 images in [0, 1] and int32 labels of an IDX pair (keys from `file_key`)."""
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
  return read_only(x), read_only(labels.astype(np.int32))


def read_only(array: np.ndarray) -> np.ndarray:
  """`array`, made read-only (decoded arrays are cached and shared)."""
  array.flags.writeable = False
  return array


def read_tiny_imagenet_folder(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
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
  return _read_tiny_imagenet(file_key(os.path.join(root, "wnids.txt")), split)


@functools.lru_cache(maxsize=2)
def _read_tiny_imagenet(
    wnids_key: tuple[str, int, int], split: str
) -> tuple[np.ndarray, np.ndarray]:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(wnids_key[0])
  wnids = read_wnids(root)
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
  return read_only(x), read_only(np.asarray(labels, np.int32))


def read_wnids(root: str) -> list[str]:
  """The sorted WordNet ids of a tiny-imagenet-200 folder's `wnids.txt`."""
  with open(os.path.join(root, "wnids.txt"), encoding="utf-8") as f:
    return sorted(line.strip() for line in f if line.strip())


# ----------------------------------------------------------------------------------------------
# Prepared tfds copies.

TFDS_IMAGE_BATCH = 2048


def version_key(version: str) -> tuple[int, ...]:
  """Sort key of a tfds version string ("3.0.1" -> (3, 0, 1))."""
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
      return data_dir, max(versions, key=version_key)
  return None


def tensorflow_available() -> bool:
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
    for start in range(0, num, TFDS_IMAGE_BATCH):
      records = source.__getitems__(list(range(start, min(start + TFDS_IMAGE_BATCH, num))))
      images = np.stack([to_image(r["image"], image_size) for r in records])
      if x is None:
        # Filled chunk by chunk, so the peak memory is the float32 result itself.
        x = np.empty((num,) + images.shape[1:], np.float32)
      x[start:start + len(records)] = images.astype(np.float32) / np.float32(255.0)
      y[start:start + len(records)] = [int(r["label"]) for r in records]
  elif tensorflow_available():
    dataset = tfds.load(
        f"{tfds_name}:{version}", split=split, data_dir=data_dir, download=False,
        as_supervised=True,
    )
    images, labels = [], []
    for image, label in tfds.as_numpy(dataset):
      images.append(to_image(image, image_size))
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
  return read_only(x), read_only(y)


def to_image(image: np.ndarray, size: int | None) -> np.ndarray:
  """An HWC uint8 image from tfds (HW for grey), resized per `resize_shorter_and_center_crop`
  when `size` is given."""
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
