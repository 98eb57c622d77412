"""The folder source against Keras' own reader of class folders, measured in one sitting.

    python benchmarks/folder.py [--mnist ../shared/data/fashion-mnist] [--faces 16000] [--repeats 2] [--epochs 3]

Two folders, each trained by the folder recipe's model (fast_cnn sized to the images, global-average
head, batch 64, float32) in alternating separate processes:
- cnnflow: `cnnflow train experiment=folder data.path=DIR` (the folder source: decoded once, cached
  as data.cache plans it, valid carved from train);
- Keras: `keras.utils.image_dataset_from_directory(DIR, validation_split=0.1, subset="both", ...)`
  with the recommended `.cache().prefetch(AUTOTUNE)`, the same model, image size and epochs.

Folders: the first 3,000 Fashion-MNIST training images as class folders (half PNG, half JPEG at
quality 95; from --mnist, else skipped), and --faces generated 178x218 JPEG faces in two class folders
(components/data/celeba_layout.py's faces). Prints, per folder, the median seconds of the epochs
after the first (the first fills the caches) on each side, and the ratio Keras / cnnflow of each
alternated pair (above 1: the folder source is faster), as median (min-max).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for a features.json are noise
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from run import cnnflow_train  # noqa: E402  (benchmarks/run.py)


def fashion_folder(source: Path, root: Path, count: int = 3000) -> Path:
    import numpy as np
    from PIL import Image

    from cnnflow.components.data.core import CLASS_NAMES

    def idx(path: Path) -> np.ndarray:
        raw = gzip.open(path).read()
        shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3]))
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(shape)

    images, labels = idx(source / "train-images-idx3-ubyte.gz"), idx(source / "train-labels-idx1-ubyte.gz")
    for i in range(count):
        folder = root / CLASS_NAMES["fashion_mnist"][labels[i]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:05d}.{'jpg' if i % 2 == 0 else 'png'}", quality=95)
    return root


def faces_folder(root: Path, count: int) -> Path:
    import numpy as np

    from cnnflow.components.data.celeba_layout import face

    rng = np.random.default_rng(0)
    for i in range(count):
        male = bool(i % 2)
        folder = root / ("Male" if male else "Female")
        folder.mkdir(parents=True, exist_ok=True)
        face(male, rng).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def keras_child(folder: str, height: int, width: int, channels: int, epochs: int) -> None:
    """The plain Keras side, run as its own process: prints one JSON line of epoch seconds."""
    import keras
    import tensorflow as tf

    from cnnflow.components.models.fast_cnn import fast_cnn

    train, valid = keras.utils.image_dataset_from_directory(
        folder, validation_split=0.1, subset="both", seed=1, image_size=(height, width), batch_size=64,
        color_mode="grayscale" if channels == 1 else "rgb")
    classes = len(train.class_names)
    scale = lambda x, y: (x / 255.0, y)  # noqa: E731
    train = train.map(scale).cache().prefetch(tf.data.AUTOTUNE)
    valid = valid.map(scale).cache().prefetch(tf.data.AUTOTUNE)
    steps = int(train.cardinality())
    model = fast_cnn((height, width, channels), classes, blocks=None, head="global_average", steps_per_epoch=steps)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(0.004, epochs * steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class Timing(keras.callbacks.Callback):
        seconds: list = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            Timing.seconds.append(time.perf_counter() - self.started)

    history = model.fit(train, validation_data=valid, epochs=epochs, callbacks=[Timing()], verbose=0)
    print(json.dumps({"epoch_seconds": Timing.seconds, "val_accuracy": history.history["val_accuracy"][-1]}))


def keras_side(folder: Path, shape: list[int], epochs: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), *map(str, shape), str(epochs)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cnnflow_side(folder: Path, epochs: int, workdir: Path) -> tuple[dict, list[int]]:
    client, run = cnnflow_train(["experiment=folder", f"data.path={folder}", f"train.epochs={epochs}", "plots=none",
                                 "resume=false"], workdir)
    seconds = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step)]
    with open(client.download_artifacts(run.info.run_id, "features.json")) as features:
        shape = json.load(features)["image_shape"]
    return {"epoch_seconds": seconds, "val_accuracy": run.data.metrics.get("val_accuracy")}, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=HERE.parent.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--faces", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, height, width, channels, epochs = args.child
        return keras_child(folder, int(height), int(width), int(channels), int(epochs))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folders = {}
        if (args.mnist / "train-images-idx3-ubyte.gz").exists():
            folders["3,000 Fashion-MNIST images (PNG + JPEG)"] = fashion_folder(args.mnist, workdir / "fashion")
        if args.faces:
            started = time.perf_counter()
            folders[f"{args.faces:,} generated 178x218 JPEG faces"] = faces_folder(workdir / "faces", args.faces)
            print(f"generated {args.faces:,} faces in {time.perf_counter() - started:.0f} s", flush=True)
        print(f"{'folder':<44}{'cnnflow s/epoch':>17}{'Keras s/epoch':>15}   Keras / cnnflow, paired")
        for label, folder in folders.items():
            ours, theirs = [], []
            for _ in range(args.repeats):  # alternate: a slow phase of the machine hits both
                result, shape = cnnflow_side(folder, args.epochs, workdir)
                ours.append(statistics.median(result["epoch_seconds"][1:]))
                theirs.append(statistics.median(keras_side(folder, shape, args.epochs)["epoch_seconds"][1:]))
            ratios = [k / c for k, c in zip(theirs, ours)]
            print(f"{label:<44}{statistics.median(ours):>17.2f}{statistics.median(theirs):>15.2f}   "
                  f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}); image shape {shape}",
                  flush=True)


if __name__ == "__main__":
    main()
