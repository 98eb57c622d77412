"""The original MNIST-format IDX files (`train-images-idx3-ubyte.gz`, ...) read from a folder.

MNIST and Fashion-MNIST ship in this format; no internet and no TFDS needed.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from cnnflow.components.data.core import CLASS_NAMES, DataError, DataInfo, Partition
from cnnflow.components.registry import register

# IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
# big-endian 32-bit size per dimension.
_UBYTE = 0x08
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_KINDS = {3: "an images file (count, rows, columns)", 1: "a labels file (count)"}


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """One IDX file (gzip or not) as an array of its declared shape; `ndim` is what the file must hold
    (3: images, 1: labels). Every problem is one line naming the file."""
    raw = _read(path)
    shape = _shape(raw, path, ndim)
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * len(shape))
    if body.size != int(np.prod(shape)) or 0 in shape:
        raise DataError(f"{path} declares shape {shape} but holds {body.size} values: truncated or corrupt")
    return body.reshape(shape)


def idx_shape(path: Path, ndim: int) -> tuple[int, ...]:
    """The shape an IDX file declares, from its header alone (the whole file is checked when read)."""
    return _shape(_read(path, 4 + 4 * ndim), path, ndim)


def _read(path: Path, size: int = -1) -> bytes:
    """The file's bytes (ungzipped), or its first `size`. A whole gzip file is decompressed in one
    call, which holds no lock: another thread goes on meanwhile (read_ahead in core.py)."""
    try:
        if not path.is_file():
            raise DataError(f"{path} is not a regular file")
        if size < 0:
            raw = path.read_bytes()
            return gzip.decompress(raw) if path.suffix == ".gz" else raw
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            return handle.read(size)
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read IDX file {path}: {_read_failure(error)}") from None


def _shape(raw: bytes, path: Path, ndim: int | None) -> tuple[int, ...]:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE:
        raise DataError(f"{path} is not an unsigned-byte IDX file (header {raw[:4].hex() or 'empty'}; expected 000008..)")
    declared = raw[3]
    if ndim is not None and declared != ndim:
        raise DataError(f"{path} holds {declared} dimension(s) but should be {_KINDS.get(ndim, f'{ndim}-dimensional')}: "
                        f"is it the wrong file under this name?")
    if len(raw) < 4 + 4 * declared:
        raise DataError(f"{path} ends inside its header: truncated")
    return tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(declared))


def _read_failure(error: OSError | EOFError) -> str:
    # gzip raises EOFError (no strerror) when the stream stops before its end marker: a cut download
    if isinstance(error, EOFError):
        return "the gzip stream ends early: the file is truncated (an interrupted download?)"
    if isinstance(error, gzip.BadGzipFile) or "gzip" in str(error):
        return "not a gzip file, or a damaged one"
    return error.strerror or str(error)


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
        shape = idx_shape(_find(folder, first, "images-idx3-ubyte"), ndim=3)  # the pixels are read once, when used
        names = class_names or tuple(str(i) for i in range(int(read_idx(_find(folder, first, "labels-idx1-ubyte"),
                                                                        ndim=1).max()) + 1))
        self.info = DataInfo(image_shape=(shape[1], shape[2], 1), num_classes=len(names), class_names=names)

    def partition(self, name: str) -> Partition:
        if name not in _FILE_PREFIX:
            raise DataError(f"The idx source has partitions 'train' and 'test', not {name!r}")
        images_file, labels_file = _find(self.folder, name, "images-idx3-ubyte"), _find(self.folder, name, "labels-idx1-ubyte")
        images, labels = read_idx(images_file, ndim=3), read_idx(labels_file, ndim=1).astype(np.int64)
        if len(images) != len(labels):
            raise DataError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
        if hasattr(self, "info") and images.shape[1:] != self.info.image_shape[:2]:
            raise DataError(f"{images_file} holds {images.shape[1]}x{images.shape[2]} images; the other partition's are "
                            f"{self.info.image_shape[0]}x{self.info.image_shape[1]}")
        if self._class_names and labels.max() >= len(self._class_names):
            position = int(np.argmax(labels >= len(self._class_names)))
            raise DataError(f"{labels_file}: label {labels[position]} at position {position} is outside the "
                            f"{len(self._class_names)} classes 0..{len(self._class_names) - 1}")
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
