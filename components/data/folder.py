"""A folder of labelled images, in the layouts Keras' `image_dataset_from_directory`, TFDS's
`ImageFolder` and torchvision's `ImageFolder` read:

    DIR/<class>/<image>                                one subfolder per class, named by the class
    DIR/train/<class>/..., DIR/valid/..., DIR/test/...  the splits given (val, validation: valid)
    data.options.labels=FILE                            a CSV of `path,label` rows, or `path,label,split`
                                                        (paths relative to DIR)

The partitions are train, valid and test. Given ones are used as they are; a missing one is carved
from train, class by class, in the order of a hash of each file's path: the same files every time,
and a file stays where it is when images are added.

PNG, JPEG, BMP, GIF (its first frame) and WebP are decoded by tf.data; TIFF, which TensorFlow does
not read, is converted to PNG once, in the cache folder. Every image is checked once, decoded whole
by Pillow (a cut-off JPEG is found here, not in epoch 3), and its size and colours are kept in the
cache folder under its size and time, so a later run checks only new and changed files. Images of
other sizes than the one chosen (data.options.image_size, else the most common, its longer side at
most MAX_SIDE) are resized when decoded; all-gray folders give one channel.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cnnflow.components.argtypes import OpenFraction, PositiveInt
from cnnflow.components.data.core import DataError, DataInfo, Partition, two_sides
from cnnflow.components.registry import register

SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WebP",
            ".tif": "TIFF", ".tiff": "TIFF"}
CONVERTED = {".tif", ".tiff"}  # formats tf.io.decode_image does not read
SPLIT_FOLDERS = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
PARTITIONS = ("train", "valid", "test")
MAX_SIDE = 160  # a default size from photos of 4000x3000 would not train on a CPU
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scanned:
    """One image as its check found it: its height, width and whether it is gray, or why it is unusable."""

    height: int = 0
    width: int = 0
    gray: bool = False
    problem: str = ""


# ---------------------------------------------------------------------------------- the layouts

def listed(folder: Path, labels: str | None) -> tuple[list[tuple[str, str, str]], collections.Counter]:
    """(partition or "" when not given, class name, path relative to `folder`) of every image file,
    and the files passed over, counted by why."""
    if labels:
        return _from_csv(folder, folder / labels)
    passed: collections.Counter = collections.Counter()
    splits = {SPLIT_FOLDERS[child.name.lower()]: child for child in _subfolders(folder, passed)
              if child.name.lower() in SPLIT_FOLDERS}
    roots = splits.items() if splits else [("", folder)]
    rows = []
    for partition, root in roots:
        for file in root.iterdir():
            if file.is_file():
                passed["file outside the class folders"] += 1
        for class_folder in _subfolders(root, passed):
            if splits and root == folder:
                continue
            for file in _files_under(class_folder, passed):
                rows.append((partition, class_folder.name, str(file.relative_to(folder))))
    if splits:
        passed["folder beside the split folders"] += sum(1 for child in _subfolders(folder, collections.Counter())
                                                         if child.name.lower() not in SPLIT_FOLDERS)
    return rows, passed


def _subfolders(folder: Path, passed: collections.Counter) -> list[Path]:
    found = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            passed["hidden file or folder"] += 1
        elif child.is_dir():
            found.append(child)
    return found


def _files_under(folder: Path, passed: collections.Counter) -> list[Path]:
    """The image files in `folder` and its subfolders, hidden ones and other files counted in `passed`."""
    files = []
    for root, folders, names in os.walk(folder):
        hidden = [name for name in folders if name.startswith(".")]
        passed["hidden file or folder"] += len(hidden)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                passed["hidden file or folder"] += 1
            elif Path(name).suffix.lower() in SUFFIXES:
                files.append(Path(root) / name)
            else:
                passed[f"other file ({Path(name).suffix.lower() or 'no suffix'})"] += 1
    return files


def _from_csv(folder: Path, table: Path) -> tuple[list[tuple[str, str, str]], collections.Counter]:
    if not table.is_file():
        raise DataError(f"data.options.labels={table.name!r}: no such file in {folder}")
    rows, passed = [], collections.Counter()
    with open(table, newline="") as handle:
        for number, fields in enumerate(csv.reader(handle), start=1):
            fields = [field.strip() for field in fields]
            if not fields or not any(fields) or (number == 1 and fields[:2] == ["path", "label"]):
                continue
            if len(fields) not in (2, 3) or not fields[0] or not fields[1]:
                raise DataError(f"{table}:{number}: expected `path,label` or `path,label,split`, got {','.join(fields)[:80]!r}")
            split = fields[2].lower() if len(fields) == 3 else ""
            if split and split not in SPLIT_FOLDERS:
                raise DataError(f"{table}:{number}: split {fields[2]!r} is not one of train, valid (val, validation), test")
            if Path(fields[0]).suffix.lower() not in SUFFIXES:
                passed[f"other file ({Path(fields[0]).suffix.lower() or 'no suffix'})"] += 1
                continue
            rows.append((SPLIT_FOLDERS.get(split, ""), fields[1], fields[0]))
    return rows, passed


# ------------------------------------------------------------------------------ checking images

def scanned(folder: Path, paths: list[str], cache: Path) -> dict[str, Scanned]:
    """Each image checked by decoding it whole, once: results are kept under the file's size and time."""
    from cnnflow.components.durable import write_durably

    kept_file = cache / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.json"
    try:
        kept = json.loads(kept_file.read_text())
    except (OSError, ValueError):
        kept = {}
    results, todo = {}, []
    for path in paths:
        try:
            stat = (folder / path).stat()
            identity = [stat.st_size, stat.st_mtime_ns]
        except OSError as error:
            results[path] = Scanned(problem=f"unreadable ({error.strerror})")
            continue
        entry = kept.get(path)
        if entry and entry[:2] == identity:
            results[path] = Scanned(*entry[2:])
        else:
            todo.append((path, identity))
    if todo:
        if len(todo) > 500:
            log.info("checking %d images in %s (once: the results are kept in %s)", len(todo), folder, cache)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow decodes without the lock
            for (path, identity), result in zip(todo, pool.map(lambda item: _check(folder / item[0]), todo)):
                results[path] = result
                kept[path] = identity + [result.height, result.width, result.gray, result.problem]
        cache.mkdir(parents=True, exist_ok=True)
        write_durably(kept_file, json.dumps(kept))
    return results


def _check(path: Path) -> Scanned:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # the whole image: a cut-off file fails here
            gray = image.mode in _GRAY_MODES or _channels_equal(image)  # gray saved as colour (WebP, GIF, JPEG)
            return Scanned(image.height, image.width, gray)
    except UnidentifiedImageError:
        return Scanned(problem="not an image Pillow reads")
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for damaged files
        return Scanned(problem=f"damaged ({str(error).splitlines()[0][:80]})")


def _channels_equal(image) -> bool:
    """Gray content in a colour file (lossy WebP and JPEG store gray a little off): as predict judges it."""
    from cnnflow.components.images import GRAY_SPREAD

    return bool(np.ptp(np.asarray(image.convert("RGB"), dtype=np.int16), axis=-1).max(initial=0) <= GRAY_SPREAD)


def converted(folder: Path, path: str, cache: Path) -> str:
    """A path tf.data can decode: TIFF converted to PNG in the cache folder (named by the file's
    path, size and time), anything else as it is."""
    source = folder / path
    if source.suffix.lower() not in CONVERTED:
        return str(source)
    from PIL import Image

    stat = source.stat()
    name = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    target = cache / "converted" / f"{name}.png"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            image.convert("L" if image.mode in _GRAY_MODES else "RGB").save(target.with_suffix(".partial.png"))
        os.replace(target.with_suffix(".partial.png"), target)
    return str(target)


# ------------------------------------------------------------------------------------ the source

class ImageFolder:
    def __init__(self, folder: Path, labels: str | None, image_size: list[int] | None, channels: int | None,
                 on_bad_image: str, valid_fraction: float, test_fraction: float):
        from cnnflow.components.data.caching import user_cache

        cache = user_cache() / "folders"
        rows, passed = listed(folder, labels)
        checks = scanned(folder, [path for _, _, path in rows], cache)
        bad = [(path, checks[path].problem) for _, _, path in rows if checks[path].problem]
        if bad and on_bad_image == "raise":
            raise DataError(f"{len(bad)} unusable images in {folder}, e.g. {_named(bad)}; remove them or set "
                            f"data.options.on_bad_image=skip")
        if bad:
            log.warning("skipped %d unusable images in %s: %s", len(bad), folder, _named(bad, len(bad)))
        rows = [row for row in rows if not checks[row[2]].problem]
        if not rows:
            raise DataError(f"data.path={folder} holds no images ({', '.join(sorted(set(SUFFIXES.values())))}) in "
                            f"class subfolders{_passed_over(passed)}")
        self.class_names = tuple(sorted({name for _, name, _ in rows}, key=_natural))
        if len(self.class_names) < 2:
            raise DataError(f"data.path={folder} has one class ({self.class_names[0]}): a classifier needs images "
                            f"of at least two, one subfolder per class")
        self.partitions = carved(rows, valid_fraction, test_fraction, folder)
        shape, said = chosen_shape([checks[path] for _, _, path in rows], image_size, channels)
        counts = ", ".join(f"{role} {len(files)}" + ("" if role == "train" or role in given(rows) else " carved from train")
                           for role, files in self.partitions.items())
        self.info = DataInfo(shape, len(self.class_names), self.class_names, any_size=True,
                             note=f"{len(rows)} images ({counts}); {said}{_passed_over(passed)}")
        self.folder, self.cache = folder, cache

    def partition(self, name: str) -> Partition:
        if name not in self.partitions:
            raise DataError(f"the folder source has partitions {', '.join(PARTITIONS)}, not {name!r}")
        files = self.partitions[name]
        paths = np.array([converted(self.folder, path, self.cache) for path, _ in files])
        number = {name: index for index, name in enumerate(self.class_names)}
        labels = np.array([number[label] for _, label in files], dtype=np.int64)
        # fitted always: a file may hold alpha, or gray as colour (GIF, WebP), whatever its size
        return Partition(paths, labels, encoded="path", fit_to=self.info.image_shape)


def carved(rows: list[tuple[str, str, str]], valid_fraction: float, test_fraction: float,
           folder: Path) -> dict[str, list[tuple[str, str]]]:
    """partition -> [(path, class)]: those given, and the missing ones carved from train per class."""
    pool = {partition: [(path, name) for p, name, path in rows if (p or "train") == partition] for partition in PARTITIONS}
    missing = [(role, fraction) for role, fraction in (("test", test_fraction), ("valid", valid_fraction))
               if role not in given(rows)]
    if not missing:
        return pool
    by_class = collections.defaultdict(list)
    for path, name in pool["train"]:
        by_class[name].append(path)
    needed = 1 + len(missing)
    small = {name: len(paths) for name, paths in by_class.items() if len(paths) < needed}
    if small:
        name, count = next(iter(sorted(small.items())))
        raise DataError(f"class {name!r} has {count} training image(s) in {folder}: carving {' and '.join(r for r, _ in missing)} "
                        f"from train needs at least {needed} per class ({len(small)} such classes); add images, or give "
                        f"{' and '.join(f'{folder}/{r}' for r, _ in missing)}")
    pool["train"] = []
    for name, paths in sorted(by_class.items()):
        places = {path: _place(path) for path in paths}
        left, low = sorted(paths, key=places.get), 0.0
        for number, (role, fraction) in enumerate(missing):  # a band of places per role: a file's role is its path's
            band = [path for path in left if low <= places[path] < low + fraction] or left[:1]  # one at least ...
            band = band[:len(left) - (len(missing) - number)]  # ... and one left for each role after it and train
            pool[role] += [(path, name) for path in band]
            taken = set(band)
            left, low = [path for path in left if path not in taken], low + fraction
        pool["train"] += [(path, name) for path in left]
    return {role: sorted(files) for role, files in pool.items()}


def _place(path: str) -> float:
    """Where a file falls in [0, 1): from its path alone, so adding images moves no other file."""
    return int(hashlib.md5(path.encode()).hexdigest(), 16) / 16**32


def given(rows: list[tuple[str, str, str]]) -> set[str]:
    """The partitions the folder (or the CSV) gives, not carved."""
    return {partition for partition, _, _ in rows if partition}


def chosen_shape(checks: list[Scanned], image_size: list[int] | None, channels: int | None) -> tuple[tuple[int, int, int], str]:
    """The images' (height, width, channels) and the line that says how it was chosen."""
    sizes = collections.Counter((c.height, c.width) for c in checks)
    (height, width), count = sizes.most_common(1)[0]
    gray = all(c.gray for c in checks)
    colour = channels or (1 if gray else 3)
    if image_size:
        said = f"images resized to {image_size[0]}x{image_size[1]} (data.options.image_size)"
        height, width = image_size
    else:
        scale = min(1.0, MAX_SIDE / max(height, width))
        common = f"{height}x{width}"
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
        said = (f"images {height}x{width}" if len(sizes) == 1 and scale == 1 else
                f"images resized to {height}x{width} (the most common size, {common}: {count} of {len(checks)}"
                + (f"; longer side at most {MAX_SIDE}" if scale < 1 else "") + ")")
    said += f", {'gray' if colour == 1 else 'colour'}" + (" (data.options.channels)" if channels else
                                                       " (all gray)" if gray else "")
    return (height, width, colour), said + "; data.options.image_size=[H,W] and data.options.channels=1|3 set them"


def _natural(name: str):
    """Class names in number order when they are numbers (2 before 10), else alphabetical."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _named(bad: list[tuple[str, str]], shown: int = 3) -> str:
    return "; ".join(f"{path} ({problem})" for path, problem in bad[:shown]) + ("; ..." if len(bad) > shown else "")


def _passed_over(passed: collections.Counter) -> str:
    said = [f"{n} {why}" for why, n in sorted(passed.items()) if n]
    return f"; passed over: {', '.join(said)}" if said else ""


@register("dataset", "folder")
def folder(name: str = "folder", path: str | None = None, data_dir=None, manual_dir=None, labels: str | None = None,
           image_size: list[PositiveInt] | None = None, channels: Literal[1, 3] | None = None,
           on_bad_image: Literal["raise", "skip"] = "skip", valid_fraction: OpenFraction = 0.1,
           test_fraction: OpenFraction = 0.1) -> ImageFolder:
    """Labelled images in the folder `path`: class subfolders, train/valid/test folders of them, or a
    CSV of `path,label` (`labels`); missing partitions carved from train (`valid_fraction`,
    `test_fraction` of each class)."""
    if not path:
        raise DataError("data.source=folder needs data.path: the folder with one subfolder of images per class")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={path!r} is not a folder")
    return ImageFolder(root, labels, two_sides(image_size), channels, on_bad_image, valid_fraction, test_fraction)
