"""What every data source shares: features (`DataInfo`), partitions of images and labels, the
`Source` protocol, and a source made once per process from `data.*` settings.

A data source (registered as kind "dataset") returns a `Source`: its features and its partitions
("train", "test", ...) as arrays or as records streamed from their files. Which examples train,
validate and test is splits.py; the tf.data pipeline that serves them is pipeline.py.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import numpy as np

from cnnflow.components import compat, registry
from cnnflow.components.errors import DataError, SettingsError


@dataclass(frozen=True)
class DataInfo:
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    note: str = ""  # what the source chose from the data or passed over, said in the flow's data line
    any_size: bool = False  # images of any size and colour are fitted to image_shape (a folder of one's own)


class Records:
    """Encoded images that stay in their files (TFDS's TFRecords) and are read in file order by
    tf.data, so a partition of any size costs no memory. Indexing with positions selects them like a
    numpy array would, except that a selection keeps file order (a stream cannot jump back)."""

    def __init__(self, read: Callable[[], Any], positions: np.ndarray):
        self._read = read  # () -> tf.data.Dataset of the encoded images, the whole partition in file order
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):  # one image (for figures): read up to it
            return next(iter(self._read().skip(int(self.positions[index])).take(1))).numpy()
        return Records(self._read, np.sort(self.positions[index]))

    def dataset(self):
        """The selected encoded images, streamed: the partition is read up to the last selected one."""
        import tensorflow as tf

        selected = np.zeros(int(self.positions.max()) + 1 if len(self.positions) else 0, dtype=bool)
        selected[self.positions] = True
        wanted = tf.constant(selected)
        # its size stated: Keras warns "Your input ran out of data" at the end of every evaluation of a
        # dataset whose size it does not know, and a copy that holds fewer fails where it is read
        return (self._read().take(len(selected)).enumerate()
                .filter(as_written(lambda position, _: wanted[position])).map(as_written(lambda _, image: image))
                .apply(tf.data.experimental.assert_cardinality(len(self.positions))))


def fewer_images(yielded: int, holds: int) -> DataError:
    return DataError(f"the data source yielded {yielded} images where the split holds {holds} (an incomplete or "
                     f"damaged copy of the data?); no metrics are recorded from them")


@contextlib.contextmanager
def read_in_full():
    """tf.data's failure for a stream that holds fewer images than its stated size, as the DataError
    it is (what a run reads inside is read whole or not at all)."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.FailedPreconditionError as error:
        counts = compat.cardinality_shortfall(error)
        if not counts:
            raise
        raise fewer_images(counts[1], counts[0]) from None


@dataclass(frozen=True)
class Partition:
    """Images and labels of one partition. Small datasets hold pixels; large ones hold encoded images
    (`encoded="path"`: JPEG/PNG file paths, `"bytes"`: the encoded bytes, in memory or as `Records`
    streamed from files) decoded inside tf.data."""

    images: np.ndarray | Records  # (n, height, width, channels) uint8, or (n,) paths / encoded bytes
    labels: np.ndarray  # (n,) int64
    encoded: str | None = None
    fit_to: tuple[int, int, int] | None = None  # encoded images of several sizes or colours: made this shape

    def take(self, positions: np.ndarray) -> Partition:
        if isinstance(self.images, Records):
            positions = np.sort(positions)  # streamed images come in file order: keep labels in step
        return replace(self, images=self.images[positions], labels=self.labels[positions])

    def image(self, index: int) -> np.ndarray:
        """One image as uint8 pixels, decoded if need be (for figures; training decodes in tf.data)."""
        if self.encoded is None:
            return self.images[index]
        return decoded(self.images[index], self.encoded, self.fit_to, fit=self.fit_to is not None).numpy()


def decoded(item, encoded: str, shape: tuple[int, ...] | None = None, fit: bool = False):
    """An encoded image (a path or its bytes) as uint8 pixels of `shape` when given. `fit`: images
    of several sizes and colours are resized to its height and width where they differ and given its
    channels (alpha dropped, gray made colour or colour gray)."""
    import tensorflow as tf

    data = tf.io.read_file(item) if encoded == "path" else item
    if not fit:
        image = tf.io.decode_image(data, channels=shape[-1] if shape else 0, expand_animations=False)
        return image if shape is None else tf.ensure_shape(image, shape)
    from cnnflow.components.images import fitted

    return fitted(tf.io.decode_image(data, expand_animations=False), shape)  # BMP, GIF, WebP take no channels=1


class Source(Protocol):
    info: DataInfo

    def partition(self, name: str) -> Partition: ...


# Class names of the datasets that come as bare label numbers.
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
}


def two_sides(image_size: list[int] | None) -> list[int] | None:
    """`data.options.image_size` of a source that resizes: [height, width], or None."""
    if image_size is not None and len(image_size) != 2:
        raise SettingsError(f"data.options.image_size={list(image_size)}: give [height, width], like [128, 128]")
    return image_size


def attribute_classes(attribute: str) -> tuple[str, str]:
    """The two class names of a binary attribute (CelebA's): label 0, then label 1."""
    return ("Female" if attribute == "Male" else f"not {attribute}"), attribute


def as_written(fn):
    """`fn` traced by tf.data as it is written. By default AutoGraph first rewrites it (for Python `if`
    and `for` on tensors), and its first use cost a third of a second of every training's start
    (benchmarks/LOG.md, "Start-up"); the pipeline's functions are TensorFlow ops alone, and Keras
    leaves its own step functions unconverted the same way. Transforms from plugins are converted on
    their own (augment.compose)."""
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(fn)


# ---------------------------------------------------------------------------------------- sources

def source_from(data: dict[str, Any]) -> Source:
    """The configured data source, built once per process for the same settings. It gets the options
    it declares: a recipe may carry options for several sources (celeba_folder's on_bad_image)."""
    _await_read_ahead()
    return _cached_source(data["source"], data["name"], data.get("path"), data.get("data_dir"), data.get("manual_dir"),
                          tuple(sorted((key, tuple(value) if isinstance(value, list) else value)  # hashable
                                       for key, value in source_options(data).items())))


def source_options(data: dict[str, Any]) -> dict[str, Any]:
    """The `data.options` the chosen source declares."""
    return registry.arguments_for("dataset", registry.get("dataset", data["source"]), data.get("options") or {})


@functools.lru_cache(maxsize=4)
def _cached_source(source: str, name: str, path: str | None, data_dir: str | None, manual_dir: str | None,
                   options: tuple[tuple[str, Any], ...]) -> Source:
    return registry.build("dataset", source, name=name, path=path, data_dir=data_dir, manual_dir=manual_dir,
                          **dict(options))


@functools.lru_cache(maxsize=8)
def _cached_partition(source: Source, partition: str) -> Partition:
    return source.partition(partition)


def partition_of(data: dict[str, Any], partition: str) -> Partition:
    return _cached_partition(source_from(data), partition)


def read_ahead(data: dict[str, Any]) -> None:
    """Starts reading the partitions the splits use in a thread of its own, for the flow's
    load_data to find read: a command starts it before it imports MLflow (1.3 s) and sets up its
    store, and gzip's decompression (0.25 s of Fashion-MNIST's training images) holds no lock, so it
    runs on the other core meanwhile. A failure is the flow's to report: load_data reads again."""
    import threading

    global _reading
    if _reading is None and data.get("source") != "tfds":  # a download is not started behind the user's back
        _reading = threading.Thread(target=_read_quietly, args=(data,), name="cnnflow read-ahead", daemon=True)
        _reading.start()


_reading = None


def _read_quietly(data: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):  # raised again, in context, when load_data reads the same files
        checked_partitions(data)


def _await_read_ahead() -> None:
    """Data is read by one thread at a time: every reader waits for a read-ahead to end first."""
    import threading

    global _reading
    if _reading is not None and _reading is not threading.current_thread():
        _reading.join()
        _reading = None


def checked_partitions(data: dict[str, Any]) -> dict[str, Partition]:
    """Every partition the configured splits use, read (so each source's file checks run) and with
    labels inside the source's classes: what would otherwise crash deep in TensorFlow stops here."""
    source = source_from(data)
    names = {parse_split(data[key])[0] for key in ("train_split", "valid_split", "test_split") if data.get(key)}
    partitions = {name: partition_of(data, name) for name in sorted(names)}
    classes = source.info.num_classes
    for name, partition in partitions.items():
        outside = np.flatnonzero((partition.labels < 0) | (partition.labels >= classes))
        if outside.size:
            raise DataError(f"data.source={data['source']} partition {name!r}: label {partition.labels[outside[0]]} at "
                            f"position {outside[0]} is outside the {classes} classes 0..{classes - 1} "
                            f"({outside.size} such labels)")
    return partitions


# ---------------------------------------------------------------------------------- split strings

SPLIT_PATTERN = re.compile(r"^(?P<name>[A-Za-z_][\w-]*)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, slice]:
    """`'test[:8000]'` -> ('test', slice(None, 8000)); percents (`train[:10%]`) as in TFDS."""
    match = SPLIT_PATTERN.match(split.replace(" ", ""))
    if not match:
        raise DataError(f"Bad split string {split!r}; use a partition name with an optional slice, "
                        f"like 'train', 'test[:8000]', 'train[8000:]' or 'train[:10%]'")
    return match["name"], slice(match["start"], match["stop"])


def split_positions(split: str, partition_size: int) -> np.ndarray:
    """Positions in the partition that a split string selects, in file order."""
    _, bounds = parse_split(split)

    def resolve(bound: str | None) -> int | None:
        if bound is None:
            return None
        if bound.endswith("%"):
            return round(int(bound[:-1]) * partition_size / 100)
        return int(bound)

    return np.arange(partition_size)[resolve(bounds.start) : resolve(bounds.stop)]
