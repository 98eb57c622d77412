"""The chapter's CelebA recipe as a plain Keras script, no cnnflow: the baseline of benchmarks/run.py.

    python benchmarks/plain_celeba.py DIR --train-size 16000 --epochs 2

DIR is CelebA's native layout (img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt).
As in the chapter, a `map` reads, decodes and augments every image every epoch (random 178x178 crop,
resize to 64x64, random flip), then shuffle(1000), repeat, batch(32), steps_per_epoch = 16000 / 32.
Prints one JSON line: seconds per epoch and seconds from process start to the first training step.
"""

import argparse
import hashlib
import json
import math
from pathlib import Path

import tensorflow as tf
from plain_mnist import Timing
from tensorflow import keras


def first_images(folder: Path, partition: str, count: int) -> tuple[list[str], list[float]]:
    """File paths and Male labels (0/1) of the first `count` images of a partition in TFDS's read order,
    the chapter's `take(count)`: TFDS stores a partition sorted by the MD5 of its name + file name."""
    lines = (folder / "list_attr_celeba.txt").read_text().splitlines()
    male = lines[1].split().index("Male") + 1
    labels = {fields[0]: float(fields[male] == "1") for fields in map(str.split, lines[2:]) if fields}
    names = [name for name, part in map(str.split, (folder / "list_eval_partition.txt").read_text().splitlines())
             if part == partition]
    salt = {"0": "train", "1": "validation", "2": "test"}[partition].encode()
    names = sorted(names, key=lambda name: hashlib.md5(salt + name.encode()).hexdigest())[:count]
    return [str(folder / "img_align_celeba" / name) for name in names], [labels[name] for name in names]


def preprocess(path, label, mode="train"):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    if mode == "train":
        image = tf.image.random_crop(image, size=(178, 178, 3))
    else:
        image = tf.image.crop_to_bounding_box(image, offset_height=20, offset_width=0, target_height=178,
                                              target_width=178)
    image = tf.image.resize(image, size=(64, 64))
    if mode == "train":
        image = tf.image.random_flip_left_right(image)
    return image / 255.0, label


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--train-size", type=int, default=16000)
    parser.add_argument("--valid-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    tf.random.set_seed(1)
    train = tf.data.Dataset.from_tensor_slices(first_images(args.folder, "0", args.train_size))
    train = train.map(preprocess).shuffle(1000).repeat().batch(32)
    valid = tf.data.Dataset.from_tensor_slices(first_images(args.folder, "1", args.valid_size))
    valid = valid.map(lambda path, label: preprocess(path, label, mode="eval")).batch(32)
    model = keras.Sequential([
        keras.Input((64, 64, 3)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Dropout(0.5),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Dropout(0.5),
        keras.layers.Conv2D(128, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(256, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1),
    ])
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True), metrics=["accuracy"])
    timing = Timing()
    model.fit(train, validation_data=valid, epochs=args.epochs, steps_per_epoch=math.ceil(args.train_size / 32),
              callbacks=[timing], verbose=0)
    print(json.dumps({"epoch_seconds": timing.epochs, "epoch_cpu_seconds": timing.cpu, "startup_seconds": timing.startup}))


if __name__ == "__main__":
    main()
