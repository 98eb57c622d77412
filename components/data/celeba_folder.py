"""CelebA in its native layout, read directly (no TFDS):

    <path>/img_align_celeba/000001.jpg ...     178x218 RGB JPEGs
    <path>/list_attr_celeba.txt                a count line, the 40 attribute names, then
                                               `000001.jpg -1 1 ...` (one -1/1 per attribute)
    <path>/list_eval_partition.txt             `000001.jpg 0|1|2` (train / validation / test)

Any subset of the official files works (rows without an image are an error, or skipped with a logged
count when `on_bad_image=skip`). Images stay on disk; tf.data decodes them.

A partition's images come in TFDS's read order by default (`order=tfds`), so the first 16,000 are
the 16,000 that the chapter's `celeba_train.take(16000)` takes: TFDS writes each partition sorted by
the MD5 of the partition's name followed by the example's key (here the file name), and reads it back
in that order. `order=file` keeps list_eval_partition.txt's order (000001.jpg, 000002.jpg, ...).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import numpy as np

from cnnflow.components.data.core import DataError, DataInfo, Partition, attribute_classes
from cnnflow.components.registry import register

PARTITIONS = {"0": "train", "1": "validation", "2": "test"}
IMAGE_SHAPE = (218, 178, 3)
_JPEG_MAGIC = b"\xff\xd8\xff"
log = logging.getLogger(__name__)


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Attribute names and, per image file name, its -1/1 values; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"CelebA attribute file {path} is missing")
    lines = path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"{path}:1: expected the number of images, got {lines[0][:60] if lines else 'an empty file'!r}")
    names = lines[1].split()
    rows: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise DataError(f"{path}:{number}: expected a file name and {len(names)} values, got {len(fields)} fields")
        if any(value not in ("1", "-1") for value in fields[1:]):
            raise DataError(f"{path}:{number}: attribute values must be 1 or -1")
        rows[fields[0]] = np.array(fields[1:], dtype=np.int8)
    if int(lines[0]) != len(rows):
        raise DataError(f"{path}:1: says {int(lines[0])} images but lists {len(rows)}")
    return names, rows


def read_partitions(path: Path) -> dict[str, list[str]]:
    """Partition name -> image file names, in file order."""
    if not path.is_file():
        raise DataError(f"CelebA partition file {path} is missing")
    partitions: dict[str, list[str]] = {name: [] for name in PARTITIONS.values()}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in PARTITIONS:
            raise DataError(f"{path}:{number}: expected `<image>.jpg 0|1|2`, got {line[:60]!r}")
        partitions[PARTITIONS[fields[1]]].append(fields[0])
    return partitions


def tfds_order(file_names: list[str], partition: str) -> list[str]:
    """The file names in the order TFDS reads the partition back (see the module docstring)."""
    salt = partition.encode()
    return sorted(file_names, key=lambda name: hashlib.md5(salt + name.encode()).hexdigest())


def _bad_image(path: Path) -> str | None:
    """Why an image cannot be used, or None: missing, or not a JPEG (checked by its first bytes)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(3)
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    return None if head == _JPEG_MAGIC else "not a JPEG"


class CelebaFolder:
    def __init__(self, folder: Path, attribute: str, on_bad_image: str, order: str):
        self.folder, self.on_bad_image, self.order = folder, on_bad_image, order
        names, self._attributes = read_attributes(folder / "list_attr_celeba.txt")
        if attribute not in names:
            raise DataError(f"CelebA has no attribute {attribute!r}; the attributes are: {', '.join(names)}")
        self._column = names.index(attribute)
        self._partitions = read_partitions(folder / "list_eval_partition.txt")
        self.info = DataInfo(IMAGE_SHAPE, 2, attribute_classes(attribute))

    def partition(self, name: str) -> Partition:
        if name not in self._partitions:
            raise DataError(f"CelebA has partitions {', '.join(self._partitions)}, not {name!r}")
        files, problems = [], []
        for file_name in self._partitions[name]:
            path = self.folder / "img_align_celeba" / file_name
            problem = "no attribute row" if file_name not in self._attributes else _bad_image(path)
            if problem:
                problems.append(f"{path} ({problem})")
            else:
                files.append(file_name)
        if problems and self.on_bad_image == "raise":
            raise DataError(f"{len(problems)} unusable CelebA {name} images, e.g. {'; '.join(problems[:3])}; "
                            f"fix them or set data.options.on_bad_image=skip")
        if problems:
            log.warning("skipped %d unusable CelebA %s images, e.g. %s", len(problems), name, "; ".join(problems[:3]))
        if self.order == "tfds":
            files = tfds_order(files, name)
        labels = np.array([self._attributes[f][self._column] == 1 for f in files], dtype=np.int64)
        paths = np.array([str(self.folder / "img_align_celeba" / f) for f in files])
        return Partition(paths, labels, encoded="path")


@register("dataset", "celeba_folder")
def celeba_folder(name: str = "celeb_a", path: str | None = None, data_dir=None, manual_dir=None,
                  attribute: str = "Male", on_bad_image: Literal["raise", "skip"] = "raise",
                  order: Literal["tfds", "file"] = "tfds") -> CelebaFolder:
    """CelebA's native files in the folder `path`; the label is one attribute (Male by default); each
    partition in TFDS's read order (the chapter's subsets) or in file order."""
    if not path:
        raise DataError("data.source=celeba_folder needs data.path: the folder holding img_align_celeba/, "
                        "list_attr_celeba.txt and list_eval_partition.txt")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path={path!r} is not a folder")
    return CelebaFolder(folder, attribute, on_bad_image, order)
