"""What every data source shares: partitions, split strings, the fixed-seed split and the tf.data pipeline.

A data source (registered as kind "dataset") returns a `Source`: its features (`DataInfo`) and its
partitions ("train", "test", ...) as arrays. Which examples train, validate and test is set by
TFDS-style split strings (`train`, `test[:8000]`, `train[10%:]`) and sizes, the same for every source:

    train_split: train     valid_split: null (carve valid_size from the shuffled train pool)
    train_size: 50000      valid_size: 10000     shuffle_buffer: 10000     test_split: test
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from cnnflow.components import compat, registry
from cnnflow.components.data import caching, fingerprint
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


# ------------------------------------------------------------------------------------------ split

@dataclass(frozen=True)
class Split:
    """Which examples of which partition each of train/valid/test uses, and, once a run has recorded
    them, what they held (fingerprint.py): each role's fingerprint and each example's digest."""

    partitions: dict[str, str]  # role -> partition name
    indices: dict[str, np.ndarray]  # role -> positions in that partition
    fingerprints: dict[str, str] = field(default_factory=dict)  # role -> hex SHA-256 of its examples and labels
    digests: dict[str, np.ndarray] = field(default_factory=dict)  # role -> (n, 32) uint8, one SHA-256 per example

    def sizes(self) -> dict[str, int]:
        return {role: len(positions) for role, positions in self.indices.items()}

    def save(self, path: str | Path) -> str:
        np.savez(path, **{f"{role}_indices": pos for role, pos in self.indices.items()},
                 **{f"{role}_partition": np.array(name) for role, name in self.partitions.items()},
                 **{f"{role}_fingerprint": np.array(value) for role, value in self.fingerprints.items()},
                 **{f"{role}_digests": value for role, value in self.digests.items()})
        return str(path)

    @classmethod
    def load(cls, path: str | Path) -> Split:
        with np.load(path) as saved:
            roles = [key.removesuffix("_indices") for key in saved.files if key.endswith("_indices")]
            recorded = [r for r in roles if f"{r}_fingerprint" in saved.files]  # splits saved before 0.2 have none
            return cls({r: str(saved[f"{r}_partition"]) for r in roles}, {r: saved[f"{r}_indices"] for r in roles},
                       {r: str(saved[f"{r}_fingerprint"]) for r in recorded},
                       {r: saved[f"{r}_digests"] for r in recorded})


def shuffled(positions: np.ndarray, buffer_size: int, seed: int) -> np.ndarray:
    """The order the chapter's `tf.random.set_seed(seed)` then `shuffle(buffer_size,
    reshuffle_each_iteration=False)` gives, so the same seed carves the book's validation images.

    Like the chapter, no op seed is passed: tf.data draws it from the global seed, and setting that
    seed first makes the draw the same whatever ran before in the process. A buffer smaller than the
    data shuffles only locally, exactly like the chapter's pipeline. The order depends only on the
    seeds, the buffer and the count, never on the images, so shuffling positions gives it.
    """
    if buffer_size <= 1 or len(positions) <= 1:
        return positions
    import tensorflow as tf

    tf.random.set_seed(seed)
    order = tf.data.Dataset.range(len(positions)).shuffle(buffer_size, reshuffle_each_iteration=False)
    return positions[next(iter(order.batch(len(positions)))).numpy()]


def _size(data: dict[str, Any], key: str) -> int | None:
    """A subset size: a count, or null / "full" for everything."""
    value = data.get(key)
    if value is None or value == "full":
        return None
    if not isinstance(value, int) or value < 0:
        raise DataError(f"data.{key}={value!r}; use a count of examples, or null / full for all of them")
    return value


def training_pool_size(data: dict[str, Any]) -> int:
    """How many examples a training subset can draw from: the train split, less the validation
    examples carved from it (when there is no valid_split)."""
    pool_name, _ = parse_split(data["train_split"])
    pool = len(split_positions(data["train_split"], len(partition_of(data, pool_name).labels)))
    return pool if data.get("valid_split") else pool - (_size(data, "valid_size") or 0)


def make_split(data: dict[str, Any], seed: int) -> Split:
    """Train, validation and test positions as `data` configures them; same settings, same split."""
    pool_name, _ = parse_split(data["train_split"])
    pool = shuffled(split_positions(data["train_split"], len(partition_of(data, pool_name).labels)),
                    data.get("shuffle_buffer") or 0, seed)
    valid_size, train_size = _size(data, "valid_size"), _size(data, "train_size")
    if data.get("valid_split"):
        valid_name, _ = parse_split(data["valid_split"])
        valid = split_positions(data["valid_split"], len(partition_of(data, valid_name).labels))[:valid_size]
        train = pool[:train_size]
    else:
        valid_name, valid_size = pool_name, valid_size or 0
        if valid_size >= len(pool):
            raise DataError(f"data.valid_size={valid_size} leaves no training examples: "
                            f"{data['train_split']!r} has only {len(pool)}")
        valid = pool[:valid_size]
        train = pool[valid_size:][:train_size]
    test_name, _ = parse_split(data["test_split"])
    test = split_positions(data["test_split"], len(partition_of(data, test_name).labels))
    wanted = {"train": (train, train_size), "valid": (valid, valid_size)}
    for role, (positions, size) in wanted.items():
        if size is not None and len(positions) < size:
            raise DataError(f"data.{role}_size={size} but only {len(positions)} examples are available "
                            f"for {role}; lower data.{role}_size or widen the split")
    return Split({"train": pool_name, "valid": valid_name, "test": test_name},
                 {"train": train, "valid": valid, "test": test})


def changes(before: Split, after: Split, role: str) -> dict[str, int]:
    """How `role` differs between two recorded splits, example by example, each named by its place
    (partition, position): added, removed, changed (the same place, other bytes) and kept."""
    def placed(split: Split) -> dict[tuple[str, int], bytes]:
        if role not in split.digests:
            raise DataError(f"a split of role {role!r} without recorded examples (cnnflow before 0.2 did not record "
                            f"them): train the run again to compare it")
        partition = split.partitions[role]
        return {(partition, int(position)): digest.tobytes()
                for position, digest in zip(split.indices[role], split.digests[role])}

    old, new = placed(before), placed(after)
    common = old.keys() & new.keys()
    changed = sum(1 for place in common if old[place] != new[place])
    return {"added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys()), "changed": changed,
            "kept": len(common) - changed}


# ---------------------------------------------------------------------------------------- tf.data

def model_input_shape(data: dict[str, Any], image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape images have after the evaluation transforms: what the model's input must take."""
    return tuple(_model_input(data, image_shape).shape)


def _model_input(data: dict[str, Any], image_shape: tuple[int, ...]):
    """A blank image through the evaluation transforms."""
    import tensorflow as tf

    from cnnflow.components.augment import compose

    return compose(data["transforms"]["eval"])(tf.zeros(image_shape, tf.uint8), tf.zeros(2, tf.int64))


def class_counts(data: dict[str, Any], split: Split, class_names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """role -> class name -> number of examples."""
    counts = {}
    for role in split.indices:
        labels = examples(data, split, role).labels
        counts[role] = {name: int(n) for name, n in zip(class_names, np.bincount(labels, minlength=len(class_names)))}
    return counts


def examples(data: dict[str, Any], split: Split, role: str) -> Partition:
    """The images and labels of one role (train, valid or test) of a split."""
    return partition_of(data, split.partitions[role]).take(split.indices[role])


_fingerprints: dict[tuple, fingerprint.Fingerprint] = {}  # once per process for the same examples


def fingerprint_of(data: dict[str, Any], split: Split, role: str) -> fingerprint.Fingerprint:
    """What one role of a split holds now, as read from the source (fingerprint.py)."""
    key = (source_from(data), split.partitions[role],
           hashlib.sha256(np.ascontiguousarray(split.indices[role], dtype=np.int64).tobytes()).hexdigest())
    if key not in _fingerprints:
        if len(_fingerprints) >= 32:  # a long-lived worker: keep the newest
            _fingerprints.pop(next(iter(_fingerprints)))
        _fingerprints[key] = fingerprint.of_partition(examples(data, split, role))
    return _fingerprints[key]


def fingerprinted(data: dict[str, Any], split: Split) -> Split:
    """`split` with what each of its roles holds now recorded in it."""
    found = {role: fingerprint_of(data, split, role) for role in split.indices}
    return replace(split, fingerprints={role: f.digest for role, f in found.items()},
                   digests={role: f.examples for role, f in found.items()})


def check_same_data(data: dict[str, Any], split: Split, run_id: str, roles: tuple[str, ...] | None = None) -> None:
    """Refuses, in one line naming both fingerprints, to go on training, or to evaluate, a run on data
    other than what it recorded (a file overwritten, another folder that holds something else); only
    `roles` when given."""
    for role, recorded in split.fingerprints.items():
        if roles is not None and role not in roles:
            continue
        now = fingerprint_of(data, split, role).digest
        if now != recorded:
            where = data.get("path") or data.get("data_dir") or data.get("manual_dir") or data["source"]
            raise DataError(f"run {run_id} used other data: its {role} examples had fingerprint {recorded[:16]}, "
                            f"{where} now gives {now[:16]}; point data.path at the data it used, or start a new run "
                            f"on this data (cnnflow train ... resume=false)")


def cache_needs(data: dict[str, Any], split: Split) -> dict[str, caching.Need]:
    """What caching each role would take: decoded images for training (cached before the random
    transforms), finished model inputs for evaluation."""
    shape = source_from(data).info.image_shape
    model_input = _model_input(data, shape)
    bytes_each = {"train": int(np.prod(shape)), "eval": model_input.shape.num_elements() * model_input.dtype.size}
    return {role: caching.Need(len(positions), bytes_each["train" if role == "train" else "eval"],
                               partition_of(data, split.partitions[role]).encoded is not None)
            for role, positions in split.indices.items()}


def make_dataset(data: dict[str, Any], split: Split, role: str, seed: int, cache: str | None = None,
                 epochs: range = range(1), skip: int = 0):
    """A batched, prefetched tf.data pipeline for one role; train-time transforms only for "train".

    Encoded images are read and decoded in parallel. Decoded training images (before the random
    transforms) and finished evaluation images are kept where `cache` says (memory | disk | none;
    default: as `data.cache` plans it, see caching.py). For "train" the pipeline serves `epochs`
    (counted from 0) one after the other, and what an epoch draws (its order, each example's
    transform seed) depends on the seed and the epoch's number alone: a training resumed or
    continued at epoch k gets exactly what epoch k of one uninterrupted training got. `skip`: batches
    of the first epoch not served (a training resumed inside it), skipped before they are transformed.
    """
    import tensorflow as tf

    from cnnflow.components.augment import compose

    chosen = examples(data, split, role)
    where = cache or (caching.plan(data, cache_needs(data, split))[role] if role in caching.CACHED_ROLES else "none")
    training = role == "train"
    transform = compose(data["transforms"]["train" if training else "eval"])
    if isinstance(chosen.images, Records):
        images = chosen.images.dataset()
    else:
        images = tf.data.Dataset.from_tensor_slices(chosen.images)
    if chosen.encoded:
        shape, fit = chosen.fit_to or source_from(data).info.image_shape, chosen.fit_to is not None
        images = images.map(as_written(lambda item: decoded(item, chosen.encoded, shape, fit)),
                            num_parallel_calls=tf.data.AUTOTUNE)
    dataset = tf.data.Dataset.zip(images, tf.data.Dataset.from_tensor_slices(chosen.labels))
    if not training:
        no_seed = tf.zeros(2, tf.int64)  # evaluation transforms are deterministic
        dataset = dataset.map(as_written(lambda image, label: (transform(image, no_seed), label)),
                              num_parallel_calls=tf.data.AUTOTUNE)
        dataset = _kept(dataset, where, data, split, role, data["transforms"]["eval"])
        return _untuned(dataset.batch(data["batch_size"]).prefetch(tf.data.AUTOTUNE))
    dataset = _kept(dataset, where, data, split, role, "decoded")

    @as_written
    def epoch(number):
        key = tf.constant(seed, tf.int64) * EPOCH_KEYS + number  # one key per (seed, epoch)
        ordered = dataset
        if data.get("shuffle_each_epoch"):
            ordered = dataset.shuffle(data["shuffle_each_epoch"], seed=key, reshuffle_each_iteration=False)
        seeds = tf.data.Dataset.range(len(chosen.labels)).map(as_written(lambda index: tf.stack([key, index])))
        first = tf.cast(number == epochs.start, tf.int64)
        augmented = tf.data.Dataset.zip(ordered, seeds).skip(first * skip * data["batch_size"]).map(
            as_written(lambda example, pair: (transform(example[0], pair), example[1])),
            num_parallel_calls=tf.data.AUTOTUNE)
        return augmented.batch(data["batch_size"])  # per epoch: its last batch is its own remainder

    served = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch)
    return _untuned(served.prefetch(tf.data.AUTOTUNE))


def as_written(fn):
    """`fn` traced by tf.data as it is written. By default AutoGraph first rewrites it (for Python `if`
    and `for` on tensors), and its first use cost a third of a second of every training's start
    (benchmarks/LOG.md, "Start-up"); the pipeline's functions are TensorFlow ops alone, and Keras
    leaves its own step functions unconverted the same way. Transforms from plugins are converted on
    their own (augment.compose)."""
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(fn)


def _untuned(dataset):
    """`dataset` without tf.data's autotuning thread. That thread sleeps between passes, for up to
    a minute once an iterator is old, and TensorFlow 2.21 often waited out the sleep when Keras dropped
    the iterator at the end of a fit: 2-60 s after a training's last epoch, in most search trials run
    by a worker (benchmarks/README). Untuned, AUTOTUNE keeps tf.data's starting values, and
    epochs measured here were as fast."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


EPOCH_KEYS = 1 << 20  # epochs a run can have before two (seed, epoch) keys could meet


def steps_per_epoch(data: dict[str, Any], split: Split) -> int:
    """Batches in one training epoch (the last one may be short)."""
    return -(-len(split.indices["train"]) // data["batch_size"])


def _kept(dataset, where: str, data: dict[str, Any], split: Split, role: str, stage: Any):
    """`dataset` cached where the plan says; a disk cache is named by the content it is made from
    (the examples' fingerprint, never a path or a folder's time) and how it is made from it."""
    if where == "memory":
        return dataset.cache()
    if where != "disk":
        return dataset
    import tensorflow as tf

    contents = {"format": 2, "tensorflow": tf.__version__, "stage": stage, "source": data["source"],
                "options": source_options(data), "examples": fingerprint_of(data, split, role).digest}
    fit_to = partition_of(data, split.partitions[role]).fit_to
    if fit_to:  # a folder's size chosen from all its images: others added elsewhere may change it
        contents["fit_to"] = list(fit_to)
    cap = data.get("cache_max_gb")
    return caching.on_disk(dataset, caching.cache_dir(data), f"{role}-{caching.key(contents)}",
                           None if cap is None else int(cap * 2**30))
