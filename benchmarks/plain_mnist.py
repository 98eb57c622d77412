"""The chapter's MNIST recipe as a plain Keras script, no cnnflow: the baseline of benchmarks/run.py.

    python benchmarks/plain_mnist.py DIR --train-size 20000 --epochs 3
    python benchmarks/plain_mnist.py DIR --full      # the whole recipe: 20 epochs, then the test set

Prints one JSON line: seconds per epoch and seconds from process start to the first training step;
with --full (or --test) also the final validation accuracy and the test loss and accuracy, the
chapter's "plain Keras" numbers that README compares cnnflow with.
"""

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import psutil
import tensorflow as tf
from tensorflow import keras


def idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read()
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3]))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(shape)


class Timing(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if not hasattr(self, "startup"):
            self.startup = time.time() - psutil.Process().create_time()

    def on_epoch_begin(self, epoch, logs=None):
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs = getattr(self, "epochs", []) + [time.perf_counter() - self.started]
        self.cpu = getattr(self, "cpu", []) + [time.process_time() - self.cpu_started]  # all threads: a CPU quota does not blur it


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--train-size", type=int, default=50000)
    parser.add_argument("--valid-size", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--test", action="store_true", help="evaluate on the test files after training")
    parser.add_argument("--full", action="store_true", help="the chapter's recipe: 20 epochs, then --test")
    args = parser.parse_args()
    if args.full:
        args.epochs, args.test, args.train_size = 20, True, 50000
    tf.random.set_seed(1)
    images = idx(args.folder / "train-images-idx3-ubyte.gz")[..., None]
    labels = idx(args.folder / "train-labels-idx1-ubyte.gz").astype("int64")
    data = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(10000, reshuffle_each_iteration=False)
    scale = lambda x, y: (tf.cast(x, tf.float32) / 255.0, y)
    valid = data.take(args.valid_size).map(scale).batch(64)
    train = data.skip(args.valid_size).take(args.train_size).map(scale).batch(64)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(32, 5, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 5, padding="same", activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(), keras.layers.Dense(1024, activation="relu"), keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timing = Timing()
    history = model.fit(train, validation_data=valid, epochs=args.epochs, callbacks=[timing], verbose=0)
    result = {"epoch_seconds": timing.epochs, "epoch_cpu_seconds": timing.cpu, "startup_seconds": timing.startup}
    if args.test:
        test_images = idx(args.folder / "t10k-images-idx3-ubyte.gz")[..., None]
        test_labels = idx(args.folder / "t10k-labels-idx1-ubyte.gz").astype("int64")
        test = tf.data.Dataset.from_tensor_slices((test_images, test_labels)).map(scale).batch(64)
        loss, accuracy = model.evaluate(test, verbose=0)
        result |= {"val_accuracy": history.history["val_accuracy"][-1], "test_loss": loss, "test_accuracy": accuracy}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
