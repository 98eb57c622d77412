"""The original MNIST-format IDX files (`train-images-idx3-ubyte.gz`, ...) read from a folder.

MNIST and Fashion-MNIST ship in this format; no internet and no TFDS needed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from cnnflow.components.data.core import CLASS_NAMES, DataError, DataInfo, Partition
from cnnflow.components.registry import register

# IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
_UBYTE = 0x08
_FILE_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzip or not) as an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"Cannot read IDX file {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE:
        raise DataError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} declares shape {shape} but holds {body.size} values: truncated or corrupt")
    return body.reshape(shape)


def _find(folder: Path, partition: str, kind: str) -> Path:
    stem = f"{_FILE_PREFIX[partition]}-{kind}"
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise DataError(f"No {stem}(.gz) in {folder} for the {partition!r} partition; "
                    f"the folder holds: {', '.join(present) or 'nothing'}")


class IdxSource:
    def __init__(self, folder: Path, class_names: tuple[str, ...] | None):
        self.folder = folder
        self._class_names = class_names
        first = next((p for p in ("train", "test") if _has(folder, p)), None)
        if first is None:
            _find(folder, "train", "images-idx3-ubyte")  # raises the message listing the folder
        shape = read_idx(_find(folder, first, "images-idx3-ubyte")).shape
        names = class_names or tuple(str(i) for i in range(int(self.partition(first).labels.max()) + 1))
        self.info = DataInfo(image_shape=(shape[1], shape[2], 1), num_classes=len(names), class_names=names)

    def partition(self, name: str) -> Partition:
        if name not in _FILE_PREFIX:
            raise DataError(f"The idx source has partitions 'train' and 'test', not {name!r}")
        images = read_idx(_find(self.folder, name, "images-idx3-ubyte"))
        labels = read_idx(_find(self.folder, name, "labels-idx1-ubyte")).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{self.folder}: {len(images)} {name} images but {len(labels)} labels")
        return Partition(images[..., np.newaxis], labels)


def _has(folder: Path, partition: str) -> bool:
    stem = f"{_FILE_PREFIX[partition]}-images-idx3-ubyte"
    return (folder / f"{stem}.gz").exists() or (folder / stem).exists()


@register("dataset", "idx")
def idx(name: str, path: str | None = None, data_dir=None, manual_dir=None) -> IdxSource:
    """IDX files in the folder `path`; `name` (mnist, fashion_mnist) picks the class names."""
    if not path:
        raise DataError("data.source=idx needs data.path: the folder with the *-idx3-ubyte.gz / *-idx1-ubyte.gz files")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path={path!r} is not a folder")
    return IdxSource(folder, CLASS_NAMES.get(name))
