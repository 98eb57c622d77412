"""The tf.data pipeline every source shares: encoded images decoded in parallel, the transforms,
the cache the plan chooses (caching.py), and epochs that draw the same whatever stage they start at.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnflow.components.data import caching
from cnnflow.components.data.core import Records, as_written, decoded, partition_of, source_from, source_options
from cnnflow.components.data.splits import Split, examples, fingerprint_of


def model_input_shape(data: dict[str, Any], image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape images have after the evaluation transforms: what the model's input must take."""
    return tuple(_model_input(data, image_shape).shape)


def _model_input(data: dict[str, Any], image_shape: tuple[int, ...]):
    """A blank image through the evaluation transforms."""
    import tensorflow as tf

    from cnnflow.components.augment import compose

    return compose(data["transforms"]["eval"])(tf.zeros(image_shape, tf.uint8), tf.zeros(2, tf.int64))


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
